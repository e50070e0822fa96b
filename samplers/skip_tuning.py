"""Skip-Tuning (docs/theory.md §8): scale a U-Net's skip connections at sampling time, for any sampler.

Skip i (0 = nearest the input, k = num_skips-1 = deepest) is multiplied by
``rho_i = rho_top + (i/k)(rho_bottom - rho_top)`` before the decoder concatenates it. The network
implements the scaling (``set_skip_scales`` / ``num_skips``, diffusion/models/unet.py); this
context manager only computes the factors and restores the previous ones afterwards.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

from torch import nn


def skip_scales(num_skips: int, rho_bottom: float, rho_top: float = 1.0) -> list[float]:
    """The linear rule: rho_top at skip 0 (input side) to rho_bottom at the deepest skip."""
    if num_skips < 1:
        raise ValueError(f"num_skips must be >= 1; got {num_skips}")
    if not (math.isfinite(rho_bottom) and math.isfinite(rho_top)):
        raise ValueError(f"rho_bottom and rho_top must be finite; got {rho_bottom}, {rho_top}")
    k = num_skips - 1
    if k == 0:
        return [float(rho_top)]  # a single skip is the input-side one
    return [rho_top + (i / k) * (rho_bottom - rho_top) for i in range(num_skips)]


def _skip_net(model_or_net: nn.Module) -> nn.Module:
    for cand in (model_or_net, getattr(model_or_net, "net", None)):
        if cand is not None and hasattr(cand, "num_skips") and hasattr(cand, "set_skip_scales"):
            return cand
    raise ValueError(f"Skip-Tuning needs a network with num_skips and set_skip_scales (the project U-Net); "
                     f"{type(model_or_net).__name__} has neither (nor does its .net)")


@contextmanager
def skip_tuning(model_or_net: nn.Module, rho_bottom: float, rho_top: float = 1.0) -> Iterator[list[float]]:
    """Within the block, the U-Net (a ScoreModel's ``.net`` or the net itself) scales its skips; yields the factors."""
    net = _skip_net(model_or_net)
    factors = skip_scales(int(net.num_skips), rho_bottom, rho_top)
    previous = getattr(net, "skip_scales", None)
    # all ones: no scaling installed at all, so the forward is bit-identical to the untuned net
    net.set_skip_scales(None if all(f == 1.0 for f in factors) else factors)
    try:
        yield factors
    finally:
        net.set_skip_scales(previous)


__all__ = ["skip_scales", "skip_tuning"]
