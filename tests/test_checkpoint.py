"""Run folders (save_run / load_run) and atomic training checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from diffusion import build
from diffusion.checkpoint import (list_checkpoints, load_run, remove_partial, resolve_checkpoint, save_run,
                                  step_dir, write_checkpoint)
from diffusion.config import ConfigError, load_config
from diffusion.ema import EMA

SMALL_UNET = ["model.options.block_out_channels=[32,32]", "model.options.attention_levels=[]"]


def resolved(overrides: list[str]):
    cfg = load_config(None, overrides)
    return build.resolve(cfg, build.build_data(cfg))


def test_save_then_load_run_rebuilds_the_same_model(tmp_path: Path) -> None:
    cfg = resolved(SMALL_UNET + ["data.resolution=8", "model.parametrization=v", "schedule.name=vp_linear"])
    torch.manual_seed(0)
    net = build.build_network(cfg)
    ema = EMA(net, decay=0.5, warmup=False)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))  # make the EMA differ from the net
    ema.update(net)
    save_run(tmp_path, net, ema.net, cfg)
    assert {p.name for p in tmp_path.iterdir()} == {"config.yaml", "model.safetensors", "ema.safetensors"}

    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.2, 0.5, 0.9])
    for use_ema, ref in ((False, net), (True, ema.net)):
        model, cfg2 = load_run(tmp_path, ema=use_ema)
        assert cfg2.model.parametrization == "v" and list(cfg2.model.input_shape) == [1, 8, 8]
        expected = build.build_score_model(cfg, ref)
        with torch.no_grad():
            assert torch.equal(model(x, t).x0, expected(x, t).x0)
    # the EMA really is a different set of weights
    m_raw, _ = load_run(tmp_path, ema=False)
    m_ema, _ = load_run(tmp_path, ema=True)
    with torch.no_grad():
        assert not torch.equal(m_raw(x, t).native, m_ema(x, t).native)


def test_load_run_schedule_is_shifted_for_the_resolution(tmp_path: Path) -> None:
    cfg = resolved(SMALL_UNET + ["data.resolution=16", "schedule.shift_base=64"])
    save_run(tmp_path, build.build_network(cfg), None, cfg)
    model, _ = load_run(tmp_path, ema=False)
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    from diffusion.schedules import Cosine

    # Simple diffusion: at 16 px the 64-px schedule gets logSNR + 2 log(64/16)
    assert torch.allclose(model.schedule.logsnr(t) - Cosine().logsnr(t), torch.full_like(t, 2 * math.log(4)),
                          atol=1e-12)


def test_interpolated_schedule_from_config_has_the_shifted_endpoints(tmp_path: Path) -> None:
    cfg = resolved(SMALL_UNET + ["data.resolution=8", "schedule.interpolate=[32,128]", "schedule.shift_base=64"])
    sched = build.build_schedule(cfg)
    from diffusion.schedules import Cosine

    base = Cosine()
    # lam(t) = t lam_shift(32)(t) + (1 - t) lam_shift(128)(t): at t=1 the 32-px shift, near t=0 the 128-px one
    assert float(sched.logsnr(1.0) - base.logsnr(1.0)) == pytest.approx(2 * math.log(64 / 32), abs=1e-12)
    assert float(sched.logsnr(0.0) - base.logsnr(0.0)) == pytest.approx(2 * math.log(64 / 128), abs=1e-12)


def test_load_run_without_weights_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        load_run(tmp_path)
    cfg = resolved(SMALL_UNET + ["data.resolution=8"])
    (tmp_path / "config.yaml").write_text(__import__("omegaconf").OmegaConf.to_yaml(cfg))
    (tmp_path / "checkpoints" / "step_0000010").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no ema\.safetensors.*checkpoints up to step 10.*--resume latest"):
        load_run(tmp_path)


def test_weights_that_do_not_fit_the_config_are_rejected(tmp_path: Path) -> None:
    cfg = resolved(SMALL_UNET + ["data.resolution=8"])
    other = resolved(["model.options.block_out_channels=[32,64]", "model.options.attention_levels=[]",
                      "data.resolution=8"])
    save_run(tmp_path, build.build_network(other), None, cfg)  # config says [32,32], weights are [32,64]
    with pytest.raises(Exception, match="size mismatch|does not fit"):
        load_run(tmp_path, ema=False)


def test_model_kind_must_fit_the_data() -> None:
    with pytest.raises(ConfigError, match="model.kind='unet' needs images.*use model.kind=mlp"):
        build.build_network(resolved(["data.name=gmm2d"]))
    with pytest.raises(ConfigError, match="divisible"):  # 3 U-Net levels need a resolution divisible by 4
        build.build_network(resolved(["data.resolution=6", "model.options.block_out_channels=[32,32,32]"]))
    with pytest.raises(ConfigError, match="patch_size"):
        build.build_network(resolved(["data.resolution=6", "model.kind=dit", "model.options.patch_size=4"]))
    with pytest.raises(ConfigError, match="model.num_classes=7 but dataset 'digits' has 10 classes"):
        resolved(["model.num_classes=7"])
    with pytest.raises(ConfigError, match=r"objective: .*unexpected keyword argument 'gamma'"):
        build.build_loss(load_config(None, ["objective.options.gamma=1"]))


# ---- atomic checkpoints ----------------------------------------------------------------------------


def _writer(payload: str, fail: bool = False):
    def write(folder: Path) -> None:
        (folder / "a.txt").write_text(payload)
        if fail:
            raise RuntimeError("killed mid-write")
        (folder / "b.txt").write_text(payload)

    return write


def test_checkpoints_are_renamed_into_place_and_pruned(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        write_checkpoint(tmp_path, step, _writer(str(step)), is_main=True, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]
    assert (step_dir(tmp_path, 6) / "b.txt").read_text() == "6"
    assert resolve_checkpoint("latest", tmp_path) == step_dir(tmp_path, 6)


def test_a_failed_write_leaves_the_previous_checkpoint_and_is_never_listed(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 2, _writer("good"), is_main=True, keep_last=1)
    with pytest.raises(RuntimeError, match="mid-write"):
        write_checkpoint(tmp_path, 4, _writer("bad", fail=True), is_main=True, keep_last=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert (step_dir(tmp_path, 2) / "b.txt").read_text() == "good"
    partial = remove_partial(tmp_path)
    assert [p.name for p in partial] == [".tmp-step_0000004"] and not partial[0].exists()


def test_resolve_checkpoint_errors() -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        resolve_checkpoint("latest", "/nonexistent/checkpoints")
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        resolve_checkpoint("/nonexistent/step_x", "/nonexistent")


@pytest.mark.parametrize("overrides, cls, attrs", [
    (["objective.name=flow", "objective.options.t_sampling=logit_normal"], "FlowMatchingLoss",
     {"t_sampling": "logit_normal"}),
    (["objective.name=v", "objective.options.min_snr_gamma=5"], "VLoss", {"gamma": 5}),
    (["objective.name=multiscale", "objective.options.scales=[1,2]"], "MultiscaleLoss", {"scales": [1, 2]}),
    (["objective.name=edm", "objective.options.p_mean=-1.0"], "EDMLoss", {"p_mean": -1.0}),
])
def test_objective_options_reach_the_loss(overrides: list[str], cls: str, attrs: dict) -> None:
    loss = build.build_loss(load_config(None, overrides))
    assert type(loss).__name__ == cls
    for k, v in attrs.items():
        assert getattr(loss, k) == v
