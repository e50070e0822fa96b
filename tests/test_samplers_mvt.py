"""The mean-value (AMED) solver, its predictor, AFS, and the training-loop entry point mvt_step."""

import math

import pytest
import torch

import samplers
from diffusion import oracle, schedules
from samplers import grids
from samplers.mvt import AMEDPredictor, load_predictor, mvt_step, save_predictor


def ring_model():
    return oracle.oracle_model(oracle.ring2d(), schedules.by_name("ddpm"))


def test_predictor_shape_params_and_identity_init():
    pred = AMEDPredictor(feature_dim=64)
    n_params = sum(p.numel() for p in pred.parameters())
    assert 8_000 < n_params < 10_000  # docs/theory.md §7.1: ~9k
    r, c, a = pred(torch.full((5,), 10.0), torch.full((5,), 2.0), torch.randn(5, 64))
    assert r.shape == c.shape == a.shape == (5,)
    assert torch.allclose(r, torch.full_like(r, 0.5)) and torch.equal(c, torch.ones(5)) and torch.equal(a, torch.ones(5))
    with pytest.raises(ValueError, match=r"needs features of shape \[B, 64\]; got None"):
        pred(10.0, 2.0)
    # time-only predictor (oracle): bounded outputs whatever its weights
    small = AMEDPredictor(feature_dim=0, delta_c=0.01, delta_a=0.2)
    torch.nn.init.normal_(small.head.weight, std=10.0)
    r, c, a = small(torch.tensor([80.0, 1.0, 0.01]), torch.tensor([1.0, 0.01, 0.0]))
    assert ((r > 0) & (r < 1)).all() and ((c - 1).abs() <= 0.01 + 1e-6).all() and ((a - 1).abs() <= 0.2 + 1e-6).all()


def test_untrained_predictor_is_geometric_midpoint_and_save_load(tmp_path):
    model = ring_model()
    eps = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pred = AMEDPredictor(feature_dim=0)
    base = samplers.sample(model, eps, sampler="mvt", nfe=8)
    with_pred = samplers.sample(model, eps, sampler="mvt", nfe=8, predictor=pred)
    assert torch.allclose(base.x, with_pred.x, atol=1e-6) and with_pred.nfe == 8
    torch.nn.init.normal_(pred.head.weight, std=0.5)  # a "trained" predictor
    grid = grids.polynomial(3, 0.01, model.schedule.sigma_edm_max, p=2.0)
    path = tmp_path / "amed.safetensors"
    save_predictor(path, pred, meta={"grid": grid.tolist(), "afs": True, "teacher": "heun M=1"})
    back = load_predictor(path)
    assert back.config() == pred.config() and back.meta["teacher"] == "heun M=1"
    for k, v in pred.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    # by path: the saved grid and AFS are used, so NFE = 2*3 - 1
    res = samplers.sample(model, eps, sampler="mvt", predictor=str(path))
    assert res.nfe == 5 and torch.allclose(res.grid, grid)
    direct = samplers.get("mvt")(model, eps * grid[0].item() * float(model.schedule.alpha(1.0)), grid,
                                 predictor=pred, afs=True)
    assert torch.allclose(res.x, direct, atol=1e-12)
    assert not torch.allclose(res.x, samplers.sample(model, eps, sampler="mvt", grid=grid, afs=True).x)
    with pytest.raises(ValueError, match="costs? 5 NFE|cost 5 NFE"):
        samplers.sample(model, eps, sampler="mvt", predictor=str(path), nfe=6)
    bogus = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(bogus))
    with pytest.raises(ValueError, match="is not an AMED predictor file"):
        load_predictor(bogus)


def test_afs_first_step_is_analytic_and_saves_one_call():
    model = ring_model()
    y = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 80.0
    a0 = float(model.schedule.alpha(model.schedule.t_of_sigma_edm(80.0)))
    a1 = float(model.schedule.alpha(model.schedule.t_of_sigma_edm(5.0)))
    grid = torch.tensor([80.0, 5.0], dtype=torch.float64)
    for name in ("euler", "ipndm", "dpmpp_2m"):
        model.reset_nfe()
        out = samplers.get(name)(model, y * a0, grid, afs=True) / a1
        assert model.nfe == 0, name
        # d0 = y/sqrt(1+se^2) (docs/theory.md §6.5); dpmpp_2m's exponential step uses D0 = y - se d0 instead
        if name == "dpmpp_2m":
            x0 = y - 80.0 * y / math.sqrt(1 + 80.0**2)
            ref = (5.0 / 80.0) * y + (1 - 5.0 / 80.0) * x0
        else:
            ref = y + (5.0 - 80.0) * y / math.sqrt(1 + 80.0**2)
        assert torch.allclose(out, ref, atol=1e-10), name
    model.reset_nfe()
    samplers.get("mvt")(model, y * a0, grid, afs=True)
    assert model.nfe == 1


def test_mvt_step_trains_a_predictor():
    """mvt_step is differentiable in (r, c, a): a few Adam steps toward a fine teacher cut the step error."""
    torch.manual_seed(0)
    model = ring_model()
    y0 = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 80.0
    a = lambda se: float(model.schedule.alpha(model.schedule.t_of_sigma_edm(se)))  # noqa: E731
    fine = grids.polynomial(40, 0.05, 80.0, p=1.0)[:-1]
    to_2 = torch.cat([fine[fine > 2.0], torch.tensor([2.0], dtype=torch.float64)])
    y_mid = samplers.get("heun")(model, y0 * a(80.0), to_2) / a(2.0)  # the teacher's point at se=2
    teacher = samplers.get("heun")(model, y0 * a(80.0), torch.cat([to_2, fine[fine < 2.0]])) / a(0.05)  # fine to 0.05
    pred = AMEDPredictor(feature_dim=0)
    opt = torch.optim.Adam(pred.parameters(), lr=5e-3)
    se_c, se_n = 2.0, 0.05  # train the second step, started from the teacher's point

    def loss_fn():
        r, c, aa = pred(torch.full((256,), se_c), torch.full((256,), se_n))
        y_next, _ = mvt_step(model, y_mid, se_c, se_n, r, c, aa)
        return (y_next - teacher).pow(2).mean()

    first = loss_fn()
    first.backward()
    grads = [p.grad for p in pred.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first.item()


def test_predictor_with_features_needs_a_bottleneck():
    model = ring_model()
    with pytest.raises(ValueError, match="expects 64 features but the network \\(OracleNet\\) has no bottleneck_features"):
        samplers.sample(model, torch.randn(2, 2, dtype=torch.float64), sampler="mvt", nfe=4,
                        predictor=AMEDPredictor(feature_dim=64))


def test_mvt_per_sample_coefficients():
    model = ring_model()
    y = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3.0
    r = torch.tensor([0.0, 0.3, 0.5, 0.9], dtype=torch.float64)
    batched, _ = mvt_step(model, y, 3.0, 0.5, r)
    for i in range(4):
        single, _ = mvt_step(model, y[i:i + 1], 3.0, 0.5, float(r[i]))
        assert torch.allclose(batched[i], single[0], atol=1e-12)
    with pytest.raises(ValueError, match="se_c > se_n >= 0"):
        mvt_step(model, y, 0.5, 3.0)


def test_predictor_reads_unet_bottleneck_features():
    unet_mod = pytest.importorskip("diffusion.models.unet")
    from diffusion.score_model import ScoreModel

    torch.manual_seed(0)
    net = unet_mod.build_unet("tiny", resolution=8, in_channels=1).eval()
    model = ScoreModel(net, schedules.by_name("ddpm"), parametrization="eps", conditioning="1000t")
    pred = AMEDPredictor(feature_dim=net.feature_dim)
    seen = []
    hook = pred.mlp.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().clone()))
    eps = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    res = samplers.sample(model, eps, sampler="mvt", nfe=4, predictor=pred)
    hook.remove()
    assert res.nfe == 4 and len(seen) == 2 and seen[0].shape == (2, net.feature_dim)
    assert not torch.equal(seen[0], seen[1])  # features of each step's first call
    plain = samplers.sample(model, eps, sampler="mvt", nfe=4)  # untrained predictor == midpoint
    assert torch.allclose(res.x, plain.x, atol=1e-5)
