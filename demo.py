"""make demo: train the default digits U-Net on the CPU and write its sample grid and loss curve.

Runs configs/digits_unet.yaml (about 6 minutes on a 2-core CPU) into runs/digits_unet/, replacing an
earlier demo run there. A time limit guarantees the 10-minute budget on a busy machine: if it is hit,
the run stops early, still saves weights, grid and loss curve, and says how many steps it made.
"""

import sys
import time

from train import run

TIME_LIMIT_MIN = 8.0  # of training; start-up, the final grid and saving fit in the rest of 10 minutes


def main() -> int:
    """Train, then print one line saying where the pictures are."""
    t0 = time.perf_counter()
    res = run(["--config", "configs/digits_unet.yaml", "train.overwrite=true", f"train.time_limit_min={TIME_LIMIT_MIN}"])
    print(f"demo: {res.steps} steps in {time.perf_counter() - t0:.0f}s (final loss {res.final_loss:.3f}) -> "
          f"samples {res.samples_png}, loss curve {res.loss_png}, weights {res.run_dir}/ema.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
