"""Schedules: closed-form identities of docs/theory.md §2, §10, §13.3 and §13.4."""

import math

import pytest
import torch

from diffusion import schedules as S

ALL = sorted(S.SCHEDULES)
T = torch.linspace(0.01, 0.99, 197, dtype=torch.float64)


@pytest.mark.parametrize("name", ALL)
def test_logsnr_strictly_decreasing_and_inverse(name):
    s = S.by_name(name)
    lam = s.logsnr(T)
    assert (lam[1:] < lam[:-1]).all()
    assert torch.allclose(s.t_of_logsnr(lam), T, atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_alpha_sigma_give_logsnr_and_float64(name):
    s = S.by_name(name)
    a, sg = s.alpha(T), s.sigma(T)
    assert a.dtype == sg.dtype == torch.float64
    assert torch.allclose(2 * torch.log(a / sg), s.logsnr(T), atol=1e-9)
    assert torch.allclose(s.sigma_edm(T), sg / a)


@pytest.mark.parametrize("name", ["vp_linear", "ddpm", "cosine"])
def test_vp_alpha2_is_sigmoid_logsnr(name):
    s = S.by_name(name)
    assert torch.allclose(s.alpha(T) ** 2, torch.sigmoid(s.logsnr(T)), atol=1e-12)
    assert torch.allclose(s.alpha(T) ** 2 + s.sigma(T) ** 2, torch.ones_like(T), atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_derivatives_match_finite_differences(name):
    s = S.by_name(name)
    t = torch.tensor([0.2037, 0.5013, 0.8071], dtype=torch.float64)  # away from ddpm knots
    h = 1e-6
    for f, df in ((s.alpha, s.dalpha), (s.sigma, s.dsigma), (s.logsnr, s.dlogsnr)):
        fd = (f(t + h) - f(t - h)) / (2 * h)
        assert torch.allclose(df(t), fd, rtol=1e-5, atol=1e-7)


def test_closed_forms():
    vp = S.VPLinear()
    t = torch.tensor(0.3, dtype=torch.float64)
    assert math.isclose(float(vp.alpha(t)), math.exp(-0.09 * 19.9 / 4 - 0.3 * 0.05), rel_tol=1e-12)
    fl = S.Flow()
    assert float(fl.alpha(t)) == pytest.approx(0.7) and float(fl.sigma(t)) == pytest.approx(0.3)
    ve = S.VE()
    assert float(ve.sigma(t)) == pytest.approx(0.01 * 5000**0.3)
    edm = S.EDM()
    assert float(edm.sigma(t)) == pytest.approx(24.0)
    cos = S.Cosine()
    assert float(cos.logsnr(torch.tensor(0.0))) == pytest.approx(15.0)
    assert float(cos.logsnr(torch.tensor(1.0))) == pytest.approx(-15.0)
    assert float(cos.alpha(torch.tensor(0.5))) == pytest.approx(math.cos(math.pi / 4), abs=1e-6)
    sub = S.SubVP()
    assert float(sub.sigma(t)) == pytest.approx(1 - float(vp.alpha(t)) ** 2)


def test_ddpm_matches_discrete_alphas_cumprod_and_index_adapter():
    s = S.DDPM()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    acp = torch.cumprod(1 - betas, 0)
    n = torch.arange(1000)
    t = s.index_to_t(n)
    assert torch.allclose(s.alpha(t) ** 2, acp, rtol=1e-12)
    assert torch.allclose(s.t_to_index(t), n.double(), atol=1e-9)
    assert float(s.alpha(torch.tensor(0.0))) == 1.0
    # between knots log(alphas_cumprod) is linear
    mid = (t[10] + t[11]) / 2
    assert float(torch.log(s.alpha(mid) ** 2)) == pytest.approx(float(torch.log(acp[10] * acp[11])) / 2, rel=1e-12)


def test_sde_coefficients_of_vp():
    vp = S.VPLinear()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    f, g2 = vp.drift_diffusion(t)
    beta = 0.1 + t * 19.9
    assert torch.allclose(f, -beta / 2) and torch.allclose(g2, beta)


@pytest.mark.parametrize("name", ["vp_linear", "cosine", "ve", "edm", "flow", "ddpm"])
@pytest.mark.parametrize("res,base", [(256, 64), (32, 64), (512, 128)])
def test_shift_for_resolution_offsets_logsnr_exactly(name, res, base):
    b = S.by_name(name)
    sh = S.by_name(name, resolution=res, shift_base=base)
    assert torch.allclose(sh.logsnr(T) - b.logsnr(T), torch.full_like(T, 2 * math.log(base / res)), atol=1e-9)
    assert sh.family == b.family
    if b.family == "vp":
        assert torch.allclose(sh.alpha(T) ** 2 + sh.sigma(T) ** 2, torch.ones_like(T))


def test_flow_shift_is_the_sd3_time_warp():
    s = 3.0  # SD3 at 1024^2
    fl = S.Flow()
    sh = S.Shifted(fl, -2 * math.log(s))
    warped = S.flow_time_warp(T, s)
    assert torch.allclose(sh.sigma(T), warped, atol=1e-12)
    assert torch.allclose(sh.alpha(T) + sh.sigma(T), torch.ones_like(T))
    assert torch.allclose(fl.logsnr(warped) - fl.logsnr(T), torch.full_like(T, -2 * math.log(s)), atol=1e-9)


def test_interpolated_endpoints_are_the_two_shifted_schedules():
    base = S.Cosine()
    it = S.Interpolated(base, res_low=32, res_high=256, base_resolution=64)
    lo = S.shift_for_resolution(base, 32, 64)
    hi = S.shift_for_resolution(base, 256, 64)
    assert float(it.logsnr(torch.tensor(1.0))) == pytest.approx(float(lo.logsnr(torch.tensor(1.0))))
    assert float(it.logsnr(torch.tensor(0.0))) == pytest.approx(float(hi.logsnr(torch.tensor(0.0))))
    t = torch.tensor(0.3, dtype=torch.float64)
    assert float(it.logsnr(t)) == pytest.approx(0.3 * float(lo.logsnr(t)) + 0.7 * float(hi.logsnr(t)))


def test_average_pooling_multiplies_snr_by_s2():
    """docs/theory.md §10 / §13.4: pooling s x s keeps a constant signal and divides the noise variance by s^2."""
    g = torch.Generator().manual_seed(0)
    s = 4
    x0 = torch.full((64, 1, 32, 32), 0.7)
    eps = torch.randn(x0.shape, generator=g)
    alpha, sigma = 0.6, 0.8
    xt = alpha * x0 + sigma * eps
    pooled = torch.nn.functional.avg_pool2d(xt, s)
    noise_var = (pooled - alpha * 0.7).var().item()
    assert noise_var * s**2 == pytest.approx(sigma**2, rel=0.03)
    from diffusion.losses import pool_logsnr_gain
    assert pool_logsnr_gain(s) == pytest.approx(math.log(s**2))


def test_edm_sigma_helpers():
    edm = S.EDM()
    assert edm.sigma_edm_max == pytest.approx(80.0) and edm.sigma_edm_min == pytest.approx(0.002)
    se = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    assert torch.allclose(edm.sigma_edm(edm.t_of_sigma_edm(se)), se)
    vp = S.VPLinear()
    assert torch.allclose(vp.sigma_edm(vp.t_of_sigma_edm(se)), se, rtol=1e-9)


# ---- bad input -------------------------------------------------------------------------------


def test_unknown_schedule_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown schedule 'vpp'.*'cosine'"):
        S.by_name("vpp")


def test_time_outside_unit_interval_rejected():
    with pytest.raises(ValueError, match=r"\[0, 1\].*1.5"):
        S.Flow().alpha(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match=r"t_max must lie in \[0, 1\]"):
        S.Custom(lambda t: 1 - t, lambda t: t, t_max=1.2)


@pytest.mark.parametrize("make", [
    lambda: S.VE(sigma_min=50, sigma_max=0.01),
    lambda: S.Cosine(logsnr_min=5, logsnr_max=-5),
    lambda: S.VPLinear(beta_min=20, beta_max=0.1),
    lambda: S.Custom(lambda t: t, lambda t: 1 - t, name="backwards"),  # logSNR increasing
    lambda: S.Custom(lambda t: torch.ones_like(t), lambda t: 1 + 0 * t, name="flat"),
])
def test_ill_formed_schedule_rejected(make):
    with pytest.raises(ValueError):
        make()


def test_non_monotone_custom_schedule_names_the_place():
    with pytest.raises(ValueError, match="strictly decreasing"):
        S.Custom(lambda t: torch.cos(3 * t) ** 2 + 0.1, lambda t: 0.5 + 0 * t, name="wiggly")


def test_shift_needs_resolution():
    with pytest.raises(ValueError, match="resolution"):
        S.by_name("cosine", shift_base=64)
