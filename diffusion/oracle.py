"""Exact denoisers for Gaussian and Gaussian-mixture data under any schedule (docs/theory.md §13.1).

For data ``sum_k pi_k N(mu_k, Sigma_k)`` the noisy marginal at (alpha, sigma) is
``sum_k pi_k N(alpha mu_k, C_k)`` with ``C_k = alpha^2 Sigma_k + sigma^2 I``. Each Sigma_k is
eigendecomposed once (Sigma_k = U_k diag(d_k) U_k^T) so C_k is diagonal in the same basis for
every noise level: log-densities, scores and posterior means cost O(K D^2) per sample, in float64.

``OracleNet`` packages the exact x0-predictor as a network, so ``oracle_model(...)`` is a
``ScoreModel`` that samplers, losses, likelihood and distillation can be tested against.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .schedules import Schedule, TimeLike, as_time


class GaussianMixture:
    """A Gaussian mixture with exact noisy marginals p_t for any (alpha, sigma)."""

    def __init__(self, means: torch.Tensor, covs: torch.Tensor, weights: Optional[torch.Tensor] = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, D]; got {tuple(means.shape)}")
        K, D = means.shape
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if covs.ndim == 0:
            covs = covs.expand(K)
        if covs.ndim == 1:  # isotropic variance per mode
            covs = covs[:, None, None] * torch.eye(D, dtype=torch.float64)
        elif covs.ndim == 2:  # diagonal variances per mode
            covs = torch.diag_embed(covs)
        if covs.shape != (K, D, D):
            raise ValueError(f"covs must broadcast to [K, D, D] = {[K, D, D]}; got {tuple(covs.shape)}")
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (K,) or (w <= 0).any():
            raise ValueError(f"weights must be {K} positive numbers; got {w.tolist()}")
        # Diagonal covariances (axis-aligned anisotropy) skip the eigenbases: O(K D) per sample instead of
        # O(K D^2), which is what makes 1024-D mixtures cheap enough for the sampler suite.
        off = covs - torch.diag_embed(torch.diagonal(covs, dim1=1, dim2=2))
        self.diagonal = bool((off == 0).all())
        if self.diagonal:
            d = torch.diagonal(covs, dim1=1, dim2=2).clone()
            U = torch.eye(D, dtype=torch.float64).expand(K, D, D)  # a view: no K x D x D memory
        else:
            d, U = torch.linalg.eigh((covs + covs.transpose(1, 2)) / 2)
        if (d <= 0).any():
            raise ValueError(f"covariances must be positive definite; smallest eigenvalue {d.min().item():.3g}")
        self.means, self.covs, self.weights = means, covs, w / w.sum()
        self.eigvals, self.eigvecs = d, U  # [K, D], [K, D, D]
        self.K, self.dim = K, D

    # ---- data ----------------------------------------------------------------------------------
    def sample(self, n: int, generator: Optional[torch.Generator] = None, return_labels: bool = False):
        """Draw n samples of the clean data (float64, [n, D])."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        scaled = z * self.eigvals[k].sqrt()
        x = self.means[k] + (scaled if self.diagonal else torch.einsum("nij,nj->ni", self.eigvecs[k], scaled))
        return (x, k) if return_labels else x

    @property
    def mean(self) -> torch.Tensor:
        """Mean of the clean data."""
        return self.weights @ self.means

    @property
    def cov(self) -> torch.Tensor:
        """Covariance of the clean data."""
        dm = self.means - self.mean
        return torch.einsum("k,kij->ij", self.weights, self.covs) + torch.einsum("k,ki,kj->ij", self.weights, dm, dm)

    # ---- noisy marginal ------------------------------------------------------------------------
    def _terms(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        x = x.double()
        a = torch.as_tensor(alpha, dtype=torch.float64, device=x.device).reshape(-1, 1, 1)
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1, 1)
        r = x[:, None, :] - a * self.means[None]  # [B, K, D]
        z = r if self.diagonal else torch.einsum("kdj,bkd->bkj", self.eigvecs, r)  # coordinates in each eigenbasis
        c = a**2 * self.eigvals[None] + s**2  # eigenvalues of C_k, [B, K, D]
        log_n = -0.5 * ((z * z / c).sum(-1) + torch.log(c).sum(-1) + self.dim * math.log(2 * math.pi))
        logits = torch.log(self.weights)[None] + log_n  # [B, K]
        return a, z, c, logits

    def _from_eigenbasis(self, w: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """sum_k w_k U_k coords_k, [B, D]."""
        # Two pairwise contractions: a single 3-operand einsum materialises [B, K, D, D] without
        # opt_einsum (about 100x slower at D=64).
        if self.diagonal:
            return (w[..., None] * coords).sum(1)
        return (w[..., None] * torch.einsum("kdj,bkj->bkd", self.eigvecs, coords)).sum(1)

    def log_prob(self, x: torch.Tensor, alpha=1.0, sigma=0.0) -> torch.Tensor:
        """Exact log p_t(x) of the noisy marginal at (alpha, sigma); [B]."""
        return torch.logsumexp(self._terms(x, alpha, sigma)[3], dim=1)

    def responsibilities(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """Posterior mode probabilities w_k(x) at (alpha, sigma); [B, K]."""
        return torch.softmax(self._terms(x, alpha, sigma)[3], dim=1)

    def score(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """grad_x log p_t(x) = sum_k w_k C_k^{-1}(alpha mu_k - x)."""
        _, z, c, logits = self._terms(x, alpha, sigma)
        w = torch.softmax(logits, dim=1)
        return -self._from_eigenbasis(w, z / c)

    def x0_hat(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """E[x0 | x_t = x] = sum_k w_k [mu_k + alpha Sigma_k C_k^{-1}(x - alpha mu_k)]."""
        a, z, c, logits = self._terms(x, alpha, sigma)
        w = torch.softmax(logits, dim=1)
        shrink = a * self.eigvals[None] * z / c  # alpha Sigma C^{-1} r, in the eigenbasis
        return torch.einsum("bk,kd->bd", w, self.means) + self._from_eigenbasis(w, shrink)

    def nearest_mode(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the most responsible mode for clean samples x; [B]."""
        return self.responsibilities(x, 1.0, 0.0).argmax(dim=1)


class OracleNet(nn.Module):
    """The exact x0-predictor of a mixture as a network ``net(x, t) -> x0`` (conditioning 't')."""

    num_classes = 0

    def __init__(self, mixture: GaussianMixture, schedule: Schedule, shape: Optional[Sequence[int]] = None):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule
        self.shape = tuple(shape) if shape is not None else (mixture.dim,)
        if math.prod(self.shape) != mixture.dim:
            raise ValueError(f"shape {self.shape} has {math.prod(self.shape)} values; the mixture has dimension {mixture.dim}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        t = as_time(t, device=x.device)
        flat = x.reshape(x.shape[0], -1)
        out = self.mixture.x0_hat(flat, self.schedule.alpha(t), self.schedule.sigma(t))
        return out.to(x.dtype).reshape(x.shape)


def oracle_model(mixture: GaussianMixture, schedule: Schedule, shape: Optional[Sequence[int]] = None):
    """A ScoreModel whose predictions are exact for ``mixture`` under ``schedule``."""
    from .score_model import ScoreModel  # local import: score_model does not depend on the oracle

    return ScoreModel(OracleNet(mixture, schedule, shape), schedule, parametrization="x0", conditioning="t")


class ClassOracleNet(nn.Module):
    """Exact x0-predictors of a class-conditional model: label k -> ``classes[k]``, label K or None -> ``uncond``."""

    def __init__(self, classes: Sequence[GaussianMixture], uncond: GaussianMixture, schedule: Schedule,
                 shape: Optional[Sequence[int]] = None):
        super().__init__()
        self.classes, self.uncond, self.schedule = list(classes), uncond, schedule
        self.num_classes = len(self.classes)
        self.shape = tuple(shape) if shape is not None else (uncond.dim,)
        if any(m.dim != uncond.dim for m in self.classes) or math.prod(self.shape) != uncond.dim:
            raise ValueError(f"every class mixture and the shape {self.shape} must have dimension {uncond.dim}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        t = as_time(t, device=x.device).expand(x.shape[0])
        flat = x.reshape(x.shape[0], -1)
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        labels = torch.full((x.shape[0],), self.num_classes) if class_labels is None else torch.as_tensor(class_labels)
        out = torch.empty_like(flat, dtype=torch.float64)
        for k, mix in enumerate([*self.classes, self.uncond]):  # a test oracle: per-class masks are fine here
            m = labels.to(x.device) == k
            if m.any():
                out[m] = mix.x0_hat(flat[m], a[m], s[m])
        return out.to(x.dtype).reshape(x.shape)


def component(mixture: GaussianMixture, index: int | Sequence[int]) -> GaussianMixture:
    """The sub-mixture of the given component(s), weights renormalised."""
    idx = torch.as_tensor([index] if isinstance(index, int) else list(index))
    return GaussianMixture(mixture.means[idx], mixture.covs[idx], mixture.weights[idx])


def class_oracle_model(mixture: GaussianMixture, schedule: Schedule, shape: Optional[Sequence[int]] = None,
                       classes: Optional[Sequence[GaussianMixture]] = None, uncond: Optional[GaussianMixture] = None):
    """A class-conditional ScoreModel, exact for each class: class k is the k-th component of ``mixture``
    (or ``classes[k]``), label ``num_classes`` the unconditional model (``mixture`` itself, or ``uncond``)."""
    from .score_model import ScoreModel

    classes = [component(mixture, k) for k in range(mixture.K)] if classes is None else classes
    net = ClassOracleNet(classes, mixture if uncond is None else uncond, schedule, shape)
    return ScoreModel(net, schedule, parametrization="x0", conditioning="t", num_classes=len(classes))


def marginal_log_prob(mixture: GaussianMixture, schedule: Schedule, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
    """Exact log p_t(x) under ``schedule`` at time t."""
    t = as_time(t)
    return mixture.log_prob(x.reshape(x.shape[0], -1), schedule.alpha(t), schedule.sigma(t))


# ---- presets ------------------------------------------------------------------------------------

RING_RADIUS, RING_STD, RING_MODES = 1.0, 0.08, 8


def gaussian(mean: Sequence[float] | torch.Tensor, std: float) -> GaussianMixture:
    """A single isotropic Gaussian N(mean, std^2 I)."""
    m = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1)
    return GaussianMixture(m, torch.tensor([std**2], dtype=torch.float64))


def point_mass(x: Sequence[float] | torch.Tensor, std: float = 1e-6) -> GaussianMixture:
    """A (numerically) point-mass distribution at x."""
    return gaussian(x, std)


def ring2d(n_modes: int = RING_MODES, radius: float = RING_RADIUS, std: float = RING_STD) -> GaussianMixture:
    """The 2-D ring: n_modes isotropic Gaussians at angles 2 pi k / n_modes, equal weights."""
    ang = 2 * math.pi * torch.arange(n_modes, dtype=torch.float64) / n_modes
    means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    return GaussianMixture(means, torch.full((n_modes,), std**2, dtype=torch.float64))


def mixture64d(n_modes: int = 10, dim: int = 64, seed: int = 0) -> GaussianMixture:
    """A 64-D mixture of 10 anisotropic Gaussians (random means of norm ~2, eigenvalues 0.003-0.05)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n_modes, dim, generator=g, dtype=torch.float64) * (2.0 / math.sqrt(dim))
    q, _ = torch.linalg.qr(torch.randn(n_modes, dim, dim, generator=g, dtype=torch.float64))
    eig = torch.exp(torch.empty(n_modes, dim, dtype=torch.float64).uniform_(math.log(0.003), math.log(0.05), generator=g))
    covs = q @ torch.diag_embed(eig) @ q.transpose(1, 2)
    weights = torch.empty(n_modes, dtype=torch.float64).uniform_(0.5, 1.5, generator=g)
    return GaussianMixture(means, covs, weights)


PRESETS = {"ring2d": ring2d, "mixture64d": mixture64d}


def preset(name: str) -> GaussianMixture:
    """A named oracle preset: 'ring2d' or 'mixture64d'."""
    if name not in PRESETS:
        raise ValueError(f"unknown oracle preset {name!r}; valid: {sorted(PRESETS)}")
    return PRESETS[name]()


__all__ = ["GaussianMixture", "OracleNet", "oracle_model", "ClassOracleNet", "component", "class_oracle_model", "marginal_log_prob", "gaussian", "point_mass",
           "ring2d", "mixture64d", "preset", "PRESETS"]
