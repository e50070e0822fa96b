"""Typed configs: YAML + overrides merge, and bad input names the key, the value and the valid choices."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from diffusion.config import ConfigError, differences, flatten, load_config, schema

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_the_promised_configs() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"digits_unet", "digits_dit", "digits_flow", "gmm2d", "cifar10_unet", "cifar10_flow", "imagenet64_dit",
            "folder256_shifted"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_says_what_it_reproduces(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.run_dir == f"runs/{path.stem}"  # default interpolation runs/${name}
    head = path.read_text().splitlines()[0]
    assert head.startswith("#") and len(head) > 20, "each recipe opens with a comment saying what it reproduces"


def test_yaml_then_overrides_win_and_types_are_converted(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("name: x\ntrain:\n  steps: 10\n  batch_size: 32\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(f, ["train.steps=20", "optim.lr=3", "model.options.dropout=0.1", "schedule.interpolate=[32,128]"])
    assert (cfg.train.steps, cfg.train.batch_size) == (20, 32)
    assert cfg.optim.lr == 3.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.options.dropout == 0.1
    assert list(cfg.schedule.interpolate) == [32, 128]
    assert cfg.run_dir == "runs/x"
    # untouched keys keep the schema defaults
    assert cfg.ema.decay == OmegaConf.select(schema(), "ema.decay")


def test_unknown_key_names_the_key_and_the_closest_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.stepz=3"])
    msg = str(e.value)
    assert "'train.stepz'" in msg and "'train.steps'" in msg and "command line" in msg
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  learning_rate: 1.0e-3\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "'optim.learning_rate'" in msg and str(f) in msg and "lr" in msg and "warmup_steps" in msg
    with pytest.raises(ConfigError, match=r"'trian'.*did you mean 'train'"):
        load_config(None, ["trian.steps=2"])


def test_wrong_type_names_the_key_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'train\.steps'.*'abc'.*Integer"):
        load_config(None, ["train.steps=abc"])
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  betas: [0.9, fast]\n")
    with pytest.raises(ConfigError, match=r"optim\.betas\[1\]"):
        load_config(f)


@pytest.mark.parametrize("override, pattern", [
    ("train.mixed_precision=fp8", r"train\.mixed_precision='fp8'.*valid: \['no', 'fp16', 'bf16'\]"),
    ("model.kind=unett", r"model\.kind='unett'.*did you mean 'unet'"),
    ("data.name=cifar", r"data\.name='cifar'.*cifar10"),
    ("schedule.name=cosin", r"schedule\.name='cosin'.*'cosine'"),
    ("objective.name=epsilon", r"objective\.name='epsilon'.*valid"),
    ("model.parametrization=noise", r"model\.parametrization='noise'.*'eps'"),
    ("train.batch_size=0", r"train\.batch_size must be > 0; got 0"),
    ("model.label_dropout=1.5", r"model\.label_dropout must lie in \[0, 1\]"),
    ("optim.betas=[0.9]", r"optim\.betas must be two numbers"),
    ("schedule.interpolate=[64]", r"schedule\.interpolate must be \[res_low, res_high\]"),
])
def test_bad_values_are_explained(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_bare_no_means_no_mixed_precision() -> None:
    # YAML reads `no` as a boolean; `train.mixed_precision=no` must still mean accelerate's "no"
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"


def test_malformed_overrides_and_missing_files() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="cannot parse overrides"):
        load_config(None, ["model.options={a:[1,2]}"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_differences_list_changed_keys_but_not_resumable_ones() -> None:
    a = load_config(None, ["train.steps=10", "optim.lr=1e-3"])
    b = load_config(None, ["train.steps=20", "optim.lr=2e-3", "model.options.dropout=0.1", "name=other"])
    diff = differences(a, b)
    assert any(line.startswith("optim.lr: checkpoint has 0.001, this run has 0.002") for line in diff)
    assert any(line.startswith("model.options") for line in diff)
    assert not any(line.startswith(("train.steps", "name", "run_dir")) for line in diff)
    assert differences(a, a) == []
    assert flatten(a)["train.steps"] == 10
