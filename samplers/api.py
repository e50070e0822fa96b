"""One entry point: ``sample(model, noise, sampler=..., nfe=... | grid=...) -> SampleResult``.

Start convention: ``noise`` is unit Gaussian eps. The run starts at the grid's first level se_0 with
``y_T = se_0 * eps`` in the EDM view, i.e. ``x_T = alpha(t_0) y_T = sigma(t_0) eps`` in model space:
the data term ``alpha(t_0) x0`` of the true marginal is dropped (alpha(1) ~ 6e-3 on the DDPM and
VP schedules; 0 for VE/EDM, whose x_T = se_max eps). On the flow schedule the default grids start
at t=1 (se=inf) with ``x_T = eps`` exactly; samplers that work in the EDM view begin that grid at
``grids.SE_CAP`` with ``y = SE_CAP * eps`` (see samplers/grids.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from . import defaults, grids
from .core import level_at
from .mvt import load_predictor
from .noise import GeneratorLike
from .registry import nfe_of, spec, steps_for_nfe


@dataclass
class SampleResult:
    """Samples and what it took to make them."""

    x: torch.Tensor  # final samples (x0, data space)
    nfe: int  # network evaluations actually used (from the model's counter; CFG counts 2 per call)
    grid: torch.Tensor  # float64 EDM sigmas, high -> low, ending in 0
    sampler: str


#: samplers whose noise eta_t = eta g(t) is singular at se=inf (t=1 of the flow family)
_SDE_IN_T = ("euler_maruyama", "pc")


def default_grid(sampler: str, n: int, schedule, kind: Optional[str] = None, *, default_rule: bool = False,
                 **grid_opts) -> torch.Tensor:
    """The grid ``sample`` builds for ``n`` steps: the sampler's default family (or ``kind``) on the schedule.

    ``default_rule``: the grid of the default configuration (no sampler named), which switches to
    ``flow_uniform`` at high budgets; a named sampler keeps the low-budget family at every ``n``
    (the lam-multistep solvers unipc, dpmpp_2m/3m are 5-60x worse on flow_uniform's large first step).
    """
    kind = kind or spec(sampler).grid
    if kind == "uniform_t" and not grid_opts and schedule.family not in ("vp", "flow"):
        # t-uniform spacing is DDIM's / FlowMatch's convention for VP and flow models; on VE/EDM
        # schedules se is ~linear in t, so it would leave a last step from se_max/n to 0.
        kind = "default"
    if kind == "default":
        kind, params = defaults.grid_params(n, high=default_rule)  # the measured rule, se_last shrinking with n
        params.update(grid_opts)
        grid_opts = params
    try:
        key = tuple(sorted(grid_opts.items()))
        hash(key)
        g = _cached_grid(kind, n, schedule, key).clone()
    except TypeError:  # unhashable options (lists, tensors): build it afresh
        g = grids.make(kind, n, schedule, **grid_opts)
    if sampler in _SDE_IN_T and math.isinf(g[0]) and g.numel() > 1 and g[1] < grids.SE_CAP:
        # the reverse SDE's diffusion g(t) diverges at t=1 of flow schedules: start those at SE_CAP
        g[0] = grids.SE_CAP
    return g


@functools.lru_cache(maxsize=1024)
def _cached_grid(kind: str, n: int, schedule, key: tuple) -> torch.Tensor:
    """Grids are pure functions of (family, n, schedule, options): built once, cloned per call."""
    return grids.make(kind, n, schedule, **dict(key))


def _check_options(name: str, opts: dict) -> None:
    valid = spec(name).options()
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise ValueError(f"sampler {name!r} has no option(s) {unknown}; valid options: {valid}")


def sample(model, noise: torch.Tensor, *, sampler: Optional[str] = None, nfe: Optional[int] = None,
           grid: Union[None, str, torch.Tensor] = None, generator: GeneratorLike = None,
           class_labels: Optional[torch.Tensor] = None, progress: bool = False,
           grid_opts: Optional[dict] = None, **opts) -> SampleResult:
    """Sample from ``model`` starting at unit noise ``noise`` [B, ...]; see the module docstring.

    Give an NFE budget (``nfe``), a grid tensor, or both (then they must agree). With neither
    ``sampler`` nor a grid the measured default (samplers/defaults.py) is used. ``grid`` may also
    name a grid family from ``samplers.grids`` (built for the budget, with ``grid_opts``).
    """
    if not isinstance(noise, torch.Tensor) or noise.ndim < 2:
        raise ValueError(f"noise must be a tensor [B, ...] of unit Gaussian noise; got "
                         f"{type(noise).__name__} of shape {tuple(getattr(noise, 'shape', ()))}")
    default_rule = sampler is None
    if sampler is None:
        sampler = defaults.SAMPLER
        opts = {**defaults.OPTIONS, **opts}
    s = spec(sampler)  # unknown name -> ValueError listing available()
    _check_options(sampler, opts)
    schedule = model.schedule

    if sampler == "mvt" and isinstance(opts.get("predictor"), (str, Path)):
        pred = load_predictor(opts["predictor"], device=noise.device)
        opts["predictor"] = pred
        if grid is None and "grid" in pred.meta:  # a predictor is trained for its grid
            grid = torch.tensor(pred.meta["grid"], dtype=torch.float64)
        if "afs" in pred.meta:
            opts.setdefault("afs", bool(pred.meta["afs"]))

    if grid is None and nfe is None and s.nfe is None:
        # an adaptive solver needs no budget: solve the schedule's whole range, then read out x0
        g = torch.tensor([schedule.sigma_edm_max, schedule.sigma_edm_min, 0.0], dtype=torch.float64)
        if not torch.isfinite(g).all():
            raise ValueError(f"sampler {sampler!r} on schedule {schedule.name!r} (noise range {g[0]:.4g}..{g[1]:.4g}) "
                             f"needs a finite grid [se_max, se_last, 0]; pass grid=")
    elif grid is None or isinstance(grid, str):
        if nfe is None:
            raise ValueError(f"give an NFE budget (nfe=...) or a grid for sampler {sampler!r}"
                             + (" (adaptive: a grid [se_max, se_last, 0])" if s.nfe is None else ""))
        n = steps_for_nfe(sampler, nfe, **opts)
        g = default_grid(sampler, n, schedule, grid, default_rule=default_rule, **(grid_opts or {}))
    else:
        if grid_opts:
            raise ValueError("grid_opts only apply when the grid is built here (grid=None or a grid name)")
        g = grids.check_grid(grid, "grid")
        if g[-1] != 0:
            raise ValueError(f"sample() needs a grid ending at se=0 (the x0 readout); got last level {g[-1].item():.6g}")
        if nfe is not None and s.nfe is not None and nfe_of(sampler, g.numel() - 1, **opts) != nfe:
            raise ValueError(f"the grid has {g.numel() - 1} steps, which cost {nfe_of(sampler, g.numel() - 1, **opts)} "
                             f"NFE with {sampler!r}, not the nfe={nfe} asked for")
    top, se0 = schedule.prior.sigma_edm, g[0].item()
    if se0 > top * (1 + 1e-6):
        raise ValueError(f"grid starts at se={se0:.6g}, above the schedule's maximum {top:.6g} ({schedule.name})")

    check = getattr(model, "check_labels", None)
    if class_labels is not None and check is not None:
        check(class_labels, noise.shape[0])  # once per call: the steps then pass the checked tensor unread
    x_T = noise * level_at(schedule, se0)[2]  # sigma at se_0 (the prior's sigma at se=inf)
    bind = getattr(model, "bind_grid", None)
    if bind is not None:  # guidance that depends on the grid (CFG++'s next level, CFG-Zero*'s first steps)
        bind(g)
    before = model.nfe
    x = s.fn(model, x_T, g, generator=generator, class_labels=class_labels, progress=progress, **opts)
    return SampleResult(x=x, nfe=model.nfe - before, grid=g, sampler=sampler)


__all__ = ["SampleResult", "default_grid", "sample"]
