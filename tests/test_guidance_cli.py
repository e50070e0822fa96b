"""sample.py's guidance flags: every kind runs and is recorded; bad combinations stop with one line (exit 2)."""

import json

import pytest
import torch

from test_sample_cli import call, make_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("guide")
    return {"uncond": make_run(root / "u"), "cond": make_run(root / "c", ["model.num_classes=10"]),
            "flow": make_run(root / "f", ["schedule.name=flow"]), "wide": make_run(root / "w", ["data.resolution=16"])}


@pytest.mark.parametrize("flags, nfe", [
    (["--guidance", "cfg", "--guidance-scale", "2"], 6),
    (["--cfg-scale", "2"], 6),
    (["--guidance", "interval", "--guidance-scale", "2", "--guidance-interval", "0.5", "3"], None),
    (["--guidance", "apg", "--guidance-scale", "3"], 6),
    (["--guidance", "cfgpp", "--guidance-scale", "0.6"], 6),
    (["--guidance", "cfgzero", "--guidance-scale", "2"], 4),  # the first step is zero-init: no call
])
def test_guidance_kinds_run_and_are_recorded(runs, tmp_path, flags, nfe):
    out = tmp_path / "s"
    assert call("--run", runs["cond"], "--sampler", "euler", "--nfe", 3, "--num", 3, "--out", out, *flags) == 0
    m = json.loads((out / "samples.json").read_text())
    assert m["guidance"]["kind"] in ("cfg", "interval", "apg", "cfgpp", "cfgzero")
    assert m["guidance"]["scale"] == float(flags[-1] if flags[0] == "--cfg-scale" else flags[3])
    if nfe is not None:
        assert m["nfe"] == nfe
    else:  # interval: guided steps cost 2, the others 1
        assert 3 < m["nfe"] < 6


def test_autoguidance_and_upsample_on_an_unconditional_run(runs, tmp_path):
    out = tmp_path / "a"
    assert call("--run", runs["uncond"], "--sampler", "heun", "--nfe", 3, "--num", 2, "--out", out,
                "--guidance", "auto", "--guidance-scale", "2", "--guide-run", runs["uncond"], "--no-ema") == 0
    m = json.loads((out / "samples.json").read_text())
    assert m["nfe"] == 6 and m["guidance"]["guide_run"] == str(runs["uncond"]) and len(m["guidance"]["guide_sha256"]) == 64
    out = tmp_path / "u"
    assert call("--run", runs["uncond"], "--sampler", "euler", "--nfe", 3, "--num", 2, "--out", out,
                "--resolution", 16, "--upsample-scale", 1.0) == 0
    m = json.loads((out / "samples.json").read_text())
    assert m["image_shape"] == [3, 16, 16] or m["image_shape"][1:] == [16, 16]
    assert m["nfe"] == 6 and m["guidance"]["upsample"] == {"resolution": 16, "factor": 2, "scale": 1.0}


@pytest.mark.parametrize("which, flags, message", [
    ("uncond", ["--guidance", "cfg", "--guidance-scale", "2"], "needs a class-conditional model"),
    ("uncond", ["--guidance", "auto", "--guidance-scale", "2"], "--guidance auto needs --guide-run"),
    ("cond", ["--guidance", "interval", "--guidance-scale", "2", "--guidance-interval", "3", "1"], "is empty"),
    ("cond", ["--guidance", "interval", "--guidance-scale", "2"], "needs --guidance-interval"),
    ("cond", ["--guidance", "apg"], "needs --guidance-scale"),
    ("cond", ["--guidance-scale", "2"], "need --guidance"),
    ("uncond", ["--guidance", "auto", "--guidance-scale", "2", "--guide-run", "flow"], "schedule"),
    ("uncond", ["--guidance", "auto", "--guidance-scale", "2", "--guide-run", "wide"], "shape"),
    ("uncond", ["--resolution", "12"], "multiple"),
])
def test_bad_combinations_stop_with_one_line(runs, tmp_path, capsys, which, flags, message):
    flags = [str(runs[f]) if f in runs else f for f in flags]
    assert call("--run", runs[which], "--sampler", "euler", "--nfe", 3, "--num", 2, "--out", tmp_path / "x", *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
