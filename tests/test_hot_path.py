"""The hot path reads nothing back from the device: counted tensor-to-Python conversions.

On a GPU every ``bool(t)``, ``t.item()``, ``float(t)``, ``int(t)``, ``t.tolist()`` (and ``__index__``)
waits for the device. These tests count them (monkeypatched on ``torch.Tensor``) around one network
call of ``ScoreModel`` for every schedule x parametrization, around sampler runs of two lengths
(the difference is the per-step count) for every registered sampler, and around one objective
forward + backward for every objective. Validation happens where values enter: once per call of
``samplers.sample`` (grid, labels) and once per grid (the coefficients of every level in one read).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import samplers
from diffusion import losses, schedules
from diffusion.host_reads import count_host_reads
from diffusion.preconditioning import EDM, Custom, Identity, edm_precond
from diffusion.score_model import ScoreModel

SCHEDULES = ["vp_linear", "ddpm", "cosine", "subvp", "ve", "edm", "flow"]
PARAMS = ["eps", "x0", "v", "score", "velocity", "edm"]




class Tiny(nn.Module):
    """Costs nothing: 0.9 x + w c_noise (w trainable, so an objective has something to backprop into)."""

    def __init__(self, num_classes: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.w = nn.Parameter(torch.tensor(1e-3, dtype=torch.float64))

    def forward(self, x, c_noise, class_labels=None):
        out = 0.9 * x + self.w.to(x.dtype) * c_noise.reshape(-1, *[1] * (x.ndim - 1))
        if class_labels is not None:
            out = out + 1e-3 * class_labels.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return out


def test_counter_sees_every_kind_of_read():
    t = torch.tensor([0.5])
    with count_host_reads() as n:
        bool(t), t.item(), float(t), int(t), t.tolist(), [0, 1][torch.tensor(1)]
    assert n[0] == 6


@pytest.mark.parametrize("sched", SCHEDULES)
@pytest.mark.parametrize("param", PARAMS)
def test_one_network_call_reads_nothing(sched, param):
    s = schedules.by_name(sched)
    cond = None if param == "edm" else {"ddpm": "index", "cosine": "logsnr", "ve": "edm"}.get(sched, "t")
    m = ScoreModel(Tiny(), s, param, conditioning=cond)
    x = torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    se = torch.tensor([0.3, 2.0, 9.0], dtype=torch.float64)
    m.prepare_levels([1.5])  # what a sampler does once per grid
    m.prepare_times([0.4])
    with count_host_reads() as n:
        p = m(x, t)
        outs = [p.x0, p.eps, p.v, p.score, p.velocity]
        q = m(x, 0.4)  # a cached grid time: Python-float coefficients
        outs += [q.x0, q.eps, q.v, q.score, q.velocity, m.denoise(x, 1.5), m.denoise(x, se)]
    assert n[0] == 0, f"{n[0]} host reads in one call ({sched}, {param})"
    assert all(o.shape == x.shape for o in outs) and m.nfe == 4


def test_labels_are_checked_once_per_tensor():
    m = ScoreModel(Tiny(num_classes=3), schedules.by_name("ddpm"), "eps")
    x, labels = torch.randn(2, 2, dtype=torch.float64), torch.tensor([0, 2])
    m(x, 0.5, labels)  # first sight: validated (one read)
    with count_host_reads() as n:
        m(x, 0.5, labels)
    assert n[0] == 0
    labels[1] = 7  # changed in place: checked again
    with pytest.raises(ValueError, match=r"out of range.*7"):
        m(x, 0.5, labels)


# Per-step allowances (host reads per sampler step), with the reason. Everything else is done once per
# call of samplers.sample: grid validation, one read of the grid's coefficients, one finiteness read.
ALLOWED_PER_STEP = {name: 0 for name in samplers.available()}
# dopri5's step-size control reads the error norm on the host (torchdiffeq); the allowance is per NFE
ALLOWED_PER_STEP["adaptive"] = 4
ALLOWED_PER_RUN = 64


def _run(model, name, short):
    kw = dict(sampler=name, generator=torch.Generator().manual_seed(0))
    se = [50.0, 20.0, 10.0, 5.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01]
    if name == "adaptive":
        kw["grid"] = torch.tensor([50.0, 0.05 if short else 0.005, 0.0], dtype=torch.float64)
    else:
        kw["grid"] = torch.tensor(se[: 4 if short else 10] + [0.0], dtype=torch.float64)
    noise = torch.randn(4, 2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0]) if model.num_classes else None
    samplers.sample(model, noise, class_labels=labels, **kw)  # warm-up: imports, lazy caches
    with count_host_reads() as n:
        res = samplers.sample(model, noise, class_labels=labels, **kw)
    return n[0], res


@pytest.mark.parametrize("name", samplers.available())
@pytest.mark.parametrize("sched, param, classes", [("ddpm", "eps", 0), ("flow", "velocity", 3), ("subvp", "edm", 0)])
def test_sampler_steps_read_nothing(name, sched, param, classes):
    model = ScoreModel(Tiny(classes), schedules.by_name(sched), param)
    n_short, r_short = _run(model, name, True)
    n_long, r_long = _run(model, name, False)
    if name == "adaptive":
        per = (n_long - n_short) / max(r_long.nfe - r_short.nfe, 1)
    else:
        per = (n_long - n_short) / (r_long.grid.numel() - r_short.grid.numel())
    assert per <= ALLOWED_PER_STEP[name], f"{name}: {per} host reads per step"
    assert n_short <= ALLOWED_PER_RUN + ALLOWED_PER_STEP[name] * r_short.nfe
    assert torch.isfinite(r_long.x).all()


OBJECTIVES = [("eps", {}), ("v", {"min_snr_gamma": 5.0}), ("edm", {}), ("flow", {}),
              ("flow", {"t_sampling": "logit_normal"}), ("multiscale", {"scales": (1, 2)})]


@pytest.mark.parametrize("sched", ["ddpm", "cosine", "subvp", "ve", "edm", "flow"])
@pytest.mark.parametrize("obj, kw", OBJECTIVES)
@pytest.mark.parametrize("param", ["eps", "v", "velocity", "edm"])
def test_objective_forward_backward_reads_nothing(sched, obj, kw, param):
    model = ScoreModel(Tiny(num_classes=2), schedules.by_name(sched), param)
    objective = losses.build_objective(obj, **kw)
    x0 = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0])
    g = torch.Generator().manual_seed(0)
    objective(model, x0, labels, generator=g).mean().backward()  # labels enter: checked once
    with count_host_reads() as n:
        loss = objective(model, x0, labels, generator=g).mean()
        loss.backward()
    assert n[0] == 0, f"{n[0]} host reads in one {obj} step ({sched}, {param})"
    assert model.net.w.grad is not None


# ---- the seam: preconditioner, parametrization, prior -------------------------------------------


def test_edm_shorthand_is_the_edm_preconditioner_and_refuses_a_conflicting_conditioning():
    s = schedules.by_name("vp_linear")
    net = Tiny()
    short = ScoreModel(net, s, "edm")
    explicit = ScoreModel(net, s, "x0", preconditioner=EDM(0.5))
    assert short.conditioning == explicit.conditioning == "edm" and short.kind == "x0"
    x, t = torch.randn(3, 2, dtype=torch.float64), torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64)
    assert torch.equal(short(x, t).x0, explicit(x, t).x0)
    # closed form: D = c_skip y + c_out F(c_in y, log(se)/4) in the EDM view y = x/alpha
    a, se = s.alpha(t)[:, None], s.sigma_edm(t)
    c_skip, c_out, c_in, c_noise = (c[:, None] for c in edm_precond(se))
    y = x / a
    expect = c_skip * y + c_out * (0.9 * c_in * y + 1e-3 * c_noise)
    assert torch.allclose(short(x, t).x0, expect, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"parametrization 'edm' fixes conditioning 'edm'.*'t'"):
        ScoreModel(net, s, "edm", conditioning="t")
    with pytest.raises(ValueError, match="conflicts with the preconditioner"):
        ScoreModel(net, s, "x0", conditioning="t", preconditioner=EDM())
    with pytest.raises(ValueError, match="outputs 'x0'"):
        ScoreModel(net, s, "eps", preconditioner=EDM())
    with pytest.raises(ValueError, match="needs a discrete"):
        ScoreModel(net, s, "eps", conditioning="index")


def test_custom_preconditioner_matches_identity_and_edm():
    s = schedules.by_name("cosine")
    x, t = torch.randn(3, 2, dtype=torch.float64), torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64)
    ident = ScoreModel(Tiny(), s, "eps", preconditioner=Identity("logsnr"))
    custom = ScoreModel(Tiny(), s, "eps", preconditioner=Custom(lambda t, a, sg: 2 * (torch.log(a) - torch.log(sg))))
    assert torch.allclose(ident(x, t).eps, custom(x, t).eps, rtol=1e-12)
    sd = 0.5

    def c(t, a, sg):
        return edm_precond(sg / a, sd)

    edm_like = Custom(c_in=lambda t, a, sg: c(t, a, sg)[2] / a, c_noise=lambda t, a, sg: c(t, a, sg)[3],
                      c_skip=lambda t, a, sg: c(t, a, sg)[0] / a, c_out=lambda t, a, sg: c(t, a, sg)[1], output="x0")
    m1, m2 = ScoreModel(Tiny(), s, "x0", preconditioner=edm_like), ScoreModel(Tiny(), s, "edm")
    assert torch.allclose(m1(x, t).x0, m2(x, t).x0, rtol=1e-12)
    assert torch.allclose(m1(x, 0.3).x0, m2(x, 0.3).x0, rtol=1e-12)  # the cached-level path agrees too


def test_float_and_tensor_paths_agree_for_every_parametrization():
    for sched in SCHEDULES:
        s = schedules.by_name(sched)
        for param in PARAMS:
            m = ScoreModel(Tiny(), s, param)
            x = torch.randn(2, 2, dtype=torch.float64)
            a, b = m(x, 0.35), m(x, torch.full((2,), 0.35, dtype=torch.float64))
            for k in ("x0", "eps", "v", "score", "velocity"):
                assert torch.allclose(getattr(a, k), getattr(b, k), rtol=1e-12, atol=1e-12), (sched, param, k)


def test_prior_is_the_end_marginal():
    for sched in SCHEDULES:
        s = schedules.by_name(sched)
        p = s.prior
        assert p.alpha == pytest.approx(float(s.alpha(s.t_max)), abs=1e-15)
        assert p.sigma == pytest.approx(float(s.sigma(s.t_max)))
        assert s.sigma_edm_max == p.sigma_edm
        x = torch.randn(5, 3, dtype=torch.float64)
        ref = torch.distributions.Normal(torch.zeros((), dtype=torch.float64), torch.tensor(p.std(0.25), dtype=torch.float64)).log_prob(x).sum(1)
        assert torch.allclose(p.log_prob(x, data_var=0.25), ref, rtol=1e-12)
    flow = schedules.by_name("flow").prior
    assert math.isinf(flow.sigma_edm) and flow.edm_start(1000.0) == (1000.0, 1000.0)
    assert schedules.by_name("edm").prior.edm_start(1000.0) == (80.0, 1.0)


def test_levels_map_zero_and_infinity_and_subvp_inverse_is_closed_form():
    s = schedules.by_name("flow")
    t, a, sg = s.levels(torch.tensor([math.inf, 1.0, 0.0], dtype=torch.float64))
    assert t.tolist() == [1.0, 0.5, 0.0] and a.tolist() == [0.0, 0.5, 1.0] and sg.tolist() == [1.0, 0.5, 0.0]
    sub = schedules.by_name("subvp")
    tt = torch.linspace(1e-3, 1, 200, dtype=torch.float64)
    assert (sub.t_of_logsnr(sub.logsnr(tt)) - tt).abs().max() < 1e-12
    bisect = schedules.Schedule.t_of_logsnr(sub, sub.logsnr(tt))
    assert (sub.t_of_logsnr(sub.logsnr(tt)) - bisect).abs().max() < 1e-12
