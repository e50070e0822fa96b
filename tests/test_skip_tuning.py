"""Skip-Tuning (docs/theory.md §13.12): the linear rho rule, rho == 1 bit-exact, restore on exit."""

import pytest
import torch
from torch import nn

import samplers
from diffusion import schedules
from diffusion.score_model import ScoreModel
from samplers.skip_tuning import skip_scales, skip_tuning


def test_linear_rule():
    assert skip_scales(5, rho_bottom=0.5) == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5])
    assert skip_scales(3, rho_bottom=0.6, rho_top=0.9) == pytest.approx([0.9, 0.75, 0.6])
    assert skip_scales(1, rho_bottom=0.5) == [1.0]
    with pytest.raises(ValueError, match="num_skips must be >= 1"):
        skip_scales(0, 0.5)


class StandIn(nn.Module):
    """Implements only the Skip-Tuning API: records what it is given."""

    num_skips = 4

    def __init__(self):
        super().__init__()
        self.skip_scales = [0.9, 0.9, 0.9, 0.9]
        self.calls = []

    def set_skip_scales(self, scales):
        self.calls.append(None if scales is None else list(scales))
        self.skip_scales = scales

    def forward(self, x, c_noise, class_labels=None):
        return x


def test_context_manager_sets_and_restores():
    net = StandIn()
    model = ScoreModel(net, schedules.by_name("ddpm"), parametrization="x0")
    with skip_tuning(model, rho_bottom=0.7) as factors:
        assert factors == pytest.approx([1.0, 0.9, 0.8, 0.7]) and net.skip_scales == factors
    assert net.skip_scales == [0.9, 0.9, 0.9, 0.9]  # the previous factors come back
    with pytest.raises(RuntimeError):
        with skip_tuning(net, rho_bottom=1.0):
            assert net.calls[-1] is None  # all ones: nothing installed
            raise RuntimeError("boom")
    assert net.skip_scales == [0.9, 0.9, 0.9, 0.9]  # restored on error too
    with pytest.raises(ValueError, match="needs a network with num_skips and set_skip_scales"):
        with skip_tuning(nn.Linear(2, 2), 0.5):
            pass


def test_real_unet_bit_exact_at_one_and_composes_with_samplers():
    unet_mod = pytest.importorskip("diffusion.models.unet")
    torch.manual_seed(0)
    net = unet_mod.build_unet("tiny", resolution=8, in_channels=1).eval()
    model = ScoreModel(net, schedules.by_name("ddpm"), parametrization="eps", conditioning="1000t")
    x = torch.randn(2, 1, 8, 8)
    c = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        base = net(x, c)
        with skip_tuning(model, rho_bottom=1.0):
            same = net(x, c)
        with skip_tuning(model, rho_bottom=0.6) as factors:
            tuned = net(x, c)
        after = net(x, c)
    assert len(factors) == net.num_skips and factors[0] == 1.0 and factors[-1] == pytest.approx(0.6)
    assert torch.equal(base, same) and torch.equal(base, after) and not torch.allclose(base, tuned)
    eps = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = samplers.sample(model, eps, sampler="euler", nfe=3)
    with skip_tuning(model, rho_bottom=1.0):
        again = samplers.sample(model, eps, sampler="euler", nfe=3)
    with skip_tuning(model, rho_bottom=0.8):
        tuned_run = samplers.sample(model, eps, sampler="euler", nfe=3)
    assert torch.equal(plain.x, again.x) and tuned_run.nfe == 3 and not torch.equal(plain.x, tuned_run.x)
