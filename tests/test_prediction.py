"""Parametrisation conversions (docs/theory.md §3, §13.2 and §13.10) and the ScoreModel wrapper."""

import math

import pytest
import torch
from torch import nn

from diffusion import prediction as P
from diffusion.schedules import by_name
from diffusion.score_model import ScoreModel

KINDS = ["eps", "x0", "v", "score", "velocity"]


def _coeffs(kind: str, n: int, g: torch.Generator):
    """Random (alpha, sigma, dalpha, dsigma): VP, and non-VP (alpha, sigma independent)."""
    a = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    if kind == "vp":
        s = (1 - a**2).sqrt()
    else:
        s = torch.rand(n, generator=g, dtype=torch.float64) * 5 + 0.05
    da = -torch.rand(n, generator=g, dtype=torch.float64)
    ds = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    return a, s, da, ds


@pytest.mark.parametrize("family", ["vp", "nonvp"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_conversion_round_trips(family, kind):
    g = torch.Generator().manual_seed(1)
    a, s, da, ds = _coeffs(family, 16, g)
    x0 = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
    x = P.expand(a, x0) * x0 + P.expand(s, x0) * eps
    truth = P.Prediction(x, x0, "x0", a, s, da, ds)
    native = truth.get(kind)
    pred = P.Prediction(x, native, kind, a, s, da, ds)
    for k in KINDS:
        assert torch.allclose(pred.get(k), truth.get(k), atol=1e-9, rtol=1e-9), (kind, k)
    assert torch.allclose(pred.x0, x0, atol=1e-9) and torch.allclose(pred.eps, eps, atol=1e-9)


def test_closed_form_relations():
    g = torch.Generator().manual_seed(2)
    a, s, da, ds = _coeffs("nonvp", 8, g)
    x0, eps = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    x = a[:, None] * x0 + s[:, None] * eps
    p = P.Prediction(x, eps, "eps", a, s, da, ds)
    assert torch.allclose(p.v, a[:, None] * eps - s[:, None] * x0)
    assert torch.allclose(p.score, -eps / s[:, None])
    assert torch.allclose(p.score, (a[:, None] * x0 - x) / s[:, None] ** 2)
    assert torch.allclose(p.velocity, da[:, None] * x0 + ds[:, None] * eps)


def test_rectified_flow_velocity_formulas():
    fl = by_name("flow")
    t = torch.tensor([0.25, 0.6], dtype=torch.float64)
    x0, eps = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    x = (1 - t)[:, None] * x0 + t[:, None] * eps
    vel = eps - x0
    p = P.Prediction(x, vel, "velocity", fl.alpha(t), fl.sigma(t), fl.dalpha(t), fl.dsigma(t))
    assert torch.allclose(p.x0, x - t[:, None] * vel) and torch.allclose(p.eps, x + (1 - t)[:, None] * vel)


def test_edm_preconditioning_identities():
    """docs/theory.md §13.10: c_in^2 (se^2 + sd^2) = 1, effective target variance 1, lambda c_out^2 = 1."""
    se = torch.logspace(-3, 2, 50, dtype=torch.float64)
    sd = 0.5
    c_skip, c_out, c_in, c_noise = P.edm_precond(se, sd)
    assert torch.allclose(c_in**2 * (se**2 + sd**2), torch.ones_like(se))
    assert torch.allclose(P.edm_loss_weight(se, sd) * c_out**2, torch.ones_like(se))
    # target F = (x0 - c_skip y)/c_out with x0 ~ var sd^2, noise se: Var[F] = 1
    var_f = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * se**2) / c_out**2
    assert torch.allclose(var_f, torch.ones_like(se))
    assert torch.allclose(c_noise, torch.log(se) / 4)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"unknown parametrization 'noise'.*'eps'"):
        P.check_parametrization("noise")
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"\(5,\).*\(4, 3\)"):
        P.expand(torch.ones(5), x)
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(4, 3\)"):
        P.Prediction(x, torch.zeros(4, 2), "eps", 1.0, 1.0)


class _Echo(nn.Module):
    """A stand-in net that records what it was called with."""

    num_classes = 3

    def forward(self, x, c, labels=None):
        self.last = (x.clone(), c.clone(), None if labels is None else labels.clone())
        return x * 0 + (0.0 if labels is None else labels.float().reshape(-1, *[1] * (x.ndim - 1)))


@pytest.mark.parametrize("cond", ["t", "1000t", "logsnr", "edm"])
def test_score_model_conditioning_scalars(cond):
    sched = by_name("vp_linear")
    net = _Echo()
    m = ScoreModel(net, sched, "eps", conditioning=cond)
    t = torch.tensor([0.1, 0.7])
    m(torch.zeros(2, 3), t)
    expect = {"t": t.double(), "1000t": 1000 * t.double(), "logsnr": sched.logsnr(t),
              "edm": torch.log(sched.sigma_edm(t)) / 4}[cond]
    assert torch.allclose(net.last[1].double(), expect.float().double(), rtol=1e-6)
    assert m.nfe == 1


def test_score_model_edm_wrapper_outputs_x0():
    sched = by_name("edm")
    net = _Echo()
    m = ScoreModel(net, sched, "edm")
    x = torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([0.01, 0.1, 0.5])
    pred = m(x, t)  # F = 0 so x0 = c_skip * y
    c_skip, _, c_in, _ = P.edm_precond(sched.sigma_edm(t))
    assert torch.allclose(pred.x0, c_skip[:, None] * x)
    assert torch.allclose(net.last[0], c_in[:, None] * x)


def test_guidance_combines_all_channels_and_counts_nfe():
    net = _Echo()
    m = ScoreModel(net, by_name("flow"), "eps").with_guidance(3.0)
    x = torch.zeros(2, 4, 2, 2)
    out = m(x, 0.5, torch.tensor([1, 2])).eps
    # cond output = label, uncond output = null label 3: 3 + 3 * (label - 3)
    assert torch.allclose(out[:, :, 0, 0], torch.tensor([[-3.0] * 4, [0.0] * 4]))
    assert m.nfe == 2
    with pytest.raises(ValueError, match="unconditional"):
        ScoreModel(nn.Identity(), by_name("flow"), num_classes=0).with_guidance(2.0)


def test_score_model_rejects_bad_labels_and_times():
    m = ScoreModel(_Echo(), by_name("flow"), "eps")
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"out of range.*7.*0\.\.2"):
        m(x, 0.5, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"\(3,\).*\(2, 3\)"):
        m(x, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m(x, 1.2)
    with pytest.raises(ValueError, match="unknown conditioning"):
        ScoreModel(_Echo(), by_name("flow"), conditioning="sigma")
    with pytest.raises(ValueError, match="exceeds"):
        ScoreModel(_Echo(), by_name("ve"), "eps").denoise(x, 1000.0)


def test_denoise_is_the_edm_view():
    sched = by_name("vp_linear")
    net = _Echo()
    m = ScoreModel(net, sched, "x0")
    y = torch.randn(2, 3, dtype=torch.float64)
    se = torch.tensor([0.5, 3.0], dtype=torch.float64)
    m.denoise(y, se)
    t = sched.t_of_sigma_edm(se)
    assert torch.allclose(net.last[0], sched.alpha(t)[:, None] * y)
    assert torch.allclose(net.last[1], t) and math.isclose(float(sched.sigma_edm(t[1])), 3.0, rel_tol=1e-9)
