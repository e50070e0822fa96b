"""Sampling grids: float64 EDM noise levels se = sigma/alpha from high to low, ending in an explicit 0.

Every grid function returns ``n + 1`` values for ``n`` steps: ``n`` decreasing positive noise levels
followed by 0, so the last step (from ``se_last`` to 0, one x0 readout) is part of the grid and of
the NFE count. ``se_last`` (the last nonzero level) is a parameter of every family because with few
steps it moves the error more than the solver's order does (docs/theory.md §5.1).

A grid may start at ``inf`` (the flow schedule at t=1): samplers that work in t (flow_euler, ddim,
euler_maruyama) start there exactly; samplers that work in the EDM view start at ``SE_CAP`` instead.
Grid functions that need a finite top use ``top_sigma(schedule)``, which applies the same cap.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from diffusion.schedules import Schedule

#: EDM sigma used in place of an infinite top (flow at t=1 has alpha=0): t = 1000/1001 there, so
#: dropping the data term alpha*x0 costs ~1e-3 of the data scale, below the VP schedules' own
#: alpha(1) ~ 6e-3, while float32 cancellation in the first step stays ~1e-4.
SE_CAP = 1000.0
#: Default last nonzero level of the textbook grids (EDM's sigma_min).
SE_LAST = 0.002


def top_sigma(schedule: Schedule) -> float:
    """The schedule's largest EDM sigma (its prior's), capped at ``SE_CAP`` (flow's is infinite)."""
    top = schedule.prior.sigma_edm
    return SE_CAP if math.isinf(top) else top


def default_se_last(schedule: Optional[Schedule]) -> float:
    """EDM's 0.002, or the schedule's smallest sigma when that is larger (VE: 0.01)."""
    return SE_LAST if schedule is None else max(SE_LAST, schedule.sigma_edm_min)


def _finish(nonzero: torch.Tensor, n: int, what: str, ends: Optional[tuple[float, float]] = None) -> torch.Tensor:
    """Append the explicit 0 and check the grid; ``ends`` pins the first/last nonzero levels exactly."""
    nonzero = nonzero.to(torch.float64).clone()
    if ends is not None:  # exp(log(x)) and friends are off by an ulp; the endpoints are parameters
        nonzero[0] = ends[0]
        if n > 1:
            nonzero[-1] = ends[1]
    g = torch.cat([nonzero, torch.zeros(1, dtype=torch.float64)])
    assert g.numel() == n + 1, (what, g.numel(), n)
    check_grid(g, what)
    return g


def _check_n(n: int, what: str) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{what}: the number of steps n must be an integer >= 1; got {n!r}")
    return n


def _check_range(se_last: float, se_max: float, what: str) -> None:
    if not (0 < se_last < se_max < math.inf):
        raise ValueError(f"{what}: need 0 < se_last < se_max < inf; got se_last={se_last}, se_max={se_max}")


def check_grid(grid: torch.Tensor, what: str = "grid") -> torch.Tensor:
    """Validate a grid: 1-D, >= 2 points, strictly decreasing, >= 0, finite except a leading inf."""
    grid_values(grid, what)
    return torch.as_tensor(grid, dtype=torch.float64)


def grid_values(grid: torch.Tensor, what: str = "grid") -> list[float]:
    """The validated grid as Python floats (``check_grid``'s rules; one host read)."""
    g = torch.as_tensor(grid, dtype=torch.float64)
    if g.ndim != 1 or g.numel() < 2:
        raise ValueError(f"{what} must be a 1-D sequence of at least 2 noise levels; got shape {tuple(g.shape)}")
    v = g.tolist()  # one read, then plain Python: a grid has tens of points
    if any(math.isnan(x) for x in v):
        raise ValueError(f"{what} contains NaN: {v}")
    if any(math.isinf(x) for x in v[1:]) or any(x < 0 for x in v):
        raise ValueError(f"{what} must be >= 0 and finite (only the first point may be inf); got {v}")
    for i in range(len(v) - 1):
        if not v[i + 1] < v[i]:
            raise ValueError(f"{what} must strictly decrease (high noise -> low); got se[{i}]={v[i]:.6g} <= "
                             f"se[{i + 1}]={v[i + 1]:.6g}")
    return v


def polynomial(n: int, se_last: float = SE_LAST, se_max: float = 80.0, p: float = 1.0) -> torch.Tensor:
    """log se_i = log se_max + (log se_last - log se_max) (i/(n-1))^p for i < n, then 0 (docs/theory.md §5.2)."""
    _check_n(n, "polynomial grid")
    _check_range(se_last, se_max, "polynomial grid")
    if not p > 0:
        raise ValueError(f"polynomial grid: exponent p must be > 0; got {p}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) ** p if n > 1 else torch.zeros(1, dtype=torch.float64)
    log_se = math.log(se_max) + (math.log(se_last) - math.log(se_max)) * ramp
    return _finish(log_se.exp(), n, "polynomial grid", (se_max, se_last))


def uniform_logsnr(n: int, se_last: float = SE_LAST, se_max: float = 80.0) -> torch.Tensor:
    """Uniform in logSNR = -2 log se between se_max and se_last, then 0 (the polynomial grid with p=1)."""
    return polynomial(n, se_last, se_max, p=1.0)


def karras(n: int, se_last: float = SE_LAST, se_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's rho-ramp: se_i = (se_max^(1/rho) + i/(n-1) (se_last^(1/rho) - se_max^(1/rho)))^rho, then 0."""
    _check_n(n, "karras grid")
    _check_range(se_last, se_max, "karras grid")
    if not rho > 0:
        raise ValueError(f"karras grid: rho must be > 0; got {rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = se_last ** (1 / rho), se_max ** (1 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho, n, "karras grid", (se_max, se_last))


def vp_time_uniform(n: int, se_last: float = SE_LAST, se_max: float = 80.0, eps_s: float = 1e-3) -> torch.Tensor:
    """AMED-Solver's 'time uniform' grid: uniform t in [1, eps_s] of a VP-linear SDE fitted to [se_last, se_max]."""
    _check_n(n, "vp_time_uniform grid")
    _check_range(se_last, se_max, "vp_time_uniform grid")
    if not 0 < eps_s < 1:
        raise ValueError(f"vp_time_uniform grid: eps_s must lie in (0, 1); got {eps_s}")
    # se(t)^2 = exp(beta_d t^2 / 2 + beta_min t) - 1, with beta_d, beta_min chosen so that
    # se(1) = se_max and se(eps_s) = se_last (EDM's VP discretisation).
    a_hi, a_lo = math.log1p(se_max**2), math.log1p(se_last**2)
    beta_d = 2 * (a_lo / eps_s - a_hi) / (eps_s - 1)
    beta_min = a_hi - beta_d / 2
    t = torch.linspace(1, eps_s, n, dtype=torch.float64) if n > 1 else torch.ones(1, dtype=torch.float64)
    return _finish(torch.sqrt(torch.expm1(beta_d * t**2 / 2 + beta_min * t)), n, "vp_time_uniform grid",
                   (se_max, se_last))


def uniform_t(schedule: Schedule, n: int, se_last: Optional[float] = None) -> torch.Tensor:
    """Uniform in the t of ``schedule`` (any schedule, shifted ones included), as EDM sigmas, then 0.

    Without ``se_last`` the points are t_max (1 - i/n), i < n: the classic grid whose next point
    would be t=0 (DDIM 'trailing' spacing on ddpm, rectified-flow Euler on flow; the flow grid
    starts at se=inf, i.e. t=1). With ``se_last`` they run linearly from t_max to t(se_last).
    """
    _check_n(n, "uniform_t grid")
    t_max = schedule.t_max
    if se_last is None:
        t = t_max * (1 - torch.arange(n, dtype=torch.float64) / n)
    else:
        if not 0 < se_last < schedule.sigma_edm_max:
            raise ValueError(f"uniform_t grid: se_last={se_last} must lie in (0, {schedule.sigma_edm_max:.6g}) "
                             f"for {schedule.name}")
        t_last = float(schedule.t_of_sigma_edm(se_last))
        t = torch.linspace(t_max, t_last, n, dtype=torch.float64) if n > 1 else torch.full((1,), t_max, dtype=torch.float64)
    return _finish(schedule.sigma_edm(t), n, f"uniform_t grid of {schedule.name}")


def flow_uniform(n: int, se_last: Optional[float] = None, shift: float = 1.0, se_max: float = math.inf) -> torch.Tensor:
    """FlowMatchEuler's grid: flow sigma uniform from 1 to sigma_last, warped by SD3's shift, as EDM sigmas, then 0.

    The flow noise level sigma = se/(1+se) runs linearly from 1 (se=inf) to the unwarped sigma_last,
    then ``shift`` maps it to s sigma/(1 + (s-1) sigma) (docs/theory.md §5.2, §10.2: the SD3 time shift). Without
    ``se_last`` the unwarped sigma_last is diffusers' 1/1000. Works for any schedule: it is a grid in se,
    starting at ``se_max`` (the schedule's top in ``make``; inf on flow) with the same spacing below it.
    """
    _check_n(n, "flow_uniform grid")
    if not (shift > 0 and math.isfinite(shift)):
        raise ValueError(f"flow_uniform grid: shift must be a finite number > 0; got {shift}")
    if se_last is None:
        s_last = 1e-3
    else:
        if not 0 < se_last < math.inf:
            raise ValueError(f"flow_uniform grid: se_last must be > 0 and finite; got {se_last}")
        warped = se_last / (1 + se_last)
        s_last = warped / (shift - (shift - 1) * warped)  # the inverse of the shift
    if not se_max > 0:
        raise ValueError(f"flow_uniform grid: se_max must be > 0; got {se_max}")
    w_top = 1.0 if math.isinf(se_max) else se_max / (1 + se_max)
    s_top = w_top / (shift - (shift - 1) * w_top)
    if not s_last < s_top:
        raise ValueError(f"flow_uniform grid: need se_last < se_max; got se_last={se_last}, se_max={se_max}")
    sig = torch.linspace(s_top, s_last, n, dtype=torch.float64) if n > 1 else torch.full((1,), s_top, dtype=torch.float64)
    sig = shift * sig / (1 + (shift - 1) * sig)
    se = sig / (1 - sig)  # 1/0 = inf at the top: the grid starts at t=1 of a flow model
    se[0] = se_max
    if se_last is not None and n > 1:
        se[-1] = se_last
    return _finish(se, n, "flow_uniform grid")


GRIDS: dict[str, Callable[..., torch.Tensor]] = {
    "flow_uniform": flow_uniform,
    "karras": karras,
    "polynomial": polynomial,
    "uniform_logsnr": uniform_logsnr,
    "vp_time_uniform": vp_time_uniform,
    "uniform_t": uniform_t,
}


def available() -> list[str]:
    """Names accepted by ``make``."""
    return sorted(GRIDS)


def make(kind: str, n: int, schedule: Optional[Schedule] = None, **params) -> torch.Tensor:
    """Build grid ``kind`` with ``n`` steps; se_max / se_last default to the schedule's range.

    For ``uniform_t``, ``grid_schedule=`` picks the schedule whose t is uniform (e.g. a shifted
    flow for SD3-style sampling); it defaults to ``schedule``.
    """
    if kind not in GRIDS:
        raise ValueError(f"unknown grid {kind!r}; valid grids: {available()}")
    if kind == "uniform_t":
        sched = params.pop("grid_schedule", None) or schedule
        if sched is None:
            raise ValueError("the uniform_t grid needs a schedule (schedule= or grid_schedule=)")
        return uniform_t(sched, n, **params)
    if kind == "flow_uniform":
        params.setdefault("se_max", math.inf if schedule is None else schedule.sigma_edm_max)
        return flow_uniform(n, **params)
    params.setdefault("se_max", top_sigma(schedule) if schedule is not None else 80.0)
    params.setdefault("se_last", default_se_last(schedule))
    return GRIDS[kind](n, **params)


__all__ = ["SE_CAP", "SE_LAST", "top_sigma", "default_se_last", "check_grid", "grid_values", "polynomial", "uniform_logsnr",
           "karras", "vp_time_uniform", "uniform_t", "flow_uniform", "GRIDS", "available", "make"]
