"""A run SIGKILLed while writing a checkpoint leaves the previous checkpoint intact and resumable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from diffusion.checkpoint import list_checkpoints
from diffusion.config import load_config
from diffusion.training import train

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["data.resolution=8", "train.steps=6", "train.batch_size=4", "train.ckpt_every=2", "train.keep_last=3",
        "train.tensorboard=false", "model.options.block_out_channels=[32,32]", "model.options.layers_per_block=1",
        "preview.n=4", "preview.nfe=4"]

# Runs train.py in a child process whose checkpoint writer stops half-way at step 4: accelerate's files
# (weights, optimizer) are written, ours (EMA, step, RNG streams) are not yet, and the folder is still
# the temporary one. The marker file tells the test the child is parked there.
CHILD = """
import sys, time, runpy
from pathlib import Path
import diffusion.training as T
marker, argv = Path(sys.argv[1]), sys.argv[2:]
real = T.save_trainer_state
def parked(folder, acc, step, *a, **k):
    if step == 4:
        marker.write_text(str(folder))
        time.sleep(600)
    real(folder, acc, step, *a, **k)
T.save_trainer_state = parked
sys.argv = ["train.py", *argv]
runpy.run_path("train.py", run_name="__main__")
"""


def test_sigkill_mid_checkpoint_keeps_the_previous_one(tmp_path: Path) -> None:
    run, marker = tmp_path / "run", tmp_path / "parked"
    argv = ["--config", "configs/digits_unet.yaml", f"run_dir={run}", *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(marker), *argv], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the child never reached the checkpoint at step 4"
            time.sleep(0.2)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL

    ckpt_root = run / "checkpoints"
    partial = Path(marker.read_text())
    assert partial.parent == ckpt_root and partial.name.startswith(".tmp-")
    assert (partial / "model.safetensors").exists() and not (partial / "trainer_state.json").exists()
    assert [s for s, _ in list_checkpoints(ckpt_root)] == [2]  # the half-written step 4 is not a checkpoint

    cfg = load_config(ROOT / "configs" / "digits_unet.yaml", [f"run_dir={run}", *ARGS])
    res = train(cfg, resume="latest")
    assert res.steps == 6
    assert [s for s, _ in list_checkpoints(ckpt_root)] == [2, 4, 6]
    assert not partial.exists()  # the resumed run swept the partial folder away
    assert (run / "model.safetensors").is_file()
