"""Preconditioners: how a network's input, noise input and output are scaled around it.

A preconditioner gives four coefficients per sample, from the time t and the schedule's
(alpha, sigma) at t, and the wrapped prediction is

    native = c_skip * x + c_out * net(c_in * x, c_noise)          (x = x_t, model space)

``Identity`` (c_in = 1, c_skip = 0, c_out = 1) hands the network x_t and a conditioning scalar
(t, 1000t, logSNR, log(sigma_edm)/4 or a DDPM index); ``EDM`` is Karras et al.'s preconditioning
in the EDM view y = x/alpha, se = sigma/alpha (its 1/alpha is folded into c_in and c_skip) and
its output is an x0 estimate; ``Custom`` takes any four functions. ``ScoreModel`` composes a
network, a schedule, one of these and a parametrization (diffusion/score_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .schedules import Schedule

CONDITIONINGS = ("t", "1000t", "logsnr", "edm", "index")
Coef = Optional[torch.Tensor]  # None: the identity value of that coefficient (skipped, not multiplied)


def check_conditioning(kind: str, schedule: Optional[Schedule] = None) -> str:
    """Return ``kind`` if it is a known conditioning scalar usable with ``schedule``, else raise ValueError."""
    if kind not in CONDITIONINGS:
        raise ValueError(f"unknown conditioning {kind!r}; valid: {list(CONDITIONINGS)}")
    if kind == "index" and schedule is not None and not hasattr(getattr(schedule, "base", schedule), "t_to_index"):
        raise ValueError(f"conditioning 'index' needs a discrete (ddpm) schedule; got {schedule.name}")
    return kind


def conditioning_scalar(kind: str, schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """The scalar a network sees for time t: t, 1000t, logSNR, log(sigma_edm)/4 or a DDPM index."""
    if kind == "t":
        return t
    if kind == "1000t":
        return 1000 * t
    if kind == "logsnr":
        return schedule.logsnr(t)
    if kind == "edm":
        return torch.log(schedule.sigma_edm(t)) / 4
    check_conditioning(kind, schedule)
    return getattr(schedule, "base", schedule).t_to_index(t)


@dataclass
class Coefficients:
    """(c_in, c_noise, c_skip, c_out) per sample; None marks an identity coefficient (1, -, 0, 1)."""

    c_in: Coef
    c_noise: torch.Tensor
    c_skip: Coef
    c_out: Coef


class Preconditioner:
    """Base: ``coefficients(schedule, t, alpha, sigma)`` for float64 [N] times (no host reads)."""

    #: the parametrization of the wrapped output (None: whatever the model's parametrization says)
    output: Optional[str] = None
    #: the name of its c_noise, reported as ``ScoreModel.conditioning``
    conditioning: str = "custom"

    def coefficients(self, schedule: Schedule, t: torch.Tensor, alpha: torch.Tensor,
                     sigma: torch.Tensor) -> Coefficients:
        """The four coefficients at times ``t`` (float64 tensors or None)."""
        raise NotImplementedError

    def check(self, schedule: Schedule) -> "Preconditioner":
        """Raise ValueError if this preconditioner cannot serve ``schedule`` (called once, at construction)."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(conditioning={self.conditioning!r})"


class Identity(Preconditioner):
    """c_in = 1, c_skip = 0, c_out = 1; c_noise is the named conditioning scalar."""

    def __init__(self, conditioning: str = "t"):
        self.conditioning = check_conditioning(conditioning)

    def check(self, schedule: Schedule) -> "Identity":
        check_conditioning(self.conditioning, schedule)
        return self

    def coefficients(self, schedule, t, alpha, sigma) -> Coefficients:
        return Coefficients(None, conditioning_scalar(self.conditioning, schedule, t), None, None)


def edm_precond(se: torch.Tensor, sigma_data: float = 0.5) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise) for EDM noise level ``se`` = sigma/alpha, in the EDM view y = x/alpha."""
    se = torch.as_tensor(se, dtype=torch.float64)
    sd2 = sigma_data**2
    denom = se**2 + sd2
    return sd2 / denom, se * sigma_data / denom.sqrt(), 1 / denom.sqrt(), torch.log(se) / 4


def edm_loss_weight(se: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM's lambda(sigma) = (se^2 + sd^2)/(se sd)^2, which makes lambda c_out^2 = 1."""
    se = torch.as_tensor(se, dtype=torch.float64)
    return (se**2 + sigma_data**2) / (se * sigma_data) ** 2


class EDM(Preconditioner):
    """Karras et al. (2022): D(y; se) = c_skip y + c_out F(c_in y, log(se)/4), an x0 estimate."""

    output = "x0"
    conditioning = "edm"

    def __init__(self, sigma_data: float = 0.5):
        if not sigma_data > 0:
            raise ValueError(f"EDM preconditioning needs sigma_data > 0; got {sigma_data}")
        self.sigma_data = float(sigma_data)

    def coefficients(self, schedule, t, alpha, sigma) -> Coefficients:
        c_skip, c_out, c_in, c_noise = edm_precond(sigma / alpha, self.sigma_data)
        # in model space: y = x / alpha enters both the input and the skip path
        return Coefficients(c_in / alpha, c_noise, c_skip / alpha, c_out)

    def __repr__(self) -> str:
        return f"EDM(sigma_data={self.sigma_data})"


CoefFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Custom(Preconditioner):
    """Any four functions of (t, alpha, sigma) -> [N] tensors; omitted ones are the identity."""

    def __init__(self, c_noise: CoefFn, c_in: Optional[CoefFn] = None, c_skip: Optional[CoefFn] = None,
                 c_out: Optional[CoefFn] = None, output: Optional[str] = None, name: str = "custom"):
        if not callable(c_noise):
            raise ValueError("a custom preconditioner needs c_noise, a function of (t, alpha, sigma)")
        for what, fn in (("c_in", c_in), ("c_skip", c_skip), ("c_out", c_out)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{what} must be a function of (t, alpha, sigma) or None; got {type(fn).__name__}")
        if (c_skip is None) != (c_out is None):
            raise ValueError("give c_skip and c_out together (c_skip alone or c_out alone has no identity partner)")
        self.fns = (c_in, c_noise, c_skip, c_out)
        self.output, self.conditioning = output, name

    def coefficients(self, schedule, t, alpha, sigma) -> Coefficients:
        c_in, c_noise, c_skip, c_out = (None if f is None else torch.as_tensor(f(t, alpha, sigma), dtype=torch.float64)
                                        for f in self.fns)
        return Coefficients(c_in, c_noise, c_skip, c_out)


__all__ = ["CONDITIONINGS", "Coefficients", "Preconditioner", "Identity", "EDM", "Custom", "check_conditioning",
           "conditioning_scalar", "edm_precond", "edm_loss_weight"]
