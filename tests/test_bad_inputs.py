"""Bad input and faults across every CLI and the Python API: one line on stderr, exit status 2, nothing
outside the output folder touched; damaged checkpoints, interrupted sampling, NaN weights and overwrite
attempts never lose or mislabel data. The CLIs run in-process (``main(argv)``) on tiny runs built once."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import distill.__main__ as distill_cli
from diffusion import checkpoint as ckpt_lib
from diffusion.checkpoint import CheckpointError, list_checkpoints, load_run, resolve_checkpoint
from diffusion.cli import OverwriteError, check_device
from diffusion.config import ConfigError, load_config
from diffusion.metrics import digits_reference
from diffusion.training import train

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script_bad", ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


train_py, sample_py, evaluate_py = _script("train"), _script("sample"), _script("evaluate")
MAINS = {"train": train_py.main, "sample": sample_py.main, "evaluate": evaluate_py.main, "distill": distill_cli.main}

TINY = ["data.resolution=8", "model.options.block_out_channels=[32,32]", "model.options.layers_per_block=1",
        "model.options.attention_levels=[]", "train.batch_size=4", "train.log_every=1", "train.tensorboard=false",
        "preview.n=2", "preview.nfe=3", "data.num_workers=0", "train.cpu_threads=1"]


# ---- fixtures: one tiny trained run (with checkpoints), sample folders, digit images ---------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad_inputs")


@pytest.fixture(scope="module")
def run(base) -> Path:
    """A finished 2-step train.py run with checkpoints at steps 1 and 2."""
    assert train_py.main([f"run_dir={base / 'run'}", *TINY, "train.steps=2", "train.ckpt_every=1",
                          "train.keep_last=5"]) == 0
    return base / "run"


@pytest.fixture(scope="module")
def done_no_ckpt(base, run) -> Path:
    """A finished run folder without checkpoints/ (a run shorter than ckpt_every)."""
    dst = base / "finished"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("checkpoints"))
    return dst


@pytest.fixture(scope="module")
def samples(base, run) -> Path:
    out = base / "samples"
    assert sample_py.main(["--run", str(run), "--num", "4", "--nfe", "3", "--out", str(out), "--device", "cpu",
                           "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def digits(base) -> Path:
    folder = base / "digits"
    folder.mkdir()
    x, _ = digits_reference()
    for i, px in enumerate(x[:6]):
        Image.fromarray(np.round(px.reshape(8, 8) * 255).astype(np.uint8)).save(folder / f"{i:06d}.png")
    return folder


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("UD_INCEPTION_WEIGHTS", raising=False)
    torch.set_num_threads(1)


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, int, str]]:
    """Every file under root (except the skipped folders): size, mtime and content hash."""
    out = {}
    for dirpath, _, files in os.walk(root):
        d = Path(dirpath)
        if any(d == s or s in d.parents for s in skip):
            continue
        for f in files:
            p = d / f
            st = p.stat()
            out[str(p)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def call(cli: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a CLI's main in-process; argparse's own errors arrive as SystemExit."""
    try:
        code = MAINS[cli]([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_one_line(code: int, err: str, needle: str) -> None:
    """Exit 2, no traceback, the last stderr line is the error and names the bad value."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert lines and "error" in lines[-1], err
    assert needle in lines[-1], (needle, lines[-1])


# ---- the bad-input table -------------------------------------------------------------------------------
# (id, cli, argv with {run} {done} {samples} {digits} {tmp} {base} placeholders, the bad value the line must name)

T = "train"
S = "sample"
E = "evaluate"
D = "distill"
SAMPLE = ["--run", "{run}", "--num", "2", "--nfe", "3", "--out", "{tmp}/out", "--device", "cpu", "--no-progress"]

CASES = [
    # train.py
    ("train-unknown-key", T, ["run_dir={tmp}/r", *TINY, "train.stepz=3"], "train.stepz"),
    ("train-bad-type", T, ["run_dir={tmp}/r", *TINY, "optim.lr=fast"], "fast"),
    ("train-missing-config", T, ["--config", "{tmp}/nope.yaml", "run_dir={tmp}/r"], "nope.yaml"),
    ("train-bad-precision", T, ["run_dir={tmp}/r", *TINY, "train.mixed_precision=fp8"], "fp8"),
    ("train-fp16-on-cpu", T, ["run_dir={tmp}/r", *TINY, "train.mixed_precision=fp16", "train.steps=1"], "fp16"),
    ("train-preview-sampler", T, ["run_dir={tmp}/r", *TINY, "preview.sampler=nosuch"], "nosuch"),
    ("train-preview-nfe", T, ["run_dir={tmp}/r", *TINY, "preview.sampler=heun", "preview.nfe=4"], "heun"),
    ("train-preview-nfe-zero", T, ["run_dir={tmp}/r", *TINY, "preview.nfe=0"], "preview.nfe"),
    ("train-data-root", T, ["run_dir={tmp}/r", *TINY, "data.name=folder", "data.root={tmp}/no_images"], "no_images"),
    ("train-data-name", T, ["run_dir={tmp}/r", *TINY, "data.name=nosuchdata"], "nosuchdata"),
    ("train-model-kind", T, ["run_dir={tmp}/r", *TINY, "model.kind=transformer"], "transformer"),
    ("train-steps-negative", T, ["run_dir={tmp}/r", *TINY, "train.steps=-1"], "-1"),
    ("train-batch-split", T, ["run_dir={tmp}/r", *TINY, "train.batch_size=3", "train.grad_accum=2"], "batch_size=3"),
    ("train-betas", T, ["run_dir={tmp}/r", *TINY, "optim.betas=[0.9,1.5]"], "1.5"),
    ("train-not-key-value", T, ["run_dir={tmp}/r", *TINY, "train.steps"], "train.steps"),
    ("train-resume-nothing", T, ["run_dir={tmp}/r", *TINY, "--resume", "latest"], "no checkpoint"),
    ("train-resume-bad-path", T, ["run_dir={tmp}/r", *TINY, "--resume", "{tmp}/step_x"], "step_x"),
    ("train-overwrite-finished", T, ["run_dir={done}", *TINY, "train.steps=2"], "train.overwrite=true"),
    ("train-overwrite-checkpoints", T, ["run_dir={run}", *TINY, "train.steps=2"], "train.overwrite=true"),
    ("train-resume-config-diff", T, ["run_dir={run}", *TINY, "train.steps=3", "optim.lr=0.5", "--resume", "latest"],
     "1 key(s): optim.lr: checkpoint has 0.002, this run has 0.5"),
    ("train-resume-nothing-to-do", T, ["run_dir={run}", *TINY, "train.steps=1", "--resume", "latest"], "train.steps=1"),
    ("train-bad-option", T, ["--resum", "latest"], "unrecognized arguments: --resum"),
    # sample.py
    ("sample-num-zero", S, ["--run", "{run}", "--num", "0", "--out", "{tmp}/out"], "got 0"),
    ("sample-batch-negative", S, ["--run", "{run}", "--num", "2", "--batch-size", "-1", "--out", "{tmp}/out"], "-1"),
    ("sample-seed-negative", S, [*SAMPLE, "--seed", "-5"], "-5"),
    ("sample-unknown-sampler", S, [*SAMPLE, "--sampler", "nosuch"], "nosuch"),
    ("sample-predictor-needs-mvt", S, [*SAMPLE, "--predictor", "{tmp}/p.safetensors"], "--predictor"),
    ("sample-predictor-missing", S, [*SAMPLE, "--sampler", "mvt", "--predictor", "{tmp}/p.safetensors"], "p.safetensors"),
    ("sample-run-missing", S, ["--run", "{tmp}/norun", "--num", "2", "--out", "{tmp}/out"], "norun"),
    ("sample-run-not-a-run", S, ["--run", "{digits}", "--num", "2", "--out", "{tmp}/out"], "config.yaml"),
    ("sample-class-label", S, [*SAMPLE, "--class-label", "3"], "--class-label 3"),
    ("sample-cfg-scale", S, [*SAMPLE, "--cfg-scale", "2"], "2.0"),
    ("sample-device-cuda", S, [*SAMPLE[:-3], "--device", "cuda"], "cuda"),
    ("sample-device-garbage", S, [*SAMPLE[:-3], "--device", "banana"], "banana"),
    ("sample-out-used", S, ["--run", "{run}", "--num", "2", "--out", "{samples}"], "--overwrite"),
    ("sample-out-is-file", S, ["--run", "{run}", "--num", "2", "--out", "{run}/config.yaml"], "config.yaml"),
    ("sample-grid-exists", S, [*SAMPLE, "--grid", "{run}/samples.png"], "--overwrite"),
    ("sample-nfe-unreachable", S, [*SAMPLE[:4], "--sampler", "heun", "--nfe", "4", *SAMPLE[6:]], "4 NFE"),
    ("sample-dtype", S, [*SAMPLE, "--dtype", "float8"], "float8"),
    ("sample-num-not-int", S, ["--run", "{run}", "--num", "abc", "--out", "{tmp}/out"], "abc"),
    ("sample-no-out", S, ["--run", "{run}", "--num", "2"], "--out"),
    # evaluate.py
    ("fid-samples-missing", E, ["fid", "--samples", "{tmp}/none", "--ref", "{digits}", "--features", "randconv"], "none"),
    ("fid-no-manifest", E, ["fid", "--samples", "{digits}", "--ref", "{digits}", "--features", "randconv"],
     "--no-manifest"),
    ("fid-unknown-ref", E, ["fid", "--samples", "{samples}", "--ref", "nosuchref", "--features", "randconv"], "nosuchref"),
    ("fid-unknown-features", E, ["fid", "--samples", "{samples}", "--ref", "{digits}", "--features", "nosuchfeat"],
     "nosuchfeat"),
    ("fid-missing-inception", E, ["fid", "--samples", "{samples}", "--ref", "{digits}", "--inception", "{tmp}/i.pt"],
     "i.pt"),
    ("fid-corrupt-inception", E, ["fid", "--samples", "{samples}", "--ref", "{digits}", "--inception", "{corrupt}"],
     "corrupt.pt"),
    ("fid-batch-size", E, ["fid", "--samples", "{samples}", "--ref", "{digits}", "--features", "randconv",
                           "--batch-size", "0"], "--batch-size"),
    ("fid-device-cuda", E, ["fid", "--samples", "{samples}", "--ref", "{digits}", "--device", "cuda"], "cuda"),
    ("nll-rtol-negative", E, ["nll", "--run", "{run}", "--rtol", "-1"], "-1.0"),
    ("nll-atol-zero", E, ["nll", "--run", "{run}", "--atol", "0"], "--atol"),
    ("nll-t-eps", E, ["nll", "--run", "{run}", "--t-eps", "2"], "2.0"),
    ("nll-num-zero", E, ["nll", "--run", "{run}", "--num", "0"], "got 0"),
    ("nll-bits", E, ["nll", "--run", "{run}", "--bits", "0"], "--bits"),
    ("nll-run-missing", E, ["nll", "--run", "{tmp}/norun"], "norun"),
    ("nll-device-cuda", E, ["nll", "--run", "{run}", "--device", "cuda"], "cuda"),
    ("nll-trace", E, ["nll", "--run", "{run}", "--trace", "fast"], "fast"),
    ("nll-data", E, ["nll", "--run", "{run}", "--data", "nosuchdata"], "nosuchdata"),
    ("nll-pretrained-missing", E, ["nll", "--pretrained", "{tmp}/nopipe", "--data", "digits"], "nopipe"),
    ("evaluate-out-clobbers", E, ["digits", "--samples", "{samples}", "--out", "{run}/config.yaml"], "config.yaml"),
    ("digits-no-manifest", E, ["digits", "--samples", "{digits}"], "--no-manifest"),
    ("evaluate-no-command", E, [], "command"),
    # python -m distill
    ("distill-unknown", D, ["sidd"], "sidd"),
    ("sid-teacher-missing", D, ["sid", "--teacher", "{tmp}/noteacher", "--out", "{tmp}/o"], "noteacher"),
    ("sid-teacher-oracle", D, ["sid", "--teacher", "oracle:nosuch", "--out", "{tmp}/o"], "nosuch"),
    ("sid-teacher-pretrained", D, ["sid", "--teacher", "pretrained:{tmp}/nopipe", "--out", "{tmp}/o"], "nopipe"),
    ("sid-teacher-not-a-run", D, ["sid", "--teacher", "{digits}", "--out", "{tmp}/o"], "digits"),
    ("sid-alpha", D, ["sid", "--teacher", "{run}", "--out", "{tmp}/o", "--alpha", "1.5"], "1.5"),
    ("sid-lr", D, ["sid", "--teacher", "{run}", "--out", "{tmp}/o", "--lr", "0"], "0.0"),
    ("sid-batch", D, ["sid", "--teacher", "{run}", "--out", "{tmp}/o", "--batch", "0"], "batch"),
    ("sid-iters", D, ["sid", "--teacher", "{run}", "--out", "{tmp}/o", "--iters", "-3"], "-3"),
    ("sid-beta1", D, ["sid", "--teacher", "{run}", "--out", "{tmp}/o", "--beta1", "1.5"], "1.5"),
    ("sid-max-nan", D, ["sid", "--teacher", "{run}", "--out", "{tmp}/o", "--max-nan-fraction", "2"], "2.0"),
    ("sid-ema", D, ["sid", "--teacher", "{run}", "--out", "{tmp}/o", "--ema-halflife-kimg", "0"], "0.0"),
    ("sid-sig-init", D, ["sid", "--teacher", "{run}", "--out", "{tmp}/o", "--sig-init", "1e9"], "1000000000.0"),
    ("sid-out-is-teacher", D, ["sid", "--teacher", "{run}", "--out", "{run}"], "teacher"),
    ("sid-out-is-finished-run", D, ["sid", "--teacher", "{run}", "--out", "{done}"], "--overwrite"),
    ("sid-resume-and-overwrite", D, ["sid", "--teacher", "{run}", "--out", "{tmp}/o", "--resume", "--overwrite"],
     "--resume"),
    ("sid-resume-nothing", D, ["sid", "--teacher", "{run}", "--out", "{tmp}/o", "--resume"], "--resume"),
    ("sid-mixed-precision", D, ["sid", "--teacher", "{run}", "--out", "{tmp}/o", "--mixed-precision", "fp8"], "fp8"),
    ("sid-prefit-preset", D, ["sid", "--teacher", "oracle:ring2d", "--out", "{tmp}/o", "--prefit-preset", "huge"],
     "huge"),
    ("sid-threads", D, ["sid", "--teacher", "{run}", "--out", "{tmp}/o", "--threads", "-1"], "-1"),
    ("sid-time-limit", D, ["sid", "--teacher", "{run}", "--out", "{tmp}/o", "--time-limit-min", "0"], "0.0"),
    ("reflow-teacher-missing", D, ["reflow", "--teacher", "{tmp}/noteacher", "--out", "{tmp}/o"], "noteacher"),
    ("reflow-pairs", D, ["reflow", "--teacher", "{run}", "--out", "{tmp}/o", "--pairs", "0"], "got 0"),
    ("reflow-val-pairs", D, ["reflow", "--teacher", "{run}", "--out", "{tmp}/o", "--pairs", "100", "--val-pairs", "500"],
     "500"),
    ("reflow-out-is-teacher", D, ["reflow", "--teacher", "{run}", "--out", "{run}"], "teacher"),
    ("reflow-out-is-finished-run", D, ["reflow", "--teacher", "{run}", "--out", "{done}"], "--overwrite"),
    ("amed-teacher-missing", D, ["amed", "--teacher", "{tmp}/noteacher", "--out", "{tmp}/a.safetensors"], "noteacher"),
    ("amed-nfe", D, ["amed", "--teacher", "oracle:ring2d", "--nfe", "0", "--out", "{tmp}/a.safetensors"], "--nfe"),
    ("amed-grid", D, ["amed", "--teacher", "oracle:ring2d", "--grid", "a,b", "--out", "{tmp}/a.safetensors"], "a,b"),
    ("amed-out-exists", D, ["amed", "--teacher", "oracle:ring2d", "--out", "{run}/ema.safetensors"], "--overwrite"),
    ("amed-device", D, ["amed", "--teacher", "oracle:ring2d", "--device", "cuda", "--out", "{tmp}/a.safetensors"],
     "cuda"),
    ("amed-solver", D, ["amed", "--teacher", "oracle:ring2d", "--teacher-solver", "foo", "--out", "{tmp}/a"], "foo"),
    ("grid-opt", D, ["grid", "--teacher", "oracle:ring2d", "--nfe", "3", "--opt", "afs", "--out", "{tmp}/g.json"], "afs"),
    ("grid-sampler", D, ["grid", "--teacher", "oracle:ring2d", "--nfe", "3", "--sampler", "nosuch",
                         "--out", "{tmp}/g.json"], "nosuch"),
    ("grid-out-exists", D, ["grid", "--teacher", "oracle:ring2d", "--nfe", "3", "--out", "{run}/config.yaml"],
     "--overwrite"),
    ("grid-nfe", D, ["grid", "--teacher", "oracle:ring2d", "--nfe", "0", "--out", "{tmp}/g.json"], "--nfe"),
    ("grid-out-is-folder", D, ["grid", "--teacher", "oracle:ring2d", "--nfe", "3", "--out", "{run}"], "folder"),
]


@pytest.mark.parametrize("cli, argv, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(cli, argv, needle, run, done_no_ckpt, samples, digits, base,
                                                   tmp_path, capsys):
    if "cuda" in needle and HAS_CUDA:
        pytest.skip("this machine has a GPU")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 not a torchscript archive" * 8)
    names = {"run": run, "done": done_no_ckpt, "samples": samples, "digits": digits, "tmp": tmp_path, "base": base,
             "corrupt": corrupt}
    argv = [a.format(**names) for a in argv]
    needle = needle.format(**names)
    before = snapshot(base)
    code, _, err = call(cli, argv, capsys)
    assert_one_line(code, err, needle)
    assert snapshot(base) == before  # no file outside the (temporary) output folder changed
    assert not (tmp_path / "o").exists() and not (tmp_path / "out").exists()  # nor was an output started


def test_there_are_at_least_60_cases():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


# ---- the Python API -------------------------------------------------------------------------------------


def test_api_errors_are_typed_and_name_the_value(run, done_no_ckpt, tmp_path):
    import samplers
    from diffusion.oracle import oracle_model, ring2d
    from diffusion.schedules import by_name
    from distill.common import TeacherError, load_teacher
    from distill.sid import SiDConfig, train_sid

    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(None, ["train.stepz=3"])
    with pytest.raises(ValueError, match="nosuch"):
        by_name("nosuch")
    model = oracle_model(ring2d(), by_name("ddpm"))
    with pytest.raises(ValueError, match=r"\[9, 11\]"):
        samplers.sample(model, torch.randn(2, 2, dtype=torch.float64), sampler="heun", nfe=10)
    with pytest.raises(FileNotFoundError, match="norun"):
        load_run(tmp_path / "norun")
    with pytest.raises(TeacherError, match="nosuch"):
        load_teacher("oracle:nosuch")
    with pytest.raises(ValueError, match="alpha"):
        SiDConfig(alpha=2.0).validate()
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="no CUDA GPU"):
            check_device("cuda")
    with pytest.raises(ValueError, match="banana"):
        check_device("banana")
    cfg = load_config(ROOT / "configs" / "digits_unet.yaml", [f"run_dir={done_no_ckpt}", *TINY])
    with pytest.raises(ConfigError, match="train.overwrite=true"):
        train(cfg)
    with pytest.raises(OverwriteError, match="teacher"):
        train_sid(str(run), run, SiDConfig(iters=1), progress=False, log=lambda s: None)
    with pytest.raises(OverwriteError, match="--overwrite"):
        train_sid(str(run), done_no_ckpt, SiDConfig(iters=1), progress=False, log=lambda s: None)


# ---- checkpoints: pickle-free, durable, damaged ones skipped ---------------------------------------------


def test_checkpoints_hold_no_pickles(run):
    for _, folder in list_checkpoints(run / "checkpoints"):
        names = sorted(p.name for p in folder.iterdir())
        assert all(n.endswith((".safetensors", ".json", ".yaml")) for n in names), names
        assert {"model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "ema.safetensors",
                "rng_state_0.safetensors", "trainer_state.json", "index.json"} <= set(names)
        for p in folder.iterdir():  # none starts like a pickle (protocol 2+ opcode 0x80) or a torch zip
            head = p.read_bytes()[:2]
            assert head[:1] != b"\x80" and head != b"PK", p
        assert ckpt_lib.checkpoint_problem(folder) is None


def test_checkpoint_files_and_folder_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_replace = os.replace
    monkeypatch.setattr(ckpt_lib, "fsync_path", lambda p: events.append(("fsync", Path(p).name)))
    monkeypatch.setattr(ckpt_lib.os, "replace", lambda a, b: (events.append(("rename", Path(a).name)),
                                                              real_replace(a, b)))

    def write(folder: Path) -> None:
        (folder / "a.json").write_text("{}")
        (folder / "b.json").write_text("[]")

    ckpt_lib.write_checkpoint(tmp_path, 3, write, is_main=True)
    rename = events.index(("rename", ".tmp-step_0000003"))
    before = events[:rename]
    assert {("fsync", "a.json"), ("fsync", "b.json"), ("fsync", ".tmp-step_0000003")} <= set(before)
    assert ("fsync", tmp_path.name) in events[rename:]  # the parent folder, so the rename itself is durable


def _damaged_copy(run: Path, dst: Path, damage) -> Path:
    shutil.copytree(run, dst)
    damage(dst / "checkpoints" / "step_0000002")
    return dst


@pytest.mark.parametrize("damage, why", [
    (lambda c: (c / "model.safetensors").write_bytes(b""), "model.safetensors is empty (0 bytes)"),
    (lambda c: (c / "optimizer.safetensors").unlink(), "optimizer.safetensors is missing"),
    (lambda c: (c / "ema.safetensors").write_bytes(b"\xff" * (c / "ema.safetensors").stat().st_size),
     "ema.safetensors is corrupt"),
    (lambda c: (c / "index.json").unlink(), "index.json is missing"),
], ids=["zero-byte", "missing", "corrupt", "no-index"])
def test_resume_latest_falls_back_past_a_damaged_checkpoint(run, tmp_path, capsys, damage, why):
    folder = _damaged_copy(run, tmp_path / "run", damage)
    code, out, err = call(T, [f"run_dir={folder}", *TINY, "train.steps=3", "train.ckpt_every=0", "--resume", "latest"],
                          capsys)
    assert code == 0, err
    text = out + err
    assert why in text and "resuming from" in text and "step_0000001" in text
    assert "Traceback" not in err and "pytorch_model.bin" not in text
    assert json.loads((folder / "train_summary.json").read_text())["steps"] == 3


def test_resume_with_only_damaged_checkpoints_stops_with_one_line(run, tmp_path, capsys):
    def both(c: Path) -> None:
        for step in (1, 2):
            (c.parent / f"step_{step:07d}" / "model.safetensors").write_bytes(b"")

    folder = _damaged_copy(run, tmp_path / "run", both)
    before = snapshot(folder)
    code, _, err = call(T, [f"run_dir={folder}", *TINY, "train.steps=3", "--resume", "latest"], capsys)
    assert_one_line(code, err, "model.safetensors is empty (0 bytes)")
    code, _, err = call(T, [f"run_dir={folder}", *TINY, "train.steps=3", "--resume",
                            f"{folder}/checkpoints/step_0000002"], capsys)
    assert_one_line(code, err, "step_0000002/model.safetensors is empty")
    assert snapshot(folder) == before
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        resolve_checkpoint("latest", folder / "checkpoints", log=lambda s: None)


def test_an_accelerate_pickle_checkpoint_is_refused_not_unpickled(tmp_path):
    old = tmp_path / "checkpoints" / "step_0000004"
    old.mkdir(parents=True)
    (old / "optimizer.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: must never be loaded
    (old / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="older version.*pickles"):
        resolve_checkpoint(str(old), tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match="no intact checkpoint.*older version"):
        resolve_checkpoint("latest", tmp_path / "checkpoints", log=lambda s: None)


def test_override_order_is_free_and_finished_runs_are_replaced_only_on_request(run, done_no_ckpt, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    # overrides before, between and after the options
    code, _, err = call(T, ["train.steps=3", "--resume", "latest", f"run_dir={folder}", *TINY], capsys)
    assert code == 0, err
    other = tmp_path / "finished"
    shutil.copytree(done_no_ckpt, other)
    code, _, err = call(T, [f"run_dir={other}", *TINY, "train.steps=1", "train.overwrite=true"], capsys)
    assert code == 0, err
    assert json.loads((other / "train_summary.json").read_text())["steps"] == 1


def test_an_interrupted_overwrite_leaves_no_old_weights_next_to_the_new_config(done_no_ckpt, tmp_path, monkeypatch):
    import diffusion.training as T_

    other = tmp_path / "finished"
    shutil.copytree(done_no_ckpt, other)

    def killed(self):
        raise RuntimeError("killed")

    monkeypatch.setattr(T_._Run, "train_step", killed)
    cfg = load_config(ROOT / "configs" / "digits_unet.yaml", [f"run_dir={other}", *TINY, "train.steps=5",
                                                              "train.overwrite=true"])
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg)
    assert load_config(other / "config.yaml").train.steps == 5
    assert not any((other / n).exists() for n in ("model.safetensors", "ema.safetensors", "train_summary.json"))


# ---- sampling: provenance survives an interrupted run ------------------------------------------------------


def test_interrupted_sampling_is_never_scored(run, digits, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"
    args = ["--run", str(run), "--nfe", "3", "--batch-size", "2", "--out", str(out), "--device", "cpu", "--no-progress"]
    assert call(S, [*args, "--num", "6"], capsys)[0] == 0
    first = sorted(p.name for p in out.iterdir())
    assert json.loads((out / "samples.json").read_text())["status"] == "complete"
    # a second run into the folder is refused without --overwrite, and leaves it as it was
    before = snapshot(out)
    code, _, err = call(S, [*args, "--num", "4"], capsys)
    assert_one_line(code, err, "--overwrite")
    assert snapshot(out) == before

    import samplers

    real, calls = samplers.sample, {"n": 0}

    def crash(*a, **k):  # the second batch dies, as a kill or an OOM would
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(samplers, "sample", crash)
    with pytest.raises(KeyboardInterrupt):
        sample_py.main([*args, "--num", "4", "--overwrite"])
    monkeypatch.setattr(samplers, "sample", real)
    m = json.loads((out / "samples.json").read_text())
    assert m["status"] == "incomplete" and m["num"] == 4
    assert sorted(p.name for p in out.glob("0*.png")) == ["000000.png", "000001.png"]  # the old 6 are gone
    assert len(first) == 7
    for cmd in (["fid", "--samples", out, "--ref", digits, "--features", "randconv"], ["digits", "--samples", out]):
        code, stdout, err = call(E, [*cmd, "--no-progress"], capsys)
        assert_one_line(code, err, "interrupted")
        assert stdout == ""


@pytest.mark.parametrize("tamper, needle", [
    (lambda f: shutil.copy(f / "000000.png", f / "000009.png"), "000009.png"),
    (lambda f: (f / "000001.png").unlink(), "000001.png"),
    (lambda f: (f / "samples.json").write_text("{"), "not valid JSON"),
    (lambda f: (f / "samples.json").unlink(), "--no-manifest"),
], ids=["extra-image", "missing-image", "broken-manifest", "no-manifest"])
def test_evaluate_refuses_images_and_manifest_that_disagree(samples, digits, tmp_path, capsys, tamper, needle):
    folder = tmp_path / "s"
    shutil.copytree(samples, folder)
    tamper(folder)
    code, out, err = call(E, ["fid", "--samples", folder, "--ref", digits, "--features", "randconv", "--no-progress"],
                          capsys)
    assert_one_line(code, err, needle)
    assert out == ""


def test_a_nan_fid_is_an_error_not_invalid_json(samples, digits, capsys, monkeypatch):
    import diffusion.metrics

    monkeypatch.setattr(diffusion.metrics, "frechet_distance", lambda a, b: float("nan"))
    code, out, err = call(E, ["fid", "--samples", samples, "--ref", digits, "--features", "randconv", "--no-progress"],
                          capsys)
    assert_one_line(code, err, "fid=nan")
    assert "NaN" not in out and out == ""
    code, out, err = call(E, ["fid", "--samples", digits, "--ref", digits, "--features", "randconv", "--no-progress",
                              "--no-manifest", "--no-kid"], capsys)
    assert code == 2 and "fid=nan" in err  # with --no-manifest as well


def test_fid_needs_two_images(samples, digits, tmp_path, capsys):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(digits / "000000.png", one / "000000.png")
    code, out, err = call(E, ["fid", "--samples", one, "--ref", digits, "--features", "randconv", "--no-manifest",
                              "--no-progress"], capsys)
    assert_one_line(code, err, "at least 2")


# ---- distillers: NaN weights never reach a checkpoint or the final save ---------------------------------------


def test_sid_stops_on_nan_weights_and_names_the_last_finite_checkpoint(tmp_path):
    from distill.common import NonFiniteError, PrefitConfig
    from distill.sid import SiDConfig, train_sid

    def poison(sid, row):
        if row["step"] == 2:
            with torch.no_grad():
                next(sid.G.net.parameters()).fill_(float("nan"))

    cfg = SiDConfig(batch=16, iters=4, lr=1e-4, log_every=1, checkpoint_every=1,
                    prefit=PrefitConfig(preset="tiny", steps=20))
    out = tmp_path / "sid"
    with pytest.raises(NonFiniteError, match=r"non-finite weights in generator after iteration 2.*step_0000001"):
        train_sid("oracle:ring2d", out, cfg, cache_dir=tmp_path / "cache", progress=False, log=lambda s: None,
                  callback=poison)
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [1]
    assert not (out / "model.safetensors").exists() and not (out / "ema.safetensors").exists()
    # the CLI reports it in one line with exit status 1 (a fault, not bad input)
    from distill.common import check_weights_finite

    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.bias.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="Last checkpoint with finite weights: none"):
        check_weights_finite({"net": net}, "after step 1")


def test_sid_resume_skips_a_damaged_checkpoint(tmp_path):
    from distill.common import PrefitConfig
    from distill.sid import SiDConfig, train_sid

    cfg = SiDConfig(batch=16, iters=2, lr=1e-4, log_every=1, checkpoint_every=1,
                    prefit=PrefitConfig(preset="tiny", steps=20))
    out, logs = tmp_path / "sid", []
    train_sid("oracle:ring2d", out, cfg, cache_dir=tmp_path / "cache", progress=False, log=lambda s: None)
    (out / "checkpoints" / "step_0000002" / "generator.safetensors").write_bytes(b"")
    cfg.iters = 3
    sid = train_sid("oracle:ring2d", out, cfg, resume=True, cache_dir=tmp_path / "cache", progress=False,
                    log=logs.append)
    assert sid.step_count == 3
    assert any("resumed" in m and "step_0000001" in m for m in logs), logs


def test_distill_overwrite_replaces_only_on_request(run, tmp_path, capsys):
    out = tmp_path / "g.json"
    argv = ["grid", "--teacher", "oracle:ring2d", "--nfe", "3", "--n-train", "8", "--n-val", "0", "--max-evals", "1",
            "--rtol", "1e-4", "--out", out]
    assert call(D, argv, capsys)[0] == 0
    before = snapshot(tmp_path)
    code, _, err = call(D, argv, capsys)
    assert_one_line(code, err, "--overwrite")
    assert snapshot(tmp_path) == before
    assert call(D, [*argv, "--overwrite"], capsys)[0] == 0
