"""Deterministic samplers against closed forms (docs/theory.md §13.6, §13.7, §13.11) and the entry point's contract."""

import math

import pytest
import torch

import samplers
from diffusion import oracle, schedules
from samplers import grids

MU, STD = 0.3, 0.5  # 1-D Gaussian data N(MU, STD^2): the PF-ODE map is known in closed form


def gaussian_model(schedule="vp_linear"):
    sch = schedules.by_name(schedule)
    return oracle.oracle_model(oracle.gaussian([MU], STD), sch)


def exact_map(y0, se0, se1):
    """EDM view, Gaussian data: y - mu scales by sqrt(std^2 + se^2) along the PF-ODE."""
    return MU + (y0 - MU) * math.sqrt(STD**2 + se1**2) / math.sqrt(STD**2 + se0**2)


def solve_to(model, name, grid, eps, y0=None, **opts):
    """Run sampler ``name`` from y0 (default se_0 eps) over ``grid`` and return y at the grid's last level."""
    sch = model.schedule
    alpha = lambda se: float(sch.alpha(sch.t_of_sigma_edm(se)))  # noqa: E731
    x = (eps * grid[0].item() if y0 is None else y0) * alpha(grid[0].item())
    out = samplers.get(name)(model, x, grid, **opts)
    return out if grid[-1] == 0 else out / alpha(grid[-1].item())


@pytest.mark.parametrize("name, order, lo, hi", [
    ("euler", 1, 1.8, 2.2), ("ddim", 1, 1.8, 2.2), ("heun", 2, 3.4, 4.8), ("dpmpp_2m", 2, 3.4, 4.8),
    ("mvt", 2, 3.4, 4.8),
])
def test_convergence_order_on_gaussian(name, order, lo, hi):
    model = gaussian_model()
    eps = torch.randn(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    se0, se1 = 20.0, 0.05
    ref = exact_map(eps * se0, se0, se1)
    errs = []
    for n in (16, 32, 64):
        g = grids.uniform_logsnr(n, se1, se0)[:-1]  # stop at se1 > 0: pure ODE error, no readout
        errs.append((solve_to(model, name, g, eps) - ref).abs().max().item())
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    # error ~ h^order: doubling the steps divides it by ~2^order
    assert all(lo < r < hi for r in ratios), (name, errs, ratios)


@pytest.mark.parametrize("name, opts", [("euler", {}), ("ddim", {"eta": 0.0}), ("mvt", {"r": 0.0}),
                                        ("mvt", {"r": 0.3}), ("mvt", {"r": 0.5}), ("mvt", {"r": 0.9})])
def test_point_mass_exact_in_one_step(name, opts):
    star = torch.tensor([0.7, -1.2], dtype=torch.float64)
    model = oracle.oracle_model(oracle.point_mass(star), schedules.by_name("ddpm"))
    eps = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for se0, se1 in ((50.0, 0.0), (50.0, 0.3), (2.0, 1.0)):
        # start on the exact trajectory y = x* + se0 eps, which the PF-ODE keeps as x* + se eps
        out = solve_to(model, name, torch.tensor([se0, se1], dtype=torch.float64), eps, star + se0 * eps, **opts)
        assert torch.allclose(out, star + se1 * eps, atol=1e-9), (name, opts, se0, se1)


def test_flow_euler_point_mass_and_edm_view_consistency():
    flow = schedules.by_name("flow")
    star = torch.tensor([0.5, -0.25], dtype=torch.float64)
    model = oracle.oracle_model(oracle.point_mass(star), flow)
    eps = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # one step from t=1 (se=inf, x = eps) to t: exactly (1-t) x* + t eps
    for t in (0.0, 0.4):
        se = t / (1 - t)
        out = samplers.get("flow_euler")(model, eps, torch.tensor([math.inf, se], dtype=torch.float64))
        assert torch.allclose(out, (1 - t) * star + t * eps, atol=1e-9)
    # on a mixture: flow_euler == deterministic DDIM (both in t, from t=1) and == Euler in the EDM
    # view up to the SE_CAP start (O(1/SE_CAP))
    ring = oracle.oracle_model(oracle.ring2d(), flow)
    g = grids.uniform_t(flow, 8)
    fe = samplers.sample(ring, eps, sampler="flow_euler", grid=g)
    dd = samplers.sample(ring, eps, sampler="ddim", grid=g)
    eu = samplers.sample(ring, eps, sampler="euler", grid=g)
    assert torch.allclose(fe.x, dd.x, atol=1e-12)
    assert (fe.x - eu.x).abs().max() < 5 / grids.SE_CAP
    assert fe.nfe == dd.nfe == eu.nfe == 8


def test_ddim_eta0_equals_euler_in_edm_view():
    model = oracle.oracle_model(oracle.ring2d(), schedules.by_name("ddpm"))
    eps = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for g in (grids.uniform_t(model.schedule, 7), grids.karras(6, 0.01, 100.0)):
        a = samplers.sample(model, eps, sampler="ddim", grid=g, eta=0.0).x
        b = samplers.sample(model, eps, sampler="euler", grid=g).x
        assert torch.allclose(a, b, atol=1e-10)


def test_mvt_special_cases_and_ipndm_order1():
    model = oracle.oracle_model(oracle.ring2d(), schedules.by_name("ddpm"))
    eps = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    g = grids.polynomial(6, 0.02, 150.0, p=1.5)
    euler = samplers.sample(model, eps, sampler="euler", grid=g).x
    assert torch.allclose(samplers.sample(model, eps, sampler="mvt", grid=g, r=0.0).x, euler, atol=1e-10)
    assert torch.allclose(samplers.sample(model, eps, sampler="ipndm", grid=g, order=1).x, euler, atol=1e-10)
    # r=1/2, c=a=1: the geometric midpoint (DPM-Solver-2), written out by hand on a grid ending above 0
    gn = g[:-1]
    y = eps * gn[0].item()
    for se, sn in zip(gn[:-1].tolist(), gn[1:].tolist()):
        mid = math.sqrt(se * sn)
        y_mid = y + (mid - se) * (y - model.denoise(y, se)) / se
        y = y + (sn - se) * (y_mid - model.denoise(y_mid, mid)) / mid
    assert torch.allclose(solve_to(model, "mvt", gn, eps), y, atol=1e-10)


NFE_CASES = [
    ("euler", {}, 7, 7), ("euler", {"afs": True}, 7, 8), ("heun", {}, 9, 5), ("dpmpp_2m", {}, 6, 6),
    ("dpmpp_2m", {"afs": True}, 5, 6), ("ipndm", {}, 5, 5), ("ipndm", {"afs": True}, 5, 6),
    ("mvt", {}, 8, 4), ("mvt", {"afs": True}, 7, 4), ("ddim", {"eta": 1.0}, 6, 6),
    ("euler_maruyama", {}, 6, 6), ("flow_euler", {}, 6, 6), ("pc", {"corrector_steps": 2}, 10, 4),
]


@pytest.mark.parametrize("name, opts, nfe, steps", NFE_CASES)
def test_nfe_counts_exact(name, opts, nfe, steps):
    model = oracle.oracle_model(oracle.ring2d(), schedules.by_name("ddpm"))
    eps = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    res = samplers.sample(model, eps, sampler=name, nfe=nfe, generator=torch.Generator().manual_seed(0), **opts)
    assert res.nfe == nfe and res.grid.numel() == steps + 1 and res.grid[-1] == 0 and res.sampler == name
    assert samplers.nfe_of(name, steps, **opts) == nfe


def test_adaptive_reports_counted_nfe_and_is_accurate():
    model = gaussian_model("vp_linear")
    eps = torch.randn(16, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    top = model.schedule.sigma_edm_max
    g = torch.tensor([top, 1.0, 1e-3], dtype=torch.float64)
    model.reset_nfe()
    out = solve_to(model, "adaptive", g, eps, rtol=1e-9, atol=1e-9)
    used = model.nfe
    assert torch.allclose(out, exact_map(eps * top, top, 1e-3), atol=1e-6)
    res = samplers.sample(model, eps, sampler="adaptive", grid=torch.tensor([top, 1e-3, 0.0], dtype=torch.float64))
    assert res.nfe > 6 and used > 6  # dopri5: 6 evaluations per step at least, all counted
    with pytest.raises(ValueError, match="adaptive"):
        samplers.sample(model, eps, sampler="adaptive", nfe=10)
    # no budget and no grid: the schedule's whole range, then the x0 readout
    full = samplers.sample(model, eps, sampler="adaptive")
    s = model.schedule
    assert full.grid.tolist() == [s.sigma_edm_max, s.sigma_edm_min, 0.0]
    assert torch.allclose(full.x, exact_map(eps * top, top, 0.0), atol=1e-3)


@pytest.mark.parametrize("nfe", [4, 5, 6, 8, 10, 15, 20])
def test_default_hits_every_budget(nfe):
    model = oracle.oracle_model(oracle.ring2d(), schedules.by_name("ddpm"))
    eps = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    res = samplers.sample(model, eps, nfe=nfe)
    assert res.nfe == nfe and res.sampler == samplers.defaults.SAMPLER and res.grid[-1] == 0


def test_start_convention_and_flow_start():
    ddpm = schedules.by_name("ddpm")
    seen = []
    model = oracle.oracle_model(oracle.ring2d(), ddpm)
    eps = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    samplers.sample(model, eps, sampler="euler", nfe=3, callback=seen.append)
    # VP: x_T = sigma(1) eps, i.e. y_T = se_max eps; the first callback sees the first step from there
    top = ddpm.sigma_edm_max
    first = seen[0]
    assert first["i"] == 0 and first["se"] == pytest.approx(top)
    d = (eps * top - first["x0_hat"]) / top
    assert torch.allclose(first["y"], eps * top + (first["se_next"] - top) * d, atol=1e-10)
    assert [s["i"] for s in seen] == [0, 1, 2] and seen[-1]["se_next"] == 0
    assert torch.allclose(seen[-1]["y"], seen[-1]["x0_hat"])


def test_callback_and_progress():
    model = oracle.oracle_model(oracle.ring2d(), schedules.by_name("ddpm"))
    eps = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    for name in samplers.available():
        seen = []
        grid = torch.tensor([80.0, 1.0, 0.05, 0.0], dtype=torch.float64)
        samplers.sample(model, eps, sampler=name, grid=grid, callback=seen.append, progress=True,
                        generator=torch.Generator().manual_seed(0))
        assert [s["i"] for s in seen] == [0, 1, 2], name
        assert all(set(s) == {"i", "se", "se_next", "y", "x0_hat"} for s in seen), name


# ---- bad input -------------------------------------------------------------------------------


def test_bad_input_errors():
    model = oracle.oracle_model(oracle.ring2d(), schedules.by_name("ddpm"))
    eps = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"unknown sampler 'eulr'.*\['adaptive', 'ddim'"):
        samplers.sample(model, eps, sampler="eulr", nfe=4)
    with pytest.raises(ValueError, match=r"'heun' cannot use exactly 10 NFE \(it needs 2n-1.*nearest valid budgets: \[9, 11\]"):
        samplers.sample(model, eps, sampler="heun", nfe=10)
    with pytest.raises(ValueError, match=r"'mvt' cannot use exactly 7 NFE.*\[6, 8\]"):
        samplers.steps_for_nfe("mvt", 7)
    with pytest.raises(ValueError, match=r"'mvt' with \{'afs': True\} cannot use exactly 6 NFE.*\[5, 7\]"):
        samplers.steps_for_nfe("mvt", 6, afs=True)
    with pytest.raises(ValueError, match=r"no option\(s\) \['rho'\]; valid options: .*'s_churn'"):
        samplers.sample(model, eps, sampler="heun", nfe=9, rho=7)
    with pytest.raises(ValueError, match="give an NFE budget"):
        samplers.sample(model, eps, sampler="euler")
    with pytest.raises(ValueError, match="cost 3 NFE with 'euler', not the nfe=4"):
        samplers.sample(model, eps, sampler="euler", nfe=4, grid=torch.tensor([10.0, 1.0, 0.1, 0.0]))
    with pytest.raises(ValueError, match="above the schedule's maximum"):
        samplers.sample(model, eps, sampler="euler", grid=torch.tensor([500.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="ending at se=0"):
        samplers.sample(model, eps, sampler="euler", grid=torch.tensor([50.0, 1.0]))
    with pytest.raises(ValueError, match="ipndm order must be one of"):
        samplers.sample(model, eps, sampler="ipndm", nfe=4, order=5)


class _NaNBelow(torch.nn.Module):
    """x0-net that returns NaN once the noise level drops below 1 (t small)."""

    num_classes = 0

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def forward(self, x, t, class_labels=None):
        se = self.schedule.sigma_edm(t)
        return torch.where((se < 1.0).reshape(-1, 1), torch.full_like(x, float("nan")), torch.zeros_like(x))


@pytest.mark.parametrize("name, step", [("euler", 2), ("heun", 1), ("ddim", 2), ("mvt", 2), ("dpmpp_2m", 2),
                                        ("ipndm", 2), ("euler_maruyama", 2)])
def test_non_finite_error_names_step_and_sigma(name, step):
    from diffusion.score_model import ScoreModel

    sch = schedules.by_name("ddpm")
    model = ScoreModel(_NaNBelow(sch), sch, parametrization="x0")
    grid = torch.tensor([50.0, 5.0, 0.5, 0.05, 0.0], dtype=torch.float64)
    where = {1: r"step 1 \(se 5 -> 0\.5\)", 2: r"step 2 \(se 0\.5 -> 0\.05\)"}[step]  # heun evaluates at the step's end
    with pytest.raises(samplers.NonFiniteError, match=r"6 non-finite values \(in 3 of 3 samples\) at " + where):
        samplers.sample(model, torch.randn(3, 2, dtype=torch.float64), sampler=name, grid=grid)
