"""Count tensor-to-Python conversions: on a GPU each one waits for the device (a host sync).

The hot path (a network call, a sampler step, a training step) is meant to make none; tests and
benchmarks/hot_path.py use ``count_host_reads`` to check it, and users can wrap their own loops in it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

#: the Tensor methods through which a value leaves the device for Python
CONVERSIONS = ("__bool__", "item", "__float__", "__int__", "__index__", "tolist")


@contextlib.contextmanager
def count_host_reads() -> Iterator[list[int]]:
    """Count conversions inside the block; yields a one-element list holding the count (read it after)."""
    n = [0]
    saved = {k: getattr(torch.Tensor, k) for k in CONVERSIONS}

    def counted(fn):
        def wrapper(*args, **kwargs):
            n[0] += 1
            return fn(*args, **kwargs)
        return wrapper

    for k, fn in saved.items():
        setattr(torch.Tensor, k, counted(fn))
    try:
        yield n
    finally:
        for k, fn in saved.items():
            setattr(torch.Tensor, k, fn)
