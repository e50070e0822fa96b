"""Two-process data parallelism on CPU through ``accelerate launch`` (gloo): replicas stay identical."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_identical_replicas(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # --multi_gpu with ACCELERATE_USE_CPU really starts 2 processes; `--cpu --num_processes 2` would start one
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(ROOT / "train.py"),
           "--config", str(ROOT / "configs" / "digits_unet.yaml"), f"run_dir={run}", "data.resolution=8",
           "train.steps=3", "train.batch_size=8", "train.grad_accum=2", "train.log_every=1", "train.ckpt_every=2",
           "train.tensorboard=false", "model.options.block_out_channels=[32,32]", "model.options.layers_per_block=1",
           "preview.n=4", "preview.nfe=4"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
