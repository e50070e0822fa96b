"""Objectives: sampling of t, targets, weights; the oracle's exact prediction minimises each loss."""

import math

import pytest
import torch
from torch import nn

from diffusion import losses as L
from diffusion.oracle import OracleNet, gaussian, oracle_model, ring2d
from diffusion.prediction import edm_loss_weight
from diffusion.schedules import by_name
from diffusion.score_model import ScoreModel


class _Perturbed(nn.Module):
    """The oracle's x0 prediction plus a fixed perturbation direction times ``scale``."""

    num_classes = 0

    def __init__(self, oracle: OracleNet, direction: torch.Tensor, scale: float):
        super().__init__()
        self.oracle, self.d, self.scale = oracle, direction, scale

    def forward(self, x, t, class_labels=None):
        return self.oracle(x, t) + self.scale * self.d


@pytest.mark.parametrize("objective,schedule", [
    ("eps", "ddpm"), ("v", "cosine"), ("edm", "edm"), ("flow", "flow"), ("eps", "vp_linear"),
])
def test_oracle_prediction_minimises_the_loss(objective, schedule):
    """Expected loss over (t, eps) is lowest at the exact posterior mean; perturbations raise it."""
    mix = ring2d()
    sched = by_name(schedule)
    obj = L.build_objective(objective)
    x0 = mix.sample(20000, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    draw = obj.draw(x0, sched, gen)
    exact = oracle_model(mix, sched)
    base = obj(exact, x0, draw=draw).mean()
    for direction in (torch.tensor([1.0, 0.0]), torch.tensor([-0.6, 0.8])):
        for scale in (0.05, -0.05):
            pert = ScoreModel(_Perturbed(exact.net, direction.double(), scale), sched, "x0")
            assert obj(pert, x0, draw=draw).mean() > base


def test_loss_target_matches_x_t():
    """Each objective's target is consistent with x_t: converting the true x0 gives the target."""
    sched = by_name("vp_linear")
    x0 = torch.randn(64, 3, dtype=torch.float64)
    for name in ("eps", "v", "edm", "flow"):
        obj = L.build_objective(name)
        d = obj.draw(x0, sched, torch.Generator().manual_seed(2))
        from diffusion.prediction import Prediction
        t = d.t
        p = Prediction(d.x_t, x0, "x0", sched.alpha(t), sched.sigma(t), sched.dalpha(t), sched.dsigma(t))
        assert torch.allclose(p.get(obj.target), obj.target_of(x0, d, sched), atol=1e-8)


def test_time_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    ddpm = by_name("ddpm")
    t = L.EpsLoss().sample_t(5000, ddpm, "cpu", g)
    idx = ddpm.t_to_index(t)
    assert torch.allclose(idx, idx.round()) and idx.min() >= 0 and idx.max() <= 999
    edm = by_name("edm")
    t = L.EDMLoss().sample_t(20000, edm, "cpu", g)
    logse = torch.log(edm.sigma_edm(t))
    assert float(logse.mean()) == pytest.approx(-1.2, abs=0.05)
    assert float(logse.std()) == pytest.approx(1.2, abs=0.05)
    t = L.FlowMatchingLoss("logit_normal").sample_t(20000, by_name("flow"), "cpu", g)
    logit = torch.log(t / (1 - t))
    assert float(logit.mean()) == pytest.approx(0.0, abs=0.05) and float(logit.std()) == pytest.approx(1.0, abs=0.05)


def test_weights():
    edm = by_name("edm")
    t = torch.tensor([0.001, 0.01, 0.5], dtype=torch.float64)
    assert torch.allclose(L.EDMLoss().weight(t, edm), edm_loss_weight(edm.sigma_edm(t)))
    cos = by_name("cosine")
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    snr = torch.exp(cos.logsnr(t))
    w = L.VLoss(min_snr_gamma=5.0).weight(t, cos)
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1))


def test_weight_conversions_between_targets():
    """docs/theory.md §4.2: ||d eps||^2 = e^lam ||d x0||^2 and ||d v||^2 = (a^2+s^2)^2/s^2 ||d x0||^2 at fixed x_t."""
    from diffusion.prediction import Prediction
    sched = by_name("ve")
    t = torch.tensor([0.3], dtype=torch.float64)
    x = torch.randn(1, 5, dtype=torch.float64)
    a, s = sched.alpha(t), sched.sigma(t)
    p1 = Prediction(x, torch.zeros(1, 5, dtype=torch.float64), "x0", a, s)
    dx0 = torch.randn(1, 5, dtype=torch.float64)
    p2 = Prediction(x, dx0, "x0", a, s)
    n0 = (p1.x0 - p2.x0).pow(2).sum()
    assert float((p1.eps - p2.eps).pow(2).sum()) == pytest.approx(float(torch.exp(sched.logsnr(t)) * n0))
    assert float((p1.v - p2.v).pow(2).sum()) == pytest.approx(float((a**2 + s**2) ** 2 / s**2 * n0))


def test_multiscale_loss_pools_and_averages():
    ms = L.MultiscaleLoss(scales=(1, 2))
    pred, target = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    target[:, :, :2, :2] = -1  # pooled by 2: one cell -1, three cells +1
    per = ms.per_sample(pred, target)
    assert torch.allclose(per, torch.ones(2))
    with pytest.raises(ValueError, match="pooling factor 3"):
        L.MultiscaleLoss(scales=(3,)).per_sample(pred, target)


def test_unknown_objective():
    with pytest.raises(ValueError, match=r"unknown objective 'l1'.*'edm'"):
        L.build_objective("l1")
    with pytest.raises(ValueError, match="t_sampling"):
        L.FlowMatchingLoss("beta")


class _ScaledLinear(nn.Module):
    """A linear velocity net scaled by the conditioning scalar."""

    num_classes = 0

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x, c, class_labels=None):
        return self.lin(x) * c[:, None]


def test_gradient_of_loss_reaches_network():
    net = _ScaledLinear()
    m = ScoreModel(net, by_name("flow"), "velocity")
    loss = L.build_objective("flow")(m, torch.randn(8, 2), generator=torch.Generator().manual_seed(0)).mean()
    loss.backward()
    assert net.lin.weight.grad is not None and torch.isfinite(net.lin.weight.grad).all() and math.isfinite(loss.item())
