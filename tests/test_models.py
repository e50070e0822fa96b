"""Backbone contract, Skip-Tuning hooks and bottleneck features (small nets, CPU, seconds)."""
from __future__ import annotations

import copy

import pytest
import torch

from diffusion.models import DiT, UNet, build_model, count_params, drop_labels

# Smaller than the "tiny" preset so the whole file runs in seconds on 2 cores.
SMALL_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, attention_levels=(1,))
SMALL_DIT = dict(hidden_size=64, depth=3, num_heads=4, patch_size=2)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run these tiny nets on one thread: on a busy 2-core box, OpenMP barriers made each conv ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(kind: str, resolution: int, num_classes: int = 0) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = SMALL_UNET if kind == "unet" else SMALL_DIT
    return build_model(kind, preset="tiny", resolution=resolution, in_channels=1, num_classes=num_classes,
                       **cfg).eval()


@pytest.mark.parametrize("kind", ["unet", "dit"])
@pytest.mark.parametrize("resolution", [8, 16])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_contract_shapes_and_attributes(kind: str, resolution: int, num_classes: int) -> None:
    net = make(kind, resolution, num_classes)
    assert (net.num_classes, net.img_channels, net.img_resolution) == (num_classes, 1, resolution)
    x = torch.randn(3, 1, resolution, resolution)
    c_noise = torch.tensor([-2.5, 0.1, 700.0])  # any range: t, log(sigma)/4, 1000 t ...
    labels = torch.tensor([0, 9, 10]) if num_classes else None  # 10 = null label
    out = net(x, c_noise, labels)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert net.bottleneck_features().shape == (3, net.feature_dim)


def test_unconditional_net_rejects_labels_and_null_label_is_default() -> None:
    x, c = torch.randn(2, 1, 8, 8), torch.rand(2)
    with pytest.raises(ValueError, match="unconditional"):
        make("unet", 8)(x, c, torch.tensor([0, 1]))
    net = make("unet", 8, num_classes=10)
    assert torch.equal(net(x, c), net(x, c, torch.tensor([10, 10])))
    assert not torch.allclose(net(x, c, torch.tensor([3, 3])), net(x, c))
    with pytest.raises(ValueError, match="0..10"):
        net(x, c, torch.tensor([0, 11]))


def test_c_noise_conditions_the_output() -> None:
    net, x = make("unet", 8), torch.randn(2, 1, 8, 8)
    assert not torch.allclose(net(x, torch.zeros(2)), net(x, torch.ones(2)))
    assert torch.equal(net(x, torch.tensor(0.5)), net(x, torch.full((2,), 0.5)))  # scalar broadcasts
    with pytest.raises(ValueError, match="one value per batch item"):
        net(x, torch.zeros(3))


def test_backward_reaches_all_unet_parameters() -> None:
    net = make("unet", 8, num_classes=10).train()
    net(torch.randn(4, 1, 8, 8), torch.rand(4), torch.randint(0, 11, (4,))).square().mean().backward()
    unused = [n for n, p in net.named_parameters() if p.grad is None and "class_embedding" not in n]
    assert not unused


# ---- Skip-Tuning ----------------------------------------------------------------------------------

def test_skip_scales_of_one_are_bit_exact() -> None:
    net = make("unet", 16)
    x, c = torch.randn(4, 1, 16, 16), torch.rand(4)
    ref = net(x, c)
    net.set_skip_scales([1.0] * net.num_skips)
    assert torch.equal(net(x, c), ref)
    net.set_skip_scales([0.7] * net.num_skips)
    assert not torch.allclose(net(x, c), ref)
    assert net.skip_scales == [0.7] * net.num_skips
    net.set_skip_scales(None)
    assert torch.equal(net(x, c), ref) and net.skip_scales is None


def test_skip_count_and_validation() -> None:
    net = make("unet", 8)
    # conv_in + (1 resnet + 1 downsampler) at level 0 + 1 resnet at level 1.
    assert net.num_skips == 4
    with pytest.raises(ValueError, match="num_skips=4"):
        net.set_skip_scales([1.0, 1.0])


def _capture_deepest_skip_and_concat(net: UNet, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (deepest encoder skip as produced, the skip half of the first decoder concat)."""
    seen: dict[str, torch.Tensor] = {}
    last_down = net.net.down_blocks[-1]
    h1 = last_down.register_forward_hook(lambda m, a, out: seen.__setitem__("skip", out[1][-1].clone()))
    first_resnet = net.net.up_blocks[0].resnets[0]  # consumes the deepest skip first
    h2 = first_resnet.register_forward_pre_hook(lambda m, a: seen.__setitem__("concat", a[0].clone()))
    try:
        net(x, c)
    finally:
        h1.remove()
        h2.remove()
    n_skip = seen["skip"].shape[1]
    return seen["skip"], seen["concat"][:, -n_skip:]


def test_scaling_deepest_skip_scales_exactly_that_concat_input() -> None:
    net = make("unet", 8)
    x, c = torch.randn(2, 1, 8, 8), torch.rand(2)
    skip, concat = _capture_deepest_skip_and_concat(net, x, c)
    assert torch.equal(concat, skip)
    net.set_skip_scales([1.0] * (net.num_skips - 1) + [0.5])
    skip_scaled, concat_scaled = _capture_deepest_skip_and_concat(net, x, c)
    # The encoder (and the main path into the mid block) is untouched; only the decoder's copy is scaled.
    assert torch.equal(skip_scaled, skip)
    assert torch.equal(concat_scaled, skip * 0.5)
    reference = make("unet", 8)  # same seed, no scaling
    reference(x, c)
    assert torch.equal(net.bottleneck_features(), reference.bottleneck_features())


def test_skip_hooks_survive_deepcopy_independently() -> None:
    net = make("unet", 8)
    x, c = torch.randn(2, 1, 8, 8), torch.rand(2)
    net.set_skip_scales([0.5] * net.num_skips)
    ema = copy.deepcopy(net)
    assert torch.equal(ema(x, c), net(x, c))
    ema.set_skip_scales(None)
    assert not torch.allclose(ema(x, c), net(x, c))
    # Each copy captures its own features.
    ema(x[:1], c[:1])
    assert net.bottleneck_features().shape[0] == 2 and ema.bottleneck_features().shape[0] == 1


def test_dit_has_no_skips() -> None:
    net = make("dit", 8)
    assert net.num_skips == 0
    net.set_skip_scales(None)
    with pytest.raises(NotImplementedError, match="U-Net"):
        net.set_skip_scales([])


# ---- construction errors and helpers ------------------------------------------------------------

def test_dit_patch_size_error_names_both_numbers() -> None:
    with pytest.raises(ValueError, match=r"resolution 10 .*patch_size 4"):
        DiT(resolution=10, patch_size=4)


def test_unet_resolution_must_divide_levels() -> None:
    with pytest.raises(ValueError, match=r"resolution 12 .*divisible.* 8"):
        UNet(resolution=12, block_out_channels=(32, 32, 32, 32))


def test_unknown_kind_and_preset() -> None:
    with pytest.raises(ValueError, match=r"'transformer'.*\['dit', 'unet'\]"):
        build_model("transformer", resolution=8)
    with pytest.raises(ValueError, match="huge"):
        build_model("unet", preset="huge", resolution=8)


def test_presets_parameter_counts() -> None:
    tiny = build_model("unet", preset="tiny", resolution=16, in_channels=1, num_classes=10)
    assert 2e6 < count_params(tiny) < 3e6
    assert count_params(tiny, trainable_only=True) == count_params(tiny)


def test_drop_labels() -> None:
    labels = torch.arange(10).repeat(100)
    g = torch.Generator().manual_seed(0)
    out = drop_labels(labels, 0.3, 10, g)
    dropped = out == 10
    assert 0.25 < dropped.float().mean() < 0.35
    assert torch.equal(out[~dropped], labels[~dropped])
    assert torch.equal(out, drop_labels(labels, 0.3, 10, torch.Generator().manual_seed(0)))
    assert torch.equal(drop_labels(labels, 0.0, 10), labels)
    assert (drop_labels(labels, 1.0, 10) == 10).all()
    with pytest.raises(ValueError):
        drop_labels(labels, 1.5, 10)


def test_skip_scaler_handles_keyword_calls() -> None:
    from diffusion.models.hooks import SkipScaler

    a, b = torch.ones(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
    _, kw = SkipScaler([1.0, 0.25])(torch.nn.Identity(), (torch.zeros(1),), {"res_hidden_states_tuple": (a, b)})
    out = kw["res_hidden_states_tuple"]
    assert out[0] is a and torch.equal(out[1], b * 0.25)  # factor 1 passes the very same tensor
