"""Adaptive reference solver: torchdiffeq (dopri5 by default) on the PF-ODE, NFE read from the model counter."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torchdiffeq import odeint

from .core import FiniteWatch, denoiser, from_edm, report, to_edm
from .noise import GeneratorLike
from .registry import register


@register("adaptive", nfe=None, rule="adaptive (counted after the solve)")
@torch.no_grad()
def adaptive(model, x: torch.Tensor, grid: torch.Tensor, *, generator: GeneratorLike = None, callback=None,
             class_labels: Optional[torch.Tensor] = None, progress: bool = False, rtol: float = 1e-5,
             atol: float = 1e-5, method: str = "dopri5") -> torch.Tensor:
    """Solve dy/du = y - D(y, e^u) in u = log se through the grid's nonzero levels, then read out x0.

    In u the EDM-view ODE dy/dse = (y - D)/se is well scaled from se_max down to se_last; the grid's
    interior levels are output times (the callback sees the state at each), not forced steps. The
    error control norm spans the whole batch, so results depend slightly on the batch's content.
    """
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"adaptive needs rtol > 0 and atol > 0; got rtol={rtol}, atol={atol}")
    y, sig = to_edm(model, x, grid)
    D = denoiser(model, class_labels)
    watch = FiniteWatch()
    nonzero = [s for s in sig if s > 0]
    if len(nonzero) > 1:
        u = torch.tensor([math.log(s) for s in nonzero], dtype=torch.float64, device=y.device)
        if y.dtype != torch.float64:
            u = u.to(y.dtype)
        path = odeint(lambda uu, yy: yy - D(yy, torch.exp(uu.double())), y, u, rtol=rtol, atol=atol, method=method)
        for i in range(len(nonzero) - 1):
            report(callback, i, sig, path[i + 1], None, watch)
        y = path[-1]
    if sig[-1] == 0:
        x0 = D(y, nonzero[-1])
        report(callback, len(sig) - 2, sig, x0, x0, watch)
        y = x0
    watch.close(y)
    return from_edm(model, y, sig[-1])


__all__ = ["adaptive"]
