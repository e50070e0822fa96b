"""Multistep data-prediction solvers users ask for by name: ``unipc`` (UniPC, bh1/bh2) and ``dpmpp_3m``.

Both work in the EDM view (docs/theory.md §1.2) on the half-logSNR ``lam = -log se``: with the x0
estimate ``D`` the PF-ODE ``dy/dse = (y - D)/se`` is exactly ``y_t = (se_t/se_s) y_s + se_t int e^lam D dlam``,
and the solvers differ only in how they fit ``D`` over ``lam`` from past evaluations. Every grid
scalar (lam, h, ratios, UniPC's coefficient solves) is a Python float computed once before the loop,
so a step is tensor arithmetic only (no host syncs). The step to se=0 (h = inf) is the x0 readout,
as in ``dpmpp_2m``: the extrapolation in lam to lam=inf is undefined, so it costs one call like a step.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .core import FiniteWatch, denoise_and_slope, denoiser, from_edm, report, steps, to_edm
from .noise import GeneratorLike
from .registry import register


def _afs_nfe(n: int, afs: bool = False, **_) -> int:
    return n - int(bool(afs))


def _lams(sig: list[float]) -> list[float]:
    """Half-logSNR lam = -log se per grid level (inf at se=0)."""
    return [math.inf if s == 0 else -math.log(s) for s in sig]


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve the small dense system a x = b (at most 3x3) in Python floats: Gaussian elimination with
    partial pivoting, so building a grid's coefficients touches no tensor (and reads no device)."""
    n = len(b)
    m = [list(row) + [rhs] for row, rhs in zip(a, b)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            m[r] = [u - f * v for u, v in zip(m[r], m[c])]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))) / m[r][r]
    return x


def unipc_coefficients(h: float, rks: list[float], variant: str, corrector: bool) -> tuple[float, list[float]]:
    """(B(h), rho) of UniPC's data-prediction update (Zhao et al. 2023, Alg. 1/2; docs/theory.md §6.12).

    ``rks`` are the previous nodes' lam offsets over h (negative); the predictor fits them, the
    corrector adds the new node r=1. ``B(h)`` is ``h`` (bh1) or ``e^h - 1`` (bh2) with h -> -h for
    data prediction. Matches the order conditions sum_m rho_m r_m^(k-1) = k! phi_(k+1)(h) / B(h).
    """
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    nodes = rks + [1.0] if corrector else list(rks)
    order = len(nodes) if corrector else len(rks) + 1
    rhs, h_phi_k, fact = [], h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        rhs.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    if not nodes:
        return b_h, []
    if corrector and len(nodes) == 1:
        return b_h, [0.5]
    if not corrector and len(nodes) == 1:
        return b_h, [0.5]
    rows = [[r ** (k - 1) for r in nodes] for k in range(1, len(nodes) + 1)]
    return b_h, _solve(rows, rhs[: len(nodes)])


@register("unipc", nfe=_afs_nfe, rule="n (n-1 with afs)")
@torch.no_grad()
def unipc(model, x: torch.Tensor, grid: torch.Tensor, *, generator: GeneratorLike = None, callback=None,
          class_labels: Optional[torch.Tensor] = None, progress: bool = False, order: int = 2,
          variant: str = "bh2", corrector: bool = True, afs: bool = False) -> torch.Tensor:
    """UniPC (data prediction): order-``order`` multistep predictor UniP + free corrector UniC (order+1).

    The corrector reuses the network call made at the predicted point for the next step, so it
    costs nothing; it is skipped at the final readout (as in diffusers' UniPCMultistepScheduler).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"unipc order must be one of [1, 2, 3]; got {order!r}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc variant must be one of ['bh1', 'bh2']; got {variant!r}")
    y, sig = to_edm(model, x, grid)
    D = denoiser(model, class_labels)
    watch = FiniteWatch()  # finiteness read once at the end, not per step
    lam = _lams(sig)
    n = len(sig) - 1
    # Step i goes sig[i] -> sig[i+1] with order min(order, i+1) (warm-up through lower orders).
    plans = []
    for i in range(n):
        if sig[i + 1] == 0:
            plans.append(None)
            continue
        p = min(order, i + 1)
        h = lam[i + 1] - lam[i]
        rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
        b_h, rho_p = unipc_coefficients(h, rks, variant, corrector=False)
        plans.append((h, sig[i + 1] / sig[i], math.expm1(-h), b_h, rks, rho_p,
                      unipc_coefficients(h, rks, variant, corrector=True)[1]))
    hist: list[torch.Tensor] = []  # x0 estimates, newest first
    y_prev = None  # the state at the previous node, before its predictor step (for the corrector)
    for i in steps(sig, progress, "unipc"):
        x0, _ = denoise_and_slope(D, y, sig[i], afs and i == 0)
        if corrector and y_prev is not None and plans[i - 1] is not None:
            _, ratio, em1, b_h, rks, _, rho_c = plans[i - 1]
            m0 = hist[0]
            res = rho_c[-1] * (x0 - m0)
            for k, rk in enumerate(rks):
                res = res + rho_c[k] * (hist[k + 1] - m0) / rk
            y = ratio * y_prev - em1 * m0 - b_h * res
        hist = [x0, *hist[: max(order - 1, 0)]]
        plan = plans[i]
        if plan is None:
            y_prev, y = y, x0
        else:
            _, ratio, em1, b_h, rks, rho_p, _ = plan
            y_prev = y
            y = ratio * y - em1 * x0
            if rks:
                res = sum(rho_p[k] * (hist[k + 1] - x0) / rk for k, rk in enumerate(rks))
                y = y - b_h * res
        report(callback, i, sig, y, x0, watch)
    watch.close(y)
    return from_edm(model, y, sig[-1])


@register("dpmpp_3m", nfe=_afs_nfe, rule="n (n-1 with afs)")
@torch.no_grad()
def dpmpp_3m(model, x: torch.Tensor, grid: torch.Tensor, *, generator: GeneratorLike = None, callback=None,
             class_labels: Optional[torch.Tensor] = None, progress: bool = False, afs: bool = False,
             classic: bool = False) -> torch.Tensor:
    """DPM-Solver++(3M) (docs/theory.md §6.13), deterministic: third-order multistep data prediction, with warm-up.

    With x0(lam) = x0 + u x0' + u^2/2 x0'' the divided difference ``d2`` estimates h^2 x0''/2, so the
    exact weight of d2 is 2 (1/2 - phi), phi = (e^-h - 1 + h)/h^2. ``classic=True`` uses the weight
    (1/2 - phi) of DPM-Solver++'s reference code (and diffusers / k-diffusion): there the h^3 term
    is halved and the measured order is 2 (tests/test_samplers_multistep.py); the default is order 3.
    """
    y, sig = to_edm(model, x, grid)
    D = denoiser(model, class_labels)
    watch = FiniteWatch()  # finiteness read once at the end, not per step
    lam = _lams(sig)
    w2 = 1.0 if classic else 2.0
    hist: list[torch.Tensor] = []  # newest first
    for i in steps(sig, progress, "dpmpp_3m"):
        se, sn = sig[i], sig[i + 1]
        x0, _ = denoise_and_slope(D, y, se, afs and i == 0)
        hist = [x0, *hist[:2]]
        if sn == 0:
            y = x0
        else:
            h = lam[i + 1] - lam[i]
            em1 = math.expm1(-h)
            y_lin = (sn / se) * y - em1 * x0
            if len(hist) == 1:
                y = y_lin
            elif len(hist) == 2:
                r0 = (lam[i] - lam[i - 1]) / h
                y = y_lin - 0.5 * em1 * (x0 - hist[1]) / r0
            else:
                r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
                d1_0, d1_1 = (x0 - hist[1]) / r0, (hist[1] - hist[2]) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                y = y_lin + (em1 / h + 1) * d1 - w2 * ((em1 + h) / h**2 - 0.5) * d2
        report(callback, i, sig, y, x0, watch)
    watch.close(y)
    return from_edm(model, y, sig[-1])


__all__ = ["unipc", "unipc_coefficients", "dpmpp_3m"]
