"""The default sampler and grid, used by ``samplers.sample(model, noise, nfe=N)`` when no sampler is named.

The rule (chosen on the tuning half of benchmarks/sampler_suite.py; reported on the other half in
benchmarks/results/sampler_suite.md): iPNDM of order 3 with the analytical first step (AFS) for
every schedule and data shape, on the ``polynomial`` log-sigma grid (p = 0.7) from the schedule's top
(SE_CAP = 1000 on flow) to se_last = 0.025 (10/n) for n steps (n = NFE + 1).

se_last shrinks like 1/n so that the final readout, whose error grows like se_last^2, keeps falling
with the budget: the old fixed se_last = 0.025 stalled at ~3e-3 RMSE past NFE 20 (issue 13), was never
monotone NFE 5..100 (0 of 20 tuning pairs) and reached 24x the best diffusers configuration at NFE 50.

Final check on the tuning half (2d-overlap-unequal, 8d-sep, mixture64d, 128d-diag-2dec, 512d-overlap on
ddpm, cosine, edm, flow: 20 pairs; results/sampler_suite_tune_final.json; ratio to the best peer):

    rule                                   worst@5  worst@10  worst@20  worst@50  median@5  median@10  monotone
    polynomial, fixed se_last 0.025 (old)  0.99     4.15      3.09      24.1      0.53      0.38       0 of 20
    polynomial, se_last 0.025 (10/n)       0.79     4.11      3.11      19.1      0.40      0.38       17 of 20  <- chosen
    flow_uniform, se_last 0.02 (10/n)      1.51     4.09      32.8      25.6      0.60      0.59       20 of 20
    polynomial below NFE 16, flow_uniform
      from NFE 16 (the first choice)       0.79     4.11      32.8      25.6      0.40      0.38       12 of 20

The first search (results/sampler_suite_tune_search.json: ring2d, mixture64d, 128d-diag-2dec on ddpm and
flow; ipndm3, unipc2/3, dpmpp_3m x p 0.7/1.0 x se_last exponent 0/1/1.5/2) picked ipndm3 + p=0.7 + 1/n
and suggested flow_uniform from NFE 16 (it cut 128d-diag-2dec's NFE-20 error 10x); the wider final check
above showed that switch losing up to 33x on 8d-sep and mixture64d, so it is off (GRID_HIGH is kept,
HIGH_STEPS = None). Every rule misses the worst-case targets on the tuning half already.

Reporting half: see benchmarks/results/sampler_suite.md (the README quotes its summary). Samplers named by
the user get the same polynomial grid with the shrinking se_last; unipc, dpmpp_2m and dpmpp_3m were 6-40x
worse on flow_uniform (large first step in lam; ring2d, NFE 20).
"""

from __future__ import annotations

SAMPLER = "ipndm"
OPTIONS: dict = {"afs": True, "order": 3}
#: low-budget grid; ``se_last`` is its value at SE_LAST_STEPS steps
GRID: dict = {"kind": "polynomial", "p": 0.7, "se_last": 0.025}
#: grid from HIGH_STEPS steps on
GRID_HIGH: dict = {"kind": "flow_uniform", "shift": 1.0, "se_last": 0.02}
#: from this many steps the default configuration would switch to GRID_HIGH; None: never (see above)
HIGH_STEPS = None
SE_LAST_STEPS = 10


def grid_params(n: int, high: bool = True) -> tuple[str, dict]:
    """(grid kind, parameters) of the default grid for ``n`` steps, se_last scaled as se_last (10/n).

    ``high=False`` (a sampler named by the user) keeps GRID at every n: the switch to GRID_HIGH was
    measured for the default solver only, and the lam-multistep solvers lose 5-60x on it (ring2d, NFE 20).
    """
    base = GRID_HIGH if high and HIGH_STEPS is not None and n >= HIGH_STEPS else GRID
    params = {k: v for k, v in base.items() if k != "kind"}
    params["se_last"] = base["se_last"] * SE_LAST_STEPS / max(n, 1)
    return base["kind"], params


def describe() -> str:
    """One line stating the rule."""
    if HIGH_STEPS is None:
        return f"{SAMPLER} {OPTIONS}; {GRID['kind']} p={GRID['p']} se_last={GRID['se_last']}*10/n for n steps"
    return (f"{SAMPLER} {OPTIONS}; n < {HIGH_STEPS} steps: {GRID['kind']} p={GRID['p']} se_last={GRID['se_last']}*10/n; "
            f"n >= {HIGH_STEPS}: {GRID_HIGH['kind']} shift={GRID_HIGH['shift']} se_last={GRID_HIGH['se_last']}*10/n")
