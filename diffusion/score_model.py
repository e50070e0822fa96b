"""ScoreModel: the one interface every sampler, loss, distiller and metric talks to.

``model(x_t, t, class_labels) -> Prediction`` whatever the network predicts (eps, x0, v, score,
flow velocity or EDM-preconditioned F). The wrapper knows the schedule and which scalar the
network was trained to see; the network knows neither. It counts network evaluations (NFE); guidance
wraps it from outside (samplers/guidance.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .prediction import Prediction, check_parametrization, edm_precond, expand
from .schedules import Schedule, TimeLike, as_time

CONDITIONINGS = ("t", "1000t", "logsnr", "edm", "index")


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
    if kind == "index":
        base = getattr(schedule, "base", schedule)
        if not hasattr(base, "t_to_index"):
            raise ValueError(f"conditioning 'index' needs a discrete (ddpm) schedule; got {schedule.name}")
        return base.t_to_index(t)
    raise ValueError(f"unknown conditioning {kind!r}; valid: {list(CONDITIONINGS)}")


class ScoreModel(nn.Module):
    """Wrap ``net(x, c_noise, class_labels)`` with a schedule and a parametrization."""

    def __init__(self, net: nn.Module, schedule: Schedule, parametrization: str = "eps",
                 conditioning: str = "t", sigma_data: float = 0.5, num_classes: Optional[int] = None):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.parametrization = check_parametrization(parametrization)
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {conditioning!r}; valid: {list(CONDITIONINGS)}")
        if parametrization == "edm" and conditioning != "edm":
            conditioning = "edm"  # EDM preconditioning fixes c_noise = log(se)/4
        self.conditioning = conditioning
        self.sigma_data = float(sigma_data)
        self.num_classes = int(num_classes if num_classes is not None else getattr(net, "num_classes", 0) or 0)
        self.nfe = 0

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

    # ---- evaluation ----------------------------------------------------------------------------
    def _times(self, t: TimeLike, x: torch.Tensor) -> torch.Tensor:
        t = as_time(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t of shape {tuple(t.shape)} does not match a batch of shape {tuple(x.shape)}")
        return t

    def _check_labels(self, class_labels: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
        if class_labels is None:
            return None
        if self.num_classes == 0:
            raise ValueError("class labels given to an unconditional model (num_classes=0)")
        labels = torch.as_tensor(class_labels).long()
        if labels.ndim == 0:
            labels = labels.expand(batch)
        if labels.shape != (batch,):
            raise ValueError(f"class labels of shape {tuple(labels.shape)} do not match batch size {batch}")
        if labels.min() < 0 or labels.max() > self.num_classes:
            raise ValueError(f"class label out of range: got {labels.min().item()}..{labels.max().item()}, "
                             f"valid 0..{self.num_classes - 1} (and {self.num_classes} = unconditional)")
        return labels

    def _net(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        self.nfe += 1
        c_noise = c_noise.to(x_in.dtype)
        if labels is None:
            return self.net(x_in, c_noise) if self.num_classes == 0 else self.net(x_in, c_noise, None)
        return self.net(x_in, c_noise, labels)

    def _guided(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        # guidance (CFG and the rest) lives in samplers/guidance.py, which wraps the whole model
        return self._net(x_in, c_noise, labels)

    def forward(self, x: torch.Tensor, t: TimeLike, class_labels: Optional[torch.Tensor] = None) -> Prediction:
        """Evaluate the network at (x_t, t) and return a Prediction."""
        t = self._times(t, x)
        labels = self._check_labels(class_labels, x.shape[0])
        s = self.schedule
        alpha, sigma = s.alpha(t), s.sigma(t)
        # lazily: most samplers never ask for the velocity, and derivatives cost autograd on some schedules
        dalpha, dsigma = (lambda: s.dalpha(t)), (lambda: s.dsigma(t))
        if self.parametrization == "edm":
            c_skip, c_out, c_in, c_noise = edm_precond(sigma / alpha, self.sigma_data)
            y = x / expand(alpha, x)
            f = self._guided(expand(c_in, x) * y, c_noise, labels)
            native = expand(c_skip, x) * y + expand(c_out, x) * f
        else:
            native = self._guided(x, conditioning_scalar(self.conditioning, s, t), labels)
        return Prediction(x, native, self.parametrization, alpha, sigma, dalpha, dsigma)

    def denoise(self, y: torch.Tensor, se: TimeLike, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """EDM-view denoiser D(y, se) = E[x0 | x/alpha = y] at noise level se = sigma/alpha."""
        se = torch.as_tensor(se, dtype=torch.float64, device=y.device)
        top = self.schedule.sigma_edm_max
        if (se > top * (1 + 1e-6)).any():
            raise ValueError(f"noise level {se.max().item():.6g} exceeds the schedule's maximum {top:.6g} ({self.schedule.name})")
        t = self.schedule.t_of_sigma_edm(se)
        x = y * expand(self.schedule.alpha(t), y)
        return self.forward(x, t, class_labels).x0
