"""Test-wide settings."""

import os

import torch
from threadpoolctl import threadpool_limits

# Two xdist workers share 2 cores: one thread each avoids oversubscription, which makes small
# convolutions (torch) and sqrtm/KID (numpy's BLAS) tens of times slower than single-threaded.
_THREADS = int(os.environ.get("UD_TEST_THREADS", "1"))
torch.set_num_threads(_THREADS)
threadpool_limits(_THREADS)
