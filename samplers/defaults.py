"""The default sampler and grid, used by ``samplers.sample(model, noise, nfe=N)`` when no sampler is named.

The rule (chosen on the tuning half of benchmarks/sampler_suite.py; reported on the other half in
benchmarks/results/sampler_suite.md): iPNDM of order 3 with the analytical first step (AFS) for
every schedule and data shape; the grid depends on the step count n (= NFE + 1 with AFS):

* n < HIGH_STEPS (NFE <= 15): ``polynomial`` log-sigma grid, p = 0.7, from the schedule's top
  (SE_CAP = 1000 on flow) to se_last = 0.025 (10/n);
* n >= HIGH_STEPS (NFE >= 16): ``flow_uniform`` grid (flow sigma se/(1+se) uniform, shift 1,
  from the schedule's top) to se_last = 0.02 (10/n).

Samplers named by the user whose registry grid is "default" (euler, heun, dpmpp_2m/3m, unipc, ipndm,
mvt) get the polynomial grid with the shrinking se_last at every n: on ring2d at NFE 20 the
flow_uniform grid made unipc 7x, dpmpp_2m 6x and dpmpp_3m 40x worse (large first step in lam).

se_last shrinks like 1/n so that the final readout, whose error grows like se_last^2, keeps falling
with the budget: the old fixed se_last = 0.025 stalled at ~3e-3 RMSE past NFE 20 (issue 13) and was
2-3.5x worse than the best diffusers configuration at NFE 50 on every tuning case.

Tuning half (ring2d, mixture64d, 128d-diag-2dec on ddpm and flow; 200-400 samples; RMSE ratio to the
best of 26 diffusers VP / 12 flow configurations at the same NFE, seed 0; sampler_suite_tune.json):

    grid / se_last rule                NFE 5 worst  NFE 10 worst  NFE 20 worst  NFE 50 worst  monotone 5..100
    polynomial p=0.7, fixed 0.025      0.93         1.12          3.09          3.51          0 of 6
    polynomial p=0.7, 0.025 (10/n)     0.79         1.11          3.11          0.99          6 of 6
    polynomial p=0.7, 0.025 (10/n)^1.5 0.80         1.11          3.53          1.25          6 of 6
    flow_uniform, 0.02 (10/n)          (ring2d/flow 0.80)  (0.86)   0.25          0.56          -

The NFE-20 misses of every log-sigma grid come from 128d-diag-2dec (per-axis widths 0.01-1): its
modes separate at se ~ 0.3-3, where a log-sigma grid from se_max puts few nodes; at NFE 20 the
flow_uniform grid cut its error 10x (4.7e-2 -> 2.8e-3 on ddpm, 3.3e-2 -> 2.7e-3 on flow) and also won
on ring2d (3.7e-3 vs 4.5e-3) and mixture64d (1.7e-3 vs 2.1e-3) on flow. At NFE 5-10 it lost on the
ring (0.8-1.5x the best peer) where the polynomial grid wins (0.3x), hence the switch. Candidates
that lost everywhere: unipc (orders 2, 3) and dpmpp_3m on these grids (unipc on flow_uniform is
unstable at the large first step from SE_CAP), p = 1.0 and 1.5, karras rho 3 and 7. The switch
point NFE 16 lies between the measured budgets 10 and 20.

Reporting half (benchmarks/results/sampler_suite.md, 8 other cases x 5 schedules): the rule misses
every issue-13 target. Median ratio to the best peer 0.89 / 0.98 / 0.69 / 0.71 at NFE 5 / 10 / 20 / 50,
worst 2.9 / 5.6 / 28 / 62, error monotone on 27 of 40 pairs. It loses on sharp modes (widths 0.01-0.05),
where se_last stays above the data's width, and the NFE-16 switch hurt 256d-sharp. A rule that also
adapts se_last to the data's smallest scale is the next step; it was not measured here.
"""

from __future__ import annotations

SAMPLER = "ipndm"
OPTIONS: dict = {"afs": True, "order": 3}
#: low-budget grid; ``se_last`` is its value at SE_LAST_STEPS steps
GRID: dict = {"kind": "polynomial", "p": 0.7, "se_last": 0.025}
#: grid from HIGH_STEPS steps on
GRID_HIGH: dict = {"kind": "flow_uniform", "shift": 1.0, "se_last": 0.02}
HIGH_STEPS = 17
SE_LAST_STEPS = 10


def grid_params(n: int, high: bool = True) -> tuple[str, dict]:
    """(grid kind, parameters) of the default grid for ``n`` steps, se_last scaled as se_last (10/n).

    ``high=False`` (a sampler named by the user) keeps GRID at every n: the switch to GRID_HIGH was
    measured for the default solver only, and the lam-multistep solvers lose 5-60x on it (ring2d, NFE 20).
    """
    base = GRID_HIGH if high and n >= HIGH_STEPS else GRID
    params = {k: v for k, v in base.items() if k != "kind"}
    params["se_last"] = base["se_last"] * SE_LAST_STEPS / max(n, 1)
    return base["kind"], params


def describe() -> str:
    """One line stating the rule."""
    return (f"{SAMPLER} {OPTIONS}; n < {HIGH_STEPS} steps: {GRID['kind']} p={GRID['p']} se_last={GRID['se_last']}*10/n; "
            f"n >= {HIGH_STEPS}: {GRID_HIGH['kind']} shift={GRID_HIGH['shift']} se_last={GRID_HIGH['se_last']}*10/n")
