"""sample.py: per-image seeds, manifest, grids, Skip-Tuning, guidance and bad input (tiny models, in-process)."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion import build
from diffusion.checkpoint import save_run
from diffusion.config import load_config
from diffusion.metrics import sha256_file

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sample", ROOT / "sample.py")  # a script, not a package module
sample = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample)

SMALL_UNET = ["model.options.block_out_channels=[32,32]", "model.options.attention_levels=[]", "data.resolution=8",
              "schedule.name=vp_linear"]


def make_run(folder: Path, extra: list[str] = ()) -> Path:
    cfg = load_config(None, SMALL_UNET + list(extra))
    cfg = build.resolve(cfg, build.build_data(cfg))
    torch.manual_seed(0)
    net = build.build_network(cfg)
    ema = build.build_network(cfg)  # a different init stands in for the EMA weights
    save_run(folder, net, ema, cfg)
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("cond"), ["model.num_classes=10"])


def images(folder: Path) -> np.ndarray:
    files = json.loads((folder / "samples.json").read_text())["files"]
    return np.stack([np.asarray(Image.open(folder / f)) for f in files])


def call(*args: str) -> int:
    return sample.main([*map(str, args), "--device", "cpu", "--no-progress"])


@pytest.mark.parametrize("opts", [["--sampler", "heun", "--nfe", "5"], ["--sampler", "ddim", "--nfe", "4", "--eta", "1"],
                                  ["--sampler", "adaptive"]])
def test_same_images_whatever_the_batch_size(run_dir, tmp_path, opts):
    outs = []
    for b in (1, 3, 8):
        out = tmp_path / f"b{b}"
        assert call("--run", run_dir, *opts, "--num", 8, "--batch-size", b, "--seed", 100, "--out", out) == 0
        outs.append(images(out))
    assert outs[0].shape == (8, 8, 8) and outs[0].std() > 0
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    # image i depends on seed S+i only: seed 103 reproduces images 3 and 4 of seed 100
    assert call("--run", run_dir, *opts, "--num", 2, "--batch-size", 2, "--seed", 103, "--out", tmp_path / "off") == 0
    assert np.array_equal(images(tmp_path / "off"), outs[0][3:5])
    assert not np.array_equal(outs[0][0], outs[0][1])


def test_manifest_grid_and_npz(run_dir, tmp_path):
    out, grid, npz = tmp_path / "s", tmp_path / "g.png", tmp_path / "s.npz"
    assert call("--run", run_dir, "--sampler", "heun", "--nfe", 5, "--num", 8, "--batch-size", 4, "--seed", 7,
                "--out", out, "--grid", grid, "--npz", npz) == 0
    m = json.loads((out / "samples.json").read_text())
    assert m["sampler"] == "heun" and m["nfe"] == 5 and m["grid"][-1] == 0 and len(m["grid"]) == 4
    assert m["seeds"]["start"] == 7 and m["seeds"]["count"] == 8 and len(m["files"]) == 8
    assert m["checkpoint"]["sha256"] == sha256_file(run_dir / "ema.safetensors") and m["checkpoint"]["ema"]
    assert m["wall_time_s"] > 0 and m["image_shape"] == [1, 8, 8]
    assert Image.open(grid).size == (3 * 32 + 4 * 2, 3 * 32 + 4 * 2)  # 8 images: 3 per row, 8 px shown as 32
    z = np.load(npz, allow_pickle=False)
    assert np.array_equal(z["images"][..., 0], images(out)) and z["seeds"].tolist() == list(range(7, 15))
    assert call("--run", run_dir, "--sampler", "heun", "--nfe", 5, "--num", 2, "--no-ema", "--out", tmp_path / "raw") == 0
    raw = json.loads((tmp_path / "raw" / "samples.json").read_text())["checkpoint"]
    assert raw["sha256"] == sha256_file(run_dir / "model.safetensors") and not raw["ema"]


def test_skip_tuning_and_default_sampler(run_dir, tmp_path):
    assert call("--run", run_dir, "--nfe", 4, "--num", 4, "--out", tmp_path / "a") == 0
    assert call("--run", run_dir, "--nfe", 4, "--num", 4, "--out", tmp_path / "b", "--skip-tuning", 0.3) == 0
    mb = json.loads((tmp_path / "b" / "samples.json").read_text())
    assert mb["skip_tuning"]["factors"][0] == 1.0 and mb["skip_tuning"]["factors"][-1] == pytest.approx(0.3)
    assert mb["nfe"] == 4 and mb["sampler"] == "ipndm"  # the measured default for an NFE budget
    assert not np.array_equal(images(tmp_path / "a"), images(tmp_path / "b"))


def test_mvt_at_an_odd_budget_uses_the_analytical_first_step(run_dir, tmp_path):
    out, grid = tmp_path / "m", tmp_path / "g.png"
    assert call("--run", run_dir, "--sampler", "mvt", "--nfe", 5, "--num", 4, "--out", out, "--grid", grid) == 0
    m = json.loads((out / "samples.json").read_text())
    assert m["nfe"] == 5 and m["options"]["afs"] is True and len(m["grid"]) == 4  # 3 steps, 2*3-1 NFE
    assert Image.open(grid).size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)


def test_class_label_and_guidance(cond_run, tmp_path):
    assert call("--run", cond_run, "--sampler", "euler", "--nfe", 3, "--num", 4, "--out", tmp_path / "c",
                "--class-label", 3, "--cfg-scale", 2.0) == 0
    m = json.loads((tmp_path / "c" / "samples.json").read_text())
    assert m["nfe"] == 6 and m["class_label"] == 3 and m["cfg_scale"] == 2.0  # guidance: two evaluations per step


@pytest.mark.parametrize("args, message", [
    (["--sampler", "nope", "--nfe", "3"], "unknown sampler 'nope'; available samplers: adaptive, ddim"),
    (["--sampler", "euler", "--nfe", "3", "--cfg-scale", "2"], "--cfg-scale 2.0 needs a class-conditional model"),
    (["--sampler", "euler", "--nfe", "3", "--class-label", "0"], "--class-label 0 given, but the model is unconditional"),
    (["--sampler", "euler", "--nfe", "3", "--predictor", "p.safetensors"], "--predictor is for --sampler mvt"),
    (["--sampler", "heun", "--nfe", "4"], "nearest valid budgets: [3, 5]"),  # heun spends 2n-1
    (["--sampler", "euler"], "give an NFE budget"),
])
def test_bad_input_on_unconditional_run(run_dir, tmp_path, capsys, args, message):
    assert call("--run", run_dir, *args, "--num", 2, "--out", tmp_path / "x") == 2
    assert message in capsys.readouterr().err


def test_class_label_out_of_range(cond_run, tmp_path, capsys):
    assert call("--run", cond_run, "--sampler", "euler", "--nfe", 3, "--num", 2, "--out", tmp_path / "x",
                "--class-label", 10) == 2
    assert "--class-label 10 out of range: the model has 10 classes (0..9)" in capsys.readouterr().err


def test_bad_run_folders(run_dir, tmp_path, capsys):
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert call("--run", empty, "--sampler", "euler", "--nfe", 3, "--num", 2, "--out", tmp_path / "x") == 2
    assert "has no ema.safetensors" in capsys.readouterr().err
    other = make_run(tmp_path / "other", ["model.options.block_out_channels=[32,64]"])
    mismatched = tmp_path / "mismatch"
    mismatched.mkdir()
    (mismatched / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    (mismatched / "ema.safetensors").write_bytes((other / "ema.safetensors").read_bytes())
    assert call("--run", mismatched, "--sampler", "euler", "--nfe", 3, "--num", 2, "--out", tmp_path / "y") == 2
    assert "do not fit the network built from its config.yaml" in capsys.readouterr().err


def test_pretrained_source_and_nan_report(tmp_path, capsys):
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler(prediction_type="sample")).save_pretrained(tmp_path / "p")
    assert call("--pretrained", tmp_path / "p", "--sampler", "ddim", "--nfe", 4, "--num", 3, "--out", tmp_path / "s") == 0
    m = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert m["checkpoint"]["kind"] == "pretrained" and m["nfe"] == 4 and len(m["files"]) == 3
    with torch.no_grad():
        unet.conv_out.bias.fill_(float("nan"))
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler(prediction_type="sample")).save_pretrained(tmp_path / "nan")
    assert call("--pretrained", tmp_path / "nan", "--sampler", "ddim", "--nfe", 4, "--num", 3, "--out", tmp_path / "n") == 1
    assert "non-finite" in capsys.readouterr().err


def test_two_processes_write_the_same_images(run_dir, tmp_path):
    """The seeds are split across processes (what `accelerate launch` does), the images do not change."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [sys.executable, str(ROOT / "sample.py"), "--run", str(run_dir), "--sampler", "heun", "--nfe", "3",
            "--num", "5", "--batch-size", "2", "--seed", "9", "--out", str(tmp_path / "mp"), "--device", "cpu",
            "--no-progress"]
    procs = [subprocess.Popen(args, env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                         "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                         "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    assert call("--run", run_dir, "--sampler", "heun", "--nfe", 3, "--num", 5, "--batch-size", 5, "--seed", 9,
                "--out", tmp_path / "sp") == 0
    assert json.loads((tmp_path / "mp" / "samples.json").read_text())["num_processes"] == 2
    assert np.array_equal(images(tmp_path / "mp"), images(tmp_path / "sp"))


def test_grid_name_grid_opt_and_opt_reproduce_a_suite_row(run_dir, tmp_path, capsys):
    import samplers

    out = tmp_path / "g"
    assert call("--run", run_dir, "--sampler", "unipc", "--nfe", 6, "--num", 2, "--out", out, "--grid", "polynomial",
                "--grid-opt", "p=0.7", "--grid-opt", "se_last=0.01", "--opt", "order=3", "--opt", "variant=bh1") == 0
    m = json.loads((out / "samples.json").read_text())
    assert m["grid_name"] == "polynomial" and m["grid_options"] == {"p": 0.7, "se_last": 0.01}
    assert m["options"] == {"order": 3, "variant": "bh1"} and m["sampler"] == "unipc" and m["nfe"] == 6
    assert m["grid"][-2] == pytest.approx(0.01) and len(m["grid"]) == 7
    # the same grid through the Python API
    assert m["grid"] == samplers.grids.make("polynomial", 6, None, p=0.7, se_last=0.01,
                                            se_max=m["grid"][0]).tolist()
    # --grid FILE.png keeps writing the picture of the images
    assert call("--run", run_dir, "--nfe", 5, "--num", 2, "--out", tmp_path / "p", "--grid", tmp_path / "pic.png") == 0
    assert (tmp_path / "pic.png").is_file() and json.loads((tmp_path / "p" / "samples.json").read_text())["grid_name"] is None


@pytest.mark.parametrize("args, msg", [
    (["--grid", "karas"], r"unknown grid 'karas'; valid grids: \[.*'karras', 'polynomial'"),
    (["--grid", "karras", "--grid-opt", "p=2"], r"grid 'karras' has no option\(s\) \['p'\]; valid options: \['se_last', 'se_max', 'rho'\]"),
    (["--grid-opt", "rho=5"], r"--grid-opt \['rho'\] needs --grid NAME"),
    (["--grid", "karras", "--grid-opt", "rho"], r"--grid-opt expects key=value; got 'rho'"),
    (["--sampler", "unipc", "--opt", "rho=3"], r"sampler 'unipc' has no option\(s\) \['rho'\]; valid options: \['order', 'variant'"),
    (["--sampler", "unipc", "--opt", "order=7"], r"unipc order must be one of \[1, 2, 3\]; got 7"),
])
def test_grid_and_opt_errors(run_dir, tmp_path, capsys, args, msg):
    import re

    assert call("--run", run_dir, "--nfe", 5, "--num", 1, "--out", tmp_path / "e", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(msg, err[0]), err
