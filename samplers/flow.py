"""Rectified-flow Euler (THEORY §4.7): ``x <- x + (t_next - t) velocity(x, t)`` in the schedule's t.

On the flow schedule (alpha = 1-t, sigma = t) this starts at t=1 (grid se=inf, x = eps) and equals
Euler in the EDM view / deterministic DDIM step for step, because x + (t_n - t)(eps - x0) =
(1-t_n) x0 + t_n eps. On other schedules it is plain Euler of the PF-ODE in t.
"""

from __future__ import annotations

from typing import Optional

import torch

from .core import FiniteWatch, steps
from .noise import GeneratorLike
from .registry import register
from .stochastic import report_x, sde_step, times


@register("flow_euler", nfe=lambda n, **_: n, rule="n", grid="uniform_t")
@torch.no_grad()
def flow_euler(model, x: torch.Tensor, grid: torch.Tensor, *, generator: GeneratorLike = None, callback=None,
               class_labels: Optional[torch.Tensor] = None, progress: bool = False) -> torch.Tensor:
    """Euler on the PF-ODE in t: x += (t_next - t) * velocity (the eta=0 member of euler_maruyama)."""
    sig, ts, alphas = times(model, grid)
    watch = FiniteWatch()
    for i in steps(sig, progress, "flow_euler"):
        x, pred = sde_step(model, x, ts[i], ts[i + 1], 0.0, None, class_labels, lazy=True)
        x0, pred = (None if callback is None else pred.x0), None  # don't keep the previous state alive
        report_x(callback, i, sig, x, alphas[i + 1], x0, watch)
    watch.close(x)
    return x


__all__ = ["flow_euler"]
