"""Samplers that work in model space (x, t) with the schedule's alpha, sigma, logSNR: ddim, euler_maruyama, pc.

They take the grid in EDM sigma like every sampler and convert it to times, so they can start at
se=inf (t=1 of the flow schedule) exactly. The step to se=0 is a noise-free x0 readout.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Union

import torch

from .core import FiniteWatch, report, steps
from .grids import grid_values
from .noise import GeneratorLike, randn_like
from .registry import register

EtaLike = Union[float, Callable[[float], float]]


def levels(model, grid: torch.Tensor) -> tuple[list[float], list[float], list[float], list[float]]:
    """(grid as floats, times, alphas, sigmas) of a grid of EDM sigmas, read once; the model caches them too."""
    rows = _grid_levels(model.schedule, tuple(grid_values(grid)))
    prep = getattr(model, "prepare_times", None)
    if prep is not None:
        prep([t for t, se in zip(rows[1], rows[0]) if se > 0])
    return rows[0], rows[1], rows[2], rows[3]


@functools.lru_cache(maxsize=1024)
def _grid_levels(schedule, sig: tuple[float, ...]) -> tuple[list[float], ...]:
    """(se, t, alpha, sigma) rows of a grid, one host read per (schedule, grid), remembered."""
    g = torch.tensor(sig, dtype=torch.float64)
    return tuple(torch.stack([g, *schedule.levels(g)]).tolist())


def times(model, grid: torch.Tensor) -> tuple[list[float], list[float], list[float]]:
    """(grid as floats, times, alphas) of a grid of EDM sigmas under the model's schedule."""
    return levels(model, grid)[:3]


def report_x(callback, i: int, sig: list[float], x: torch.Tensor, alpha_next: float, x0: torch.Tensor,
             watch: Optional[FiniteWatch] = None) -> None:
    """``core.report`` for samplers in model space: the callback sees y = x/alpha_next."""
    # callbacks always see the EDM view y = x/alpha, whatever space the sampler works in
    report(callback, i, sig, x if callback is None else x / alpha_next, x0, watch)


@register("ddim", nfe=lambda n, **_: n, rule="n", grid="uniform_t", stochastic=True)
@torch.no_grad()
def ddim(model, x: torch.Tensor, grid: torch.Tensor, *, generator: GeneratorLike = None, callback=None,
         class_labels: Optional[torch.Tensor] = None, progress: bool = False, eta: float = 0.0,
         variance: str = "posterior") -> torch.Tensor:
    """DDIM with eta (docs/theory.md §6.6): eta=0 deterministic, eta=1 DDPM ancestral with the posterior variance.

    From t to s: ``x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z``, ``c = eta sigma_s
    sqrt(1 - exp(lam_t - lam_s))``. ``variance="large"`` keeps that mean but draws the noise with
    DDPM's alternative std ``eta sqrt(1 - alpha_t^2/alpha_s^2)`` (sqrt(beta_t) for unit strides).
    """
    if variance not in ("posterior", "large"):
        raise ValueError(f"ddim variance must be 'posterior' or 'large'; got {variance!r}")
    if eta < 0:
        raise ValueError(f"ddim eta must be >= 0; got {eta}")
    sig, ts, alphas = times(model, grid)
    watch = FiniteWatch()
    for i in steps(sig, progress, "ddim"):
        pred = model(x, ts[i], class_labels)
        x0, eps = pred.x0, pred.eps
        se, sn, a_s = sig[i], sig[i + 1], alphas[i + 1]
        if sn == 0:
            x = x0 if a_s == 1.0 else a_s * x0
        else:
            s_s = a_s * sn  # sigma_s, from the EDM level so that se=0 means exactly no noise
            ratio2 = (sn / se) ** 2  # exp(lam_t - lam_s); 0 at se = inf
            c = eta * s_s * math.sqrt(1 - ratio2)
            x = torch.mul(x0, a_s).add_(eps, alpha=math.sqrt(max(s_s**2 - c**2, 0.0)))
            std = c if variance == "posterior" else eta * math.sqrt(max(1 - (alphas[i] / a_s) ** 2, 0.0))
            if std > 0:
                x = x + std * randn_like(x, generator)
        report_x(callback, i, sig, x, a_s, x0, watch)
    watch.close(x)
    return x


def _check_eta(val: float, t: float, model) -> float:
    if not (math.isfinite(val) and val >= 0):
        raise ValueError(f"eta_t must be finite and >= 0; got {val} at t={t:.6g} ({model.schedule.name}); "
                         f"start the grid below se=inf for a stochastic reverse SDE")
    return val


def _eta_at(eta: EtaLike, model, t: float) -> float:
    """eta_t: a multiple of the forward diffusion g(t) (float) or a user function of t."""
    return _etas(eta, model, [t])[0]


def _etas(eta: EtaLike, model, ts: list[float]) -> list[float]:
    """eta_t at every time in ``ts``, computed once up front (g(t) for all of them in one host read)."""
    if callable(eta):
        return [_check_eta(float(eta(t)), t, model) for t in ts]
    if eta == 0:
        return [0.0] * len(ts)  # the PF-ODE; skips g, which is infinite at t=1 of the flow schedule
    if not ts:
        return []
    g2 = model.schedule.drift_diffusion(torch.tensor(ts, dtype=torch.float64))[1].tolist()
    return [_check_eta(float(eta) * math.sqrt(v) if v >= 0 else math.nan, t, model) for v, t in zip(g2, ts)]


def sde_step(model, x: torch.Tensor, t: float, t_next: float, eta_t: float, generator: GeneratorLike,
             class_labels: Optional[torch.Tensor], lazy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler-Maruyama step of the reverse-SDE family (docs/theory.md §6.7); returns (x_next, x0_hat).

    ``x - h [f x - (g^2 + eta_t^2)/2 score] + eta_t sqrt(h) z`` written as ``velocity - eta_t^2/2 score``
    (velocity = f x - g^2/2 score is the PF-ODE drift), which stays finite at t=1 of the flow schedule.
    ``lazy=True`` returns the Prediction instead of x0_hat (a sampler without a callback never needs x0).
    """
    pred = model(x, t, class_labels)
    h = t - t_next
    drift = pred.velocity if eta_t == 0 else pred.velocity - 0.5 * eta_t**2 * pred.score
    x = torch.add(x, drift, alpha=-h)
    if eta_t > 0:
        x = x + eta_t * math.sqrt(h) * randn_like(x, generator)
    return x, (pred if lazy else pred.x0)


@register("euler_maruyama", nfe=lambda n, **_: n, rule="n", grid="uniform_t", stochastic=True)
@torch.no_grad()
def euler_maruyama(model, x: torch.Tensor, grid: torch.Tensor, *, generator: GeneratorLike = None, callback=None,
                   class_labels: Optional[torch.Tensor] = None, progress: bool = False,
                   eta: EtaLike = 1.0) -> torch.Tensor:
    """Reverse-SDE family in t: eta_t = eta*g(t) (eta=1 classical reverse SDE, 0 the PF-ODE) or eta(t)."""
    sig, ts, alphas = times(model, grid)
    n = len(sig) - 1
    etas = dict(zip([i for i in range(n) if sig[i + 1] != 0],
                    _etas(eta, model, [ts[i] for i in range(n) if sig[i + 1] != 0])))
    watch = FiniteWatch()
    for i in steps(sig, progress, "euler_maruyama"):
        if sig[i + 1] == 0:  # final noise-free readout
            x0 = model(x, ts[i], class_labels).x0
            x = x0 if alphas[i + 1] == 1.0 else alphas[i + 1] * x0
        else:
            x, x0 = sde_step(model, x, ts[i], ts[i + 1], etas[i], generator, class_labels)
        report_x(callback, i, sig, x, alphas[i + 1], x0, watch)
    watch.close(x)
    return x


def _langevin_step(score: torch.Tensor, z: torch.Tensor, a: float, snr: float, sigma: float, norm: str) -> torch.Tensor:
    """Step size e per sample: 2 a (snr ||z|| / ||score||)^2 with batch-mean or own norms, or 2 a (snr sigma)^2."""
    if norm == "sigma":  # ||z||^2/||score||^2 ~ sigma^2 when the noise dominates; needs no other sample
        return torch.full((score.shape[0],), 2 * a * (snr * sigma) ** 2, dtype=score.dtype, device=score.device)
    nz, ns = (v.reshape(v.shape[0], -1).norm(dim=1) for v in (z, score))
    if norm == "batch":
        nz, ns = nz.mean().expand_as(nz), ns.mean().expand_as(ns)
    return 2 * a * (snr * nz / ns) ** 2


@register("pc", nfe=lambda n, corrector_steps=1, **_: (n - 1) * (corrector_steps + 1) + 1,
          rule="(n-1)(corrector_steps+1)+1", grid="uniform_t", stochastic=True)
@torch.no_grad()
def pc(model, x: torch.Tensor, grid: torch.Tensor, *, generator: GeneratorLike = None, callback=None,
       class_labels: Optional[torch.Tensor] = None, progress: bool = False, corrector_steps: int = 1,
       snr: float = 0.16, norm: str = "sigma", eta: EtaLike = 1.0) -> torch.Tensor:
    """Predictor-corrector (Score SDE): Langevin corrector steps at t_i, then a reverse-SDE Euler-Maruyama step.

    Langevin: ``x += e score + sqrt(2e) z``, ``e = 2 a (snr ||z|| / ||score||)^2`` with
    ``a = alpha_next^2/alpha^2`` (1 - beta of the step; 1 for VE). ``norm="sigma"`` (default) uses
    e = 2 a (snr sigma_t)^2, which needs no other sample, so per-image seeds hold; ``"batch"``
    averages the norms over the batch as the Score SDE code does (image i then depends on its
    batch; on the 2-D ring both give the right moments); ``"sample"``
    uses each sample's own norms, which is only sane in high dimension (a near-zero score gives a
    huge step).
    """
    if norm not in ("batch", "sigma", "sample"):
        raise ValueError(f"pc norm must be 'batch', 'sigma' or 'sample'; got {norm!r}")
    if corrector_steps < 0:
        raise ValueError(f"pc corrector_steps must be >= 0; got {corrector_steps}")
    sig, ts, alphas, sigmas = levels(model, grid)
    n = len(sig) - 1
    etas = dict(zip([i for i in range(n) if sig[i + 1] != 0],
                    _etas(eta, model, [ts[i] for i in range(n) if sig[i + 1] != 0])))
    watch = FiniteWatch()
    for i in steps(sig, progress, "pc"):
        if sig[i + 1] == 0:
            x0 = model(x, ts[i], class_labels).x0
            x = x0 if alphas[i + 1] == 1.0 else alphas[i + 1] * x0
            report_x(callback, i, sig, x, alphas[i + 1], x0, watch)
            continue
        a = min((alphas[i + 1] / alphas[i]) ** 2, 1.0) if alphas[i] > 0 else 1.0
        for _ in range(corrector_steps):
            score = model(x, ts[i], class_labels).score
            z = randn_like(x, generator)
            e = _langevin_step(score, z, a, snr, sigmas[i], norm).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
            x = x + e * score + torch.sqrt(2 * e) * z
            watch.add(x, i, sig[i], sig[i])
        x, x0 = sde_step(model, x, ts[i], ts[i + 1], etas[i], generator, class_labels)
        report_x(callback, i, sig, x, alphas[i + 1], x0, watch)
    watch.close(x)
    return x


__all__ = ["levels", "times", "report_x", "sde_step", "ddim", "euler_maruyama", "pc"]
