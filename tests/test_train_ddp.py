"""Two-process data parallelism on CPU through ``accelerate launch`` (gloo): replicas stay identical, and a
two-process resume from a (pickle-free) checkpoint is bit-exact."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run: Path, *extra: str) -> subprocess.CompletedProcess:
    # --multi_gpu with ACCELERATE_USE_CPU really starts 2 processes; `--cpu --num_processes 2` would start one
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(ROOT / "train.py"),
           "--config", str(ROOT / "configs" / "digits_unet.yaml"), f"run_dir={run}", "data.resolution=8",
           "train.steps=3", "train.batch_size=8", "train.grad_accum=2", "train.log_every=1", "train.ckpt_every=2",
           "train.tensorboard=false", "model.options.block_out_channels=[32,32]", "model.options.layers_per_block=1",
           "preview.n=4", "preview.nfe=4", *extra]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_train_identical_replicas(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _launch(run)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    checksums = summary["param_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1], checksums  # gathered from each rank
    assert "2 process(es) x 2 x 2 accum = batch 8" in proc.stdout
    # every rank saved its own noise stream into the (atomically renamed) checkpoint
    ckpt = run / "checkpoints" / "step_0000002"
    assert {"rng_state_0.safetensors", "rng_state_1.safetensors", "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}
    g0, g1 = (load_file(ckpt / f"rng_state_{r}.safetensors")["generator"] for r in (0, 1))
    assert not (g0 == g1).all()  # ranks draw different noise
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    assert not [p.name for p in ckpt.iterdir() if p.suffix in (".bin", ".pkl", ".pt", ".pth")]  # no pickles

    # resume the step-2 checkpoint in a fresh folder with 2 processes: step 3 is bit-identical to the straight run
    other = tmp_path / "resumed"
    shutil.copytree(ckpt, other / "checkpoints" / ckpt.name)
    proc = _launch(other, "--resume", "latest")  # options after the key=value overrides are accepted too
    assert "resumed from" in proc.stdout
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(run / name), load_file(other / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
