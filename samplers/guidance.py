"""Guidance as a sampler-side wrapper: ``Guided(model, kind, scale, ...)`` is a model like any other.

A ``Guided`` object offers what samplers use -- ``model(x, t, labels) -> Prediction``,
``model.denoise(y, se, labels)``, ``.schedule``, ``.nfe`` / ``reset_nfe()`` -- and builds each
prediction from calls of the wrapped ``ScoreModel``(s), so every sampler works unchanged. The NFE
counter is the wrapped models' own: a guided evaluation costs 2, one outside the guidance band 1,
a CFG-Zero* zero-init evaluation 0.

Notation (EDM view, any schedule): ``y = x/alpha``, noise level ``se = sigma/alpha``, ``y = x0 + se eps``.
``D_c``, ``D_u`` are the conditional and the unconditional (or the guide model's) x0 predictions at the
same (x, t), ``Delta = D_c - D_u``, ``w`` the scale. With x fixed every parametrization is affine in x0
with the same x term, so a combination whose weights sum to 1 is the same in x0, eps, v or velocity.

* ``cfg``      D = D_u + w Delta                      (Ho & Salimans 2022; w = 1 is the conditional model)
* ``interval`` cfg for se in [lo, hi], the conditional model (one call) elsewhere (Kynkaanniemi et al.
               2024). The band is in EDM sigma units, so it means the same on every schedule and grid;
               every other kind also accepts ``interval=``.
* ``auto``     D = D_bad + w (D_good - D_bad): the "unconditional" branch is a weaker guide model of the
               same task, called with the same labels (autoguidance, Karras et al. 2024); works for
               unconditional models.
* ``apg``      Delta <- Delta + beta Delta_prev (momentum), Delta <- Delta min(1, r/||Delta||) (norm clamp),
               split Delta = Delta_par + Delta_orth relative to D_c, D = D_c + (w-1)(Delta_orth + eta Delta_par)
               (adaptive projected guidance, Sadat et al. 2024, in the denoised space as the paper
               recommends). eta = 1, no clamp, no momentum is cfg exactly.
* ``cfgzero``  CFG-Zero* (Fan et al. 2025) in the flow-matching velocity v = eps - x0 (for a flow model
               this is its velocity; for any other schedule the velocity of the equivalent flow model
               x_flow = y/(1+se), so the rule means the same everywhere): s* = <v_c, v_u>/||v_u||^2 per
               sample, v = s* v_u + w (v_c - s* v_u), D = (y - se v)/(1 + se). Zero-init: while
               se > ``zero_above`` the velocity is 0 (D = y/(1+se): a flow sampler's x stays put) and no
               network is called. ``cfgzero(model, w, zero_init_steps=K)`` sets zero_above = grid[K]
               when a grid is bound.
* ``cfgpp``    CFG++ (Chung et al. 2024). Its DDIM step re-noises the guided x0 with the *unconditional*
               eps: y' = D_w + se' eps_u, D_w = D_u + lam Delta, eps_u = (y - D_u)/se. A DDIM / EDM-Euler
               step with a plain denoiser D is y' = D + se'(y - D)/se. Both agree when, with r = se'/se,
                   D_pp = D_u + lam Delta / (1 - r)
               which is CFG with the step-dependent scale lam/(1 - r). The wrapper needs se', the next
               level of the grid: ``samplers.sample`` binds its grid (``bind_grid``); an evaluation at se
               uses the next grid level below se. dpmpp_2m's first-order part is the same DDIM step; for
               higher-order and adaptive samplers this is the CFG++ denoiser of the nearest grid step.
* ``upsample`` upsample guidance (Hwang et al. 2024) for a model trained at resolution R sampled at s R:
               eps = eps(x, t) + w U[eps_lo(D[x] c_t, tau)/s - D[eps(x, t)]], with D an s x s average pool,
               U nearest upsampling, tau the time with logSNR(tau) = logSNR(t) + 2 log s (the pooled noise
               has std sigma/s) and c_t = alpha_tau/alpha_t (= 1/sqrt(alpha_t^2 + sigma_t^2/s^2) = 1/rho_t
               on VP schedules). w here is the paper's (1 + w): at w = 1 the pooled part of eps is the
               low-resolution model's. eps_lo is the same model (convolutional nets run at any size) or
               ``guide=``. With x fixed and se_tau = se/s this is, in x0,
                   D = D_hi + w U[D_lo - D[D_hi]]
               (the low model's denoised image replaces the pooled part of the high one), which is what
               is computed: it stays finite where alpha_t -> 0 (t = 1 of the flow schedule).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from diffusion.prediction import Prediction, expand
from diffusion.schedules import TimeLike, as_time

KINDS = ("cfg", "interval", "apg", "cfgpp", "cfgzero", "auto", "upsample")
NEEDS_LABELS = ("cfg", "interval", "apg", "cfgpp", "cfgzero")  # kinds whose second branch is the null label


def _bdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product, shaped [B, 1, ...] to broadcast against a and b."""
    return (a * b).flatten(1).sum(1).reshape(-1, *([1] * (a.ndim - 1)))


def apg_update(delta: torch.Tensor, cond: torch.Tensor, eta: float = 0.0,
               norm_threshold: Optional[float] = None) -> torch.Tensor:
    """APG's update: clamp ||delta|| to norm_threshold, then delta_orth + eta delta_par relative to ``cond``."""
    if norm_threshold is not None:
        norm = _bdot(delta, delta).sqrt()
        delta = delta * torch.clamp(norm_threshold / norm.clamp_min(1e-30), max=1.0)
    par = _bdot(delta, cond) / _bdot(cond, cond).clamp_min(1e-30) * cond
    return (delta - par) + eta * par


def cfgzero_scale(v_c: torch.Tensor, v_u: torch.Tensor) -> torch.Tensor:
    """CFG-Zero*'s optimised scale s* = <v_c, v_u> / ||v_u||^2 per sample ([B, 1, ...])."""
    return _bdot(v_c, v_u) / _bdot(v_u, v_u).clamp_min(1e-30)


def upsample_time(schedule, t: TimeLike, factor: int) -> torch.Tensor:
    """tau with logSNR(tau) = logSNR(t) + 2 log(factor): the time of an s x s average-pooled x_t."""
    t = as_time(t)
    return schedule.t_of_logsnr(schedule.logsnr(t) + 2 * math.log(factor)).clamp(schedule.t_min, schedule.t_max)


def pool(x: torch.Tensor, s: int) -> torch.Tensor:
    """D: s x s average pooling over the last two axes."""
    return F.avg_pool2d(x, s)


def unpool(x: torch.Tensor, s: int) -> torch.Tensor:
    """U: nearest upsampling by s over the last two axes."""
    return x.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1)


class Guided:
    """A guided model with the ScoreModel interface; see the module docstring for each ``kind``."""

    def __init__(self, model, kind: str = "cfg", scale: float = 1.0, *, guide=None,
                 interval: Optional[Sequence[float]] = None, eta: float = 0.0,
                 norm_threshold: Optional[float] = None, momentum: float = 0.0,
                 zero_above: Optional[float] = None, zero_init_steps: int = 0, factor: int = 2,
                 grid: Optional[torch.Tensor] = None):
        if kind not in KINDS:
            raise ValueError(f"unknown guidance {kind!r}; valid: {list(KINDS)}")
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"guidance scale must be finite; got {scale}")
        num_classes = int(getattr(model, "num_classes", 0) or 0)
        if kind in NEEDS_LABELS and num_classes == 0:
            raise ValueError(f"guidance {kind!r} (scale {scale}) needs a class-conditional model; this one is "
                             f"unconditional (use 'auto' with a guide model)")
        if kind == "auto":
            if guide is None:
                raise ValueError("guidance 'auto' needs a guide model (a weaker model of the same task)")
            check_compatible(model, guide)
        if kind == "interval" and interval is None:
            raise ValueError("guidance 'interval' needs interval=(lo, hi) in EDM sigma units")
        if interval is not None:
            lo, hi = (float(v) for v in interval)
            if not (0 <= lo < hi):
                raise ValueError(f"guidance interval must satisfy 0 <= lo < hi (EDM sigma); got [{lo}, {hi}]")
            interval = (lo, hi)
        if kind == "upsample" and (int(factor) != factor or factor < 2):
            raise ValueError(f"upsample factor must be an integer >= 2; got {factor}")
        if norm_threshold is not None and not norm_threshold > 0:
            raise ValueError(f"APG norm_threshold must be > 0; got {norm_threshold}")
        self.model, self.kind, self.scale, self.guide = model, kind, scale, guide
        self.interval, self.eta, self.norm_threshold, self.momentum = interval, float(eta), norm_threshold, float(momentum)
        self.zero_above, self.zero_init_steps, self.factor = zero_above, int(zero_init_steps), int(factor)
        self.schedule = model.schedule
        self.num_classes = num_classes
        self.grid: Optional[torch.Tensor] = None
        self._avg: Optional[torch.Tensor] = None  # APG momentum buffer
        if grid is not None:
            self.bind_grid(grid)

    # ---- the ScoreModel interface ----------------------------------------------------------------
    @property
    def net(self):
        """The wrapped model's network (Skip-Tuning and the AMED predictor read it)."""
        return self.model.net

    def __getattr__(self, name: str):
        """Anything else (parameters(), parametrization, sigma_data, ...) is the wrapped model's."""
        model = self.__dict__.get("model")
        if model is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(model, name)

    @property
    def _models(self) -> list:
        other = self.guide if self.guide is not None else self.model
        return [self.model] if other is self.model else [self.model, other]

    @property
    def nfe(self) -> int:
        """Network evaluations of every wrapped model (each model counted once)."""
        return sum(m.nfe for m in self._models)

    def reset_nfe(self) -> int:
        """Zero the wrapped models' counters (and APG's momentum); return the previous total."""
        self._avg = None
        return sum(m.reset_nfe() for m in self._models)

    def bind_grid(self, grid: torch.Tensor) -> "Guided":
        """Use ``grid`` (EDM sigmas, high -> low) for CFG++'s next level and CFG-Zero*'s zero-init steps."""
        g = torch.as_tensor(grid, dtype=torch.float64).flatten().cpu()
        self.grid, self._avg = g, None
        self._asc = torch.flip(g, [0])
        if self.kind == "cfgzero" and self.zero_init_steps > 0:
            k = min(self.zero_init_steps, g.numel() - 1)
            self.zero_above = float(g[k])
        return self

    def __call__(self, x: torch.Tensor, t: TimeLike, class_labels: Optional[torch.Tensor] = None) -> Prediction:
        """The guided prediction at (x_t, t)."""
        se_host = None
        if isinstance(t, (int, float)):  # decide on the host: a plain number costs no device sync
            se_host = float(self.schedule.sigma_edm(torch.tensor(float(t), dtype=torch.float64)))
        return self._predict(x, t, class_labels, se_host)

    forward = __call__

    def denoise(self, y: torch.Tensor, se: TimeLike, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """EDM-view guided denoiser D(y, se)."""
        se_host = float(se) if isinstance(se, (int, float)) else None
        se_t = torch.as_tensor(se, dtype=torch.float64, device=y.device)
        t = self.schedule.t_of_sigma_edm(se_t)
        x = y * expand(self.schedule.alpha(t), y)
        return self._predict(x, t, class_labels, se_host).x0

    # ---- the guided prediction -------------------------------------------------------------------
    def _in(self, se_host: Optional[float], se: torch.Tensor, lo: float, hi: float):
        """True/False when known on the host, else a per-sample mask for se in [lo, hi]."""
        if se_host is not None:
            return lo <= se_host <= hi
        return (se >= lo) & (se <= hi)

    def _predict(self, x, t, labels, se_host: Optional[float]) -> Prediction:
        s = self.schedule
        tt = as_time(t, device=x.device)
        if tt.ndim == 0:
            tt = tt.expand(x.shape[0])
        alpha, sigma = s.alpha(tt), s.sigma(tt)
        se = sigma / alpha
        zero = None
        if self.kind == "cfgzero" and self.zero_above is not None:
            zero = self._in(se_host, se, math.nextafter(self.zero_above, math.inf), math.inf)
            if zero is True:  # zero-init: velocity 0, no network call
                x0 = x / expand(alpha + sigma, x)
                return Prediction(x, x0, "x0", alpha, sigma, lambda: s.dalpha(tt), lambda: s.dsigma(tt))
        cond = self.model(x, tt, labels)
        active = True if self.interval is None else self._in(se_host, se, *self.interval)
        if active is False:
            return cond
        if self.kind == "upsample":
            out = self._upsample(x, tt, labels, cond)
        else:
            out = self._combine(x, tt, labels, cond, se)
        if active is not True:  # per-sample band: both branches were evaluated (and counted)
            out = torch.where(expand(active, x).bool(), out, cond.x0)
        if zero is not None and zero is not False:
            out = torch.where(expand(zero, x).bool(), x / expand(alpha + sigma, x), out)
        return Prediction(x, out, "x0", cond.alpha, cond.sigma, cond.dalpha, cond.dsigma)

    def _other(self, x, t, labels) -> Prediction:
        if self.guide is not None:  # autoguidance: the weaker model, same labels
            return self.guide(x, t, labels)
        if labels is None:
            raise ValueError(f"guidance {self.kind!r} needs class labels (the conditional branch); got none")
        null = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        return self.model(x, t, null)

    def _combine(self, x, t, labels, cond: Prediction, se: torch.Tensor) -> torch.Tensor:
        unc = self._other(x, t, labels)
        d_c, d_u, w = cond.x0, unc.x0, self.scale
        if self.kind in ("cfg", "interval", "auto"):
            return d_u + w * (d_c - d_u)
        if self.kind == "apg":
            delta = d_c - d_u
            if self.momentum != 0.0:
                delta = delta if self._avg is None else delta + self.momentum * self._avg
                self._avg = delta
            return d_c + (w - 1) * apg_update(delta, d_c, self.eta, self.norm_threshold)
        if self.kind == "cfgzero":
            v_c, v_u = cond.eps - d_c, unc.eps - d_u
            k = cfgzero_scale(v_c, v_u)
            v = k * v_u + w * (v_c - k * v_u)
            a, sg = expand(cond.alpha, x), expand(cond.sigma, x)
            return (x - sg * v) / (a + sg)
        # cfgpp
        if self.grid is None:
            raise ValueError("guidance 'cfgpp' needs the sampling grid (samplers.sample binds it; else call bind_grid)")
        asc = self._asc.to(se.device)
        idx = (torch.searchsorted(asc, se * (1 - 1e-9)) - 1).clamp_min(0)  # largest grid level below se
        r = torch.where(torch.isinf(se), torch.zeros_like(se), asc[idx] / se)
        return d_u + w * (d_c - d_u) / expand(1 - r, x)

    def _upsample(self, x, t, labels, cond: Prediction) -> torch.Tensor:
        f, s = self.factor, self.schedule
        if x.ndim < 3 or x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"upsample guidance needs images whose height and width divide by {f}; got {tuple(x.shape)}")
        tau = upsample_time(s, t, f)
        c = f * s.sigma(tau) / cond.sigma  # = alpha_tau/alpha_t, finite also where alpha_t -> 0
        low_model = self.guide if self.guide is not None else self.model
        low = low_model(pool(x, f) * expand(c, x), tau, labels)
        # the eps form above in x0 (equal for x fixed, since se_tau = se/s); finite also at alpha_t = 0
        return cond.x0 + self.scale * unpool(low.x0 - pool(cond.x0, f), f)


def check_compatible(model, guide) -> None:
    """A guide model must share the schedule (the same alpha, sigma) with the model it guides."""
    s, g = model.schedule, guide.schedule
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    same = s.name == g.name and torch.allclose(s.alpha(t), g.alpha(t)) and torch.allclose(s.sigma(t), g.sigma(t))
    if not same:
        raise ValueError(f"guide model's schedule {g.name!r} differs from the model's {s.name!r}; "
                         f"a guide must use the same schedule")


def guided(model, kind: str = "cfg", scale: float = 1.0, **opts) -> Guided:
    """``Guided(model, kind, scale, **opts)``: the guided model (``scale`` 1 with cfg is the conditional model)."""
    return Guided(model, kind, scale, **opts)


__all__ = ["KINDS", "Guided", "guided", "apg_update", "cfgzero_scale", "upsample_time", "pool", "unpool",
           "check_compatible"]
