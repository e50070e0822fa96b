"""PF-ODE likelihood against closed forms (docs/theory.md §12, §13.9)."""

import math

import pytest
import torch

from diffusion import schedules
from diffusion.likelihood import (bits_per_dim, bpd_offset, dequantize, evaluate_nll, log_likelihood, rademacher,
                                  trace_of_jacobian)
from diffusion.oracle import GaussianMixture, gaussian, marginal_log_prob, mixture64d, oracle_model, ring2d

TOL = 0.02  # nats per dimension (the target)


def full_cov_gaussian() -> GaussianMixture:
    """A 3-D Gaussian with correlated coordinates (its PF-ODE Jacobian is not diagonal)."""
    cov = torch.tensor([[0.20, 0.05, 0.00], [0.05, 0.10, 0.02], [0.00, 0.02, 0.30]], dtype=torch.float64)
    return GaussianMixture(torch.tensor([[0.3, -0.5, 0.1]], dtype=torch.float64), cov[None])


@pytest.mark.parametrize("schedule", ["vp_linear", "flow", "edm"])
def test_gaussian_log_likelihood_matches_density(schedule):
    s = schedules.by_name(schedule)
    mix = full_cov_gaussian()
    x = mix.sample(12, torch.Generator().manual_seed(0))
    res = log_likelihood(oracle_model(mix, s), x, trace="exact")
    exact = mix.log_prob(x)  # the data density itself
    err = (res.log_prob - exact).abs() / mix.dim
    assert err.max() < TOL, (schedule, err.max().item())
    assert res.nfe > 10 and res.dim == 3


def test_ring_mixture_log_likelihood_matches_marginal():
    s = schedules.by_name("cosine")
    mix = ring2d()
    x = mix.sample(12, torch.Generator().manual_seed(1))
    res = log_likelihood(oracle_model(mix, s), x, trace="exact")
    exact = marginal_log_prob(mix, s, x, 0.0)
    assert ((res.log_prob - exact).abs() / 2).max() < TOL


def test_hutchinson_is_exact_for_isotropic_gaussian():
    # an isotropic Gaussian has a diagonal PF-ODE Jacobian, where e^T J e = tr J for every +-1 probe
    s = schedules.by_name("vp_linear")
    mix = gaussian([0.5, -0.2, 0.1, 0.0], 0.3)
    x = mix.sample(8, torch.Generator().manual_seed(2))
    res = log_likelihood(oracle_model(mix, s), x, trace="hutchinson", generator=torch.Generator().manual_seed(3))
    assert ((res.log_prob - mix.log_prob(x)).abs() / 4).max() < TOL


def test_hutchinson_estimate_is_unbiased():
    """Mean of e^T J e over many Rademacher probes -> tr J, within 4 standard errors of the exact variance."""
    s = schedules.by_name("vp_linear")
    mix = mixture64d()
    model = oracle_model(mix, s)
    x = mix.sample(1, torch.Generator().manual_seed(0)) * float(s.alpha(0.3)) + float(s.sigma(0.3)) * torch.randn(
        1, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda z: model(z, 0.3).velocity, x)[0, :, 0, :]  # [64, 64]
    n = 4000
    xs = x.expand(n, 64).clone().requires_grad_(True)
    with torch.enable_grad():
        f = model(xs, 0.3).velocity
        est = trace_of_jacobian(f, xs, [rademacher(xs.shape, torch.Generator().manual_seed(5), dtype=xs.dtype)])
    sym = jac + jac.T
    var = float(torch.triu(sym, diagonal=1).pow(2).sum())  # Var(e^T J e) = sum_{i<j} (J_ij + J_ji)^2
    assert var > 1.0  # a non-trivial Jacobian: the check below could fail
    se = math.sqrt(var / n)
    assert abs(est.mean().item() - jac.trace().item()) < 4 * se
    assert est.var().item() == pytest.approx(var, rel=0.15)


def test_exact_trace_is_jacobian_trace():
    s = schedules.by_name("cosine")
    model = oracle_model(ring2d(), s)
    x = torch.tensor([[0.3, 0.8], [-1.0, 0.2]], dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        f = model(x, 0.4).velocity
        tr = trace_of_jacobian(f, x, [torch.tensor([[1.0, 0.0]] * 2, dtype=x.dtype), torch.tensor([[0.0, 1.0]] * 2, dtype=x.dtype)])
    for i in range(2):
        j = torch.autograd.functional.jacobian(lambda z: model(z, 0.4).velocity, x[i:i + 1].detach())[0, :, 0, :]
        assert tr[i].item() == pytest.approx(j.trace().item(), rel=1e-10)


def test_bits_per_dim_of_uniform_8bit_data_is_8():
    # uniform density on [-1, 1]^D: log p = -D log 2, i.e. every 8-bit level has probability 1/256
    d = 10
    lp = torch.tensor([-d * math.log(2.0)])
    assert bits_per_dim(lp, d).item() == pytest.approx(8.0, abs=1e-12)
    assert bpd_offset(8, (-1, 1)) == 7 and bpd_offset(8, (0, 1)) == 8


def test_dequantize_stays_in_the_pixel_bin():
    k = torch.arange(256, dtype=torch.float64)
    x = (k / 127.5 - 1).repeat(40)  # 8-bit data mapped to [-1, 1]
    xd = dequantize(x, torch.Generator().manual_seed(0))
    pos = (xd + 1) / 2 * 256
    assert torch.equal(pos.floor(), k.repeat(40))  # each value stays in its own 1/256 bin
    assert (pos - pos.floor()).mean().item() == pytest.approx(0.5, abs=0.02)  # uniform noise inside it


def test_evaluate_nll_reports_bits_and_nfe():
    s = schedules.by_name("vp_linear")
    mix = gaussian([0.0, 0.0], 0.5)
    x = mix.sample(6, torch.Generator().manual_seed(0))
    rec = evaluate_nll(oracle_model(mix, s), [x[:3], x[3:]], dequantize_bits=None, trace="exact")
    assert rec["num_samples"] == 6 and len(rec["nfe_per_batch"]) == 2 and min(rec["nfe_per_batch"]) > 0
    assert rec["nats_per_dim"] == pytest.approx(float(-mix.log_prob(x).mean() / 2), abs=TOL)


def test_bad_arguments_raise():
    model = oracle_model(ring2d(), schedules.by_name("cosine"))
    x = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown trace estimator 'bogus'"):
        log_likelihood(model, x, trace="bogus")
    with pytest.raises(ValueError, match="t_eps < t_end"):
        log_likelihood(model, x, t_eps=0.5, t_end=0.2)
    with pytest.raises(ValueError, match="max_exact_dim"):
        log_likelihood(model, x, trace="exact", max_exact_dim=1)
