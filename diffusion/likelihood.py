"""Exact log-likelihood through the probability-flow ODE (docs/theory.md §12).

Along the PF-ODE ``dx/dt = F(x, t)`` the log-density obeys ``d log p_t(x(t))/dt = -div F``, so

    log p_0(x) = log p_1(x(1)) + integral_{t_eps}^{1} div F(x(t), t) dt.

``log_likelihood`` integrates the augmented system (x, integral of div F) with torchdiffeq's
adaptive solver (dopri5, rtol = atol = 1e-5 as in Score SDE). The divergence is either exact
(one vector-Jacobian product per dimension: low-dimensional data and tests) or Hutchinson's
estimate ``e^T (dF/dx) e`` with one Rademacher probe per sample, drawn once and kept for the whole
solve (one VJP per evaluation; the log-likelihood estimate is then unbiased).

Prior. At t=1 the marginal is ``alpha(1) x0 + sigma(1) eps``; the default prior is
``N(0, sigma(1)^2 I)``, as in Score SDE's VP/sub-VP likelihoods. It ignores the remaining
signal ``alpha(1) x0``, which costs about ``alpha(1)^2 E|x0|^2 / (2 sigma(1)^2)`` nats (~1e-5 per
dim for vp_linear at data scale 1). Pass ``data_var`` to use ``N(0, sigma^2 + alpha^2 data_var)``
instead, exact for zero-mean Gaussian data of that variance and the right choice for schedules
whose alpha(1) is not small.

Bits/dim for 8-bit images: dequantise with uniform noise, then
``bpd = -log p / (D ln 2) + bits - log2(hi - lo)`` (7 for data in [-1, 1], 8 for [0, 1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torchdiffeq import odeint

from .schedules import Prior
from .score_model import ScoreModel

TRACES = ("hutchinson", "exact")


@dataclass
class LikelihoodResult:
    """Per-sample PF-ODE log-likelihood and its parts (all in nats)."""

    log_prob: torch.Tensor  # [B] log p_0(x)
    prior_log_prob: torch.Tensor  # [B] log p_1(x(1)) under the Gaussian prior
    delta_log_prob: torch.Tensor  # [B] integral of div F from t_eps to t_end
    x_end: torch.Tensor  # the latent x(t_end)
    nfe: int  # network evaluations used by the solve
    dim: int  # D, the number of data dimensions per sample

    @property
    def nats_per_dim(self) -> torch.Tensor:
        """Negative log-likelihood per dimension in nats, [B]."""
        return -self.log_prob / self.dim

    def bits_per_dim(self, bits: int = 8, data_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
        """Bits/dim of the (dequantised) 8-bit data, [B]; see ``bits_per_dim``."""
        return bits_per_dim(self.log_prob, self.dim, bits=bits, data_range=data_range)


def bpd_offset(bits: int = 8, data_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """bits - log2(hi - lo): 7 for 8-bit data in [-1, 1], 8 for [0, 1] (docs/theory.md §12)."""
    lo, hi = data_range
    if not hi > lo:
        raise ValueError(f"data_range must be (lo, hi) with hi > lo; got {data_range}")
    return bits - math.log2(hi - lo)


def bits_per_dim(log_prob: torch.Tensor, dim: int, bits: int = 8,
                 data_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Convert a continuous log-density (nats) of dequantised data into discrete bits per dimension."""
    return -log_prob / (dim * math.log(2)) + bpd_offset(bits, data_range)


def dequantize(x: torch.Tensor, generator: Optional[torch.Generator] = None, bits: int = 8,
               data_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Snap x to its 2^bits levels and add uniform noise inside each level's bin (float64 math)."""
    lo, hi = data_range
    levels = 2**bits
    u01 = ((x.double() - lo) / (hi - lo)).clamp(0, 1)
    k = torch.round(u01 * (levels - 1))  # the integer pixel value the data came from
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=x.device)
    return (lo + (hi - lo) * (k + u) / levels).to(x.dtype)


def gaussian_prior_log_prob(x: torch.Tensor, alpha: float, sigma: float,
                            data_var: Optional[float] = None) -> torch.Tensor:
    """log N(x; 0, v I) with v = sigma^2 (default) or sigma^2 + alpha^2 data_var; [B] (``Prior.log_prob``)."""
    return Prior(1.0, float(alpha), float(sigma)).log_prob(x, data_var)


def rademacher(shape: Sequence[int], generator: Optional[torch.Generator] = None,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random +-1 entries (the Hutchinson probe with the lowest variance among iid probes)."""
    return torch.randint(0, 2, tuple(shape), generator=generator, device=device).to(dtype) * 2 - 1


def trace_of_jacobian(out: torch.Tensor, x: torch.Tensor, probes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over probes e of e^T (d out / d x) e, per sample [B]; one VJP per probe.

    With one Rademacher probe this is Hutchinson's unbiased trace estimate; with the D standard
    basis vectors it is the exact trace (the divergence).
    """
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for i, e in enumerate(probes):
        (vjp,) = torch.autograd.grad(out, x, e, retain_graph=i < len(probes) - 1)
        total = total + (vjp * e).flatten(1).sum(1).double()
    return total


def _basis_probes(x: torch.Tensor) -> list[torch.Tensor]:
    """The D standard basis vectors, each repeated over the batch (exact trace)."""
    d = x[0].numel()
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    return [eye[i].reshape(x.shape[1:]).expand_as(x) for i in range(d)]


_ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


def _land_on(method: str, t_end: float) -> Optional[dict]:
    """Adaptive torchdiffeq solvers step past the end time and interpolate back; the schedule is
    undefined beyond t=1, so make the last step land exactly on ``t_end``."""
    return {"step_t": [t_end]} if method in _ADAPTIVE else None


def log_likelihood(model: ScoreModel, x: torch.Tensor, *, trace: str = "hutchinson",
                   generator: Optional[torch.Generator] = None, t_eps: float = 1e-5,
                   t_end: Optional[float] = None, method: str = "dopri5", rtol: float = 1e-5,
                   atol: float = 1e-5, data_var: Optional[float] = None,
                   class_labels: Optional[torch.Tensor] = None, max_exact_dim: int = 4096) -> LikelihoodResult:
    """log p_0(x) per sample by integrating the PF-ODE and its divergence from t_eps to t_end.

    ``trace='hutchinson'`` draws one Rademacher probe per sample from ``generator`` and keeps it for
    the whole solve; ``trace='exact'`` costs D VJPs per evaluation (allowed up to ``max_exact_dim``).
    ``t_end`` defaults to the schedule's ``t_max`` (1 for every built-in schedule).
    """
    if trace not in TRACES:
        raise ValueError(f"unknown trace estimator {trace!r}; valid: {list(TRACES)}")
    schedule = model.schedule
    t_end = float(schedule.t_max if t_end is None else t_end)
    t_eps = max(float(t_eps), float(schedule.t_min))
    if not 0 <= t_eps < t_end <= 1:
        raise ValueError(f"need 0 <= t_eps < t_end <= 1; got t_eps={t_eps}, t_end={t_end}")
    dim = x[0].numel()
    if trace == "exact" and dim > max_exact_dim:
        raise ValueError(f"exact trace needs {dim} VJPs per evaluation (data dimension {dim} > "
                         f"max_exact_dim={max_exact_dim}); use trace='hutchinson' or raise max_exact_dim")
    probes = ([rademacher(x.shape, generator, x.device, x.dtype)] if trace == "hutchinson"
              else _basis_probes(x))

    def drift(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        xt = state[0].detach().requires_grad_(True)
        with torch.enable_grad():
            f = model(xt, t.to(torch.float64), class_labels).velocity
            div = trace_of_jacobian(f, xt, probes)
        return f.detach(), div.to(state[1].dtype)

    nfe0 = model.nfe
    zero = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    times = torch.tensor([t_eps, t_end], dtype=torch.float64, device=x.device)
    with torch.no_grad():
        xs, deltas = odeint(drift, (x, zero), times, rtol=rtol, atol=atol, method=method,
                            options=_land_on(method, t_end))
    x_end, delta = xs[-1], deltas[-1].double()
    end = schedule.prior if t_end == schedule.t_max else schedule.prior_at(t_end)
    prior = end.log_prob(x_end, data_var)
    log_prob = prior + delta
    bad = int((~torch.isfinite(log_prob)).sum())
    if bad:
        raise FloatingPointError(f"PF-ODE likelihood produced {bad} non-finite values out of {x.shape[0]} "
                                 f"samples (schedule {schedule.name}, t in [{t_eps}, {t_end}])")
    return LikelihoodResult(log_prob, prior, delta, x_end, model.nfe - nfe0, dim)


def evaluate_nll(model: ScoreModel, batches: Iterable[torch.Tensor], *,
                 generator: Optional[torch.Generator] = None, dequantize_bits: Optional[int] = 8,
                 data_range: tuple[float, float] = (-1.0, 1.0), progress: bool = False,
                 **kwargs) -> dict:
    """Mean bits/dim (with standard error) and NFE over batches of data, each dequantised first.

    ``dequantize_bits=None`` skips dequantisation and reports nats/dim of continuous data only.
    Extra keyword arguments go to ``log_likelihood``.
    """
    from tqdm.auto import tqdm

    rows, nfes = [], []
    for x in tqdm(batches, desc="nll", disable=not progress):
        if dequantize_bits is not None:
            x = dequantize(x, generator, dequantize_bits, data_range)
        res = log_likelihood(model, x, generator=generator, **kwargs)
        rows.append(res.log_prob)
        nfes.append(res.nfe)
        dim = res.dim
    if not rows:
        raise ValueError("evaluate_nll got no data batches")
    lp = torch.cat(rows)
    nats = -lp / dim
    out = {"num_samples": int(lp.numel()), "dim": dim, "nats_per_dim": float(nats.mean()),
           "nats_per_dim_stderr": float(nats.std() / math.sqrt(lp.numel())) if lp.numel() > 1 else float("nan"),
           "nfe_per_batch": nfes, "nfe_mean": sum(nfes) / len(nfes)}
    if dequantize_bits is not None:
        bpd = bits_per_dim(lp, dim, dequantize_bits, data_range)
        out.update(bits_per_dim=float(bpd.mean()),
                   bits_per_dim_stderr=out["nats_per_dim_stderr"] / math.log(2),
                   bpd_offset=bpd_offset(dequantize_bits, data_range))
    return out


__all__ = ["LikelihoodResult", "log_likelihood", "evaluate_nll", "bits_per_dim", "bpd_offset", "dequantize",
           "gaussian_prior_log_prob", "rademacher", "trace_of_jacobian", "TRACES"]
