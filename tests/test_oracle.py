"""The exact Gaussian / mixture oracle (docs/theory.md §13.1): scores, Tweedie, PF-ODE map, presets."""

import math

import pytest
import torch

from diffusion import oracle as O
from diffusion.schedules import by_name


def test_presets_exist_and_have_the_documented_shape():
    ring = O.ring2d()
    assert ring.K == 8 and ring.dim == 2
    assert torch.allclose(ring.means.norm(dim=1), torch.ones(8, dtype=torch.float64))
    mix = O.mixture64d()
    assert mix.K == 10 and mix.dim == 64
    assert torch.allclose(mix.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert O.preset("ring2d").K == 8
    with pytest.raises(ValueError, match=r"unknown oracle preset 'ring'.*mixture64d"):
        O.preset("ring")


def test_gaussian_closed_forms():
    """Single Gaussian N(mu, s^2 I): v_t = a^2 s^2 + sigma^2, x0_hat and score in closed form."""
    mu, s = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64), 0.7
    g = O.gaussian(mu, s)
    a, sg = torch.tensor([0.8, 0.3]), torch.tensor([0.6, 2.0])
    x = torch.randn(2, 3, dtype=torch.float64)
    v = a[:, None] ** 2 * s**2 + sg[:, None] ** 2
    assert torch.allclose(g.score(x, a, sg), -(x - a[:, None] * mu) / v)
    assert torch.allclose(g.x0_hat(x, a, sg), mu + a[:, None] * s**2 / v * (x - a[:, None] * mu))
    logp = -0.5 * (((x - a[:, None] * mu) ** 2 / v).sum(1) + 3 * torch.log(2 * math.pi * v[:, 0]))
    assert torch.allclose(g.log_prob(x, a, sg), logp)


@pytest.mark.parametrize("name", ["ring2d", "mixture64d"])
def test_score_is_gradient_of_exact_log_density_and_tweedie(name):
    mix = O.preset(name)
    gen = torch.Generator().manual_seed(0)
    x = mix.sample(6, gen) * 0.9 + 0.3 * torch.randn(6, mix.dim, generator=gen, dtype=torch.float64)
    a, s = torch.full((6,), 0.8, dtype=torch.float64), torch.full((6,), 0.6, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mix.log_prob(xr, a, s).sum(), xr)
    assert torch.allclose(mix.score(x, a, s), grad, atol=1e-10)
    # Tweedie: x0_hat = (x + sigma^2 score) / alpha
    assert torch.allclose(mix.x0_hat(x, a, s), (x + s[:, None] ** 2 * mix.score(x, a, s)) / a[:, None], atol=1e-10)


def test_score_matches_finite_differences_on_ring():
    mix = O.ring2d()
    x = torch.tensor([[0.5, 0.4], [-1.1, 0.2]], dtype=torch.float64)
    a, s = 0.9, 0.3
    h = 1e-6
    fd = torch.stack([(mix.log_prob(x + h * e, a, s) - mix.log_prob(x - h * e, a, s)) / (2 * h)
                      for e in torch.eye(2, dtype=torch.float64)], dim=1)
    assert torch.allclose(mix.score(x, a, s), fd, atol=1e-6)


def test_mixture_sampling_moments():
    mix = O.mixture64d()
    x = mix.sample(40000, torch.Generator().manual_seed(3))
    assert torch.allclose(x.mean(0), mix.mean, atol=0.03)
    assert torch.allclose(torch.cov(x.T), mix.cov, atol=0.03)


def test_log_prob_is_normalised_in_2d():
    mix = O.ring2d()
    g = torch.linspace(-2, 2, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    for a, s in ((1.0, 0.0), (0.7, 0.3)):
        mass = mix.log_prob(pts, a, s).exp().sum() * (g[1] - g[0]) ** 2
        assert float(mass) == pytest.approx(1.0, abs=2e-3)


def test_oracle_model_is_exact_under_any_schedule_and_pf_ode_map():
    """The oracle's x0 equals the Gaussian posterior mean; the PF-ODE map of a Gaussian is affine."""
    mu, s0 = torch.tensor([0.5, -0.2], dtype=torch.float64), 0.4
    for name in ("vp_linear", "edm", "flow", "ddpm"):
        sched = by_name(name)
        model = O.oracle_model(O.gaussian(mu, s0), sched)
        t = torch.tensor([0.2, 0.6], dtype=torch.float64)
        x = torch.randn(2, 2, dtype=torch.float64)
        a, s = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
        v = a**2 * s0**2 + s**2
        p = model(x, t)
        assert torch.allclose(p.x0, mu + a * s0**2 / v * (x - a * mu))
        assert torch.allclose(p.score, -(x - a * mu) / v)
    # integrate dx/dt = velocity with classical RK4 vs the exact map x(t2) = a2 mu + sqrt(v2/v1)(x1 - a1 mu)
    sched = by_name("vp_linear")
    model = O.oracle_model(O.gaussian(mu, s0), sched)
    x1 = torch.randn(4, 2, dtype=torch.float64)
    ts = torch.linspace(0.8, 0.3, 101, dtype=torch.float64)
    x = x1.clone()

    def f(x, t):
        return model(x, t).velocity

    for i in range(len(ts) - 1):  # RK4: error O(h^4) ~ 1e-8
        t, h = ts[i], ts[i + 1] - ts[i]
        k1 = f(x, t)
        k2 = f(x + h / 2 * k1, t + h / 2)
        k3 = f(x + h / 2 * k2, t + h / 2)
        k4 = f(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    a1, a2 = sched.alpha(ts[0]), sched.alpha(ts[-1])
    v1, v2 = a1**2 * s0**2 + sched.sigma(ts[0]) ** 2, a2**2 * s0**2 + sched.sigma(ts[-1]) ** 2
    exact = a2 * mu + (v2 / v1).sqrt() * (x1 - a1 * mu)
    assert torch.allclose(x, exact, atol=1e-6)


def test_marginal_log_prob_and_image_shapes():
    mix = O.mixture64d()
    sched = by_name("cosine")
    model = O.oracle_model(mix, sched, shape=(1, 8, 8))
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    out = model(x, 0.5)
    assert out.x0.shape == (3, 1, 8, 8)
    lp = O.marginal_log_prob(mix, sched, x, 0.5)
    assert lp.shape == (3,) and torch.isfinite(lp).all()
    with pytest.raises(ValueError, match="dimension 64"):
        O.OracleNet(mix, sched, shape=(1, 4, 4))


def test_point_mass_denoiser_is_constant():
    x_star = torch.tensor([0.3, -0.7], dtype=torch.float64)
    pm = O.point_mass(x_star)
    x = torch.randn(5, 2, dtype=torch.float64) * 3
    assert torch.allclose(pm.x0_hat(x, 0.5, 0.8), x_star.expand(5, 2), atol=1e-9)


def test_bad_mixture_inputs():
    with pytest.raises(ValueError, match="positive definite"):
        O.GaussianMixture(torch.zeros(1, 2), torch.tensor([[[1.0, 0.0], [0.0, -1.0]]]))
    with pytest.raises(ValueError, match=r"\[K, D\]"):
        O.GaussianMixture(torch.zeros(3), torch.ones(3))


def test_diagonal_fast_path_matches_full_covariance():
    # the same mixture, once detected diagonal and once with a rotation that hides it (then undone)
    g = torch.Generator().manual_seed(3)
    means = torch.randn(3, 5, dtype=torch.float64, generator=g)
    var = torch.rand(3, 5, dtype=torch.float64, generator=g) + 0.05
    diag = O.GaussianMixture(means, var, torch.tensor([0.2, 0.3, 0.5]))
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=g))
    full = O.GaussianMixture(means @ q.T, q @ torch.diag_embed(var) @ q.T, torch.tensor([0.2, 0.3, 0.5]))
    assert diag.diagonal and not full.diagonal
    x = torch.randn(7, 5, dtype=torch.float64, generator=g)
    for a, s in ((1.0, 0.0), (0.8, 0.6), (0.0, 1.0)):
        assert torch.allclose(diag.x0_hat(x, a, s) @ q.T, full.x0_hat(x @ q.T, a, s), atol=1e-10)
        assert torch.allclose(diag.log_prob(x, a, s), full.log_prob(x @ q.T, a, s), atol=1e-10)
    assert diag.sample(4, torch.Generator().manual_seed(0)).shape == (4, 5)
