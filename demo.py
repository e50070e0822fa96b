"""make demo: train the default digits U-Net on the CPU and write its sample grid and loss curve."""

import sys

if __name__ == "__main__":
    sys.exit("make demo: the trainer (train.py) is not built yet; see issue 'Trainer'. Nothing was trained.")
