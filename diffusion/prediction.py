"""Conversions among eps / x0 / v / score / velocity predictions for any (alpha, sigma).

None of these assume a variance-preserving schedule (docs/theory.md §3.1). Coefficients may be
Python floats (cached per grid level: no tensor is built) or float64 per-sample tensors;
``expand`` broadcasts them against the data. How a network's input and output are scaled
(EDM's c_in, c_skip, c_out) is a preconditioner (diffusion/preconditioning.py), not a
parametrization: "edm" survives here only as a name for x0.
"""

from __future__ import annotations

from functools import cached_property

import torch

#: what a network may predict; "edm" is ScoreModel's shorthand for EDM preconditioning with x0 output
PARAMETRIZATIONS = ("eps", "x0", "v", "score", "velocity", "edm")
#: the quantities a Prediction converts among
KINDS = ("eps", "x0", "v", "score", "velocity")


def check_parametrization(name: str) -> str:
    """Return ``name`` if it is a known parametrization, else raise ValueError listing them."""
    if name not in PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {name!r}; valid: {list(PARAMETRIZATIONS)}")
    return name


def expand(coef: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    """Broadcast a scalar or per-sample coefficient [B] against ``x`` [B, ...] in x's dtype (floats pass through)."""
    if isinstance(coef, float):
        return coef
    c = torch.as_tensor(coef, device=x.device)
    if c.ndim == 0:
        return c.to(x.dtype)
    if c.ndim == 1:
        if c.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"coefficient of shape {tuple(c.shape)} does not broadcast against data of shape {tuple(x.shape)}")
        c = c.reshape(-1, *([1] * (x.ndim - 1)))
    try:
        torch.broadcast_shapes(c.shape, x.shape)
    except RuntimeError as e:
        raise ValueError(f"coefficient of shape {tuple(c.shape)} does not broadcast against data of shape {tuple(x.shape)}") from e
    return c.to(x.dtype)


def _floats(*coefs) -> bool:
    # Python-float coefficients (a cached grid level): fused kernels, x + c*y in one pass over the data
    return all(isinstance(c, float) for c in coefs)


def x0_from_eps(x, eps, alpha, sigma):
    """x0 = (x - sigma eps) / alpha."""
    if _floats(alpha, sigma):
        return torch.add(x, eps, alpha=-sigma).div_(alpha)
    return (x - expand(sigma, x) * eps) / expand(alpha, x)


def eps_from_x0(x, x0, alpha, sigma):
    """eps = (x - alpha x0) / sigma."""
    if _floats(alpha, sigma):
        return torch.add(x, x0, alpha=-alpha).div_(sigma)
    return (x - expand(alpha, x) * x0) / expand(sigma, x)


def v_from(x0, eps, alpha, sigma):
    """v = alpha eps - sigma x0."""
    if _floats(alpha, sigma):
        return torch.mul(eps, alpha).sub_(x0, alpha=sigma)
    return expand(alpha, x0) * eps - expand(sigma, x0) * x0


def x0_eps_from_v(x, v, alpha, sigma):
    """Invert v: x0 = (alpha x - sigma v)/(alpha^2+sigma^2), eps = (sigma x + alpha v)/(alpha^2+sigma^2)."""
    if _floats(alpha, sigma):
        n = alpha * alpha + sigma * sigma
        return torch.mul(x, alpha).sub_(v, alpha=sigma).div_(n), torch.mul(x, sigma).add_(v, alpha=alpha).div_(n)
    a, s = expand(alpha, x), expand(sigma, x)
    n = a * a + s * s
    return (a * x - s * v) / n, (s * x + a * v) / n


def score_from_eps(eps, sigma):
    """score = -eps / sigma."""
    if _floats(sigma):
        return eps / -sigma
    return -eps / expand(sigma, eps)


def velocity_from(x0, eps, dalpha, dsigma):
    """PF-ODE velocity dx/dt = dalpha x0 + dsigma eps."""
    if _floats(dalpha, dsigma):
        return torch.mul(x0, dalpha).add_(eps, alpha=dsigma)
    return expand(dalpha, x0) * x0 + expand(dsigma, x0) * eps


def x0_eps_from_velocity(x, vel, alpha, sigma, dalpha, dsigma):
    """Solve x = a x0 + s eps, vel = a' x0 + s' eps for (x0, eps)."""
    if _floats(alpha, sigma, dalpha, dsigma):
        det = alpha * dsigma - sigma * dalpha
        return (torch.mul(x, dsigma).sub_(vel, alpha=sigma).div_(det),
                torch.mul(vel, alpha).sub_(x, alpha=dalpha).div_(det))
    a, s, da, ds = (expand(c, x) for c in (alpha, sigma, dalpha, dsigma))
    det = a * ds - s * da
    return (ds * x - s * vel) / det, (a * vel - da * x) / det


class Prediction:
    """A network output at (x, t) from which every other parametrization is derived lazily."""

    def __init__(self, x: torch.Tensor, native: torch.Tensor, kind: str, alpha, sigma, dalpha=None, dsigma=None):
        check_parametrization(kind)
        kind = "x0" if kind == "edm" else kind
        if native.shape != x.shape:
            raise ValueError(f"prediction of shape {tuple(native.shape)} does not match x of shape {tuple(x.shape)}")
        self.x, self.native, self.kind = x, native, kind
        self.alpha, self.sigma, self.dalpha, self.dsigma = alpha, sigma, dalpha, dsigma

    @classmethod
    def exact(cls, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, alpha, sigma, dalpha=None,
              dsigma=None) -> "Prediction":
        """The true (x0, eps) behind x = alpha x0 + sigma eps, to read targets (v, velocity, ...) from."""
        p = cls(x, x0, "x0", alpha, sigma, dalpha, dsigma)
        p.__dict__["_x0_eps"] = (x0, eps)
        return p

    @cached_property
    def _x0_eps(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, p, a, s = self.x, self.native, self.alpha, self.sigma
        if self.kind == "eps":
            return x0_from_eps(x, p, a, s), p
        if self.kind == "x0":
            return p, eps_from_x0(x, p, a, s)
        if self.kind == "v":
            return x0_eps_from_v(x, p, a, s)
        if self.kind == "score":
            eps = p * -s if isinstance(s, float) else -expand(s, x) * p
            return x0_from_eps(x, eps, a, s), eps
        return x0_eps_from_velocity(x, p, a, s, self._d("dalpha"), self._d("dsigma"))

    def _d(self, name: str):
        val = getattr(self, name)
        if val is None:
            raise ValueError(f"{name} is needed to convert from/to velocity but was not given")
        if callable(val):  # derivatives are computed only when a velocity is asked for
            val = val()
            setattr(self, name, val)
        return val

    @property
    def x0(self) -> torch.Tensor:
        """Denoised estimate E[x0 | x_t]."""
        return self.native if self.kind == "x0" else self._x0_eps[0]

    @property
    def eps(self) -> torch.Tensor:
        """Noise estimate E[eps | x_t]."""
        return self.native if self.kind == "eps" else self._x0_eps[1]

    @property
    def v(self) -> torch.Tensor:
        """v-prediction alpha eps - sigma x0."""
        return self.native if self.kind == "v" else v_from(self.x0, self.eps, self.alpha, self.sigma)

    @property
    def score(self) -> torch.Tensor:
        """grad_x log p_t(x) = -eps / sigma."""
        return self.native if self.kind == "score" else score_from_eps(self.eps, self.sigma)

    @property
    def velocity(self) -> torch.Tensor:
        """PF-ODE drift dx/dt."""
        if self.kind == "velocity":
            return self.native
        return velocity_from(self.x0, self.eps, self._d("dalpha"), self._d("dsigma"))

    def get(self, kind: str) -> torch.Tensor:
        """The prediction in parametrization ``kind`` ('edm' means x0)."""
        check_parametrization(kind)
        return self.x0 if kind == "edm" else getattr(self, kind)


# EDM's coefficients moved to the preconditioner module; kept importable from here
from .preconditioning import edm_loss_weight, edm_precond  # noqa: E402,F401
