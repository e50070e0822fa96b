"""Training objectives. Each one only says how to draw (t, x_t), what the target is and how to weight.

The model may predict in any parametrization: the loss compares ``Prediction.get(target)`` with
the objective's target, so an eps-loss on an x0-network (or an EDM loss on a v-network) is a
conversion, not a special case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .prediction import Prediction, edm_loss_weight, expand
from .schedules import DDPM, Schedule, trusted_times
from .score_model import ScoreModel


@dataclass
class Draw:
    """One draw of the forward process: times, noise, noisy data."""

    t: torch.Tensor
    eps: torch.Tensor
    x_t: torch.Tensor


class Objective:
    """Base objective: sample_t -> (x_t, target, weight) -> weighted mean-squared error."""

    target: str = "eps"

    def sample_t(self, n: int, schedule: Schedule, device, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Draw n training times in [0, 1] (float64)."""
        raise NotImplementedError

    def weight(self, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        """Per-sample loss weight w(t)."""
        return torch.ones_like(t)

    def draw(self, x0: torch.Tensor, schedule: Schedule, generator: Optional[torch.Generator] = None) -> Draw:
        """Draw t and eps and form x_t = alpha x0 + sigma eps."""
        t = self.sample_t(x0.shape[0], schedule, x0.device, generator).to(x0.device)
        # draw on the generator's device (times are drawn on the CPU too), then move: a CPU generator then
        # works for GPU data and gives the same noise on every device
        gen_device = generator.device if generator is not None else x0.device
        eps = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
        x_t = expand(schedule.alpha(t), x0) * x0 + expand(schedule.sigma(t), x0) * eps
        return Draw(t, eps, x_t)

    def target_of(self, x0: torch.Tensor, d: Draw, schedule: Schedule) -> torch.Tensor:
        """The regression target in this objective's parametrization: the exact Prediction's conversion."""
        if self.target not in ("x0", "edm", "eps", "v", "velocity"):
            raise ValueError(f"objective target {self.target!r} is not one of x0, eps, v, velocity")
        t = d.t
        with trusted_times():
            exact = Prediction.exact(d.x_t, x0, d.eps, schedule.alpha(t), schedule.sigma(t),
                                     lambda: schedule.dalpha(t), lambda: schedule.dsigma(t))
            return exact.get(self.target)

    def per_sample(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean squared error per sample."""
        return (pred - target).pow(2).flatten(1).mean(1)

    def __call__(self, model: ScoreModel, x0: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None, draw: Optional[Draw] = None) -> torch.Tensor:
        """Weighted loss per sample, [B] (no host reads: times come from ``sample_t``, not from a user)."""
        with trusted_times():
            d = draw if draw is not None else self.draw(x0, model.schedule, generator)
            pred = model(d.x_t, d.t, class_labels).get(self.target)
            w = self.weight(d.t, model.schedule).to(x0.dtype)
            return w * self.per_sample(pred, self.target_of(x0, d, model.schedule))


def _uniform(n: int, lo: float, hi: float, device, generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, dtype=torch.float64, generator=generator).to(device)


class EpsLoss(Objective):
    """DDPM 'simple': ||eps_hat - eps||^2, t uniform over the discrete steps (or U[t_eps, 1])."""

    target = "eps"

    def __init__(self, t_eps: float = 1e-3):
        self.t_eps = t_eps

    def sample_t(self, n, schedule, device, generator):
        base = getattr(schedule, "base", schedule)
        if isinstance(base, DDPM):
            idx = torch.randint(0, base.T, (n,), generator=generator)
            return base.index_to_t(idx).to(device)
        return _uniform(n, max(self.t_eps, schedule.t_min), schedule.t_max, device, generator)


class VLoss(EpsLoss):
    """v-prediction loss; ``min_snr_gamma`` gives Min-SNR-gamma weighting min(SNR, g)/(SNR+1)."""

    target = "v"

    def __init__(self, t_eps: float = 1e-3, min_snr_gamma: Optional[float] = None):
        super().__init__(t_eps)
        self.gamma = min_snr_gamma

    def weight(self, t, schedule):
        if self.gamma is None:
            return torch.ones_like(t)
        snr = torch.exp(schedule.logsnr(t))
        return snr.clamp(max=self.gamma) / (snr + 1)


class EDMLoss(Objective):
    """EDM: ln(sigma_e) ~ N(P_mean, P_std^2), x0 target, weight (se^2 + sd^2)/(se sd)^2."""

    target = "x0"

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5):
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data

    def sample_t(self, n, schedule, device, generator):
        se = torch.exp(self.p_mean + self.p_std * torch.randn(n, dtype=torch.float64, generator=generator))
        # the schedule's t range bounds se (up to the prior's level); the lognormal's far tails are clipped to it
        t = schedule.t_of_sigma_edm(se.clamp(schedule.sigma_edm_min, schedule.prior.sigma_edm))
        return t.clamp(max(schedule.t_min, 1e-6), schedule.t_max).to(device)

    def weight(self, t, schedule):
        return edm_loss_weight(schedule.sigma_edm(t), self.sigma_data)


class FlowMatchingLoss(Objective):
    """Rectified flow / SD3: velocity target, t uniform or logit-normal (sigmoid of N(m, s^2))."""

    target = "velocity"

    def __init__(self, t_sampling: str = "uniform", t_eps: float = 1e-3, logit_mean: float = 0.0, logit_std: float = 1.0):
        if t_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"unknown t_sampling {t_sampling!r}; valid: ['uniform', 'logit_normal']")
        self.t_sampling, self.t_eps, self.m, self.s = t_sampling, t_eps, logit_mean, logit_std

    def sample_t(self, n, schedule, device, generator):
        if self.t_sampling == "uniform":
            return _uniform(n, self.t_eps, 1.0, device, generator)
        return torch.sigmoid(self.m + self.s * torch.randn(n, dtype=torch.float64, generator=generator)).to(device)


class MultiscaleLoss(EpsLoss):
    """Simple diffusion: mean over pooling factors s of ||pool_s(eps_hat) - pool_s(eps)||^2."""

    def __init__(self, scales: Sequence[int] = (1, 2, 4), t_eps: float = 1e-3):
        super().__init__(t_eps)
        if not scales or any(int(s) < 1 for s in scales):
            raise ValueError(f"pooling scales must be positive integers; got {list(scales)}")
        self.scales = [int(s) for s in scales]

    def per_sample(self, pred, target):
        if pred.ndim != 4:
            raise ValueError(f"multiscale loss needs images [B, C, H, W]; got shape {tuple(pred.shape)}")
        losses = []
        for s in self.scales:
            if pred.shape[-1] % s or pred.shape[-2] % s:
                raise ValueError(f"pooling factor {s} does not divide image size {tuple(pred.shape[-2:])}")
            p, q = (F.avg_pool2d(z, s) if s > 1 else z for z in (pred, target))
            losses.append((p - q).pow(2).flatten(1).mean(1))
        return torch.stack(losses).mean(0)


OBJECTIVES = {"eps": EpsLoss, "v": VLoss, "edm": EDMLoss, "flow": FlowMatchingLoss, "multiscale": MultiscaleLoss}


def build_objective(name: str, **kwargs) -> Objective:
    """Objective by name: eps, v, edm, flow, multiscale."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid objectives: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)


def pool_logsnr_gain(s: int) -> float:
    """Average pooling by s keeps the signal and divides the noise std by s: logSNR + 2 log s."""
    return 2 * math.log(s)
