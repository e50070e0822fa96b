"""SiD under `accelerate launch` with two CPU processes (gloo): global batch and NaN counts, per-process
noise streams in checkpoints, and exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from distill.common import PrefitConfig
from distill.sid import SiDConfig, train_sid
from tests.test_train_ddp import ROOT, _free_port

COMMON = ["--teacher", "oracle:ring2d", "--batch", "64", "--lr", "1e-4", "--checkpoint-every", "2", "--log-every", "1",
          "--prefit-preset", "tiny", "--prefit-steps", "40", "--no-progress"]


def launch(args: list[str]) -> subprocess.CompletedProcess:
    # --multi_gpu with ACCELERATE_USE_CPU really starts 2 processes; `--cpu --num_processes 2` would start one
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "distill", "sid", *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_process_sid_counts_globally_and_resumes_exactly(tmp_path: Path) -> None:
    cache = ["--cache-dir", str(tmp_path / "cache")]
    launch(COMMON + cache + ["--out", str(tmp_path / "full"), "--iters", "4"])
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in rows] == [2] * 4
    # the global batch of 64 is split 32 + 32; counts are summed over both processes
    assert rows[-1]["samples"] == 4 * 2 * 64 and rows[-1]["nan_samples"] == 0
    ck = tmp_path / "full" / "checkpoints" / "step_0000004"
    assert json.loads((ck / "state.json").read_text())["world_size"] == 2
    r0, r1 = (load_file(ck / f"rng_state_{r}.safetensors")["rng"] for r in (0, 1))
    assert not (r0 == r1).all()  # each process keeps its own noise stream

    launch(COMMON + cache + ["--out", str(tmp_path / "half"), "--iters", "2"])
    launch(COMMON + cache + ["--out", str(tmp_path / "half"), "--iters", "4", "--resume"])
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(tmp_path / "full" / name), load_file(tmp_path / "half" / name)
        assert all((a[k] == b[k]).all() for k in a), name

    cfg = SiDConfig(batch=64, iters=6, prefit=PrefitConfig(preset="tiny", steps=40))  # the CLI's pre-fit: cached
    with pytest.raises(ValueError, match="written by 2 process"):
        train_sid("oracle:ring2d", tmp_path / "full", cfg, resume=True, cache_dir=tmp_path / "cache", progress=False,
                  log=lambda s: None)
