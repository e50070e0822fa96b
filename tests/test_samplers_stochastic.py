"""Stochastic samplers: DDIM(eta=1) is the DDPM posterior (docs/theory.md §13.5), SDE/ODE marginals agree
on the exact 2-D ring oracle (item 7), and per-image seeds make image i independent of its batch."""

import math

import pytest
import torch

import samplers
from diffusion import oracle, schedules
from samplers import grids, noise


def ddpm_posterior(x_t, x0, a_t, s_t, a_s, s_s):
    """q(x_s | x_t, x0) for s < t: mean and std, written with alpha_{t|s} = a_t/a_s."""
    a_ts = a_t / a_s
    var_ts = s_t**2 - a_ts**2 * s_s**2
    mean = (a_ts * s_s**2 / s_t**2) * x_t + (a_s * var_ts / s_t**2) * x0
    return mean, math.sqrt(var_ts * s_s**2 / s_t**2)


@pytest.mark.parametrize("k, j", [(500, 499), (999, 899), (600, 200)])  # unit stride and strided
def test_ddim_eta1_is_ddpm_posterior(k, j):
    sch = schedules.by_name("ddpm")
    model = oracle.oracle_model(oracle.ring2d(), sch)
    ac = sch.alphas_cumprod
    a_t, a_s = ac[k].sqrt().item(), ac[j].sqrt().item()
    s_t, s_s = math.sqrt(1 - ac[k].item()), math.sqrt(1 - ac[j].item())
    grid = torch.tensor([s_t / a_t, s_s / a_s], dtype=torch.float64)  # a step between two DDPM indices
    x_t = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1.3
    x0 = model(x_t, sch.index_to_t(k)).x0
    mean, std = ddpm_posterior(x_t, x0, a_t, s_t, a_s, s_s)
    z = noise.randn(x_t.shape, noise.generators(7, 6), dtype=torch.float64)
    out = samplers.get("ddim")(model, x_t, grid, eta=1.0, generator=noise.generators(7, 6))
    assert torch.allclose(out, mean + std * z, atol=1e-10)
    if j == k - 1:  # unit stride: the textbook coefficients from betas and alphas_cumprod
        beta = sch.betas[k].item()
        coef0 = beta * ac[j].sqrt().item() / (1 - ac[k].item())
        coef_t = (1 - ac[j].item()) * math.sqrt(1 - beta) / (1 - ac[k].item())
        assert torch.allclose(mean, coef0 * x0 + coef_t * x_t, atol=1e-12)
        assert std == pytest.approx(math.sqrt(beta * (1 - ac[j].item()) / (1 - ac[k].item())), rel=1e-10)
        # DDPM's "large" variance: same mean, noise std sqrt(beta_t)
        large = samplers.get("ddim")(model, x_t, grid, eta=1.0, variance="large", generator=noise.generators(7, 6))
        assert torch.allclose(large, mean + math.sqrt(beta) * z, atol=1e-10)


def test_ddim_no_noise_on_last_step():
    sch = schedules.by_name("ddpm")
    model = oracle.oracle_model(oracle.ring2d(), sch)
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = float(sch.t_of_sigma_edm(3.0))
    a = float(sch.alpha(t))
    out = samplers.get("ddim")(model, x * a, torch.tensor([3.0, 0.0], dtype=torch.float64), eta=1.0,
                               generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, model.denoise(x, 3.0), atol=1e-12)


def _moments_ok(x, mean, cov, n):
    # Monte-Carlo error of a mean ~ sqrt(var/n), of a covariance entry ~ var sqrt(2/n); allow 5 sigma
    var = cov.diagonal().max().item()
    tol_m, tol_c = 5 * math.sqrt(var / n), 5 * var * math.sqrt(2 / n)
    dm = (x.mean(0) - mean).abs().max().item()
    dc = (torch.cov(x.T) - cov).abs().max().item()
    return dm < tol_m and dc < tol_c, (dm, tol_m, dc, tol_c)


METHODS = [  # (sampler, grid, steps, options): PF-ODE, reverse SDE, eta_t = g/2, ancestral DDPM, PC
    ("dpmpp_2m", "karras", 30, {}), ("euler_maruyama", "uniform_t", 200, {"eta": 1.0}),
    ("euler_maruyama", "uniform_t", 200, {"eta": 0.5}), ("ddim", "uniform_t", 200, {"eta": 1.0}),
    ("pc", "uniform_t", 100, {}),
]


@pytest.mark.parametrize("se_end", [0.0, 0.5])  # at t~0 and at an intermediate t vs the analytic p_t
def test_sde_and_ode_marginals_agree_on_ring(se_end):
    sch = schedules.by_name("vp_linear")
    mix = oracle.ring2d()
    model = oracle.oracle_model(mix, sch)
    n = 3000
    eps = noise.randn((n, 2), torch.Generator().manual_seed(11), dtype=torch.float64)
    t_end = float(sch.t_of_sigma_edm(se_end)) if se_end > 0 else 0.0
    a, s = float(sch.alpha(t_end)), float(sch.sigma(t_end)) if se_end > 0 else 0.0
    mean, cov = a * mix.mean, a**2 * mix.cov + s**2 * torch.eye(2, dtype=torch.float64)
    for name, kind, steps, opts in METHODS:
        g = grids.make(kind, steps, sch)
        if se_end > 0:  # same family of grids, stopped at se_end
            g = torch.cat([g[g > se_end], torch.tensor([se_end], dtype=torch.float64)])
        res = samplers.get(name)(model, eps * float(sch.sigma(1.0)), g, generator=torch.Generator().manual_seed(3), **opts)
        ok, info = _moments_ok(res, mean, cov, n)
        assert ok, (name, opts, se_end, info)
        if se_end == 0:  # mode weights 1/8 each (multinomial sd ~0.006) and within-mode spread
            w = torch.bincount(mix.nearest_mode(res), minlength=8).double() / n
            assert (w - 1 / 8).abs().max() < 0.03, (name, opts, w)
            dist = (res - mix.means[mix.nearest_mode(res)]).norm(dim=1).mean().item()
            assert abs(dist - oracle.RING_STD * math.sqrt(math.pi / 2)) < 0.015, (name, opts, dist)


STOCHASTIC = [("ddim", {"eta": 1.0}), ("euler_maruyama", {}), ("pc", {}), ("heun", {"s_churn": 10.0}),
              ("euler", {"s_churn": 10.0})]


@pytest.mark.parametrize("name, opts", STOCHASTIC)
def test_per_image_seeds_independent_of_batch(name, opts):
    model = oracle.oracle_model(oracle.ring2d(), schedules.by_name("ddpm"))
    outs = []
    for b in (1, 3, 8):
        eps = noise.randn((b, 2), noise.generators(100, b), dtype=torch.float64)
        res = samplers.sample(model, eps, sampler=name, nfe=samplers.nfe_of(name, 6, **opts),
                              generator=noise.generators(200, b), **opts)
        outs.append(res.x)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[1], outs[2][:3]), name
    # same seeds again: bit-identical; other seeds: different
    eps = noise.randn((3, 2), noise.generators(100, 3), dtype=torch.float64)
    again = samplers.sample(model, eps, sampler=name, nfe=samplers.nfe_of(name, 6, **opts),
                            generator=noise.generators(200, 3), **opts).x
    other = samplers.sample(model, eps, sampler=name, nfe=samplers.nfe_of(name, 6, **opts),
                            generator=noise.generators(201, 3), **opts).x
    assert torch.equal(again, outs[1]) and not torch.allclose(other, outs[1])


def test_deterministic_samplers_bit_stable_and_single_generator():
    model = oracle.oracle_model(oracle.mixture64d(), schedules.by_name("ddpm"))
    eps = noise.randn((4, 64), torch.Generator().manual_seed(5), dtype=torch.float32)
    for name in ("euler", "heun", "dpmpp_2m", "ipndm", "mvt", "ddim", "flow_euler"):
        nfe = samplers.nfe_of(name, 4)
        a = samplers.sample(model, eps, sampler=name, nfe=nfe).x
        b = samplers.sample(model, eps.clone(), sampler=name, nfe=nfe).x
        assert a.dtype == torch.float32 and torch.equal(a, b), name
    # one torch.Generator for the whole batch: reproducible for a fixed batch
    r1 = samplers.sample(model, eps, sampler="ddim", nfe=5, eta=1.0, generator=torch.Generator().manual_seed(9)).x
    r2 = samplers.sample(model, eps, sampler="ddim", nfe=5, eta=1.0, generator=torch.Generator().manual_seed(9)).x
    assert torch.equal(r1, r2)


def test_noise_helpers_and_errors():
    gens = noise.generators(10, 3, offset=2)
    x = noise.randn((3, 4), gens, dtype=torch.float64)
    assert torch.equal(x[1], torch.randn(4, generator=torch.Generator().manual_seed(13), dtype=torch.float64))
    with pytest.raises(ValueError, match="got 2 per-image generators for a batch of 3"):
        noise.randn((3, 4), noise.generators(0, 2))
    model = oracle.oracle_model(oracle.ring2d(), schedules.by_name("flow"))
    with pytest.raises(ValueError, match="eta_t must be finite"):  # reverse SDE is singular at t=1 of flow
        samplers.sample(model, torch.randn(2, 2, dtype=torch.float64), sampler="euler_maruyama",
                        grid=torch.tensor([math.inf, 1.0, 0.0], dtype=torch.float64))
    # its default grid starts at SE_CAP instead, so it runs on flow models (every sampler on every schedule)
    assert samplers.sample(model, torch.randn(2, 2, dtype=torch.float64), sampler="euler_maruyama",
                           nfe=4).grid[0] == samplers.grids.SE_CAP
    with pytest.raises(ValueError, match="pc norm must be 'batch', 'sigma' or 'sample'"):
        samplers.sample(model, torch.randn(2, 2, dtype=torch.float64), sampler="pc", nfe=5, norm="l2")
