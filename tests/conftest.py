"""Test-wide settings."""

import os

import pytest
import torch
from threadpoolctl import threadpool_limits

# Two xdist workers share 2 cores: one thread each avoids oversubscription, which makes small
# convolutions (torch) and sqrtm/KID (numpy's BLAS) tens of times slower than single-threaded.
_THREADS = int(os.environ.get("UD_TEST_THREADS", "1"))
torch.set_num_threads(_THREADS)
threadpool_limits(_THREADS)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide singletons; a test that picked bf16 must not fix it for the next test."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
