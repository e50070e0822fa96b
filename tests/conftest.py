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


@pytest.fixture
def device() -> torch.device:
    """Where a device-agnostic test (marked ``device``) puts its tensors: $UD_TEST_DEVICE, default cpu.

    benchmarks/gpu_check.py runs ``pytest -m device`` with UD_TEST_DEVICE=cuda on a GPU machine.
    """
    name = os.environ.get("UD_TEST_DEVICE", "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"UD_TEST_DEVICE={name} but torch sees no CUDA device")
    return dev
