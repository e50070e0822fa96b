"""SiD one-step distillation: the score identity, the generator loss against closed forms (docs/theory.md
§13.13), a short run on the 2-D oracle, run folders, exact resume and the bad-input errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from diffusion.oracle import gaussian
from diffusion.prediction import eps_from_x0
from diffusion.schedules import by_name
from diffusion.score_model import ScoreModel
from distill.common import (DivergenceError, NonFiniteCounter, NonFiniteError, PrefitConfig, TeacherError, load_teacher,
                            prefit, sliced_wasserstein)
from distill.sid import (SiD, SiDConfig, check_alpha, generate, generator_sigmas, load_generator, main, sid_generator_loss,
                         train_sid)

TINY_PREFIT = PrefitConfig(preset="tiny", steps=250)  # batch/lr: the CLI defaults, so the CLI test hits the cache


# ---- closed-form helpers: 1-D (or isotropic) Gaussian data N(mu, s^2) in the EDM view (alpha = 1) ----


def gauss_denoiser(y, se, mu, s):
    """E[x0 | x0 + se n = y] for x0 ~ N(mu, s^2)."""
    return mu + s**2 / (s**2 + se**2) * (y - mu)


def hermite_grid(n: int = 4):
    """Product Gauss-Hermite nodes/weights for E over (z, n) ~ N(0, 1)^2: exact for polynomials of degree <= 2n-1."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    w = w / math.sqrt(2 * math.pi)
    Z, N = np.meshgrid(x, x, indexing="ij")
    return (torch.tensor(a.ravel(), dtype=torch.float64) for a in (Z, N, np.outer(w, w)))


# ---- docs/theory.md §13.13 ------------------------------------------------------------------------------


def test_score_identity_monte_carlo():
    """E<f(x_t), eps_opt(x_t)> = E<f(x_t), eps> for Gaussian data, and a wrong eps_opt breaks it."""
    g = torch.Generator().manual_seed(0)
    mu, s, D, n = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), 0.6, 3, 400_000
    sched = by_name("cosine")
    t = torch.tensor(0.55, dtype=torch.float64)
    a, sig = sched.alpha(t), sched.sigma(t)
    x0 = mu + s * torch.randn(n, D, generator=g, dtype=torch.float64)
    eps = torch.randn(n, D, generator=g, dtype=torch.float64)
    x = a * x0 + sig * eps
    v = a**2 * s**2 + sig**2
    eps_opt = sig * (x - a * mu) / v  # closed form: -sigma * score
    oracle_eps = eps_from_x0(x, gaussian(mu, s).x0_hat(x, a, sig), a, sig)
    assert torch.allclose(oracle_eps, eps_opt, atol=1e-10)
    f = torch.sin(2 * x) + 0.3 * x**2 - x[:, [1, 2, 0]]  # an arbitrary non-linear test function
    diff = (f * (eps_opt - eps)).sum(1)
    se = float(diff.std() / math.sqrt(n))
    assert abs(float(diff.mean())) < 4 * se
    wrong = (f * (0.9 * eps_opt - eps)).sum(1)  # negative control: the check has the power to fail
    assert abs(float(wrong.mean())) > 10 * float(wrong.std() / math.sqrt(n))


def test_generator_loss_vanishes_when_generator_matches_data():
    """G = data law and analytic fake score: L_G and its gradient vanish; off the data they do not."""
    z, n, w = hermite_grid()
    mu, s, se = 0.3, 0.7, 0.8

    def loss_and_grad(m0, c0, alpha=1.2):
        th = torch.tensor([m0, c0], dtype=torch.float64, requires_grad=True)
        x_g = th[0] + th[1] * z
        y = x_g + se * n
        fr = gauss_denoiser(y, se, mu, s)
        ff = gauss_denoiser(y, se, *th.detach())  # psi*(theta): the fake score of G's own law, frozen
        loss = (w * sid_generator_loss(x_g[:, None], fr[:, None], ff[:, None], alpha, normalize=False)).sum()
        return float(loss.detach()), torch.autograd.grad(loss, th)[0]

    loss, grad = loss_and_grad(mu, s)
    assert abs(loss) < 1e-14 and grad.abs().max() < 1e-14
    # per-sample weighted loss on Monte-Carlo samples, through the oracle's denoiser: zero as well
    g = torch.Generator().manual_seed(1)
    th = torch.tensor([mu, s], dtype=torch.float64, requires_grad=True)
    x_g = (th[0] + th[1] * torch.randn(4096, 2, generator=g, dtype=torch.float64))
    y = x_g + se * torch.randn(4096, 2, generator=g, dtype=torch.float64)
    fr = gaussian([mu, mu], s).x0_hat(y, 1.0, se)
    ff = gauss_denoiser(y, se, mu, s)
    L = sid_generator_loss(x_g, fr, ff, 1.2).mean()
    assert abs(float(L.detach())) < 1e-10 and torch.autograd.grad(L, th)[0].abs().max() < 1e-8
    # away from the data the gradient is non-zero and gradient descent moves (m, c) towards (mu, s)
    _, g_far = loss_and_grad(mu + 0.4, 1.3 * s)
    assert g_far[0] > 1e-3 and g_far[1] > 1e-3
    _, g_near = loss_and_grad(mu - 0.4, 0.7 * s)
    assert g_near[0] < -1e-3 and g_near[1] < -1e-3


@pytest.mark.parametrize("se", [0.05, 0.5, 2.0, 10.0])
def test_alpha_half_gives_fisher_divergence_gradient(se):
    """FGM identity on a 1-D Gaussian generator: grad(2 L2_sg - L1_sg) = grad L1 (exact by quadrature)."""
    z, n, w = hermite_grid()
    mu, s = 0.3, 0.7
    theta0 = [1.1, 1.3]

    def sid_grad(alpha):
        th = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
        x_g = th[0] + th[1] * z
        y = x_g + se * n
        fr, ff = gauss_denoiser(y, se, mu, s), gauss_denoiser(y, se, *th.detach())
        loss = (w * sid_generator_loss(x_g[:, None], fr[:, None], ff[:, None], alpha, normalize=False)).sum()
        return torch.autograd.grad(2 * loss / se**2, th)[0]  # x0-form loss = se^2 (L2 - alpha L1)

    th = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    y = th[0] + th[1] * z + se * n
    fisher = (w * (gauss_denoiser(y, se, mu, s) - gauss_denoiser(y, se, th[0], th[1])) ** 2).sum() / se**2
    g_fisher = torch.autograd.grad(fisher, th)[0]  # psi*(theta) differentiated too: the true Fisher gradient
    assert torch.allclose(sid_grad(0.5), g_fisher, rtol=1e-9, atol=1e-14)
    assert not torch.allclose(sid_grad(1.0), g_fisher, rtol=1e-3, atol=1e-6)  # only alpha = 1/2 is exact


def test_x0_form_is_eps_form():
    """sum((fr-ff)((fr-x_g) - a(fr-ff))) = se^2 (<e_phi - e_psi, e_phi - n> - a ||e_phi - e_psi||^2)."""
    g = torch.Generator().manual_seed(2)
    x_g, n, fr, ff = (torch.randn(16, 5, generator=g, dtype=torch.float64) for _ in range(4))
    se, alpha = 0.7, 1.2
    y = x_g + se * n
    e_phi, e_psi = (y - fr) / se, (y - ff) / se
    l2 = ((e_phi - e_psi) * (e_phi - n)).sum(1)
    l1 = ((e_phi - e_psi) ** 2).sum(1)
    assert torch.allclose(sid_generator_loss(x_g, fr, ff, alpha, normalize=False), se**2 * (l2 - alpha * l1), atol=1e-12)
    w = 1 / (x_g - fr).abs().mean(1)
    assert torch.allclose(sid_generator_loss(x_g, fr, ff, alpha), w * se**2 * (l2 - alpha * l1), atol=1e-12)


def test_generator_sigmas_follow_the_restricted_rho_ramp():
    """u ~ U[0, 0.8] on the rho=7 ramp: se in [0.002, 24.4], and the ramp formula at the endpoints."""
    se = generator_sigmas(20000, torch.Generator().manual_seed(0))
    top = (80 ** (1 / 7) + 0.2 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert abs(top - 24.4) < 0.05
    assert se.min() >= 0.002 - 1e-12 and se.max() <= top + 1e-9
    assert se.min() < 0.0025 and se.max() > 0.95 * top
    u = 0.8 * torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(se, (80 ** (1 / 7) + (1 - u) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7)


@pytest.mark.parametrize("alpha", [0.0, 1.5, -0.3, 2.0, float("nan")])
def test_alpha_outside_open_interval_is_rejected(alpha):
    with pytest.raises(ValueError, match=r"alpha must lie in the open interval \(0.0, 1.5\)"):
        check_alpha(alpha)
    with pytest.raises(ValueError, match="alpha"):
        SiDConfig(alpha=alpha).validate()


def test_alpha_inside_is_accepted():
    assert check_alpha(1.2) == 1.2 and check_alpha(0.5) == 0.5 and check_alpha(1.49) == 1.49


# ---- runs on the 2-D oracle ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    """The ring oracle teacher and a quick MLP pre-fit (shared by the run tests of this module)."""
    cache = tmp_path_factory.mktemp("prefit")
    teacher = load_teacher("oracle:ring2d")
    init = prefit(teacher, TINY_PREFIT, cache, log=lambda s: None)
    return teacher, init, cache


def quick_cfg(**kw) -> SiDConfig:
    base = dict(lr=1e-4, batch=128, iters=6, log_every=2, checkpoint_every=3, ema_halflife_kimg=2.0, prefit=TINY_PREFIT)
    return SiDConfig(**{**base, **kw})


def test_short_sid_run_reduces_sliced_wasserstein(ring, tmp_path):
    teacher, init, cache = ring
    data = teacher.sample_data(8000, torch.Generator().manual_seed(5))
    z = torch.randn(8000, 2, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        sw0 = sliced_wasserstein(generate(init[0], z), data)
    sid = train_sid(teacher, tmp_path / "run", quick_cfg(iters=150, batch=256, log_every=50, checkpoint_every=150),
                    init=init, progress=False, log=lambda s: None)
    sw1 = sliced_wasserstein(sid.sample(z), data)
    floor = sliced_wasserstein(teacher.sample_data(8000, torch.Generator().manual_seed(7)), data)
    print(f"sliced W2: start {sw0:.4f}, after 150 iterations {sw1:.4f}, data-vs-data floor {floor:.4f}")
    assert sw0 > 0.3 and sw1 < 0.3 * sw0, (sw0, sw1, floor)
    assert sid.nan.bad == 0 and sid.nan.total == 150 * 2 * 256


def test_run_folder_samples_in_one_step(ring, tmp_path):
    teacher, init, cache = ring
    sid = train_sid(teacher, tmp_path / "run", quick_cfg(), init=init, progress=False, log=lambda s: None)
    run = tmp_path / "run"
    for f in ("config.yaml", "model.safetensors", "ema.safetensors", "samples.png", "loss.png", "metrics.jsonl"):
        assert (run / f).is_file(), f
    G, cfg = load_generator(run)
    assert cfg.kind == "generator" and cfg.generator.sig_init == 2.5 and cfg.generator.nfe == 1
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    G.reset_nfe()
    x = generate(G, z, cfg.generator.sig_init)
    assert G.nfe == 1 and torch.equal(x, sid.sample(z))
    G_raw, _ = load_generator(run, ema=False)
    assert torch.equal(generate(G_raw, z), sid.sample(z, ema=False))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6] and all("nan_samples" in r for r in rows)


def test_resume_is_bit_exact(ring, tmp_path):
    teacher, init, cache = ring
    full = train_sid(teacher, tmp_path / "full", quick_cfg(), init=init, progress=False, log=lambda s: None)
    train_sid(teacher, tmp_path / "half", quick_cfg(iters=3), init=init, progress=False, log=lambda s: None)
    resumed = train_sid(teacher, tmp_path / "half", quick_cfg(), init=init, resume=True, progress=False, log=lambda s: None)
    for a, b in ((full.G.net, resumed.G.net), (full.fake.net, resumed.fake.net), (full.ema.net, resumed.ema.net)):
        for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), k
    assert full.step_count == resumed.step_count == 6


def test_resume_with_a_different_teacher_is_an_error(ring, tmp_path):
    teacher, init, cache = ring
    train_sid(teacher, tmp_path / "run", quick_cfg(iters=3), init=init, progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="different teacher|distilled from teacher 'oracle:ring2d'"):
        train_sid("oracle:mixture64d", tmp_path / "run", quick_cfg(), resume=True, progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="already has checkpoints"):
        train_sid(teacher, tmp_path / "run", quick_cfg(), init=init, progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="no checkpoint to resume"):
        train_sid(teacher, tmp_path / "empty", quick_cfg(), init=init, resume=True, progress=False, log=lambda s: None)


@pytest.mark.parametrize("spec, match", [
    ("oracle:nonexistent", "unknown oracle preset 'nonexistent'"),
    ("/no/such/run", "no such folder"),
    ("", "non-empty string"),
])
def test_teacher_that_cannot_be_loaded(spec, match):
    with pytest.raises(TeacherError, match=match):
        load_teacher(spec)


def test_run_folder_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "config.yaml").write_text("name: x\n")
    with pytest.raises(TeacherError, match="cannot load teacher"):
        load_teacher(str(tmp_path))


class _NaNRows(nn.Module):
    """Wraps a net and makes the first ``k`` rows of every output NaN."""

    def __init__(self, net: nn.Module, k: int):
        super().__init__()
        self.net, self.k = net, k

    def forward(self, x, c_noise, class_labels=None):
        out = self.net(x, c_noise)
        return torch.cat([torch.full_like(out[: self.k], float("nan")), out[self.k:]])


def _sid_with_nan_generator(ring, k: int) -> SiD:
    teacher, init, _ = ring
    sid = SiD(teacher, init[0], quick_cfg())
    sid.G.net = _NaNRows(sid.G.net, k)  # only the generator misbehaves; the fake score stays clean
    return sid


def test_non_finite_samples_are_counted_reported_and_stop_the_run(ring):
    # one NaN sample per batch of 128 (0.8%) is under the 1% threshold: counted, reported, left out of the losses
    sid = _sid_with_nan_generator(ring, 1)
    rows = [sid.step() for _ in range(6)]
    assert sid.nan.bad == 6 * 2 and sid.nan.total == 6 * 2 * 128
    assert [r["nan_samples"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert all(torch.isfinite(p).all() for p in sid.G.parameters()) and all(math.isfinite(r["loss_gen"]) for r in rows)
    sid = _sid_with_nan_generator(ring, 3)  # 2.3%: the run stops with the count in the message
    with pytest.raises(NonFiniteError, match=r"3 of 128 generator samples were non-finite \(2.34%\)"):
        sid.step()


def test_non_finite_counter():
    c = NonFiniteCounter(max_fraction=0.25)
    x = torch.zeros(8, 3)
    x[0, 1] = float("inf")
    assert c(x).tolist() == [False] + [True] * 7 and c.state() == {"bad": 1, "total": 8}
    x[1:4, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="5 of 16"):
        c(x)
    with pytest.raises(ValueError, match="max_fraction"):
        NonFiniteCounter(1.5)


def test_divergence_is_detected_and_stops_the_run(ring, tmp_path):
    teacher, init, cache = ring
    with pytest.raises((DivergenceError, NonFiniteError), match="diverged|non-finite"):
        train_sid(teacher, tmp_path / "run", quick_cfg(lr=3.0, iters=60, diverge_factor=5.0), init=init,
                  progress=False, log=lambda s: None)


def test_cli(ring, tmp_path, capsys):
    teacher, init, cache = ring
    out = tmp_path / "cli"
    args = ["--teacher", "oracle:ring2d", "--out", str(out), "--iters", "2", "--batch", "64", "--lr", "1e-4",
            "--checkpoint-every", "2", "--log-every", "1", "--prefit-preset", "tiny", "--prefit-steps", "250",
            "--cache-dir", str(cache), "--no-progress"]
    assert main(args + ["--no-sample-weight"]) == 0
    assert "one-step generator" in capsys.readouterr().out
    cfg = load_generator(out)[1]
    assert cfg.generator.teacher == "oracle:ring2d" and cfg.sid.normalize is False
    with pytest.raises(ValueError, match="alpha must lie"):
        main(args[:4] + ["--alpha", "1.5"])


def test_mixed_precision_bf16_and_time_limit(ring, tmp_path):
    """bf16 autocast through accelerate runs and stays finite; a time limit stops early but still saves."""
    teacher, init, _ = ring
    logs = []
    sid = train_sid(teacher, tmp_path / "bf16", quick_cfg(iters=1000, mixed_precision="bf16"), init=init, progress=False,
                    log=logs.append, time_limit_s=0.0)
    assert sid.step_count == 1 and any("time limit" in m for m in logs)
    assert (tmp_path / "bf16" / "ema.safetensors").is_file() and (tmp_path / "bf16" / "checkpoints" / "step_0000001").is_dir()
    assert all(torch.isfinite(p).all() for p in sid.G.parameters())


def test_sample_py_draws_a_generator_run_in_one_network_call(ring, tmp_path):
    """`sample.py --run` on a SiD run folder: one call per image, image i = G(sig_init * noise(seed S+i))."""
    import sample
    import samplers

    teacher, init, cache = ring
    sid = train_sid(teacher, tmp_path / "run", quick_cfg(), init=init, progress=False, log=lambda s: None)
    out = tmp_path / "samples"
    assert sample.main(["--run", str(tmp_path / "run"), "--num", "5", "--batch-size", "2", "--seed", "7",
                        "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    manifest = json.loads((out / "samples.json").read_text())
    assert manifest["sampler"] == "one_step" and manifest["nfe"] == 1 and manifest["grid"] == [2.5, 0.0]
    assert manifest["checkpoint"]["kind"] == "generator"
    noise = samplers.noise.randn((5, 2), samplers.noise.generators(7, 5))
    expect = sid.sample(noise).float().numpy()
    assert np.allclose(np.load(out / "samples.npz")["samples"], expect, atol=1e-6)
    # a one-step generator has no sampler or NFE to choose
    assert sample.main(["--run", str(tmp_path / "run"), "--num", "2", "--nfe", "5", "--out", str(tmp_path / "x"),
                        "--device", "cpu", "--no-progress"]) == 2


def test_non_finite_counts_are_summed_across_processes():
    """With a cross-process sum every process holds (and stops on) the global counts."""
    two_equal_processes = lambda t: 2 * t  # noqa: E731  what a 2-process all-reduce of equal counts returns
    c = NonFiniteCounter(max_fraction=0.25, reduce=two_equal_processes)
    x = torch.zeros(8, 3)
    x[0, 0] = float("nan")
    assert c(x).tolist() == [False] + [True] * 7 and c.state() == {"bad": 2, "total": 16}


def test_pretrained_diffusers_teacher(tmp_path):
    """A local diffusers pipeline folder as teacher: G starts as the teacher's denoiser at sig_init, trains, samples."""
    import sample
    from tests.test_pretrained import save_pipeline

    folder = save_pipeline(tmp_path / "pipe")
    teacher = load_teacher(f"pretrained:{folder}")
    assert teacher.shape == (1, 8, 8) and teacher.has_weights
    cfg = SiDConfig(lr=1e-5, batch=4, iters=2, log_every=1, checkpoint_every=2)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expect = teacher.model.denoise(2.5 * z, torch.full((3,), 2.5, dtype=torch.float64))
        start = SiD(teacher, teacher.model, cfg)
        assert torch.allclose(start.sample(z, ema=False), expect, atol=1e-6)
    sid = train_sid(teacher, tmp_path / "run", cfg, progress=False, log=lambda s: None)
    assert sid.step_count == 2 and sid.nan.bad == 0
    assert not torch.equal(sid.sample(z, ema=False), expect)  # the generator moved away from the teacher
    G, run_cfg = load_generator(tmp_path / "run", ema=False)
    assert run_cfg.model.kind == "pretrained" and run_cfg.generator.teacher == f"pretrained:{folder}"
    assert torch.allclose(generate(G, z), sid.sample(z, ema=False), atol=1e-6)
    assert sample.main(["--run", str(tmp_path / "run"), "--num", "2", "--out", str(tmp_path / "png"),
                        "--device", "cpu", "--no-progress"]) == 0
