"""Deterministic PF-ODE solvers in the EDM view: euler, heun, dpmpp_2m, ipndm.

Each works on ``dy/dse = (y - D(y, se))/se`` over a grid of EDM noise levels (docs/theory.md §6.2, §6.3,
§6.4, §6.5); the last step to se=0 is part of the grid and costs one network call (a plain x0 readout
for euler/heun/dpmpp_2m, the multistep formula for ipndm).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .core import FiniteWatch, afs_slope, denoise_and_slope, denoiser, from_edm, report, steps, to_edm
from .noise import GeneratorLike, randn_like
from .registry import register

# Adams-Bashforth weights on (d_n, d_{n-1}, ...) for iPNDM orders 1-4 (docs/theory.md §6.5).
AB_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _afs_nfe(n: int, afs: bool = False, **_) -> int:
    return n - int(bool(afs))


def churn(y: torch.Tensor, se: float, n: int, s_churn: float, s_min: float, s_max: float, s_noise: float,
          generator: GeneratorLike, se_top: float) -> tuple[torch.Tensor, float]:
    """EDM's stochastic churn: raise se by gamma = min(s_churn/n, sqrt2-1) inside [s_min, s_max], adding noise."""
    if s_churn <= 0 or not s_min <= se <= s_max:
        return y, se  # no noise is drawn, so deterministic runs keep their RNG untouched
    se_hat = min(se * (1 + min(s_churn / n, math.sqrt(2) - 1)), se_top)
    if se_hat <= se:
        return y, se
    return y + math.sqrt(se_hat**2 - se**2) * s_noise * randn_like(y, generator), se_hat


@register("euler", nfe=_afs_nfe, rule="n (n-1 with afs)")
@torch.no_grad()
def euler(model, x: torch.Tensor, grid: torch.Tensor, *, generator: GeneratorLike = None, callback=None,
          class_labels: Optional[torch.Tensor] = None, progress: bool = False, afs: bool = False,
          s_churn: float = 0.0, s_min: float = 0.0, s_max: float = math.inf, s_noise: float = 1.0) -> torch.Tensor:
    """Euler on the PF-ODE in the EDM view, y += (se_next - se)(y - D)/se (= deterministic DDIM)."""
    y, sig = to_edm(model, x, grid)
    D = denoiser(model, class_labels)
    watch = FiniteWatch()
    for i in steps(sig, progress, "euler"):
        y, se = churn(y, sig[i], len(sig) - 1, s_churn, s_min, s_max, s_noise, generator,
                      model.schedule.sigma_edm_max)
        x0, d = denoise_and_slope(D, y, se, afs and i == 0)
        y = x0 if sig[i + 1] == 0 else torch.add(y, d, alpha=sig[i + 1] - se)
        report(callback, i, sig, y, x0, watch)
    watch.close(y)
    return from_edm(model, y, sig[-1])


@register("heun", nfe=lambda n, **_: 2 * n - 1, rule="2n-1")
@torch.no_grad()
def heun(model, x: torch.Tensor, grid: torch.Tensor, *, generator: GeneratorLike = None, callback=None,
         class_labels: Optional[torch.Tensor] = None, progress: bool = False, s_churn: float = 0.0,
         s_min: float = 0.0, s_max: float = math.inf, s_noise: float = 1.0) -> torch.Tensor:
    """EDM's 2nd-order Heun (Karras et al. Alg. 2) with optional churn; the step to se=0 is Euler."""
    y, sig = to_edm(model, x, grid)
    D = denoiser(model, class_labels)
    watch = FiniteWatch()
    for i in steps(sig, progress, "heun"):
        sn = sig[i + 1]
        y_hat, se = churn(y, sig[i], len(sig) - 1, s_churn, s_min, s_max, s_noise, generator,
                          model.schedule.sigma_edm_max)
        x0 = D(y_hat, se)
        d = (y_hat - x0) / se
        y = y_hat + (sn - se) * d
        if sn > 0:
            d2 = (y - D(y, sn)) / sn
            y = y_hat + (sn - se) * (d + d2) / 2
        report(callback, i, sig, y, x0, watch)
    watch.close(y)
    return from_edm(model, y, sig[-1])


@register("dpmpp_2m", nfe=_afs_nfe, rule="n (n-1 with afs)")
@torch.no_grad()
def dpmpp_2m(model, x: torch.Tensor, grid: torch.Tensor, *, generator: GeneratorLike = None, callback=None,
             class_labels: Optional[torch.Tensor] = None, progress: bool = False, afs: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M): multistep data prediction, exact in the linear part, in h = -log se (half-logSNR)."""
    y, sig = to_edm(model, x, grid)
    D = denoiser(model, class_labels)
    watch = FiniteWatch()
    x0_prev = None
    for i in steps(sig, progress, "dpmpp_2m"):
        se, sn = sig[i], sig[i + 1]
        x0 = y - se * afs_slope(y, se) if afs and i == 0 else D(y, se)  # the slope itself is not needed
        if sn == 0:
            y = x0  # h = inf: the second-order correction is undefined, take the exact readout
        else:
            h = math.log(se / sn)
            x0_d = x0
            if x0_prev is not None:
                r = math.log(sig[i - 1] / se) / h  # previous step size over this one, in half-logSNR
                x0_d = torch.mul(x0, 1 + 1 / (2 * r)).sub_(x0_prev, alpha=1 / (2 * r))
            y = torch.mul(y, sn / se).sub_(x0_d, alpha=math.expm1(-h))
        x0_prev = x0
        report(callback, i, sig, y, x0, watch)
    watch.close(y)
    return from_edm(model, y, sig[-1])


@register("ipndm", nfe=_afs_nfe, rule="n (n-1 with afs)")
@torch.no_grad()
def ipndm(model, x: torch.Tensor, grid: torch.Tensor, *, generator: GeneratorLike = None, callback=None,
          class_labels: Optional[torch.Tensor] = None, progress: bool = False, afs: bool = False,
          order: int = 4) -> torch.Tensor:
    """Improved PNDM: Adams-Bashforth weights on the slopes d = (y - D)/se, warming up through lower orders."""
    if order not in AB_WEIGHTS:
        raise ValueError(f"ipndm order must be one of {sorted(AB_WEIGHTS)}; got {order!r}")
    y, sig = to_edm(model, x, grid)
    D = denoiser(model, class_labels)
    watch = FiniteWatch()
    history: list[torch.Tensor] = []  # newest slope first
    for i in steps(sig, progress, "ipndm"):
        se, sn = sig[i], sig[i + 1]
        x0, d = denoise_and_slope(D, y, se, afs and i == 0)
        history = [d, *history[: order - 1]]
        weights = AB_WEIGHTS[len(history)]
        d_hat = history[0] * weights[0] if len(history) > 1 else history[0]
        for w, h in zip(weights[1:], history[1:]):
            d_hat = d_hat.add_(h, alpha=w)
        y = torch.add(y, d_hat, alpha=sn - se)
        report(callback, i, sig, y, x0, watch)
    watch.close(y)
    return from_edm(model, y, sig[-1])


__all__ = ["AB_WEIGHTS", "churn", "euler", "heun", "dpmpp_2m", "ipndm"]
