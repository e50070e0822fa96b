"""Test-wide settings."""

import os

import torch

# Two xdist workers share 2 cores: one thread each avoids oversubscription, which makes small
# convolutions tens of times slower than running them single-threaded.
torch.set_num_threads(int(os.environ.get("UD_TEST_THREADS", "1")))
