"""Learned solvers (distill grid / distill amed) on exact oracles, and the benchmark helpers they rely on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import samplers
from benchmarks import common
from diffusion import oracle as oracle_lib
from diffusion.schedules import by_name
from distill import __main__ as distill_cli
from distill import amed as amed_lib
from distill import grid as grid_lib
from distill.common import Teacher, TeacherError, load_teacher, oracle_teacher


@pytest.fixture(scope="module")
def ring():
    """The exact ring2d oracle on the DDPM schedule (the samplers benchmark's, next to diffusers' schedulers)."""
    return load_teacher("oracle:ring2d", oracle_schedule="ddpm")


def gaussian_teacher(mu: float = 0.3, std: float = 0.5) -> Teacher:
    return oracle_teacher(oracle_lib.gaussian([mu, -mu], std), "gaussian", "ddpm")


def exact_flow(y0: torch.Tensor, se0: float, se: float, mu: torch.Tensor, std: float) -> torch.Tensor:
    """PF-ODE map of Gaussian data in the EDM view: y(se) = mu + sqrt((s^2+se^2)/(s^2+se0^2)) (y0 - mu)."""
    return mu + math.sqrt((std**2 + se**2) / (std**2 + se0**2)) * (y0 - mu)


# ---- teacher -------------------------------------------------------------------------------------


def test_teacher_states_match_exact_gaussian_flow():
    """dopri5 teacher states at every node equal the closed-form PF-ODE map (docs/theory.md §13.1)."""
    t = gaussian_teacher()
    mu = torch.tensor([0.3, -0.3], dtype=torch.float64)
    noise = grid_lib.training_noise(32, t.shape, dtype=torch.float64)
    grid = torch.tensor([100.0, 5.0, 0.5, 0.05, 0.0], dtype=torch.float64)
    states = grid_lib.teacher_states(t.model, noise, grid, solver="adaptive", rtol=1e-8, atol=1e-8)
    assert len(states) == grid.numel()
    y0 = noise * 100.0
    assert torch.equal(states[0], y0)
    for se, y in zip(grid.tolist()[1:], states[1:]):
        assert torch.allclose(y, exact_flow(y0, 100.0, se, mu, 0.5), atol=2e-6), se


def test_heun_teacher_with_more_nodes_converges_to_exact():
    """The AMED teacher (Heun + M inserted nodes) approaches the exact flow as M grows (2nd order)."""
    t = gaussian_teacher()
    mu = torch.tensor([0.3, -0.3], dtype=torch.float64)
    noise = grid_lib.training_noise(16, t.shape, dtype=torch.float64)
    grid = torch.tensor([80.0, 2.0, 0.2, 0.0], dtype=torch.float64)
    exact = exact_flow(noise * 80.0, 80.0, 0.2, mu, 0.5)
    errs = [float((grid_lib.teacher_states(t.model, noise, grid, solver="heun", extra_nodes=m)[2] - exact).abs().max())
            for m in (3, 7, 15)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[1] / errs[2] > 3  # halving the step: ~4x for a 2nd-order method


def test_insert_nodes_keeps_student_nodes():
    fine, idx = grid_lib._insert_nodes([80.0, 8.0, 0.8, 0.0], 1)
    assert [fine[i] for i in idx] == [80.0, 8.0, 0.8, 0.0]
    assert fine[1] == pytest.approx(math.sqrt(80 * 8)) and fine[-2] == pytest.approx(0.4)


# ---- grid parametrisation and fitting ------------------------------------------------------------


def test_theta_grid_round_trip_and_monotone():
    g = torch.tensor([157.4, 20.0, 3.0, 0.4, 0.03, 0.0], dtype=torch.float64)
    top, theta = grid_lib.grid_to_theta(g)
    back = grid_lib.theta_to_grid(top, theta)
    assert back[0] == g[0] and torch.allclose(back, g, rtol=1e-12, atol=0)
    for th in (torch.randn(6, generator=torch.Generator().manual_seed(1)) * 5, torch.full((6,), -30.0)):
        h = grid_lib.theta_to_grid(top, th)
        assert h[0] == pytest.approx(157.4) and h[-1] == 0 and bool((h[1:] < h[:-1]).all())


def test_fit_grid_reduces_error_and_generalises(ring):
    """A few least-squares iterations cut the MSE to the teacher on training noise and on unseen noise."""
    model = ring.model
    opts = dict(samplers.defaults.OPTIONS)
    sampler = samplers.defaults.SAMPLER
    init = grid_lib.initial_grid(model, sampler, 4, opts, kind="karras")
    noise = grid_lib.training_noise(96, ring.shape, dtype=torch.float64)
    target = grid_lib.teacher_states(model, noise, init, rtol=1e-7, atol=1e-7)[-1]
    fit = grid_lib.fit_grid(model, noise, target, init, sampler, opts, max_evals=6)
    assert fit.loss_final < 0.5 * fit.loss_init
    assert fit.grid[0] == init[0] and fit.grid[-1] == 0 and fit.grid.numel() == init.numel()
    # unseen noises (a disjoint seed range): the learned grid still beats the one it started from
    held = grid_lib.training_noise(96, ring.shape, seed=grid_lib.TRAIN_SEED + 10_000, dtype=torch.float64)
    ref = grid_lib.teacher_states(model, held, init, rtol=1e-7, atol=1e-7)[-1]
    err = lambda g: float((grid_lib.sample_with_grid(model, held, g, sampler, opts) - ref).pow(2).mean())  # noqa: E731
    assert err(fit.grid) < 0.5 * err(init)


def test_grid_file_round_trip_reproduces_samples(ring, tmp_path):
    g = torch.tensor([157.40728081040763, 12.5, 0.9, 0.05, 0.0], dtype=torch.float64)
    fit = grid_lib.GridFit(g, "ipndm", {"afs": True, "order": 3}, 1.0, 0.5, [1.0, 0.5], {"train_seed": 7})
    path = grid_lib.save_grid(tmp_path / "g.json", fit)
    back = grid_lib.load_grid(path)
    assert torch.equal(back.grid, g) and back.sampler == "ipndm" and back.options == {"afs": True, "order": 3}
    assert back.meta == {"train_seed": 7}
    eps = samplers.noise.randn((8, 2), samplers.noise.generators(5, 8), dtype=torch.float64)
    a = samplers.sample(ring.model, eps, sampler=back.sampler, grid=back.grid, **back.options)
    b = samplers.sample(ring.model, eps, sampler="ipndm", grid=g, afs=True, order=3)
    assert a.nfe == 3 and torch.equal(a.x, b.x)


def test_grid_bad_inputs(ring, tmp_path):
    noise = torch.zeros(4, 2, dtype=torch.float64)
    g = torch.tensor([157.4, 1.0, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="stochastic"):
        grid_lib.fit_grid(ring.model, noise, noise, g, "euler_maruyama")
    with pytest.raises(ValueError, match="must match"):
        grid_lib.fit_grid(ring.model, noise, noise[:2], g, "euler")
    with pytest.raises(ValueError, match="learnable grid"):
        grid_lib.grid_to_theta(torch.tensor([157.4, 0.0], dtype=torch.float64))
    (tmp_path / "x.json").write_text('{"format": "something-else", "grid": [1, 0]}')
    with pytest.raises(ValueError, match="not a learned-grid file"):
        grid_lib.load_grid(tmp_path / "x.json")
    with pytest.raises(ValueError, match="unknown oracle preset 'nope'"):
        load_teacher("oracle:nope")
    with pytest.raises(ValueError, match="run folder"):
        load_teacher(str(tmp_path / "missing_run"))
    with pytest.raises(ValueError, match="valid: \\['adaptive', 'heun'\\]"):
        grid_lib.teacher_states(ring.model, noise, g, solver="rk4")


# ---- AMED -----------------------------------------------------------------------------------------


def test_amed_training_reduces_error_to_teacher(ring):
    """A few dozen Adam steps on the predictor reduce each student step's distance to the teacher's next state."""
    model = ring.model
    grid = torch.tensor([157.40728081040763, 1.5, 0.1, 0.0], dtype=torch.float64)
    noise = grid_lib.training_noise(128, ring.shape, dtype=torch.float64)
    states = grid_lib.teacher_states(model, noise, grid, rtol=1e-7, atol=1e-7)
    pred0 = samplers.AMEDPredictor()
    with torch.no_grad():
        r0, c0, a0 = pred0(torch.tensor([10.0]), torch.tensor([1.0]))
    assert (float(r0), float(c0), float(a0)) == (0.5, 1.0, 1.0)  # starts at the geometric midpoint
    pred, hist = amed_lib.train_predictor(model, grid, states, afs=True, iters=40, batch=128)
    assert hist[-1] < 0.7 * hist[0]
    # the trained solver is closer to the teacher's final samples than r=1/2 on the same grid
    final = lambda **kw: samplers.sample(model, noise, sampler="mvt", grid=grid, afs=True, **kw).x  # noqa: E731
    e_mid = float((final() - states[-1]).pow(2).mean())
    e_amed = float((final(predictor=pred) - states[-1]).pow(2).mean())
    assert e_amed < 0.8 * e_mid


def test_amed_uses_unet_bottleneck_features():
    """With a U-Net the predictor reads the bottleneck feature captured during each step's first call."""
    from diffusion.models import build_model
    from diffusion.score_model import ScoreModel

    torch.manual_seed(0)
    net = build_model("unet", preset="tiny", resolution=8, in_channels=1).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    model = ScoreModel(net, by_name("cosine"), parametrization="eps")
    assert amed_lib.feature_dim_of(model) == net.feature_dim > 0
    grid = samplers.grids.make("polynomial", 2, model.schedule, se_last=0.5)
    noise = grid_lib.training_noise(4, (1, 8, 8))
    states = grid_lib.teacher_states(model, noise, grid, solver="heun", extra_nodes=1)
    pred, hist = amed_lib.train_predictor(model, grid, states, afs=False, iters=2, batch=4)
    assert pred.feature_dim == net.feature_dim and all(math.isfinite(h) for h in hist)
    res = samplers.sample(model, noise, sampler="mvt", grid=grid, predictor=pred)
    assert res.nfe == 4 and torch.isfinite(res.x).all()


def test_amed_training_is_reproducible(ring):
    """Same seed, same teacher states -> bit-identical predictor (seeded init, seeded minibatches)."""
    grid = torch.tensor([157.40728081040763, 1.5, 0.1, 0.0], dtype=torch.float64)
    noise = grid_lib.training_noise(32, ring.shape, dtype=torch.float64)
    states = grid_lib.teacher_states(ring.model, noise, grid, solver="heun", extra_nodes=1)
    a, ha = amed_lib.train_predictor(ring.model, grid, states, afs=True, iters=3, batch=16, seed=5)
    b, hb = amed_lib.train_predictor(ring.model, grid, states, afs=True, iters=3, batch=16, seed=5)
    assert ha == hb and all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_amed_step_weights():
    w = amed_lib.step_weights([80.0, 1.0, 0.0], sigma_data=0.5)
    assert w == [pytest.approx(0.25 / 1.25), 1.0]


def test_amed_file_round_trip_and_sampler_reads_grid(ring, tmp_path):
    fit = amed_lib.distill(ring, 5, afs=True, teacher_solver="heun", extra_nodes=1, n_train=32, iters=3, batch=32,
                           grid_batch=16)
    assert fit.grid.numel() == 4 and samplers.nfe_of("mvt", 3, afs=True) == 5
    path = amed_lib.save(tmp_path / "p.safetensors", fit)
    pred = samplers.load_predictor(path)
    assert pred.meta["grid"] == [float(v) for v in fit.grid] and pred.meta["afs"] is True
    assert pred.meta["train_seed"] == grid_lib.TRAIN_SEED and len(pred.meta["coefficients"]) == 3
    for k, v in fit.predictor.state_dict().items():
        assert torch.equal(pred.state_dict()[k], v)
    eps = samplers.noise.randn((8, 2), samplers.noise.generators(3, 8), dtype=torch.float64)
    by_path = samplers.sample(ring.model, eps, sampler="mvt", predictor=str(path))  # grid and afs from the file
    by_obj = samplers.sample(ring.model, eps, sampler="mvt", grid=fit.grid, predictor=fit.predictor, afs=True)
    assert by_path.nfe == 5 and torch.equal(by_path.grid, fit.grid) and torch.equal(by_path.x, by_obj.x)


def test_cli_grid_and_amed(tmp_path, capsys):
    out = tmp_path / "g.json"
    assert distill_cli.main(["grid", "--teacher", "oracle:ring2d", "--nfe", "3", "--opt", "afs=true", "--n-train", "16",
                             "--n-val", "8", "--max-evals", "2", "--rtol", "1e-5", "--out", str(out)]) == 0
    fit = grid_lib.load_grid(out)
    assert fit.sampler == "ipndm" and fit.options == {"afs": True} and fit.grid.numel() == 5
    assert fit.meta["teacher"] == "oracle:ring2d" and fit.loss_final <= fit.loss_init
    # the fitted grid is kept only if it also wins on the held-out training noises
    m = fit.meta
    assert m["kept"] == ("fit" if m["val_mse_fit"] < m["val_mse_init"] else "init")
    if m["kept"] == "init":
        assert fit.grid.tolist() == m["init_grid"]
    out2 = tmp_path / "p.safetensors"
    assert distill_cli.main(["amed", "--teacher", "oracle:ring2d", "--nfe", "4", "--no-afs", "--n-train", "16",
                             "--iters", "2", "--out", str(out2)]) == 0
    assert samplers.load_predictor(out2).meta["afs"] is False
    assert "wrote" in capsys.readouterr().out


# ---- training noises are never the benchmark's evaluation noises --------------------------------


def test_training_and_evaluation_noises_are_disjoint():
    from benchmarks import samplers as bench

    n_train = bench.n_training_noises()
    n_eval = max(full for full, _ in bench.CASES.values())
    assert bench.EVAL_SEED != grid_lib.TRAIN_SEED
    grid_lib.check_disjoint_seeds(grid_lib.TRAIN_SEED, n_train, bench.EVAL_SEED, n_eval)  # raises on overlap
    with pytest.raises(ValueError, match="overlap"):
        grid_lib.check_disjoint_seeds(100, 50, 120, 10)
    train = grid_lib.training_noise(n_train, (2,), dtype=torch.float64)
    ev = samplers.noise.randn((n_eval, 2), samplers.noise.generators(bench.EVAL_SEED, n_eval), dtype=torch.float64)
    assert not (train[:, None, :] == ev[None, :, :]).all(-1).any()
    # per-image seeds: a training noise does not depend on how many are drawn
    assert torch.equal(grid_lib.training_noise(3, (2,), dtype=torch.float64), train[:3])


# ---- benchmark statistics --------------------------------------------------------------------------


def test_paired_bootstrap_ratio_closed_forms():
    rng = np.random.default_rng(0)
    b = rng.exponential(size=500)
    same = common.paired_bootstrap_ratio(b, b, "rms", n_boot=200)
    assert (same.value, same.lo, same.hi) == (1.0, 1.0, 1.0)
    scaled = common.paired_bootstrap_ratio(0.25 * b, b, "median", n_boot=200)
    assert scaled.value == pytest.approx(0.25) and scaled.lo == pytest.approx(0.25) and scaled.hi == pytest.approx(0.25)
    noisy = common.paired_bootstrap_ratio(0.5 * b * rng.uniform(0.9, 1.1, size=500), b, "rms", n_boot=400)
    assert noisy.lo < noisy.value < noisy.hi and noisy.lo < 0.5 < noisy.hi
    with pytest.raises(ValueError, match="non-finite"):
        common.paired_bootstrap_ratio(np.array([1.0, np.nan]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="equal length"):
        common.paired_bootstrap_ratio(np.ones(3), np.ones(4))


def test_target_verdicts():
    assert common.Target("x", 0.5, 0.6).verdict == "PASS"
    assert common.Target("x", 0.7, 0.6).verdict == "MISS"
    assert "[MISS]" in common.Target("x", 0.7, 0.6).line()


def test_learned_grid_and_amed_on_a_flow_teacher():
    """issue 13: both learned solvers train on a flow-schedule teacher (start at SE_CAP, t=1 is se=inf)."""
    teacher = load_teacher("oracle:ring2d@flow")
    assert teacher.model.schedule.name == "flow"
    opts = dict(samplers.defaults.OPTIONS)
    init = grid_lib.initial_grid(teacher.model, "ipndm", 4, opts, kind="polynomial")
    noise = grid_lib.training_noise(64, teacher.shape, dtype=torch.float64)
    target = grid_lib.teacher_states(teacher.model, noise, init, rtol=1e-7, atol=1e-7)[-1]
    fit = grid_lib.fit_grid(teacher.model, noise, target, init, "ipndm", opts, max_evals=5)
    assert fit.loss_final < 0.7 * fit.loss_init and fit.grid[-1] == 0
    am = amed_lib.distill(teacher, 5, True, teacher_solver="adaptive", n_train=32, iters=3, batch=32)
    x = samplers.sample(teacher.model, noise[:8], sampler="mvt", predictor=am.predictor, grid=am.grid).x
    assert torch.isfinite(x).all() and am.grid[0] == samplers.grids.SE_CAP
    with pytest.raises(TeacherError, match="unknown schedule 'flw'"):
        load_teacher("oracle:ring2d@flw")
