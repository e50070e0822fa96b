"""Reflow: flow coordinates of any schedule, accurate teacher pairs (cached, resumable), straighter
paths without a higher transport cost on the oracle (docs/theory.md §11.2, §13.14), one-step output."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffusion.oracle import gaussian, oracle_model, ring2d
from diffusion.schedules import by_name
from distill.common import PrefitConfig, Teacher, TeacherError, freeze, load_teacher
from distill.reflow import FlowPort, ReflowConfig, flow_student, make_pairs, main, reflow, straightness
from distill.sid import generate, load_generator


def _gaussian_teacher(mu: float, s: float, dim: int = 2) -> Teacher:
    mix = gaussian([mu] * dim, s)
    return Teacher(freeze(oracle_model(mix, by_name("edm"))), f"test:gaussian({mu},{s})", f"g{mu}{s}", (dim,), mixture=mix)


@pytest.mark.parametrize("base", ["edm", "vp_linear", "cosine"])
def test_flow_port_reads_any_schedule_in_flow_coordinates(base):
    """A FlowPort'ed exact oracle on schedule `base` equals the exact oracle built on the flow schedule."""
    mix = ring2d()
    ported = flow_student(oracle_model(mix, by_name(base)))
    exact = oracle_model(mix, by_name("flow"))
    g = torch.Generator().manual_seed(0)
    x0 = mix.sample(256, g)
    z = torch.randn(256, 2, generator=g, dtype=torch.float64)
    top = by_name(base).sigma_edm_max
    for t in (0.02, 0.3, 0.7, 0.95):
        if t / (1 - t) > top:
            continue
        x = (1 - t) * x0 + t * z
        assert torch.allclose(ported(x, t).x0, exact(x, t).x0, atol=1e-6), (base, t)
        assert torch.allclose(ported(x, t).velocity, exact(x, t).velocity, atol=1e-5), (base, t)
    # at t = 1 (x = z, se = inf) the port reads the top level: the posterior mean is ~E[x0] = 0 there
    assert ported(z, 1.0).x0.abs().max() < 2 / top


def test_flow_velocity_of_a_gaussian_is_the_closed_form():
    """E[z - x0 | x_t] for x0 ~ N(mu, s^2) on x_t = (1-t) x0 + t z (docs/theory.md §13.14)."""
    mu, s = 0.4, 0.3
    model = flow_student(oracle_model(gaussian([mu, mu], s), by_name("edm")))
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for t in (0.1, 0.5, 0.9):
        v = (1 - t) ** 2 * s**2 + t**2
        x0_hat = mu + (1 - t) * s**2 / v * (x - (1 - t) * mu)
        eps_hat = (x - (1 - t) * x0_hat) / t
        assert torch.allclose(model(x, t).velocity, eps_hat - x0_hat, atol=1e-8)


def test_pairs_follow_the_exact_ode_and_resume_by_chunk(tmp_path):
    """Pairs of a Gaussian teacher match the closed-form PF-ODE map; cached chunks are reused exactly."""
    mu, s = 0.4, 0.3
    teacher = _gaussian_teacher(mu, s)
    pairs = make_pairs(teacher, tmp_path / "pairs", n=300, chunk=128, seed=3, log=lambda m: None)
    assert len(pairs) == 300 and sorted(p.name for p in (tmp_path / "pairs").glob("chunk_*")) == [
        "chunk_00000.safetensors", "chunk_00001.safetensors", "chunk_00002.safetensors"]
    top = 80.0  # y_T = 80 z at se = 80; the Gaussian PF-ODE map to se = 0 is affine
    exact = mu + s / math.sqrt(s**2 + top**2) * (top * pairs.noise.double() - mu)
    assert (pairs.data.double() - exact).abs().max() < 2e-3
    # resume: delete one chunk; it is solved again identically and the others are read back
    (tmp_path / "pairs" / "chunk_00001.safetensors").unlink()
    logs = []
    again = make_pairs(teacher, tmp_path / "pairs", n=300, chunk=128, seed=3, log=logs.append)
    assert len(logs) == 1 and "chunk 1" in logs[0]
    assert torch.equal(again.noise, pairs.noise) and torch.equal(again.data, pairs.data)
    with pytest.raises(ValueError, match="other settings"):
        make_pairs(teacher, tmp_path / "pairs", n=300, chunk=128, seed=3, rtol=1e-3, log=lambda m: None)


def test_reflow_straightens_without_raising_transport_cost(tmp_path):
    """On the 2-D oracle: S drops, E||z - x||^2 of the student's ODE coupling <= the teacher's."""
    cfg = ReflowConfig(pairs=3072, val_pairs=512, chunk=1536, iters=400, batch=256, lr=3e-4, log_every=200,
                       one_step_iters=200, prefit=PrefitConfig(preset="tiny", steps=250))
    res = reflow("oracle:ring2d", tmp_path / "rf", cfg, cache_dir=tmp_path / "cache", progress=False, log=lambda m: None)
    st = res.stats
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in st.items()})
    assert st["straightness"] < 0.25 * st["straightness_init"]
    assert st["student_cost"] <= st["teacher_cost"] * 1.01
    # the run folder: kind reflow with the stats; metrics log S; the one-step folder samples in one NFE
    cfg_yaml = (tmp_path / "rf" / "config.yaml").read_text()
    assert "kind: reflow" in cfg_yaml and "straightness" in cfg_yaml
    rows = [json.loads(line) for line in (tmp_path / "rf" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [200, 400] and all("straightness" in r for r in rows)
    G, gcfg = load_generator(tmp_path / "rf" / "onestep")
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    G.reset_nfe()
    x = generate(G, z, gcfg.generator.sig_init)
    assert G.nfe == 1 and torch.isfinite(x).all() and gcfg.generator.val_mse < 0.05


def test_straightness_is_zero_for_a_straight_coupling():
    """A point-mass teacher has straight paths: S of its exact velocity on its own pairs is ~0."""
    x_star = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    model = flow_student(oracle_model(gaussian(x_star[0], 1e-4), by_name("edm")))
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    from distill.reflow import Pairs

    straight = Pairs(z, x_star.expand(256, 2))
    assert straightness(model, straight) < 1e-6
    crossed = Pairs(z, x_star.expand(256, 2) + 0.5 * torch.randn(256, 2, dtype=torch.float64))
    assert straightness(model, crossed) > 0.1  # pairs this teacher would not make are far from straight


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="val_pairs"):
        ReflowConfig(pairs=100, val_pairs=100).validate()
    with pytest.raises(ValueError, match="iters must be > 0"):
        ReflowConfig(iters=0).validate()
    with pytest.raises(TeacherError, match="no such folder"):
        main(["--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="need n >= 1"):
        make_pairs(load_teacher("oracle:ring2d"), tmp_path / "p", n=0)
