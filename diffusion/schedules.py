"""Noise schedules: every model is x_t = alpha(t) x0 + sigma(t) eps on t in [0, 1] (t=0 data).

All coefficients are computed in float64 and returned on the device of ``t``. A schedule is fully
described by its logSNR curve ``lam(t) = log(alpha^2 / sigma^2)`` plus a *family* that says how
alpha and sigma are recovered from lam:

* ``vp``   alpha^2 + sigma^2 = 1       (alpha^2 = sigmoid(lam))
* ``flow`` alpha + sigma = 1           (sigma = sigmoid(-lam/2)), rectified flow / SD3
* ``ve``   alpha = 1                   (sigma = exp(-lam/2)), VE and EDM

which is what lets shifted and interpolated schedules stay in their base family.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterator, Optional, Union

import torch

TimeLike = Union[float, torch.Tensor]

_FAMILIES = ("vp", "flow", "ve", "other")

_TRUST = threading.local()


@contextmanager
def trusted_times() -> Iterator[None]:
    """Inside the block, tensor times are not value-checked (a check reads the device: a host sync).

    The hot path (ScoreModel.forward, samplers, objectives) runs in it; its times come from grids and
    samplers that were validated where they entered. Python numbers are always checked (free).
    """
    depth = getattr(_TRUST, "depth", 0)
    _TRUST.depth = depth + 1
    try:
        yield
    finally:
        _TRUST.depth = depth


def _bad_time(bad: list) -> ValueError:
    return ValueError(f"time t must lie in [0, 1] (t=0 data, t=1 noise); got {bad}")


def as_time(t: TimeLike, device: torch.device | None = None) -> torch.Tensor:
    """Convert ``t`` to a float64 tensor and check it lies in [0, 1] (tensors: outside ``trusted_times``)."""
    if isinstance(t, (float, int)):
        if not 0 <= t <= 1:  # NaN fails this too
            raise _bad_time([t])
        return torch.tensor(float(t), dtype=torch.float64, device=device)
    tt = torch.as_tensor(t, dtype=torch.float64, device=device)
    if getattr(_TRUST, "depth", 0):
        return tt
    if torch.isnan(tt).any() or (tt < 0).any() or (tt > 1).any():
        raise _bad_time(tt[(tt < 0) | (tt > 1) | torch.isnan(tt)].flatten()[:3].tolist())
    return tt


@dataclass(frozen=True)
class Prior:
    """The marginal at the schedule's end time t: alpha x0 + sigma eps, used as N(0, sigma^2 I).

    The one place that knows the end point: samplers start from ``sample``, the likelihood scores
    with ``log_prob``, and ``sigma_edm`` (inf where alpha = 0, the flow schedule at t=1) bounds
    every noise level. ``data_var`` widens the std to sqrt(sigma^2 + alpha^2 data_var), exact for
    zero-mean Gaussian data of that variance.
    """

    t: float
    alpha: float
    sigma: float

    @property
    def sigma_edm(self) -> float:
        """EDM noise level sigma/alpha at the end (inf when alpha = 0)."""
        return math.inf if self.alpha == 0 else self.sigma / self.alpha

    def mean(self, like: torch.Tensor) -> torch.Tensor:
        """The prior mean: zeros (the data term alpha E[x0] is dropped)."""
        return torch.zeros_like(like)

    def std(self, data_var: Optional[float] = None) -> float:
        """sigma, or sqrt(sigma^2 + alpha^2 data_var)."""
        return math.sqrt(self.sigma**2 + (0.0 if data_var is None else self.alpha**2 * float(data_var)))

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        """x at the end time from unit noise: sigma * noise."""
        return noise * self.sigma

    def log_prob(self, x: torch.Tensor, data_var: Optional[float] = None) -> torch.Tensor:
        """log N(x; 0, std^2 I) per sample, [B] float64."""
        var = self.std(data_var) ** 2
        flat = x.double().flatten(1)
        return -0.5 * (flat.pow(2).sum(1) / var + flat.shape[1] * math.log(2 * math.pi * var))

    def edm_start(self, cap: float) -> tuple[float, float]:
        """(se0, scale): the EDM-view start level min(sigma_edm, cap) and y = scale * x for x = ``sample``.

        An infinite end level (alpha = 0) cannot be a state of the EDM view y = x/alpha; the same
        noise at the finite level ``cap`` is y = cap * eps = x * cap / sigma.
        """
        if self.alpha == 0:
            return cap, cap / self.sigma
        return self.sigma_edm, 1 / self.alpha


def _from_logsnr(lam: torch.Tensor, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Recover (alpha, sigma) from logSNR within a schedule family."""
    if family == "vp":
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
    if family == "flow":
        sigma = torch.sigmoid(-lam / 2)
        return 1 - sigma, sigma
    if family == "ve":
        return torch.ones_like(lam), torch.exp(-lam / 2)
    raise ValueError(f"cannot rebuild alpha, sigma from logSNR for family {family!r}; valid: vp, flow, ve")


class Schedule:
    """Base class: subclasses define ``alpha``/``sigma`` (and ideally ``logsnr``/``t_of_logsnr``)."""

    name: str = "schedule"
    family: str = "other"
    #: the largest/smallest t at which alpha and sigma are both > 0 (samplers start/stop there)
    t_min: float = 0.0
    t_max: float = 1.0

    # ---- core coefficients -------------------------------------------------------------------
    def alpha(self, t: TimeLike) -> torch.Tensor:
        """Signal scale alpha(t) (float64)."""
        raise NotImplementedError

    def sigma(self, t: TimeLike) -> torch.Tensor:
        """Noise scale sigma(t) (float64)."""
        raise NotImplementedError

    def logsnr(self, t: TimeLike) -> torch.Tensor:
        """log(alpha^2 / sigma^2), strictly decreasing in t."""
        t = as_time(t)
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def t_of_logsnr(self, lam: TimeLike) -> torch.Tensor:
        """Inverse of ``logsnr`` (bisection fallback; subclasses give closed forms)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        lo = torch.full_like(lam, self.t_min)
        hi = torch.full_like(lam, self.t_max)
        for _ in range(64):  # 2^-64 of the unit interval: below float64 resolution
            mid = (lo + hi) / 2
            go_right = self.logsnr(mid) > lam
            lo = torch.where(go_right, mid, lo)
            hi = torch.where(go_right, hi, mid)
        return (lo + hi) / 2

    # ---- EDM view ------------------------------------------------------------------------------
    def sigma_edm(self, t: TimeLike) -> torch.Tensor:
        """EDM noise level sigma/alpha = exp(-lam/2)."""
        t = as_time(t)
        return self.sigma(t) / self.alpha(t)

    def t_of_sigma_edm(self, se: TimeLike) -> torch.Tensor:
        """Time at which sigma/alpha equals ``se``."""
        se = torch.as_tensor(se, dtype=torch.float64)
        return self.t_of_logsnr(-2 * torch.log(se)).clamp(0.0, 1.0)

    @cached_property
    def _sigma_edm_min(self) -> float:
        return float(self.sigma_edm(max(self.t_min, 1e-5)))

    @property
    def sigma_edm_min(self) -> float:
        """Smallest positive EDM sigma the schedule reaches (at t_min)."""
        return self._sigma_edm_min

    @property
    def sigma_edm_max(self) -> float:
        """Largest EDM sigma the schedule reaches (at t_max; inf for flow): ``prior.sigma_edm``."""
        return self.prior.sigma_edm

    # ---- the end point and noise levels ------------------------------------------------------
    def prior_at(self, t: float) -> Prior:
        """The Gaussian prior at time ``t`` (coefficients read once, as Python floats)."""
        tt = as_time(float(t))
        return Prior(float(t), float(self.alpha(tt)), float(self.sigma(tt)))

    @cached_property
    def prior(self) -> Prior:
        """The prior at ``t_max``, computed once per schedule."""
        return self.prior_at(self.t_max)

    def levels(self, se: TimeLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, alpha, sigma) at EDM noise levels ``se`` (float64 [N]); se=0 is t=0, se >= prior.sigma_edm is t_max.

        Vectorised over a whole grid, so samplers read every per-step scalar once, up front.
        """
        se = torch.as_tensor(se, dtype=torch.float64).reshape(-1)
        p = self.prior
        top = se >= p.sigma_edm
        inner = torch.where((se > 0) & ~top, se, torch.ones_like(se))
        zero = se == 0
        with trusted_times():
            t_in = self.t_of_sigma_edm(inner)
            t = torch.where(zero, torch.zeros_like(se), torch.where(top, torch.full_like(se, p.t), t_in))
            alpha = torch.where(top, torch.full_like(se, p.alpha), self.alpha(t))
        # sigma = alpha * se for finite levels keeps se=0 exactly noise-free
        sigma = torch.where(top, torch.full_like(se, p.sigma), alpha * torch.where(top, torch.zeros_like(se), se))
        return t, alpha, sigma

    # ---- derivatives (autograd in float64; closed forms where subclasses give them) -----------
    def _grad(self, fn: Callable[[torch.Tensor], torch.Tensor], t: TimeLike) -> torch.Tensor:
        t = as_time(t).detach().clone().requires_grad_(True)
        with torch.enable_grad():
            y = fn(t)
            (g,) = torch.autograd.grad(y.sum(), t)
        return g.detach()

    def dalpha(self, t: TimeLike) -> torch.Tensor:
        """d alpha / dt."""
        return self._grad(self.alpha, t)

    def dsigma(self, t: TimeLike) -> torch.Tensor:
        """d sigma / dt."""
        return self._grad(self.sigma, t)

    def dlogsnr(self, t: TimeLike) -> torch.Tensor:
        """d lam / dt (negative)."""
        return self._grad(self.logsnr, t)

    def drift_diffusion(self, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward-SDE coefficients f(t) = dalpha/alpha and g^2(t) = -sigma^2 dlam/dt."""
        t = as_time(t)
        return self.dalpha(t) / self.alpha(t), -self.sigma(t) ** 2 * self.dlogsnr(t)

    # ---- validation ----------------------------------------------------------------------------
    def validate(self, n: int = 2049) -> "Schedule":
        """Raise ValueError unless alpha, sigma > 0 and logSNR strictly decreases inside (0, 1)."""
        lo = max(self.t_min, 1e-4)
        hi = min(self.t_max, 1 - 1e-4)
        if not lo < hi:
            raise ValueError(f"{self.name}: empty time range t_min={self.t_min}, t_max={self.t_max}")
        t = torch.linspace(lo, hi, n, dtype=torch.float64)
        a, s = self.alpha(t), self.sigma(t)
        if not (torch.isfinite(a).all() and torch.isfinite(s).all() and (a > 0).all() and (s > 0).all()):
            raise ValueError(f"{self.name}: alpha and sigma must be finite and > 0 on ({lo}, {hi})")
        lam = self.logsnr(t)
        steps = lam[1:] - lam[:-1]
        if not (steps < 0).all():
            i = int(torch.nonzero(steps >= 0)[0])
            raise ValueError(
                f"{self.name}: logSNR must be strictly decreasing in t, but lam({t[i]:.4f})={lam[i]:.6g} "
                f"<= lam({t[i + 1]:.4f})={lam[i + 1]:.6g}"
            )
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class LogSNRSchedule(Schedule):
    """A schedule given by its logSNR curve and family; alpha and sigma follow from lam."""

    def alpha(self, t: TimeLike) -> torch.Tensor:
        return _from_logsnr(self.logsnr(t), self.family)[0]

    def sigma(self, t: TimeLike) -> torch.Tensor:
        return _from_logsnr(self.logsnr(t), self.family)[1]


# ---------------------------------------------------------------------------------------------
# Concrete schedules
# ---------------------------------------------------------------------------------------------


class VPLinear(Schedule):
    """Score-SDE VP with linear beta(t) from beta_min to beta_max."""

    family = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"vp_linear needs 0 <= beta_min < beta_max; got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.name = f"vp_linear(beta_min={beta_min}, beta_max={beta_max})"
        self.validate()

    def log_alpha(self, t: TimeLike) -> torch.Tensor:
        """log alpha(t) = -t^2 (bmax-bmin)/4 - t bmin/2."""
        t = as_time(t)
        return -(t**2) * (self.beta_max - self.beta_min) / 4 - t * self.beta_min / 2

    def alpha(self, t: TimeLike) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: TimeLike) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))

    def dalpha(self, t: TimeLike) -> torch.Tensor:
        t = as_time(t)
        return self.alpha(t) * (-t * (self.beta_max - self.beta_min) / 2 - self.beta_min / 2)

    def dsigma(self, t: TimeLike) -> torch.Tensor:
        # sigma^2 = 1 - alpha^2  =>  sigma' = -alpha alpha' / sigma
        return -self.alpha(t) * self.dalpha(t) / self.sigma(t)

    def logsnr(self, t: TimeLike) -> torch.Tensor:
        la2 = 2 * self.log_alpha(t)
        return la2 - torch.log(-torch.expm1(la2))

    def t_of_logsnr(self, lam: TimeLike) -> torch.Tensor:
        lam = torch.as_tensor(lam, dtype=torch.float64)
        d = self.beta_max - self.beta_min
        # solve d/2 t^2 + bmin t + log(1 + e^-lam) = 0 for t >= 0
        c = torch.nn.functional.softplus(-lam)
        return (2 * c / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * c))).clamp(0, 1)


class DDPM(Schedule):
    """DDPM's discrete linear betas, made continuous: log(alphas_cumprod) is linear between knots.

    Index ``n`` (0..T-1, diffusers' timestep) sits at ``t = (n+1)/T``; ``t=0`` is clean data.
    """

    family = "vp"

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, num_train_timesteps: int = 1000,
                 betas: torch.Tensor | None = None):
        if betas is None:
            if not 0 < beta_start < beta_end < 1:
                raise ValueError(f"ddpm needs 0 < beta_start < beta_end < 1; got {beta_start}, {beta_end}")
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("ddpm betas must be a 1-D sequence with every value in (0, 1)")
        self.T = int(betas.numel())
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        # knots of log alpha^2 at t = 0, 1/T, ..., 1 (t=0: clean data, log 1 = 0)
        self._log_a2 = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(self.alphas_cumprod)])
        self.name = f"ddpm(T={self.T})"
        self.validate()

    def index_to_t(self, n: TimeLike) -> torch.Tensor:
        """diffusers/DDPM integer timestep n (0..T-1) -> continuous t."""
        return (torch.as_tensor(n, dtype=torch.float64) + 1) / self.T

    def t_to_index(self, t: TimeLike) -> torch.Tensor:
        """Continuous t -> (fractional) DDPM timestep; integer at the knots."""
        return as_time(t) * self.T - 1

    def log_alpha2(self, t: TimeLike) -> torch.Tensor:
        """Piecewise-linear interpolation of log(alphas_cumprod) in t."""
        t = as_time(t)
        knots = self._log_a2.to(t.device)
        pos = t * self.T
        i = pos.floor().clamp(0, self.T - 1).long()
        frac = pos - i
        return knots[i] + frac * (knots[i + 1] - knots[i])

    def alpha(self, t: TimeLike) -> torch.Tensor:
        return torch.exp(self.log_alpha2(t) / 2)

    def sigma(self, t: TimeLike) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(self.log_alpha2(t)))

    def dalpha(self, t: TimeLike) -> torch.Tensor:
        # piecewise linear log alpha^2: its slope on the segment holding t is T * (knot difference)
        t = as_time(t)
        knots = self._log_a2.to(t.device)
        i = (t * self.T).floor().clamp(0, self.T - 1).long()
        return self.alpha(t) * (knots[i + 1] - knots[i]) * self.T / 2

    def dsigma(self, t: TimeLike) -> torch.Tensor:
        return -self.alpha(t) * self.dalpha(t) / self.sigma(t)

    def logsnr(self, t: TimeLike) -> torch.Tensor:
        la2 = self.log_alpha2(t)
        return la2 - torch.log(-torch.expm1(la2))

    def t_of_logsnr(self, lam: TimeLike) -> torch.Tensor:
        lam = torch.as_tensor(lam, dtype=torch.float64)
        target = torch.nn.functional.logsigmoid(lam)  # log alpha^2
        knots = self._log_a2.to(lam.device)
        neg = -knots  # increasing
        j = torch.searchsorted(neg, (-target).contiguous()).clamp(1, self.T)
        lo, hi = knots[j - 1], knots[j]
        frac = (target - lo) / (hi - lo)
        return ((j - 1 + frac) / self.T).clamp(0, 1)


class Cosine(LogSNRSchedule):
    """Simple-diffusion cosine: lam(t) = -2 log tan(tmin + t (tmax - tmin)), lam in [lam_min, lam_max]."""

    family = "vp"

    def __init__(self, logsnr_min: float = -15.0, logsnr_max: float = 15.0):
        if not logsnr_min < logsnr_max:
            raise ValueError(f"cosine needs logsnr_min < logsnr_max; got {logsnr_min}, {logsnr_max}")
        self.tmin = math.atan(math.exp(-logsnr_max / 2))
        self.tmax = math.atan(math.exp(-logsnr_min / 2))
        self.name = f"cosine(logsnr in [{logsnr_min}, {logsnr_max}])"
        self.validate()

    def logsnr(self, t: TimeLike) -> torch.Tensor:
        t = as_time(t)
        return -2 * torch.log(torch.tan(self.tmin + t * (self.tmax - self.tmin)))

    def t_of_logsnr(self, lam: TimeLike) -> torch.Tensor:
        lam = torch.as_tensor(lam, dtype=torch.float64)
        return ((torch.atan(torch.exp(-lam / 2)) - self.tmin) / (self.tmax - self.tmin)).clamp(0, 1)


class SubVP(VPLinear):
    """Sub-VP SDE marginal: alpha of vp_linear, sigma = 1 - alpha^2 (a std, not a variance)."""

    family = "other"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        super().__init__(beta_min, beta_max)
        self.name = f"subvp(beta_min={beta_min}, beta_max={beta_max})"

    def sigma(self, t: TimeLike) -> torch.Tensor:
        return -torch.expm1(2 * self.log_alpha(t))

    def dsigma(self, t: TimeLike) -> torch.Tensor:
        return -2 * self.alpha(t) * self.dalpha(t)

    def logsnr(self, t: TimeLike) -> torch.Tensor:
        return 2 * (self.log_alpha(t) - torch.log(self.sigma(t)))

    def t_of_logsnr(self, lam: TimeLike) -> torch.Tensor:
        # closed form: with a2 = alpha^2 and u = e^-lam, SNR = a2/(1-a2)^2 = 1/u gives
        # -log a2 = log1p((u + sqrt(u^2 + 4u))/2); then the vp_linear quadratic in t
        lam = torch.as_tensor(lam, dtype=torch.float64)
        u = torch.exp(-lam)
        c = torch.log1p((u + torch.sqrt(u * u + 4 * u)) / 2)
        d = self.beta_max - self.beta_min
        return (2 * c / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * c))).clamp(0, 1)


class VE(Schedule):
    """Variance exploding: alpha = 1, sigma = smin (smax/smin)^t."""

    family = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"ve needs 0 < sigma_min < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.smin, self.smax = float(sigma_min), float(sigma_max)
        self.name = f"ve(sigma in [{sigma_min}, {sigma_max}])"
        self.validate()

    def alpha(self, t: TimeLike) -> torch.Tensor:
        return torch.ones_like(as_time(t))

    def sigma(self, t: TimeLike) -> torch.Tensor:
        return self.smin * (self.smax / self.smin) ** as_time(t)

    def dsigma(self, t: TimeLike) -> torch.Tensor:
        return self.sigma(t) * math.log(self.smax / self.smin)

    def dalpha(self, t: TimeLike) -> torch.Tensor:
        return torch.zeros_like(as_time(t))

    def t_of_logsnr(self, lam: TimeLike) -> torch.Tensor:
        lam = torch.as_tensor(lam, dtype=torch.float64)
        return ((-lam / 2 - math.log(self.smin)) / math.log(self.smax / self.smin)).clamp(0, 1)


class EDM(Schedule):
    """EDM (Karras et al.): alpha = 1, sigma = t * sigma_max; sampling grids live in sigma space."""

    family = "ve"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"edm needs 0 < sigma_min < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.smin, self.smax = float(sigma_min), float(sigma_max)
        self.t_min = self.smin / self.smax
        self.name = f"edm(sigma in [{sigma_min}, {sigma_max}])"
        self.validate()

    def alpha(self, t: TimeLike) -> torch.Tensor:
        return torch.ones_like(as_time(t))

    def sigma(self, t: TimeLike) -> torch.Tensor:
        return as_time(t) * self.smax

    def dalpha(self, t: TimeLike) -> torch.Tensor:
        return torch.zeros_like(as_time(t))

    def dsigma(self, t: TimeLike) -> torch.Tensor:
        return torch.full_like(as_time(t), self.smax)

    def t_of_logsnr(self, lam: TimeLike) -> torch.Tensor:
        lam = torch.as_tensor(lam, dtype=torch.float64)
        return (torch.exp(-lam / 2) / self.smax).clamp(0, 1)

    @property
    def sigma_edm_min(self) -> float:
        return self.smin


class Flow(Schedule):
    """Rectified flow / SD3: alpha = 1 - t, sigma = t."""

    family = "flow"
    name = "flow"

    def __init__(self) -> None:
        self.validate()

    def alpha(self, t: TimeLike) -> torch.Tensor:
        return 1 - as_time(t)

    def sigma(self, t: TimeLike) -> torch.Tensor:
        return as_time(t).clone()

    def dalpha(self, t: TimeLike) -> torch.Tensor:
        return -torch.ones_like(as_time(t))

    def dsigma(self, t: TimeLike) -> torch.Tensor:
        return torch.ones_like(as_time(t))

    def t_of_logsnr(self, lam: TimeLike) -> torch.Tensor:
        return torch.sigmoid(-torch.as_tensor(lam, dtype=torch.float64) / 2)


class Custom(Schedule):
    """A user schedule from two callables alpha(t), sigma(t); validated at construction."""

    def __init__(self, alpha_fn: Callable[[torch.Tensor], torch.Tensor],
                 sigma_fn: Callable[[torch.Tensor], torch.Tensor], name: str = "custom",
                 t_min: float = 0.0, t_max: float = 1.0):
        for v, what in ((t_min, "t_min"), (t_max, "t_max")):
            if not 0 <= v <= 1:
                raise ValueError(f"{what} must lie in [0, 1]; got {v}")
        self._a, self._s, self.name, self.t_min, self.t_max = alpha_fn, sigma_fn, name, t_min, t_max
        self.validate()

    def alpha(self, t: TimeLike) -> torch.Tensor:
        return self._a(as_time(t))

    def sigma(self, t: TimeLike) -> torch.Tensor:
        return self._s(as_time(t))


# ---------------------------------------------------------------------------------------------
# Derived schedules: SNR shift for resolution and its interpolation (docs/theory.md §10)
# ---------------------------------------------------------------------------------------------


class Shifted(LogSNRSchedule):
    """``lam'(t) = lam(t) + delta`` in the base's family (for flow: the SD3 time warp)."""

    def __init__(self, base: Schedule, delta: float):
        if base.family not in ("vp", "flow", "ve"):
            raise ValueError(f"cannot shift {base.name}: family {base.family!r}; shiftable families: vp, flow, ve")
        self.base, self.delta, self.family = base, float(delta), base.family
        self.t_min, self.t_max = base.t_min, base.t_max
        self.name = f"shifted({base.name}, delta={self.delta:+.4f})"
        self.validate()

    def logsnr(self, t: TimeLike) -> torch.Tensor:
        return self.base.logsnr(t) + self.delta

    def t_of_logsnr(self, lam: TimeLike) -> torch.Tensor:
        return self.base.t_of_logsnr(torch.as_tensor(lam, dtype=torch.float64) - self.delta)


def resolution_delta(resolution: int, base_resolution: int) -> float:
    """logSNR offset 2 log(base/res): pooling by s adds 2 log s, so a bigger image needs less SNR."""
    if resolution <= 0 or base_resolution <= 0:
        raise ValueError(f"resolutions must be positive; got resolution={resolution}, base={base_resolution}")
    return 2 * math.log(base_resolution / resolution)


def shift_for_resolution(base: Schedule, resolution: int, base_resolution: int = 64) -> Schedule:
    """Simple-diffusion / SD3 shift: the base schedule tuned at ``base_resolution`` used at ``resolution``."""
    delta = resolution_delta(resolution, base_resolution)
    return base if delta == 0 else Shifted(base, delta)


def flow_time_warp(t: TimeLike, s: float) -> torch.Tensor:
    """SD3's warp t' = s t / (1 + (s-1) t); on the flow schedule it shifts logSNR by -2 log s."""
    t = as_time(t)
    return s * t / (1 + (s - 1) * t)


class Interpolated(LogSNRSchedule):
    """lam(t) = t lam_shift(res_low)(t) + (1-t) lam_shift(res_high)(t) (Simple diffusion §5)."""

    def __init__(self, base: Schedule, res_low: int, res_high: int, base_resolution: int = 64):
        if base.family not in ("vp", "flow", "ve"):
            raise ValueError(f"cannot interpolate {base.name}: family {base.family!r}; valid: vp, flow, ve")
        self.base, self.family = base, base.family
        self.d_low = resolution_delta(res_low, base_resolution)
        self.d_high = resolution_delta(res_high, base_resolution)
        self.t_min, self.t_max = base.t_min, base.t_max
        self.name = f"interpolated({base.name}, res_low={res_low}, res_high={res_high}, base={base_resolution})"
        self.validate()

    def logsnr(self, t: TimeLike) -> torch.Tensor:
        t = as_time(t)
        return self.base.logsnr(t) + t * self.d_low + (1 - t) * self.d_high


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "vp_linear": VPLinear,
    "ddpm": DDPM,
    "cosine": Cosine,
    "subvp": SubVP,
    "ve": VE,
    "edm": EDM,
    "flow": Flow,
}


def by_name(name: str, *, resolution: int | None = None, shift_base: int | None = None,
            interpolate: tuple[int, int] | None = None, **kwargs) -> Schedule:
    """Build a schedule by name; ``shift_base`` shifts it for ``resolution`` (Simple diffusion / SD3).

    ``interpolate=(res_low, res_high)`` builds the interpolated schedule with ``shift_base`` as
    the reference resolution (default 64).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid schedules: {sorted(SCHEDULES)}")
    base = SCHEDULES[name](**kwargs)
    if interpolate is not None:
        return Interpolated(base, interpolate[0], interpolate[1], base_resolution=shift_base or 64)
    if shift_base is not None:
        if resolution is None:
            raise ValueError("shift_base needs the training/sampling resolution (resolution=...)")
        return shift_for_resolution(base, resolution, shift_base)
    return base
