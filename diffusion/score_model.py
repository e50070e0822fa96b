"""ScoreModel: the one interface every sampler, loss, distiller and metric talks to.

``model(x_t, t, class_labels) -> Prediction`` whatever the network predicts. The wrapper composes
four things (the shape of EDM's ``EDMPrecond`` and k-diffusion's ``Denoiser``): the network, the
schedule (alpha, sigma at t), a preconditioner (c_in, c_noise, c_skip, c_out; see
diffusion/preconditioning.py) and a parametrization (what the preconditioned output is: eps, x0,
v, score or velocity). It counts network evaluations (NFE); guidance (CFG and its variants) wraps it from
outside (samplers/guidance.py).

Hot path. A Python-number time or EDM level (what samplers pass, one per grid point) is looked up
in a per-level cache of Python-float coefficients, filled for a whole grid at once by
``prepare_levels`` / ``prepare_times``; a tensor time (training) is computed on the device. Neither
reads a tensor back to the host: values are validated where they enter (Python numbers here,
labels once per tensor, grids in ``samplers.sample``).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from .preconditioning import CONDITIONINGS, EDM, Identity, Preconditioner, conditioning_scalar  # noqa: F401
from .prediction import Prediction, check_parametrization, expand
from .schedules import Schedule, TimeLike, trusted_times

#: the level cache is cleared beyond this many entries (a sampler uses tens; a sweep may use more)
MAX_LEVELS = 100_000


class Level(NamedTuple):
    """Everything a forward at one time needs, as Python floats (None: identity coefficient)."""

    alpha: float
    sigma: float
    dalpha: float
    dsigma: float
    c_in: Optional[float]
    c_noise: float
    c_skip: Optional[float]
    c_out: Optional[float]


class ScoreModel(nn.Module):
    """Wrap ``net(x, c_noise, class_labels)`` with a schedule, a preconditioner and a parametrization.

    ``conditioning`` names the identity preconditioner's c_noise (default "t");
    ``preconditioner=`` takes any other (diffusion/preconditioning.py). ``parametrization="edm"``
    is the EDM preconditioner with x0 output; an explicit conflicting ``conditioning`` raises.
    Class labels are range-checked once per tensor (``check_labels``; a sampler passes the same
    tensor every step); ``validate_labels = False`` skips the check for callers that checked
    their labels at the source (a training loop's dataset).
    """

    def __init__(self, net: nn.Module, schedule: Schedule, parametrization: str = "eps",
                 conditioning: Optional[str] = None, sigma_data: float = 0.5, num_classes: Optional[int] = None,
                 preconditioner: Optional[Preconditioner] = None):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.parametrization = check_parametrization(parametrization)
        self.sigma_data = float(sigma_data)
        if parametrization == "edm":
            # backwards-compatible shorthand: EDM preconditioning, x0 output; a conflicting explicit
            # conditioning is an error rather than silently replaced
            if preconditioner is not None:
                raise ValueError(f"parametrization 'edm' builds the EDM preconditioner itself; got preconditioner="
                                 f"{preconditioner!r} too (use parametrization='x0' with your preconditioner)")
            if conditioning not in (None, "edm"):
                raise ValueError(f"parametrization 'edm' fixes conditioning 'edm' (c_noise = log(sigma_edm)/4); got "
                                 f"conditioning={conditioning!r} (valid with 'edm': 'edm' or None; for an x0 network "
                                 f"without EDM preconditioning use parametrization='x0')")
            preconditioner = EDM(self.sigma_data)
        elif preconditioner is None:
            preconditioner = Identity("t" if conditioning is None else conditioning)
        elif conditioning is not None and conditioning != preconditioner.conditioning:
            raise ValueError(f"conditioning {conditioning!r} conflicts with the preconditioner's c_noise "
                             f"{preconditioner.conditioning!r}; give one of them")
        out = preconditioner.output
        if out is not None and self.parametrization not in (out, "edm"):
            raise ValueError(f"preconditioner {preconditioner!r} outputs {out!r}; got parametrization "
                             f"{self.parametrization!r} (use {out!r})")
        self.preconditioner = preconditioner.check(schedule)
        self.kind = out or ("x0" if self.parametrization == "edm" else self.parametrization)  # Prediction's kind
        self.conditioning = preconditioner.conditioning
        self.num_classes = int(num_classes if num_classes is not None else getattr(net, "num_classes", 0) or 0)
        self.validate_labels = True  # False: the caller vouches for label ranges (e.g. checked at the data source)
        self.nfe = 0
        self._levels: dict[float, Level] = {}
        self._t_of_se: dict[float, float] = {}
        self._c_noise: dict[tuple, torch.Tensor] = {}
        self._levels_for: tuple = (schedule, preconditioner)
        self._labels_ok: Optional[weakref.ref] = None

    # ---- bookkeeping ---------------------------------------------------------------------------
    def reset_nfe(self) -> int:
        """Zero the network-evaluation counter and return its previous value."""
        n, self.nfe = self.nfe, 0
        return n

    def with_guidance(self, scale: float):
        """Classifier-free guidance eps_u + w (eps_c - eps_u): ``samplers.guidance.Guided(self, "cfg", scale)``."""
        if scale == 1.0:
            return self
        from samplers.guidance import Guided  # local: guidance wraps models from outside the core package

        return Guided(self, "cfg", scale)

    # ---- per-level coefficient cache -------------------------------------------------------------
    def _cache(self) -> dict[float, Level]:
        if self._levels_for[0] is not self.schedule or self._levels_for[1] is not self.preconditioner:
            self._levels, self._t_of_se, self._c_noise = {}, {}, {}  # schedule/preconditioner swapped: recompute
            self._levels_for = (self.schedule, self.preconditioner)
        if len(self._levels) > MAX_LEVELS or len(self._c_noise) > MAX_LEVELS:
            self._levels.clear()
            self._t_of_se.clear()
            self._c_noise.clear()
        return self._levels

    def prepare_times(self, ts: Sequence[float]) -> None:
        """Compute and cache the coefficients of every time in ``ts`` at once (one host read per call)."""
        cache = self._cache()
        new = sorted({float(t) for t in ts} - cache.keys())
        if not new:
            return
        for t in new:
            if not 0 <= t <= 1:
                raise ValueError(f"time t must lie in [0, 1] (t=0 data, t=1 noise); got {t}")
        s = self.schedule
        tt = torch.tensor(new, dtype=torch.float64)
        with trusted_times():
            alpha, sigma = s.alpha(tt), s.sigma(tt)
            c = self.preconditioner.coefficients(s, tt, alpha, sigma)
            cols = [alpha, sigma, s.dalpha(tt), s.dsigma(tt), c.c_in, c.c_noise, c.c_skip, c.c_out]
        rows = torch.stack([torch.zeros_like(tt) if v is None else torch.broadcast_to(v.to(tt), tt.shape)
                            for v in cols]).tolist()
        for j, t in enumerate(new):
            vals = [None if cols[k] is None else rows[k][j] for k in range(len(cols))]
            cache[t] = Level(*vals)

    def prepare_levels(self, se: Sequence[float]) -> list[float]:
        """Cache the times (and their coefficients) of EDM levels ``se``; returns the times (se=0 -> 0, top -> t_max)."""
        self._cache()
        new = sorted({float(v) for v in se} - self._t_of_se.keys())
        if new:
            for t, v in zip(self.schedule.levels(torch.tensor(new, dtype=torch.float64))[0].tolist(), new):
                self._t_of_se[v] = t
        ts = [self._t_of_se[float(v)] for v in se]
        self.prepare_times([t for t, v in zip(ts, se) if v > 0])
        return ts

    def _level(self, t: float) -> Level:
        lv = self._cache().get(t)
        if lv is None:
            self.prepare_times([t])
            lv = self._levels[t]
        return lv

    # ---- evaluation ----------------------------------------------------------------------------
    def _times(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t of shape {tuple(t.shape)} does not match a batch of shape {tuple(x.shape)}")
        return t

    def check_labels(self, class_labels, batch: int) -> Optional[torch.Tensor]:
        """Validate labels once (reads their range: one host sync) and remember the tensor as checked."""
        if class_labels is None:
            return None
        if self.num_classes == 0:
            raise ValueError("class labels given to an unconditional model (num_classes=0)")
        labels = torch.as_tensor(class_labels).long()
        if labels.ndim == 0:
            labels = labels.expand(batch)
        if labels.shape != (batch,):
            raise ValueError(f"class labels of shape {tuple(labels.shape)} do not match batch size {batch}")
        if self.validate_labels:
            lo, hi = torch.stack([labels.min(), labels.max()]).tolist()
            if lo < 0 or hi > self.num_classes:
                raise ValueError(f"class label out of range: got {lo}..{hi}, valid 0..{self.num_classes - 1} "
                                 f"(and {self.num_classes} = unconditional)")
        if isinstance(class_labels, torch.Tensor):
            self._labels_ok = (weakref.ref(class_labels), class_labels._version, labels)
        return labels

    def _labels(self, class_labels, batch: int) -> Optional[torch.Tensor]:
        if class_labels is None:
            return None
        ok = self._labels_ok
        if ok is not None and ok[0]() is class_labels and ok[1] == class_labels._version and ok[2].shape[0] == batch:
            return ok[2]  # the same unchanged tensor as last time: already checked (samplers pass one per run)
        return self.check_labels(class_labels, batch)

    def _net(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        self.__dict__["nfe"] += 1  # nn.Module.__setattr__ costs a few isinstance checks per call
        if c_noise.dtype != x_in.dtype:
            c_noise = c_noise.to(x_in.dtype)
        if labels is None:
            return self.net(x_in, c_noise) if self.num_classes == 0 else self.net(x_in, c_noise, None)
        return self.net(x_in, c_noise, labels)

    def _guided(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        # guidance (CFG and the rest) lives in samplers/guidance.py, which wraps the whole model
        return self._net(x_in, c_noise, labels)

    def forward(self, x: torch.Tensor, t: TimeLike, class_labels: Optional[torch.Tensor] = None) -> Prediction:
        """Evaluate the network at (x_t, t) and return a Prediction (no host reads; see the module doc)."""
        labels = self._labels(class_labels, x.shape[0])
        if isinstance(t, (float, int)):
            lv = self._level(float(t))
            key = (lv.c_noise, x.shape[0], x.dtype, x.device)
            c_noise = self._c_noise.get(key)
            if c_noise is None:  # one small tensor per (level, batch), reused by every later call
                c_noise = self._c_noise[key] = torch.full((x.shape[0],), lv.c_noise, dtype=x.dtype, device=x.device)
            f = self._guided(x if lv.c_in is None else x * lv.c_in, c_noise, labels)
            native = f if lv.c_out is None else x * lv.c_skip + f * lv.c_out
            return Prediction(x, native, self.kind, lv.alpha, lv.sigma, lv.dalpha, lv.dsigma)
        s = self.schedule
        with trusted_times():
            t = self._times(t, x)
            alpha, sigma = s.alpha(t), s.sigma(t)
            c = self.preconditioner.coefficients(s, t, alpha, sigma)
            f = self._guided(x if c.c_in is None else expand(c.c_in, x) * x, c.c_noise.expand(t.shape), labels)
            native = f if c.c_out is None else expand(c.c_skip, x) * x + expand(c.c_out, x) * f
        # lazily: most samplers never ask for the velocity, and derivatives cost autograd on some schedules

        def derivative(fn):
            def run():
                with trusted_times():
                    return fn(t)
            return run

        return Prediction(x, native, self.kind, alpha, sigma, derivative(s.dalpha), derivative(s.dsigma))

    def _edm_view(self, y: torch.Tensor, se: float, class_labels) -> Prediction:
        """The Prediction at EDM level ``se`` (a Python float, checked against the schedule's range) for y = x/alpha."""
        top = self.schedule.prior.sigma_edm
        if not se <= top * (1 + 1e-6):
            raise ValueError(f"noise level {se:.6g} exceeds the schedule's maximum {top:.6g} ({self.schedule.name})")
        self._cache()
        t = self._t_of_se.get(se)
        if t is None:
            t = self.prepare_levels([se])[0]
        return self.forward(y * self._level(t).alpha, t, class_labels)

    def denoise_and_slope(self, y: torch.Tensor, se: float, class_labels: Optional[torch.Tensor] = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(D(y, se), the PF-ODE slope dy/dse = (y - D)/se); for an eps network the slope is its eps itself."""
        if self.kind == "eps" and isinstance(se, (float, int)) and se > 0:
            eps = self._edm_view(y, float(se), class_labels).native
            return torch.add(y, eps, alpha=-float(se)), eps
        x0 = self.denoise(y, se, class_labels)
        return x0, torch.sub(y, x0).div_(se)

    def denoise(self, y: torch.Tensor, se: TimeLike, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """EDM-view denoiser D(y, se) = E[x0 | x/alpha = y] at noise level se = sigma/alpha.

        A Python-number ``se`` is checked against the schedule's range; a tensor is not (that
        would read it back from the device every call).
        """
        if isinstance(se, (float, int)):
            se = float(se)
            pred = self._edm_view(y, se, class_labels)
            # an eps network's x0 = (x - sigma eps)/alpha is y - se eps in the EDM view: one pass, not two
            return torch.add(y, pred.native, alpha=-se) if self.kind == "eps" and se > 0 else pred.x0
        with trusted_times():
            se = torch.as_tensor(se, dtype=torch.float64, device=y.device)
            t = self.schedule.t_of_sigma_edm(se)
            x = y * expand(self.schedule.alpha(t), y)
        pred = self.forward(x, t, class_labels)
        return y - expand(se, y) * pred.native if self.kind == "eps" else pred.x0
