"""evaluate.py fid / nll / digits end to end on tiny inputs, offline, and its bad-input errors."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.metrics import digits_reference, sha256_file

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")  # top-level scripts, not packages
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


evaluate, sample = _script("evaluate"), _script("sample")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("UD_INCEPTION_WEIGHTS", raising=False)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # two test workers share two cores (see test_metrics.py)
        yield


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    folder = tmp_path_factory.mktemp("pipe")
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler(prediction_type="sample")).save_pretrained(folder)
    return folder


def digit_folder(folder: Path, start: int, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    x, _ = digits_reference()
    for i, px in enumerate(x[start:start + n]):
        Image.fromarray(np.round(px.reshape(8, 8) * 255).astype(np.uint8)).save(folder / f"{i:05d}.png")
    return folder


def run_json(capsys, *args) -> dict:
    assert evaluate.main([*map(str, args), "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def test_fid_record_from_sample_py_output(pretrained, tmp_path, capsys):
    out = tmp_path / "s"
    assert sample.main(["--pretrained", str(pretrained), "--sampler", "ddim", "--nfe", "4", "--num", "12",
                        "--out", str(out), "--device", "cpu", "--no-progress", "--grid", str(out / "grid.png")]) == 0
    capsys.readouterr()  # sample.py's own summary line
    ref = digit_folder(tmp_path / "ref", 0, 40)
    rec = run_json(capsys, "fid", "--samples", out, "--ref", ref, "--features", "randconv", "--out", tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == rec
    assert rec["num_images"] == 12 and rec["reference"]["num_images"] == 40  # the grid PNG is not a sample
    assert rec["fid"] > 0 and rec["kid"] is not None and rec["cleanfid_mode"] == "custom"
    assert rec["sampling"]["sampler"] == "ddim" and rec["sampling"]["nfe"] == 4
    assert rec["sampling"]["checkpoint"]["sha256"] == sha256_file(pretrained / "unet" / "diffusion_pytorch_model.safetensors")
    assert len(rec["reference"]["sha256"]) == 64 and "50000" in rec["note"]
    same = run_json(capsys, "fid", "--samples", ref, "--ref", ref, "--features", "randconv", "--no-kid", "--no-manifest")
    assert abs(same["fid"]) < 1e-6 and same["sampling"] is None and same["kid"] is None and "kid_note" not in same


def test_digits_command(tmp_path, capsys):
    rec = run_json(capsys, "digits", "--samples", digit_folder(tmp_path / "d", 1000, 300), "--no-manifest")
    assert rec["digits_classifier_score"] > 6 and rec["pixel_frechet_distance_8x8"] < 1.0
    assert rec["num_images"] == 300 and rec["image_size"] == [8, 8]


def test_nll_command_on_a_pretrained_model(pretrained, capsys):
    rec = run_json(capsys, "nll", "--pretrained", pretrained, "--data", "digits", "--num", 2, "--batch-size", 2,
                   "--rtol", "1e-2", "--atol", "1e-2", "--t-eps", "1e-3")
    assert rec["num_samples"] == 2 and rec["dim"] == 64 and rec["nfe_mean"] > 0 and rec["bpd_offset"] == 7
    # bits/dim = nats/dim / ln 2 + 7 for 8-bit data in [-1, 1]
    assert rec["bits_per_dim"] == pytest.approx(rec["nats_per_dim"] / math.log(2) + 7, rel=1e-12)
    assert rec["checkpoint"]["kind"] == "pretrained"


@pytest.mark.parametrize("make, args, message", [
    (lambda p: p.mkdir(), ["fid", "--ref", "{ref}", "--features", "randconv"], "no images"),
    ("mixed", ["fid", "--ref", "{ref}", "--features", "randconv"], "different sizes"),
    ("digits", ["fid", "--ref", "{tmp}/missing", "--features", "randconv"], "not found: expected one of"),
    ("digits", ["fid", "--ref", "{ref}"], "Inception weights not found at"),
    ("digits", ["digits"], None),
])
def test_fid_bad_input(tmp_path, capsys, monkeypatch, make, args, message):
    ref = digit_folder(tmp_path / "ref", 0, 5)
    samples = tmp_path / "samples"
    if make == "digits":
        digit_folder(samples, 5, 5)
    elif make == "mixed":
        digit_folder(samples, 5, 3)
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(samples / "big.png")
    else:
        make(samples)
    monkeypatch.setenv("UD_INCEPTION_WEIGHTS", str(tmp_path / "no-inception.pt"))
    argv = [a.format(ref=ref, tmp=tmp_path) for a in args]
    code = evaluate.main([argv[0], "--samples", str(samples), *argv[1:], "--no-progress", "--no-manifest"])
    err = capsys.readouterr().err
    if message is None:
        assert code == 0
    else:
        assert code == 2 and message in err, err


def test_nll_needs_data_for_a_pretrained_model(pretrained, capsys):
    assert evaluate.main(["nll", "--pretrained", str(pretrained), "--no-progress"]) == 2
    assert "--pretrained needs --data NAME" in capsys.readouterr().err
