"""Helpers every sampler shares: the EDM view, the step loop, finiteness checks, callbacks.

The EDM view (docs/theory.md §1.2): ``y = x/alpha``, ``se = sigma/alpha``, ``y = x0 + se*eps``, and the
denoiser ``D(y, se) = model.denoise(y, se)``. In it the PF-ODE is ``dy/dse = (y - D(y, se))/se``
for every schedule, so one solver serves VP, VE, EDM and flow models alike.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterable, Optional

import torch
from tqdm.auto import tqdm

from diffusion.schedules import Schedule

from .grids import SE_CAP, grid_values

Callback = Optional[Callable[[dict], None]]
Denoiser = Callable[[torch.Tensor, "float | torch.Tensor"], torch.Tensor]


class NonFiniteError(FloatingPointError):
    """Sampling produced NaN or inf; the message names the step and its noise levels."""


@functools.lru_cache(maxsize=4096)
def level_at(schedule: Schedule, se: float) -> tuple[float, float, float]:
    """(t, alpha, sigma) at EDM level ``se`` as floats (``Schedule.levels``), remembered per schedule and level."""
    return tuple(torch.stack(schedule.levels(float(se)))[:, 0].tolist())


def t_at(schedule: Schedule, se: float) -> float:
    """The schedule time of EDM level ``se`` (0 -> t=0, >= the prior's level -> t_max); see ``Schedule.levels``."""
    return level_at(schedule, float(se))[0]


def alpha_at(schedule: Schedule, se: float) -> float:
    """alpha at EDM level ``se``: converts between x (model space) and y = x/alpha (EDM view)."""
    return level_at(schedule, float(se))[1]


def prepare(model, sig: list[float]) -> None:
    """Cache the model's coefficients for every level of the grid at once (no host reads per step)."""
    fn = getattr(model, "prepare_levels", None)
    if fn is not None:
        fn([se for se in sig if se > 0])


def to_edm(model, x: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """(y, grid as floats) for a sampler working in the EDM view; an infinite top becomes SE_CAP.

    ``x`` is the state at ``grid[0]`` in model space. At se=inf (flow, t=1) x is pure noise
    sigma(t_max)*eps, and the same noise at the capped level is y = SE_CAP*eps (``Prior.edm_start``).
    """
    sig = grid_values(grid)
    if math.isinf(sig[0]):
        if sig[1] >= SE_CAP:
            raise ValueError(f"grid starts at inf and its next level {sig[1]:.6g} is >= SE_CAP={SE_CAP}; "
                             f"EDM-view samplers replace inf by SE_CAP")
        sig[0], scale = model.schedule.prior.edm_start(SE_CAP)
        y = x * scale
    else:
        y = x / alpha_at(model.schedule, sig[0])
    prepare(model, sig)
    return y, sig


def from_edm(model, y: torch.Tensor, se: float) -> torch.Tensor:
    """Back to model space x = alpha*y at level ``se`` (at se=0 this is the sample x0)."""
    a = alpha_at(model.schedule, se)
    return y if a == 1.0 else y * a


class _Denoiser:
    """D(y, se) = model.denoise(y, se, labels), plus ``slope`` when the model has a cheaper one."""

    def __init__(self, model, class_labels: Optional[torch.Tensor]):
        self.model, self.labels = model, class_labels
        # looked up on the class: a wrapper that forwards unknown attributes to an inner ScoreModel
        # (a guidance wrapper, say) must not have its own denoise bypassed
        self.slope = model.denoise_and_slope if "denoise_and_slope" in dir(type(model)) else None

    def __call__(self, y: torch.Tensor, se) -> torch.Tensor:
        return self.model.denoise(y, se, self.labels)


def denoiser(model, class_labels: Optional[torch.Tensor] = None) -> Denoiser:
    """D(y, se): the model's x0 estimate in the EDM view (se a float or a per-sample tensor)."""
    return _Denoiser(model, class_labels)


def afs_slope(y: torch.Tensor, se: float) -> torch.Tensor:
    """Analytical first step (docs/theory.md §6.5): at large se, (y - D)/se ~ y/sqrt(1 + se^2), no network call."""
    return y / math.sqrt(1 + se * se)


def denoise_and_slope(D, y: torch.Tensor, se: float, analytic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, slope (y - x0_hat)/se) from the network, or from the analytical first step (no call)."""
    if analytic:
        d = afs_slope(y, se)
        return y - se * d, d
    slope = getattr(D, "slope", None)
    if slope is not None:
        return slope(y, se, D.labels)
    x0 = D(y, se)
    return x0, torch.sub(y, x0).div_(se)


class FiniteWatch:
    """Finiteness per step, kept on the device and read once when sampling ends (no per-step sync).

    Each step adds one cheap reduction (the sum of the state: NaN and inf propagate through it, and
    ``isfinite`` over the whole state costs ~50x more on a CPU). ``close`` reads them once and
    raises NonFiniteError at the first step whose state held NaN/inf, with the number of
    non-finite values and samples counted in the final state (never drop samples silently).
    """

    def __init__(self) -> None:
        self.records: list[tuple[int, float, float, torch.Tensor]] = []

    def add(self, y: torch.Tensor, i: int, se: float, se_next: float) -> None:
        """Record the sum of ``y`` after step ``i`` (one reduction, no host read)."""
        # half types accumulate in float32, so a large but finite state cannot overflow the check
        acc = torch.float32 if y.dtype in (torch.float16, torch.bfloat16) else None
        self.records.append((i, se, se_next, y.sum(dtype=acc)))

    def close(self, final: torch.Tensor) -> None:
        """One host read for the whole run; on NaN/inf raise NonFiniteError naming the first bad step."""
        if not self.records:
            return
        records, self.records = self.records, []
        ok = torch.isfinite(torch.stack([r[3] for r in records])).tolist()
        if all(ok):
            return
        i, se, sn, _ = records[ok.index(False)]
        bad = ~torch.isfinite(final.reshape(final.shape[0] if final.ndim > 0 else 1, -1))
        n_bad, rows = torch.stack([bad.sum(), bad.any(1).sum()]).tolist()
        raise NonFiniteError(f"sampling produced {n_bad} non-finite values (in {rows} of {bad.shape[0]} samples) at "
                             f"step {i} (se {se:.6g} -> {sn:.6g}) (the first step with NaN/inf; values counted in "
                             f"the final state)")


def check_finite(y: torch.Tensor, i: int, se: float, se_next: float) -> None:
    """Raise NonFiniteError counting the NaN/inf values after step ``i`` now (reads the device)."""
    w = FiniteWatch()
    w.add(y, i, se, se_next)
    w.close(y)


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_rank() != 0)


def steps(sig: list[float], progress: bool = False, desc: str = "sampling") -> Iterable[int]:
    """Step indices 0..len(sig)-2, with a tqdm bar when ``progress`` (main process only)."""
    n = len(sig) - 1
    if not progress or not _is_main_process():
        return range(n)
    return tqdm(range(n), desc=desc, leave=False)


def report(callback: Callback, i: int, sig: list[float], y: torch.Tensor, x0_hat: Optional[torch.Tensor],
           watch: Optional[FiniteWatch] = None) -> None:
    """After step i: record y's finiteness in ``watch`` (or check it now), then call ``callback(dict(...))``.

    ``y`` is the state *after* the step (at ``se_next``, EDM view); ``x0_hat`` the denoiser output
    at ``se`` (the analytic one for an AFS step).
    """
    if watch is None:
        check_finite(y, i, sig[i], sig[i + 1])
    else:
        watch.add(y, i, sig[i], sig[i + 1])
    if callback is not None:
        callback(dict(i=i, se=sig[i], se_next=sig[i + 1], y=y, x0_hat=x0_hat))


__all__ = ["NonFiniteError", "FiniteWatch", "prepare", "t_at", "alpha_at", "to_edm", "from_edm", "denoiser", "afs_slope", "check_finite",
           "steps", "report", "Callback", "Denoiser"]
