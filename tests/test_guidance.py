"""Guidance (samplers/guidance.py) against closed forms on class-conditional Gaussian / mixture oracles."""

import math

import pytest
import torch

import samplers
from diffusion import oracle
from diffusion.schedules import by_name
from samplers.guidance import Guided, apg_update, cfgzero_scale, pool, unpool, upsample_time

D64 = torch.float64


def ring_classes(schedule):
    """Class k = ring mode k (8 classes); label 8 = the whole ring."""
    return oracle.class_oracle_model(oracle.ring2d(), schedule)


class CountingNet(torch.nn.Module):
    """Counts forward calls of the wrapped net, independently of ScoreModel.nfe."""

    def __init__(self, net):
        super().__init__()
        self.inner, self.calls = net, 0
        self.num_classes = getattr(net, "num_classes", 0)

    def forward(self, x, t, class_labels=None):
        self.calls += 1
        return self.inner(x, t, class_labels)


def counted(model):
    from diffusion.score_model import ScoreModel

    net = CountingNet(model.net)
    return ScoreModel(net, model.schedule, "x0", "t", num_classes=model.num_classes), net


# ---- CFG ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sched", ["ddpm", "flow", "edm"])
def test_cfg_is_eps_u_plus_w_times_difference(sched):
    s = by_name(sched)
    m = ring_classes(s)
    x = torch.randn(6, 2, dtype=D64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    w = 3.5
    g = Guided(m, "cfg", w)
    for t in (0.2, 0.6):
        pred = g(x, t, labels)
        e_c, e_u = m(x, t, labels).eps, m(x, t, torch.full((6,), 8)).eps
        assert torch.allclose(pred.eps, e_u + w * (e_c - e_u), atol=1e-9, rtol=1e-9)
    assert g.nfe == 2 * 2 + 2 * 2  # two guided calls (2 each) + the 4 reference calls above share the counter
    # with_guidance is the same wrapper
    wg = m.with_guidance(w)
    assert isinstance(wg, Guided) and torch.allclose(wg(x, 0.3, labels).x0, g(x, 0.3, labels).x0)
    assert wg.parametrization == "x0" and list(wg.parameters()) == list(m.parameters())  # the rest is delegated


def test_cfg_on_gaussians_is_the_tilted_gaussian():
    """Class N(mu_c, s^2 I), unconditional N(mu_u, s_u^2 I): w score_c + (1-w) score_u is a Gaussian score."""
    s = by_name("cosine")
    mu_c, mu_u, sc, su, w = torch.tensor([1.0, -0.5]), torch.tensor([0.2, 0.3]), 0.3, 0.8, 2.5
    m = oracle.class_oracle_model(oracle.gaussian(mu_c, sc), s, classes=[oracle.gaussian(mu_c, sc)],
                                  uncond=oracle.gaussian(mu_u, su))
    g = Guided(m, "cfg", w)
    x = torch.randn(5, 2, dtype=D64, generator=torch.Generator().manual_seed(1))
    for t in (0.1, 0.5, 0.9):
        a, sg = float(s.alpha(t)), float(s.sigma(t))
        vc, vu = a * a * sc**2 + sg**2, a * a * su**2 + sg**2
        prec = w / vc + (1 - w) / vu  # the tilted density p_c^w p_u^(1-w) at level t is N(m, 1/prec)
        mean = (w * a * mu_c.double() / vc + (1 - w) * a * mu_u.double() / vu) / prec
        score = -(x - mean) * prec
        assert torch.allclose(g(x, t, torch.zeros(5, dtype=torch.long)).score, score, atol=1e-9)


def test_cfg_samples_the_tilted_gaussian_when_variances_agree():
    """Equal variances: the tilted family is the diffusion of N(w mu_c + (1-w) mu_u, s^2), sampled exactly."""
    s = by_name("edm")
    mu_c, mu_u, sd, w = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5]), 0.2, 2.0
    m = oracle.class_oracle_model(oracle.gaussian(mu_c, sd), s, uncond=oracle.gaussian(mu_u, sd))
    noise = samplers.noise.randn((4000, 2), samplers.noise.generators(seed=0, n=4000), dtype=D64)
    res = samplers.sample(Guided(m, "cfg", w), noise, sampler="heun", nfe=31, class_labels=torch.zeros(4000, dtype=torch.long))
    want = w * mu_c.double() + (1 - w) * mu_u.double()
    assert torch.allclose(res.x.mean(0), want, atol=4 * sd / math.sqrt(4000))
    assert torch.allclose(res.x.std(0), torch.full((2,), sd, dtype=D64), rtol=0.05)
    assert res.nfe == 2 * 31


# ---- interval -------------------------------------------------------------------------------------

def test_interval_outside_band_is_the_conditional_model_at_one_nfe():
    s = by_name("ddpm")
    m = ring_classes(s)
    g = Guided(m, "interval", 3.0, interval=(0.5, 2.0))
    x = torch.randn(4, 2, dtype=D64, generator=torch.Generator().manual_seed(2))
    lab = torch.tensor([0, 1, 2, 3])
    for se, inside in ((0.1, False), (1.0, True), (5.0, False)):
        y = x
        g.reset_nfe()
        got = g.denoise(y, se, lab)
        cost = g.reset_nfe()
        want_c, want_u = m.denoise(y, se, lab), m.denoise(y, se, torch.full((4,), 8))
        want = want_u + 3.0 * (want_c - want_u) if inside else want_c
        assert torch.equal(got, want) if not inside else torch.allclose(got, want, atol=1e-12)
        assert cost == (2 if inside else 1)
    # a per-sample noise level (tensor) evaluates both branches (counted) and picks per sample
    se = torch.tensor([0.1, 1.0, 5.0, 1.5], dtype=D64)
    g.reset_nfe()
    got = g.denoise(x, se, lab)
    assert g.nfe == 2
    for i in range(4):
        assert torch.allclose(got[i], g.denoise(x[i:i + 1], float(se[i]), lab[i:i + 1])[0], atol=1e-12)
    with pytest.raises(ValueError, match="lo < hi"):
        Guided(m, "interval", 2.0, interval=(2.0, 1.0))


# ---- APG ------------------------------------------------------------------------------------------

def test_apg_split_and_clamp():
    gen = torch.Generator().manual_seed(3)
    cond, delta = torch.randn(5, 3, 4, generator=gen, dtype=D64), torch.randn(5, 3, 4, generator=gen, dtype=D64)
    orth = apg_update(delta, cond, eta=0.0)
    assert torch.allclose((orth * cond).sum((1, 2)), torch.zeros(5, dtype=D64), atol=1e-12)  # orthogonal to cond
    par = delta - orth
    cos = (par * cond).sum((1, 2)) / (par.norm(dim=(1, 2)) * cond.norm(dim=(1, 2)))
    assert torch.allclose(cos.abs(), torch.ones(5, dtype=D64))  # the removed part is parallel to cond
    assert torch.allclose(apg_update(delta, cond, eta=1.0), delta)  # eta=1: the whole update
    assert torch.allclose(apg_update(delta, cond, eta=0.3), orth + 0.3 * par)
    r = 0.5 * float(delta.flatten(1).norm(dim=1).min())
    clamped = apg_update(delta, cond, eta=1.0, norm_threshold=r)
    assert torch.allclose(clamped.flatten(1).norm(dim=1), torch.full((5,), r, dtype=D64))  # clamped to r
    assert torch.allclose(apg_update(delta, cond, 1.0, 1e9), delta)  # a loose clamp changes nothing


def test_apg_in_the_model_reduces_to_cfg_and_to_orthogonal():
    s = by_name("cosine")
    m = ring_classes(s)
    x = torch.randn(6, 2, dtype=D64, generator=torch.Generator().manual_seed(4))
    lab = torch.arange(6)
    w, se = 4.0, 0.7
    d_c, d_u = m.denoise(x, se, lab), m.denoise(x, se, torch.full((6,), 8))
    assert torch.allclose(Guided(m, "apg", w, eta=1.0).denoise(x, se, lab), d_u + w * (d_c - d_u), atol=1e-12)
    out = Guided(m, "apg", w, eta=0.0).denoise(x, se, lab)
    assert torch.allclose(((out - d_c) * d_c).sum(1), torch.zeros(6, dtype=D64), atol=1e-10)
    delta = d_c - d_u
    par = (delta * d_c).sum(1, keepdim=True) / (d_c * d_c).sum(1, keepdim=True) * d_c
    assert torch.allclose(out, d_c + (w - 1) * (delta - par), atol=1e-12)
    # momentum: the second call uses delta_2 + beta delta_1
    g = Guided(m, "apg", w, eta=1.0, momentum=-0.5)
    g.denoise(x, se, lab)
    d2c, d2u = m.denoise(x, 0.3, lab), m.denoise(x, 0.3, torch.full((6,), 8))
    assert torch.allclose(g.denoise(x, 0.3, lab), d2c + (w - 1) * ((d2c - d2u) - 0.5 * delta), atol=1e-12)


# ---- CFG++ ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_cfgpp_step_renoises_with_the_unconditional_eps(sampler):
    """One DDIM/Euler step with the CFG++ denoiser is y' = D_u + lam (D_c - D_u) + se' eps_u."""
    s = by_name("ddpm")
    m = ring_classes(s)
    lam = 0.6
    grid = torch.tensor([3.0, 1.2, 0.0], dtype=D64)
    lab = torch.arange(5)
    eps = torch.randn(5, 2, dtype=D64, generator=torch.Generator().manual_seed(5))
    g = Guided(m, "cfgpp", lam, grid=grid)
    seen = []
    samplers.get(sampler)(g, eps * float(s.alpha(s.t_of_sigma_edm(3.0))) * 3.0, grid, class_labels=lab,
                          callback=lambda d: seen.append(d["y"]))
    y = eps * 3.0
    d_c, d_u = m.denoise(y, 3.0, lab), m.denoise(y, 3.0, torch.full((5,), 8))
    want = d_u + lam * (d_c - d_u) + 1.2 * (y - d_u) / 3.0
    assert torch.allclose(seen[0], want, atol=1e-9)
    # the last step (se' = 0) is the guided readout D_u + lam Delta
    y1 = seen[0]
    d_c, d_u = m.denoise(y1, 1.2, lab), m.denoise(y1, 1.2, torch.full((5,), 8))
    assert torch.allclose(seen[1], d_u + lam * (d_c - d_u), atol=1e-9)
    with pytest.raises(ValueError, match="grid"):
        Guided(m, "cfgpp", lam).denoise(y, 1.0, lab)


# ---- CFG-Zero* ------------------------------------------------------------------------------------

def test_cfgzero_scale_and_zero_init():
    """Centred Gaussians: v_c = k v_u exactly, so s* = k and CFG-Zero* returns the conditional model for any w."""
    s = by_name("flow")
    sc, su = 0.3, 1.0
    m = oracle.class_oracle_model(oracle.gaussian([0.0, 0.0], sc), s, uncond=oracle.gaussian([0.0, 0.0], su))
    x = torch.randn(4, 2, dtype=D64, generator=torch.Generator().manual_seed(6))
    lab = torch.zeros(4, dtype=torch.long)
    t = 0.6
    a, sg = 1 - t, t
    vel = lambda var: (x * (1 / sg - (a * var / (a * a * var + sg * sg)) * (1 + a / sg)))  # eps - x0 in closed form
    k = (vel(sc**2) / vel(su**2))[0, 0]
    pc, pu = m(x, t, lab), m(x, t, torch.ones(4, dtype=torch.long))
    assert torch.allclose(pc.eps - pc.x0, vel(sc**2)) and torch.allclose(cfgzero_scale(vel(sc**2), vel(su**2)), k.expand(4, 1))
    out = Guided(m, "cfgzero", 5.0)(x, t, lab)
    assert torch.allclose(out.velocity, pc.velocity, atol=1e-10)  # (plain CFG at w=5 would not)
    assert not torch.allclose(Guided(m, "cfg", 5.0)(x, t, lab).velocity, pc.velocity, atol=1e-3)
    # orthogonal branches: s* = 0, so v = w v_c
    vc, vu = torch.tensor([[1.0, 0.0]], dtype=D64), torch.tensor([[0.0, 2.0]], dtype=D64)
    assert cfgzero_scale(vc, vu).item() == 0.0
    # zero-init: the first K grid steps cost nothing and leave a flow model's x where it is
    g = Guided(m, "cfgzero", 3.0, zero_init_steps=2)
    noise = torch.randn(4, 2, dtype=D64, generator=torch.Generator().manual_seed(7))
    xs = []
    res = samplers.sample(g, noise, sampler="flow_euler", nfe=6, class_labels=lab,
                          callback=lambda d: xs.append(d["y"] * (1 / (1 + d["se_next"]))))
    assert torch.allclose(xs[0], noise) and torch.allclose(xs[1], noise)  # x unchanged by the zeroed steps
    assert res.nfe == 2 * (6 - 2)


# ---- autoguidance ---------------------------------------------------------------------------------

def test_autoguidance_with_a_wider_bad_model():
    s = by_name("edm")
    good = oracle.oracle_model(oracle.ring2d(), s)
    wide = oracle.ring2d(std=0.3)
    bad = oracle.oracle_model(wide, s)
    w = 2.0
    g = Guided(good, "auto", w, guide=bad)
    y = torch.randn(7, 2, dtype=D64, generator=torch.Generator().manual_seed(8))
    for se in (0.05, 0.5, 3.0):
        got = g.denoise(y, se)
        dg = oracle.ring2d().x0_hat(y, 1.0, se)
        db = wide.x0_hat(y, 1.0, se)
        assert torch.allclose(got, db + w * (dg - db), atol=1e-12)
    assert good.nfe == 3 and bad.nfe == 3 and g.nfe == 6
    # sharper than the good model: guided samples sit closer to the ring's modes
    noise = samplers.noise.randn((2000, 2), samplers.noise.generators(seed=1, n=2000), dtype=D64)
    g.reset_nfe()
    xg = samplers.sample(g, noise, sampler="heun", nfe=31).x
    x1 = samplers.sample(good, noise, sampler="heun", nfe=31).x
    dist = lambda x: (x.norm(dim=1) - 1).abs().mean()
    assert dist(xg) < 0.8 * dist(x1)
    with pytest.raises(ValueError, match="schedule"):
        Guided(good, "auto", 2.0, guide=oracle.oracle_model(wide, by_name("flow")))
    with pytest.raises(ValueError, match="guide model"):
        Guided(good, "auto", 2.0)
    with pytest.raises(ValueError, match="unconditional"):
        Guided(good, "cfg", 2.0)


# ---- upsample guidance ----------------------------------------------------------------------------

def _blocky_mixture(gen, f=2, n=4, modes=3, delta=0.01):
    """Images [1, n, n] whose modes are constant on f x f blocks plus isotropic detail: pool-consistent."""
    lo = n // f
    means_lo = torch.randn(modes, lo * lo, generator=gen, dtype=D64)
    up = lambda v: unpool(v.reshape(-1, 1, lo, lo), f).reshape(v.shape[0], -1)
    a = torch.randn(modes, lo * lo, lo * lo, generator=gen, dtype=D64) * 0.3
    cov_lo = a @ a.transpose(1, 2) + 0.05 * torch.eye(lo * lo, dtype=D64)
    U = up(torch.eye(lo * lo, dtype=D64)).T  # [n*n, lo*lo]
    hi = oracle.GaussianMixture(up(means_lo), U @ cov_lo @ U.T + delta * torch.eye(n * n, dtype=D64))
    Dm = pool(torch.eye(n * n, dtype=D64).reshape(-1, 1, n, n), f).reshape(n * n, -1).T  # [lo*lo, n*n]
    low = oracle.GaussianMixture(means_lo, Dm @ hi.covs @ Dm.T)
    return hi, low


@pytest.mark.parametrize("sched", ["cosine", "flow", "edm"])
def test_upsample_correction_vanishes_for_an_exact_pool_consistent_model(sched):
    s = by_name(sched)
    hi, low = _blocky_mixture(torch.Generator().manual_seed(9))
    m_hi, m_lo = oracle.oracle_model(hi, s, (1, 4, 4)), oracle.oracle_model(low, s, (1, 2, 2))
    g = Guided(m_hi, "upsample", 1.7, guide=m_lo, factor=2)
    x = torch.randn(6, 1, 4, 4, dtype=D64, generator=torch.Generator().manual_seed(10))
    for t in (0.2, 0.5, 0.8):
        assert torch.allclose(g(x, t).eps, m_hi(x, t).eps, atol=1e-8)
    # a low-resolution model of other data does move the prediction
    other = oracle.oracle_model(oracle.GaussianMixture(low.means + 1, low.covs), s, (1, 2, 2))
    assert not torch.allclose(Guided(m_hi, "upsample", 1.0, guide=other)(x, 0.5).eps, m_hi(x, 0.5).eps, atol=1e-3)
    g.reset_nfe()
    g(x, 0.4)
    assert m_hi.nfe == 1 and m_lo.nfe == 1 and g.nfe == 2


@pytest.mark.parametrize("sched", ["vp_linear", "cosine", "ddpm", "flow", "edm"])
def test_upsample_time_is_the_logsnr_shift(sched):
    s = by_name(sched)
    t = torch.tensor([0.3, 0.5, 0.7], dtype=D64)
    for f in (2, 4):
        tau = upsample_time(s, t, f)
        assert torch.allclose(s.logsnr(tau), s.logsnr(t) + 2 * math.log(f), atol=1e-6)
        assert torch.allclose(s.sigma_edm(tau), s.sigma_edm(t) / f, rtol=1e-6)
        if s.family == "vp":  # the pooled input scale alpha_tau/alpha_t is the 1/rho_t
            rho = (s.alpha(t) ** 2 + s.sigma(t) ** 2 / f**2).sqrt()
            assert torch.allclose(s.alpha(tau) / s.alpha(t), 1 / rho, rtol=1e-6)


# ---- every sampler x every guidance, with an honest NFE count ---------------------------------------

def _build(kind, base, flow_like):
    if kind == "auto":
        return Guided(base, "auto", 2.0, guide=oracle.class_oracle_model(oracle.ring2d(std=0.3), base.schedule))
    opts = {"interval": (0.3, 2.0)} if kind == "interval" else {}
    if kind == "apg":
        opts = dict(eta=0.0, norm_threshold=1.0, momentum=-0.5)
    if kind == "cfgzero":
        opts = dict(zero_init_steps=1)
    return Guided(base, kind, 0.5 if kind == "cfgpp" else 2.0, **opts)


@pytest.mark.parametrize("kind", ["cfg", "interval", "apg", "cfgpp", "cfgzero", "auto", "upsample"])
@pytest.mark.parametrize("sampler", samplers.available())
def test_every_sampler_with_every_guidance(sampler, kind):
    s = by_name("flow" if sampler == "flow_euler" else "ddpm")
    if kind == "upsample":
        hi, low = _blocky_mixture(torch.Generator().manual_seed(11))
        base, net = counted(oracle.class_oracle_model(hi, s, (1, 4, 4), classes=[hi]))
        lo_model, lo_net = counted(oracle.class_oracle_model(low, s, (1, 2, 2), classes=[low]))
        g = Guided(base, "upsample", 1.5, guide=lo_model)  # an oracle is exact at one size: the pooled twin
        noise = torch.randn(3, 1, 4, 4, dtype=D64, generator=torch.Generator().manual_seed(12))
        nets = [net, lo_net]
    else:
        base, net = counted(ring_classes(s))
        g = _build(kind, base, sampler == "flow_euler")
        nets = [net] + ([counted_guide(g)] if kind == "auto" else [])
        noise = torch.randn(3, 2, dtype=D64, generator=torch.Generator().manual_seed(12))
    labels = torch.tensor([0, 1, 2]) if kind != "upsample" else torch.zeros(3, dtype=torch.long)
    kw = dict(nfe=None if sampler == "adaptive" else {"heun": 9, "pc": 7, "mvt": 6}.get(sampler, 5))
    if sampler == "adaptive":
        kw = dict(rtol=1e-3, atol=1e-3)
    if sampler == "mvt":
        kw["afs"] = False
    res = samplers.sample(g, noise, sampler=sampler, class_labels=labels, **kw)
    assert torch.isfinite(res.x).all()
    calls = sum(n.calls for n in nets)
    assert res.nfe == calls  # every network call counted, no more
    if sampler != "adaptive":
        base_nfe = samplers.nfe_of(sampler, res.grid.numel() - 1)
        if kind in ("cfg", "apg", "cfgpp", "auto", "upsample"):
            assert res.nfe == 2 * base_nfe
        elif kind == "interval":
            assert base_nfe < res.nfe < 2 * base_nfe
        else:  # cfgzero: the first step is free
            assert res.nfe < 2 * base_nfe


def counted_guide(g):
    guide, net = counted(g.guide)
    g.guide = guide
    return net
