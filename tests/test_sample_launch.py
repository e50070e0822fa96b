"""`accelerate launch sample.py` splits the seeds over its processes without --device (CPU here)."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from test_sample_cli import call, images, make_run

ROOT = Path(__file__).resolve().parents[1]


def test_accelerate_launch_splits_the_seeds(tmp_path):
    run = make_run(tmp_path / "run")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(ROOT / "sample.py"), "--run", str(run), "--sampler", "heun", "--nfe", "3", "--num", "5", "--batch-size", "2",
           "--seed", "3", "--out", str(tmp_path / "mp"), "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads((tmp_path / "mp" / "samples.json").read_text())
    assert m["num_processes"] == 2 and m["images_per_process"] == [3, 2]
    assert call("--run", run, "--sampler", "heun", "--nfe", 3, "--num", 5, "--seed", 3, "--out", tmp_path / "sp") == 0
    assert np.array_equal(images(tmp_path / "mp"), images(tmp_path / "sp"))
