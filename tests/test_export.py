"""python -m diffusion.export: every shipped recipe (tiny stand-ins) either loads in a stock diffusers
pipeline whose images equal our sampler's at equal noise, or is refused in one line."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion import build
from diffusion.checkpoint import save_run
from diffusion.config import load_config
from diffusion.export import EXPORT_INFO, main as export_main, verify
from samplers.noise import generators

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sample", ROOT / "sample.py")
sample = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample)

# recipe -> (pipeline written, our matching sampler) or None when there is no stock equivalent
EXPECTED = {
    "digits_unet": ("ConsistencyModelPipeline", "EDMEulerScheduler", "euler"),
    "cifar10_unet": ("ConsistencyModelPipeline", "EDMEulerScheduler", "euler"),
    "digits_flow": ("DDPMPipeline", "FlowMatchEulerDiscreteScheduler", "flow_euler"),
    "cifar10_flow": ("DDPMPipeline", "FlowMatchEulerDiscreteScheduler", "flow_euler"),
    "folder256_shifted": ("DDIMPipeline", "DDIMScheduler", "ddim"),
    "digits_dit": None, "imagenet64_dit": None, "gmm2d": None,
}


def test_every_shipped_recipe_is_listed():
    assert sorted(EXPECTED) == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))


def tiny_run(recipe: str, folder: Path) -> Path:
    """The recipe's model/schedule/objective on a tiny net and 8x8 digits (gmm2d keeps its 2-D data)."""
    over = ["model.preset=tiny"] + ([] if recipe == "gmm2d" else ["data.name=digits", "data.root=null", "data.resolution=8"])
    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml", over)
    cfg.data.options = {} if recipe != "gmm2d" else cfg.data.options
    cfg.model.options = {"block_out_channels": [32, 32], "attention_levels": []} if cfg.model.kind == "unet" else {}
    if cfg.model.num_classes:
        cfg.model.num_classes = 10
    if cfg.schedule.shift_base is not None:
        cfg.schedule.shift_base = 4  # 8x8 stands in for 256x256: still a shifted (lower-SNR) schedule
        # logSNR from -6 (not -15): 30 steps cannot teach eps at se = 3600, whose error x0 multiplies by se
        cfg.schedule.options = {"logsnr_min": -6.0}
    torch.manual_seed(0)
    data = build.build_data(cfg)
    cfg = build.resolve(cfg, data)
    model, loss = build.build_score_model(cfg), build.build_loss(cfg)
    if cfg.model.kind == "unet":  # a random net's samples saturate every pixel; 30 steps make them informative
        opt = torch.optim.Adam(model.net.parameters(), lr=3e-3)
        x0 = torch.stack([data[i][0] for i in range(64)]).float()
        for _ in range(30):
            opt.zero_grad()
            loss(model, x0).mean().backward()
            opt.step()
    save_run(folder, model.net, model.net, cfg)
    return folder


def images(folder: Path) -> np.ndarray:
    files = json.loads((folder / "samples.json").read_text())["files"]
    return np.stack([np.asarray(Image.open(folder / f)) for f in files]).astype(int)


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_export_loads_in_stock_diffusers_and_reads_back(recipe, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    run = tiny_run(recipe, tmp_path / "run")
    out = tmp_path / "export"
    rc = export_main([str(run), str(out)])
    msg = capsys.readouterr()
    if EXPECTED[recipe] is None:
        assert rc == 2 and not out.exists()
        line = msg.err.strip()
        assert line.count("\n") == 0 and "no stock diffusers equivalent" in line and "needs" in line, line
        return
    pipeline, scheduler, sampler = EXPECTED[recipe]
    assert rc == 0, msg.err
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe).__name__ == pipeline and type(pipe.scheduler).__name__ == scheduler
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["matching_sampler"] == sampler and len(info["weights_sha256"]) == 64
    # the stock pipeline and our sampler on the scheduler's grid, same per-image noise
    v = verify(run, out, num=3, steps=6, seed=5)
    assert v["nfe"] == 6 and v["max_diff_grey_levels"] < 0.05 and v["max_rel_diff_unclamped"] < 1e-4, v
    # sample.py --pretrained OUT reads it back: with any other sampler the same images as sample.py --run RUN
    # (EDM and flow read back to the same schedule; a DDIM export's record rebuilds the continuous one) ...
    for src, arg in (("run", run), ("pretrained", out)):
        assert sample.main([f"--{src}", str(arg), "--sampler", "ipndm", "--nfe", "6", "--num", "3", "--seed", "5",
                            "--out", str(tmp_path / f"s_{src}"), "--device", "cpu", "--no-progress"]) == 0
    ours, back = images(tmp_path / "s_run"), images(tmp_path / "s_pretrained")
    assert 20 < ours.std() and (ours % 255 != 0).mean() > 0.05  # not all saturated (digits have black backgrounds)
    assert np.array_equal(ours, back)
    # ... and with the scheduler's own sampler the stock pipeline's images (its steps, its start)
    assert sample.main(["--pretrained", str(out), "--sampler", sampler, "--nfe", "6", "--num", "3", "--seed", "5",
                        "--out", str(tmp_path / "native"), "--device", "cpu", "--no-progress"]) == 0
    pipe.set_progress_bar_config(disable=True)
    kw = {"eta": 0.0} if pipeline == "DDIMPipeline" else {}
    theirs = pipe(batch_size=3, generator=generators(5, 3), num_inference_steps=6, output_type="np", **kw).images
    theirs = np.round(theirs * 255).astype(int)
    assert np.abs(images(tmp_path / "native").reshape(theirs.shape) - theirs).max() <= 1


def test_refuses_to_overwrite_and_names_what_is_missing(tmp_path, capsys):
    run = tiny_run("digits_flow", tmp_path / "run")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert export_main([str(run), str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "out" / "keep.txt").exists()
    cfg_path = run / "config.yaml"
    cfg_path.write_text(cfg_path.read_text().replace("conditioning: 1000t", "conditioning: t"))
    assert export_main([str(run), str(tmp_path / "o2")]) == 2
    assert "needs model.parametrization=velocity and model.conditioning=1000t" in capsys.readouterr().err
