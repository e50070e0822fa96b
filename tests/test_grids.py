"""Sampling grids: closed-form values, endpoints, explicit final 0, and bad input."""

import math

import pytest
import torch

from diffusion import schedules
from samplers import grids


def test_karras_matches_edm_n18_values():
    g = grids.karras(18, se_last=0.002, se_max=80.0, rho=7.0)
    assert g.dtype == torch.float64 and g.numel() == 19 and g[-1] == 0
    # docs/theory.md §5.2: 80, 57.586, 40.786, ..., 0.0075, 0.002, then 0
    assert g[:3].tolist() == pytest.approx([80.0, 57.586, 40.786], abs=5e-4)
    assert g[-3:-1].tolist() == pytest.approx([0.0075, 0.002], abs=5e-5)
    # interior point against the formula written out by hand
    i = 9
    ref = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert g[i].item() == pytest.approx(ref, rel=1e-14)


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 3.0])
def test_polynomial_in_log_sigma(p):
    n, lo, hi = 7, 0.01, 150.0
    g = grids.polynomial(n, se_last=lo, se_max=hi, p=p)
    assert g.numel() == n + 1 and g[-1] == 0
    frac = (torch.log(g[:-1]) - math.log(hi)) / (math.log(lo) - math.log(hi))
    assert torch.allclose(frac, (torch.arange(n, dtype=torch.float64) / (n - 1)) ** p, atol=1e-12)
    if p == 1.0:
        assert torch.equal(g, grids.uniform_logsnr(n, lo, hi))
        steps = torch.diff(-2 * torch.log(g[:-1]))  # logSNR increments are all equal
        assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-10)


def test_vp_time_uniform_is_uniform_in_fitted_vp_time():
    n, lo, hi, eps_s = 6, 0.002, 80.0, 1e-3
    g = grids.vp_time_uniform(n, lo, hi, eps_s)
    assert g[0].item() == pytest.approx(hi, rel=1e-10) and g[-2].item() == pytest.approx(lo, rel=1e-8)
    # invert se^2 = exp(beta_d t^2/2 + beta_min t) - 1 with the same fit: t must be linear
    a_hi, a_lo = math.log1p(hi**2), math.log1p(lo**2)
    beta_d = 2 * (a_lo / eps_s - a_hi) / (eps_s - 1)
    beta_min = a_hi - beta_d / 2
    q = torch.log1p(g[:-1] ** 2)
    t = (-beta_min + torch.sqrt(beta_min**2 + 2 * beta_d * q)) / beta_d
    assert torch.allclose(t, torch.linspace(1, eps_s, n, dtype=torch.float64), atol=1e-9)


def test_uniform_t_ddpm_is_trailing_spacing():
    sch = schedules.by_name("ddpm")
    g = grids.uniform_t(sch, 10)
    # t = 1, 0.9, ..., 0.1 are the DDPM indices 999, 899, ..., 99 ("trailing")
    idx = torch.arange(999, 0, -100, dtype=torch.float64)
    se = torch.sqrt((1 - sch.alphas_cumprod[idx.long()]) / sch.alphas_cumprod[idx.long()])
    assert torch.allclose(g[:-1], se, rtol=1e-12) and g[-1] == 0


def test_uniform_t_flow_starts_at_infinity_and_shifted_schedule_grid():
    flow = schedules.by_name("flow")
    g = grids.uniform_t(flow, 4)
    assert math.isinf(g[0]) and g[1:].tolist() == pytest.approx([3.0, 1.0, 1 / 3, 0.0])  # t/(1-t)
    shifted = schedules.by_name("flow", resolution=256, shift_base=64)  # SD3 shift s = 4
    gs = grids.make("uniform_t", 4, flow, grid_schedule=shifted)
    # SD3 warp t' = s t/(1 + (s-1) t) at t = 0.75: se = t'/(1-t') = s t/(1-t) = 4 * 3
    assert gs[1].item() == pytest.approx(12.0, rel=1e-9)
    g2 = grids.uniform_t(schedules.by_name("ddpm"), 5, se_last=0.05)
    assert g2[-2].item() == pytest.approx(0.05, rel=1e-9)


def test_make_uses_schedule_range_and_caps_flow():
    ddpm = schedules.by_name("ddpm")
    g = grids.make("karras", 5, ddpm)
    assert g[0].item() == pytest.approx(ddpm.sigma_edm_max) and g[-2].item() == pytest.approx(0.002)
    gf = grids.make("polynomial", 5, schedules.by_name("flow"), p=2.0, se_last=0.01)
    assert gf[0].item() == grids.SE_CAP and gf[-2].item() == pytest.approx(0.01)
    assert grids.make("karras", 3, schedules.by_name("ve"))[-2].item() == pytest.approx(0.01, rel=1e-3)  # VE floor
    for n in (1, 2):
        for kind in ("karras", "polynomial", "uniform_logsnr", "vp_time_uniform"):
            gg = grids.make(kind, n, ddpm)
            assert gg.numel() == n + 1 and gg[-1] == 0 and gg[0].item() == pytest.approx(ddpm.sigma_edm_max)


def test_bad_grid_input():
    with pytest.raises(ValueError, match="unknown grid 'linear'.*karras"):
        grids.make("linear", 5)
    with pytest.raises(ValueError, match="n must be an integer >= 1; got 0"):
        grids.karras(0)
    with pytest.raises(ValueError, match="se_last=90"):
        grids.polynomial(4, se_last=90.0, se_max=80.0)
    with pytest.raises(ValueError, match="strictly decrease"):
        grids.check_grid(torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="only the first point may be inf"):
        grids.check_grid(torch.tensor([math.inf, math.inf, 0.0]))
    with pytest.raises(ValueError, match="NaN"):
        grids.check_grid(torch.tensor([1.0, float("nan"), 0.0]))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_uniform_matches_diffusers_flow_match_euler(shift):
    import diffusers

    s = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    s.set_timesteps(12)
    sig = s.sigmas.double()[:-1]
    ref = sig / (1 - sig)  # flow sigma -> EDM sigma; inf at sigma = 1
    g = grids.flow_uniform(12, se_last=ref[-1].item(), shift=shift)
    assert g.numel() == 13 and g[-1] == 0 and math.isinf(g[0]) and math.isinf(ref[0])
    assert torch.allclose(g[1:-1], ref[1:], rtol=1e-5)  # diffusers' table is float32
    # default: unwarped sigma_last = 1/1000; works as the grid of an EDM-view sampler on flow
    d = grids.make("flow_uniform", 6, schedules.by_name("flow"), shift=3.0)
    sp = 3 * 1e-3 / (1 + 2 * 1e-3)
    assert d[-2].item() == pytest.approx(sp / (1 - sp), rel=1e-12)
    with pytest.raises(ValueError, match="shift must be a finite number > 0"):
        grids.flow_uniform(5, shift=0.0)
