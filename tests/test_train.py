"""The trainer in-process on tiny nets: every recipe runs, resume is bit-exact, NaN and bad input stop cleanly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import diffusion.losses
from diffusion.checkpoint import list_checkpoints, load_run, step_dir
from diffusion.config import load_config
from diffusion.previews import read_metrics
from diffusion.training import NonFiniteLossError, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
_spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
train_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_script)

# nets far smaller than any preset: a step costs milliseconds on one thread
TINY_OPTIONS = {
    "unet": {"block_out_channels": [32, 32], "layers_per_block": 1, "attention_levels": [1]},
    "dit": {"hidden_size": 32, "depth": 1, "num_heads": 2},
    "mlp": {"hidden": 32, "depth": 1, "emb_dim": 16},
}
QUICK = ["train.steps=2", "train.batch_size=4", "train.log_every=1", "train.ckpt_every=0", "train.tensorboard=false",
         "preview.n=4", "data.num_workers=0"]


def image_folder(root: Path, n_per_class: int = 3, classes: tuple[str, ...] = ("cat", "dog"), size: int = 12) -> Path:
    """A tiny folder of random RGB PNGs, one subfolder per class."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def tiny(path: Path | None, overrides: list[str], tmp: Path):
    """A config shrunk for tests: tiny net options replace the recipe's, image data at 8x8."""
    cfg = load_config(path, [f"run_dir={tmp / 'run'}", *QUICK, *overrides])
    opts = dict(TINY_OPTIONS[cfg.model.kind])
    if cfg.model.kind == "dit":
        opts["patch_size"] = int(cfg.model.options.get("patch_size", 2))
    cfg.model.preset = "tiny"
    cfg.model.options = opts
    if cfg.data.name in ("cifar10", "folder"):  # never download: point image recipes at a folder we write
        cfg.data.name, cfg.data.root = "folder", str(image_folder(tmp / "images"))
        cfg.data.options = {"hflip": True, "channels": 3, "class_subfolders": True}
        cfg.model.num_classes = 2 if cfg.model.num_classes else 0
    if cfg.data.name != "gmm2d":
        cfg.data.resolution = 8
    if cfg.preview.sampler == "heun":
        cfg.preview.nfe = 3  # Heun spends 2N - 1
    else:
        cfg.preview.nfe = 4
    return cfg


def sampler_for(cfg):
    return train_script.preview_sampler(cfg.preview.nfe, cfg.preview.sampler, cfg.preview.seed)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_recipe_runs_two_steps_and_leaves_a_loadable_run_folder(path: Path, tmp_path: Path) -> None:
    cfg = tiny(path, [], tmp_path)
    res = train(cfg, sample_fn=sampler_for(cfg))
    run = res.run_dir
    assert res.steps == 2 and np.isfinite(res.final_loss)
    for name in ("config.yaml", "model.safetensors", "ema.safetensors", "samples.png", "loss.png", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2]
    model, saved = load_run(run)
    assert saved.schedule == cfg.schedule and saved.objective == cfg.objective
    shape = list(saved.model.input_shape)
    x = torch.randn(2, *shape)
    labels = torch.tensor([0, 1]) if saved.model.num_classes else None
    with torch.no_grad():
        assert torch.isfinite(model(x, 0.5, labels).x0).all()
    with Image.open(run / "samples.png") as im:  # a grid of 4 tiles (images) or a scatter plot (2-D points)
        assert min(im.size) >= 48


def test_two_processes_worth_of_batch_is_split_and_validated(tmp_path: Path) -> None:
    cfg = tiny(None, ["train.batch_size=6", "train.grad_accum=4"], tmp_path)
    with pytest.raises(Exception, match=r"train.batch_size=6 must be divisible by .* 1 x 4 = 4"):
        train(cfg)


# ---- exact resume -----------------------------------------------------------------------------------

RESUME = ["train.batch_size=8", "train.grad_accum=2", "model.num_classes=10", "model.label_dropout=0.3",
          "optim.warmup_steps=4", "optim.lr=3e-3", "ema.decay=0.9", "train.ckpt_every=3", "train.keep_last=5"]


def _opt_state(folder: Path) -> dict:
    from diffusion.checkpoint import load_optimizer_state

    return load_optimizer_state(folder)


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    """Train 6 steps straight == train 3, stop (new process state), resume, train 3 more."""
    straight = tiny(None, RESUME + ["train.steps=6"], tmp_path / "a")
    straight.model.options.dropout = 0.2  # dropout draws from the global RNG, which must be restored too
    train(straight)

    first = tiny(None, RESUME + ["train.steps=3"], tmp_path / "b")
    first.model.options.dropout = 0.2
    train(first)
    torch.manual_seed(12345)  # disturb the global RNG: resume must restore it, not rely on it
    second = first.copy()
    second.train.steps = 6
    res = train(second, resume="latest")
    assert res.steps == 6

    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    oa, ob = _opt_state(step_dir(a / "checkpoints", 6)), _opt_state(step_dir(b / "checkpoints", 6))
    assert oa["param_groups"] == ob["param_groups"]
    for k in oa["state"]:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa["state"][k][field], ob["state"][k][field]), (k, field)
    la = [m["loss"] for m in read_metrics(a / "metrics.jsonl")]
    lb = [m["loss"] for m in read_metrics(b / "metrics.jsonl")]
    assert len(la) == 6 and la == lb  # same batches, same noise, same dropout, step by step


def test_resume_with_an_incompatible_config_lists_the_differences(tmp_path: Path, capsys) -> None:
    cfg = tiny(None, ["train.ckpt_every=2"], tmp_path)
    train(cfg)
    argv = ["--config", str(ROOT / "configs" / "digits_unet.yaml"), f"run_dir={tmp_path / 'run'}", *QUICK,
            "train.steps=4", "data.resolution=8", "optim.lr=0.5", "ema.decay=0.5", "--resume", "latest"]
    assert train_script.main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "optim.lr: checkpoint has" in err and "this run has 0.5" in err
    assert "ema.decay" in err and "model.options" in err  # the tiny options differ from the recipe's too
    # a fresh run into a folder with checkpoints is refused instead of silently overwriting them
    with pytest.raises(Exception, match="already holds checkpoints.*--resume latest"):
        train(cfg)


# ---- NaN ---------------------------------------------------------------------------------------------


def test_nan_loss_stops_naming_the_step_without_writing_a_checkpoint(tmp_path: Path, monkeypatch) -> None:
    real = diffusion.losses.Objective.__call__
    calls = {"n": 0}

    def poisoned(self, model, x0, class_labels=None, generator=None, draw=None):
        calls["n"] += 1
        loss = real(self, model, x0, class_labels, generator, draw)
        if calls["n"] == 3:  # step 3 of the run: two samples go NaN
            loss = torch.cat([loss[:2] * float("nan"), loss[2:]])
        return loss

    monkeypatch.setattr(diffusion.losses.Objective, "__call__", poisoned)
    cfg = tiny(None, ["train.steps=5", "train.ckpt_every=2"], tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3: 2 of 4 per-sample losses .*"
                                                 r"no checkpoint written.*step_0000002"):
        train(cfg)
    run = tmp_path / "run"
    ckpt_root = run / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpt_root)] == [2]
    assert sorted(p.name for p in ckpt_root.iterdir()) == ["step_0000002"]  # no partial folder either
    assert not (run / "model.safetensors").exists()
    monkeypatch.setattr(diffusion.losses.Objective, "__call__", real)
    cfg.train.steps = 4
    assert train(cfg, resume="latest").steps == 4  # the last good checkpoint resumes


# ---- bad input -------------------------------------------------------------------------------------------


def _main(argv: list[str], capsys) -> tuple[int, str]:
    code = train_script.main(argv)
    return code, capsys.readouterr().err


def test_bad_input_is_one_clear_line(tmp_path: Path, capsys) -> None:
    base = [f"run_dir={tmp_path / 'run'}", *QUICK]
    code, err = _main([*base, "train.stepz=3"], capsys)
    assert code == 2 and "'train.stepz'" in err and "'train.steps'" in err
    code, err = _main([*base, "optim.lr=fast"], capsys)
    assert code == 2 and "'optim.lr'" in err and "'fast'" in err
    missing = tmp_path / "no_such_folder"
    code, err = _main([*base, "data.name=folder", f"data.root={missing}", "data.resolution=8"], capsys)
    assert code == 2 and str(missing) in err and "does not exist" in err
    code, err = _main(["--config", str(ROOT / "configs" / "digits_dit.yaml"), *base, "data.resolution=6",
                       "model.options.patch_size=4"], capsys)
    assert code == 2 and "not divisible by patch_size 4" in err
    code, err = _main([*base, "data.resolution=6", "model.options.block_out_channels=[32,32,32]"], capsys)
    assert code == 2 and "divisible by 2**(num_levels-1) = 4" in err


def test_a_corrupt_image_is_named(tmp_path: Path, capsys) -> None:
    folder = image_folder(tmp_path / "images", n_per_class=2)
    bad = folder / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    code, err = _main([f"run_dir={tmp_path / 'run'}", *QUICK, "data.name=folder", f"data.root={folder}",
                       "data.resolution=8", "data.options.channels=3", "train.batch_size=5"], capsys)
    assert code == 2 and str(bad) in err


def test_time_limit_stops_early_but_saves_everything_and_can_resume(tmp_path: Path) -> None:
    cfg = tiny(None, ["train.steps=50", "train.time_limit_min=1e-9", "train.ckpt_every=10"], tmp_path)
    res = train(cfg)
    run = res.run_dir
    assert res.steps == 1  # the limit is checked after every step
    assert (run / "model.safetensors").is_file() and (run / "ema.safetensors").is_file()
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1]
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [1]  # resumable from where it stopped
    cfg.train.time_limit_min = 0.0
    cfg.train.steps = 3
    assert train(cfg, resume="latest").steps == 3
