"""Rectified-flow Euler (docs/theory.md §6.8): Euler on the PF-ODE in the schedule's own noise coordinate.

On the flow family (alpha = 1 - sigma, shifted flows included) the PF-ODE in sigma is
``dx/dsigma = eps_hat - x0_hat`` (the velocity), and Euler in sigma is diffusers'
FlowMatchEulerDiscreteScheduler step for step: ``x += (sigma_next - sigma)(eps_hat - x0_hat)``.
On the unshifted flow sigma = t, so this is also Euler in t, equal to deterministic DDIM and to Euler in
the EDM view, because x + (t_n - t)(eps - x0) = (1-t_n) x0 + t_n eps. It starts at se=inf (sigma = 1)
exactly; working in sigma keeps a shifted flow's t=1 free of the schedule's derivatives there.
On other families it is plain Euler of the PF-ODE in t.
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
    """Euler on the PF-ODE: in sigma on flow schedules (FlowMatchEuler), in t elsewhere."""
    sig, ts, alphas = times(model, grid)
    watch = FiniteWatch()
    in_sigma = model.schedule.family == "flow"
    sigmas = [1.0 - a for a in alphas]  # flow family: sigma = 1 - alpha, grid floats computed once
    for i in steps(sig, progress, "flow_euler"):
        if in_sigma:
            pred = model(x, ts[i], class_labels)
            ds, d_dt = sigmas[i + 1] - sigmas[i], pred.dsigma
            if pred.kind == "velocity" and isinstance(d_dt, float) and d_dt != 0:
                # on the flow family eps - x0 = velocity / (dsigma/dt): one fused update, no conversion; the
                # last step (sigma_next = 0) lands exactly on x0 = x - sigma (eps - x0) the same way
                x0 = None if callback is None else pred.x0
                x = torch.add(x, pred.native, alpha=ds / d_dt)
            elif sig[i + 1] == 0:
                x = x0 = pred.x0
            else:  # alpha + sigma = 1 makes eps - x0 = (x - x0)/sigma, which holds at sigma = 1 (t = 1) too
                x0 = pred.x0
                x = torch.add(x * (1 + ds / sigmas[i]), x0, alpha=-ds / sigmas[i])
        else:
            x, pred = sde_step(model, x, ts[i], ts[i + 1], 0.0, None, class_labels, lazy=True)
            x0 = None if callback is None else pred.x0
        pred = None  # don't keep the previous state alive
        report_x(callback, i, sig, x, alphas[i + 1], x0, watch)
    watch.close(x)
    return x


__all__ = ["flow_euler"]
