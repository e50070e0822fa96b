#!/usr/bin/env python
"""Sampler suite: the default sampler vs every applicable diffusers scheduler, 16 exact-oracle cases x 5 schedules.

Cases (``CASES``): Gaussian mixtures from diffusion/oracle.py, 2-D to 1024-D, mode widths 0.01-1 (two
decades), well- and poorly-separated modes, unequal weights, isotropic / axis-aligned / rotated
anisotropic covariances. They alternate between a **tuning half** (``half="tune"``; the default rule
in samplers/defaults.py was chosen on these only, with ``--tune``) and a **reporting half**
(``half="report"``; the targets below are checked on these only). Schedules: ddpm, cosine, edm,
flow and flow shifted by 3 (SD3). In the EDM view the PF-ODE ``dy/dse = (y - D)/se`` is the same for
every schedule; a schedule fixes where sampling starts (se_max: 157, 1808, 80, inf), what "uniform
in t" means, and which diffusers configurations apply:

* VP (ddpm; cosine via ``trained_betas`` of our cosine at 1000 steps): DDIM trailing, Euler / Heun /
  DPM++2M / DPM++3M / UniPC (bh1, bh2) / DEIS with default, Karras, exponential and beta sigmas;
* EDM: EDMEuler, EDM DPM++2M / 3M (rho 7);
* flow (both flow schedules): FlowMatchEuler and FlowMatchHeun with shift 1 and 3, DPM++2M/3M,
  UniPC and DEIS with ``use_flow_sigmas`` and flow_shift 1 and 3.

Each peer gets the exact denoiser at the noise level it believes it is at, in the form it expects
(epsilon, EDM preconditioned output or flow velocity). Error = RMSE per dimension against a dopri5
solve (float64, rtol=atol=1e-10, max norm) of the PF-ODE from each method's *own* start state;
references are cached per start. k-diffusion is not installed here (optional extra): not run.
Samples per case: 150-400 on the tuning half, 40-120 on the reporting half (so that the report
run fits ~10 min of two CPU threads: ``--cases`` subsets run in parallel with ``--part``, then ``--merge``).

Targets (issue 13, reporting half, the default given only an NFE budget, vs the best peer at the
same NFE): worst case over (case, schedule) <= 0.8x at NFE 5, 10, 20 and <= 1.0x at NFE 50; median
<= 0.6x at NFE 5 and 10; RMSE strictly decreasing NFE 5 -> 100 on every (case, schedule).

    python benchmarks/sampler_suite.py            # report run, writes results/sampler_suite.{md,json,png}
    python benchmarks/sampler_suite.py --tune     # the final rule vs its parts on the tuning half (results/sampler_suite_tune_final.json)
    python benchmarks/sampler_suite.py --tune --candidates search --cases ring2d,mixture64d,128d-diag-2dec --schedules ddpm,flow
                                                  # the first search (results/sampler_suite_tune_search.json)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]  # don't let this folder shadow `samplers`
sys.path.insert(0, str(_HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchdiffeq import odeint  # noqa: E402

import samplers  # noqa: E402
from benchmarks.common import (RESULTS_DIR, Series, Target, Timer, environment, loglog_plot, markdown_table,  # noqa: E402
                               write_json, write_markdown)
from diffusion import oracle as oracle_lib  # noqa: E402
from diffusion import schedules as sched_lib  # noqa: E402

NAME = "sampler_suite"
NFES = (5, 10, 20, 50, 100)
PEER_NFES = (5, 10, 20, 50)  # the budgets the targets compare at
EVAL_SEED = 0
REF_TOL = 1e-10
SE_INF_PROXY = 1e10  # a start at se=inf (flow, t=1) is solved from here: O(1/se) = 1e-10 away


# ---- cases ----------------------------------------------------------------------------------------

def _mixture(dim: int, k: int, seed: int, mean_norm: float, std: tuple[float, float], weights: str = "equal",
             cov: str = "iso") -> oracle_lib.GaussianMixture:
    """k random modes (mean norm ~ mean_norm), per-mode std in ``std`` (log-uniform), cov iso | diag | rotated."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, dim, generator=g, dtype=torch.float64)
    means = means / means.norm(dim=1, keepdim=True) * mean_norm
    lo, hi = math.log(std[0]), math.log(std[1])
    if cov == "iso":
        var = torch.exp(2 * torch.empty(k, dtype=torch.float64).uniform_(lo, hi, generator=g))
        covs = var
    else:
        var = torch.exp(2 * torch.empty(k, dim, dtype=torch.float64).uniform_(lo, hi, generator=g))
        covs = var
        if cov == "rotated":
            q, _ = torch.linalg.qr(torch.randn(k, dim, dim, generator=g, dtype=torch.float64))
            covs = q @ torch.diag_embed(var) @ q.transpose(1, 2)
    w = None if weights == "equal" else torch.exp(torch.empty(k, dtype=torch.float64).uniform_(0, math.log(10), generator=g))
    return oracle_lib.GaussianMixture(means, covs, w)


@dataclass
class Case:
    """One oracle problem: how to build the mixture, how many samples, and its half."""

    name: str
    make: Callable[[], oracle_lib.GaussianMixture]
    n: int
    half: str  # "tune" or "report"
    note: str


CASES: list[Case] = [
    Case("ring2d", oracle_lib.ring2d, 400, "tune", "8 modes on a circle, std 0.08"),
    Case("ring2d-sharp", lambda: oracle_lib.ring2d(std=0.01), 120, "report", "8 modes, std 0.01"),
    Case("2d-overlap-unequal", lambda: _mixture(2, 2, 1, 0.3, (0.25, 0.25), "unequal"), 400, "tune",
         "2 poorly separated modes, weights up to 10:1"),
    Case("2d-aniso-rot", lambda: _mixture(2, 3, 2, 1.0, (0.02, 0.3), "unequal", "rotated"), 120, "report",
         "3 rotated elongated modes"),
    Case("8d-sep", lambda: _mixture(8, 4, 3, 2.0, (0.03, 0.06), "unequal"), 300, "tune", "4 well separated narrow modes"),
    Case("8d-overlap", lambda: _mixture(8, 6, 4, 0.5, (0.4, 0.6)), 100, "report", "6 overlapping wide modes"),
    Case("16d-aniso-rot", lambda: _mixture(16, 5, 5, 1.5, (0.01, 0.3), "equal", "rotated"), 300, "tune",
         "5 rotated modes, axes 0.01-0.3"),
    Case("32d-mix", lambda: oracle_lib.mixture64d(dim=32, seed=6), 64, "report", "mixture64d recipe at 32-D"),
    Case("mixture64d", oracle_lib.mixture64d, 200, "tune", "10 rotated modes, eigenvalues 0.003-0.05"),
    Case("64d-wide-unequal", lambda: _mixture(64, 5, 7, 1.0, (0.3, 1.0), "unequal"), 64, "report",
         "5 wide modes (std up to 1), unequal weights"),
    Case("128d-diag-2dec", lambda: _mixture(128, 4, 8, 2.0, (0.01, 1.0), "equal", "diag"), 200, "tune",
         "4 modes, per-axis std 0.01-1 (two decades)"),
    Case("256d-sharp", lambda: _mixture(256, 8, 9, 2.0, (0.02, 0.05), "unequal", "diag"), 40, "report",
         "8 narrow modes, unequal weights"),
    Case("512d-overlap", lambda: _mixture(512, 3, 10, 0.5, (0.3, 0.5), "equal", "diag"), 150, "tune",
         "3 overlapping modes"),
    Case("1024d-aniso", lambda: _mixture(1024, 4, 11, 3.0, (0.01, 1.0), "unequal", "diag"), 40, "report",
         "4 modes, per-axis std 0.01-1, unequal weights"),
    Case("1024d-many", lambda: _mixture(1024, 10, 12, 2.0, (0.05, 0.1), "unequal", "diag"), 150, "tune",
         "10 modes, unequal weights"),
    Case("2048d-two", lambda: _mixture(2048, 2, 13, 1.0, (0.02, 0.2), "unequal", "diag"), 40, "report",
         "2 modes, per-axis std 0.02-0.2"),
]


def schedule(name: str) -> sched_lib.Schedule:
    """The suite's schedules: ddpm, cosine, edm, flow and flow_sd3 (flow shifted by 3, SD3)."""
    if name == "flow_sd3":
        return sched_lib.Shifted(sched_lib.Flow(), -2 * math.log(3.0))
    return sched_lib.by_name(name)


SCHEDULES = ("ddpm", "cosine", "edm", "flow", "flow_sd3")


# ---- peers --------------------------------------------------------------------------------------

@dataclass
class Peer:
    """One diffusers configuration: class, constructor kwargs and how it wants the model output."""

    label: str
    cls: str
    kind: str  # "vp" (epsilon on a beta table), "edm" (EDM preconditioned), "flow" (flow velocity)
    kwargs: dict = field(default_factory=dict)
    heun: bool = False  # 2n - 1 calls for n steps

    def steps(self, nfe: int) -> int:
        """Steps that fit an NFE budget (Heun: the largest n with 2n - 1 <= nfe)."""
        return (nfe + 1) // 2 if self.heun else nfe


def peers(sched_name: str) -> list[Peer]:
    """Every diffusers configuration that applies to the schedule's family."""
    fam = schedule(sched_name).family
    if fam == "vp":
        out = [Peer("DDIM trailing", "DDIMScheduler", "vp", dict(clip_sample=False, timestep_spacing="trailing",
                                                                 set_alpha_to_one=True))]
        sig = {"": {}, " karras": dict(use_karras_sigmas=True), " exp": dict(use_exponential_sigmas=True),
               " beta": dict(use_beta_sigmas=True)}
        for label, cls, kw, heun in [
            ("Euler", "EulerDiscreteScheduler", {}, False), ("Heun", "HeunDiscreteScheduler", {}, True),
            ("DPM++2M", "DPMSolverMultistepScheduler", dict(solver_order=2), False),
            ("DPM++3M", "DPMSolverMultistepScheduler", dict(solver_order=3), False),
            ("UniPC bh2", "UniPCMultistepScheduler", dict(solver_type="bh2"), False),
            ("UniPC bh1", "UniPCMultistepScheduler", dict(solver_type="bh1"), False),
            ("DEIS", "DEISMultistepScheduler", {}, False)]:
            for suffix, skw in sig.items():
                if heun and suffix in (" exp", " beta"):
                    continue
                out.append(Peer(label + suffix, cls, "vp", {**kw, **skw}, heun))
        return out
    if fam == "ve":
        return [Peer("EDM Euler", "EDMEulerScheduler", "edm"),
                Peer("EDM DPM++2M", "EDMDPMSolverMultistepScheduler", "edm", dict(solver_order=2)),
                Peer("EDM DPM++3M", "EDMDPMSolverMultistepScheduler", "edm", dict(solver_order=3))]
    out = []
    for shift in (1.0, 3.0):
        s = f" shift {shift:g}"
        out += [Peer("FlowMatchEuler" + s, "FlowMatchEulerDiscreteScheduler", "flow", dict(shift=shift)),
                Peer("FlowMatchHeun" + s, "FlowMatchHeunDiscreteScheduler", "flow", dict(shift=shift), True)]
        fk = dict(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
        out += [Peer("DPM++2M flow" + s, "DPMSolverMultistepScheduler", "flow", {**fk, "solver_order": 2}),
                Peer("DPM++3M flow" + s, "DPMSolverMultistepScheduler", "flow", {**fk, "solver_order": 3}),
                Peer("UniPC flow" + s, "UniPCMultistepScheduler", "flow", fk),
                Peer("DEIS flow" + s, "DEISMultistepScheduler", "flow", fk)]
    return out


def run_peer(peer: Peer, sched_name: str, mix: oracle_lib.GaussianMixture, eps: torch.Tensor,
             nfe: int) -> tuple[torch.Tensor, float, torch.Tensor, int]:
    """(final samples, start se, start y, calls): a diffusers scheduler driven by the exact denoiser."""
    import diffusers

    cls = getattr(diffusers, peer.cls)
    if peer.kind == "vp":
        sch = schedule(sched_name)
        kw = dict(num_train_timesteps=1000, prediction_type="epsilon")
        # cosine: diffusers' own cosine table (squaredcos_cap_v2), what its users run on a cosine model;
        # our cosine's betas reach ~1 at t=1, where diffusers' Karras/exponential/beta tables break
        kw.update(dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear") if sched_name == "ddpm"
                  else dict(beta_schedule="squaredcos_cap_v2"))
        del sch
        s = cls(**kw, **peer.kwargs)
    elif peer.kind == "edm":
        s = cls(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, **peer.kwargs)
    else:
        s = cls(num_train_timesteps=1000, **peer.kwargs)
    s.set_timesteps(peer.steps(nfe))
    x = eps * float(getattr(s, "init_noise_sigma", 1.0))
    start, calls = None, 0
    is_ddim = isinstance(s, diffusers.DDIMScheduler)
    for i, t in enumerate(s.timesteps):
        if peer.kind == "flow":
            if s.step_index is None:
                s._init_step_index(t)
            sg = float(s.sigmas[s.step_index])
            a = 1.0 - sg
            x0 = mix.x0_hat(x, a, sg)
            se = math.inf if a == 0 else sg / a
            y = x if a == 0 else x / a
            out = (x - a * x0) / sg - x0  # velocity eps - x0
        elif peer.kind == "edm":
            m = s.scale_model_input(x, t)  # initialises the step index
            se = float(s.sigmas[s.step_index])
            y = x
            x0 = mix.x0_hat(y, 1.0, se)
            c_skip = 0.25 / (se * se + 0.25)
            c_out = se * 0.5 / math.sqrt(se * se + 0.25)
            out = (x0 - c_skip * y) / c_out
            del m
        else:
            m = s.scale_model_input(x, t)
            if is_ddim:
                acp = float(s.alphas_cumprod[int(t)])
                se = math.sqrt((1 - acp) / acp)
            else:
                se = float(s.sigmas[s.step_index if s.step_index is not None else i])
            y = m.double() * math.sqrt(1 + se * se)
            out = -se * mix.score(y, 1.0, se)  # the exact epsilon at (x_t, se)
        if start is None:
            start = (se, y.clone())
        calls += 1
        x = s.step(out, t, x).prev_sample
    return x.double(), start[0], start[1], calls


# ---- ours -----------------------------------------------------------------------------------------

def run_ours(model, eps: torch.Tensor, nfe: int, cfg: Optional[dict]) -> tuple[torch.Tensor, float, torch.Tensor, int]:
    """(samples, start se, start y, calls) of samplers.sample; cfg None is the default rule."""
    cfg = dict(cfg or {})
    if "se_last_rule" in cfg:  # tuning: se_last = a (10/n)^q for n steps
        a, q = cfg.pop("se_last_rule")
        n = samplers.steps_for_nfe(cfg["sampler"], nfe, **{k: v for k, v in cfg.items() if k not in ("sampler", "grid", "grid_opts")})
        cfg["grid_opts"] = {**cfg.get("grid_opts", {}), "se_last": a * (10 / n) ** q}
    res = samplers.sample(model, eps, nfe=nfe, sampler=cfg.pop("sampler", None), grid=cfg.pop("grid", None),
                          grid_opts=cfg.pop("grid_opts", None), **cfg)
    se0 = float(res.grid[0])
    return res.x.double(), se0, eps if math.isinf(se0) else eps * se0, res.nfe


# ---- reference --------------------------------------------------------------------------------------

class References:
    """dopri5 solutions of the PF-ODE from each distinct start (se0, y0), cached for the run."""

    def __init__(self, mix: oracle_lib.GaussianMixture):
        self.mix, self.cache, self.calls = mix, {}, 0

    def get(self, se0: float, y0: torch.Tensor) -> torch.Tensor:
        """Samples at se=0 from y0 at se0 (se0=inf: y0 is the unit noise, solved from SE_INF_PROXY)."""
        key = (se0, hashlib.sha1(y0.double().contiguous().numpy().tobytes()).hexdigest())
        if key not in self.cache:
            self.cache[key] = self._solve(se0, y0.double())
        return self.cache[key]

    def _solve(self, se0: float, y0: torch.Tensor) -> torch.Tensor:
        mix = self.mix
        if math.isinf(se0):
            se0, y0 = SE_INF_PROXY, y0 * SE_INF_PROXY
        norm = {"norm": lambda v: v.abs().max()}
        y = y0
        if se0 > 1.0:
            # stage 1, u = log se, VP-scaled state x = y/sqrt(1+se^2): bounded from se = 1e10 down to 1
            def f1(u, x):
                self.calls += 1
                se = float(torch.exp(u))
                c = 1 + se * se
                return x / c - mix.x0_hat(x * math.sqrt(c), 1.0, se) / math.sqrt(c)

            u = torch.tensor([math.log(se0), 0.0], dtype=torch.float64)
            x = odeint(f1, y0 / math.sqrt(1 + se0 * se0), u, method="dopri5", rtol=REF_TOL, atol=REF_TOL, options=norm)[-1]
            y, se0 = x * math.sqrt(2.0), 1.0

        # stage 2, in se to exactly 0: dy/dse = -se * score, finite at se = 0
        def f2(se, yy):
            self.calls += 1
            return -se * mix.score(yy, 1.0, se)

        span = torch.tensor([se0, 0.0], dtype=torch.float64)
        return odeint(f2, y, span, method="dopri5", rtol=REF_TOL, atol=REF_TOL, options=norm)[-1]


# ---- measuring ----------------------------------------------------------------------------------------

def metrics(x: torch.Tensor, ref: torch.Tensor, mix: oracle_lib.GaussianMixture, ref_modes: torch.Tensor) -> dict:
    """RMSE per dimension, median per-sample error, % of samples in a different mode than the reference."""
    e = (x - ref).norm(dim=1) / math.sqrt(mix.dim)
    flips = (mix.nearest_mode(x) != ref_modes).double().mean().item() * 100
    return {"rmse": e.pow(2).mean().sqrt().item(), "median": e.median().item(), "flip_pct": flips}


def evaluate(case: Case, sched_name: str, methods: dict[str, Optional[dict]], with_peers: bool,
             log: Callable[[str], None], peer_cache: Optional[dict] = None) -> dict:
    """Every method (ours: name -> config) and optionally every peer, at every NFE, on one (case, schedule)."""
    mix = case.make()
    sch = schedule(sched_name)
    model = oracle_lib.oracle_model(mix, sch)
    eps = samplers.noise.randn((case.n, mix.dim), samplers.noise.generators(EVAL_SEED, case.n), dtype=torch.float64)
    refs = References(mix)
    modes: dict = {}

    def score(x, se0, y0):
        ref = refs.get(se0, y0)
        k = id(ref)
        if k not in modes:
            modes[k] = mix.nearest_mode(ref)
        return metrics(x, ref, mix, modes[k])

    out: dict[str, Any] = {"ours": {}, "peers": {}}
    for label, cfg in methods.items():
        for nfe in NFES:
            with Timer() as tm:
                x, se0, y0, calls = run_ours(model, eps, nfe, cfg)
            out["ours"][f"{label}@{nfe}"] = {**score(x, se0, y0), "nfe": calls, "seconds": tm.s}
    if with_peers:
        fam_key = "flow" if sch.family == "flow" else sched_name  # both flow schedules: the same peers, same ODE
        if peer_cache is not None and (case.name, fam_key) in peer_cache:
            out["peers"] = peer_cache[(case.name, fam_key)]
            out["peer_failures"] = peer_cache[(case.name, fam_key, "failures")]
        else:
            for p in peers(sched_name):
                for nfe in PEER_NFES:
                    if p.steps(nfe) < 1:
                        continue
                    try:
                        with Timer() as tm:
                            x, se0, y0, calls = run_peer(p, sched_name, mix, eps, nfe)
                    except Exception as e:  # a diffusers configuration that cannot run this budget: listed, not hidden
                        out.setdefault("peer_failures", []).append(f"{p.label}@{nfe}: {type(e).__name__}: {e}"[:200])
                        continue
                    if not torch.isfinite(x).all():
                        out.setdefault("peer_failures", []).append(f"{p.label}@{nfe}: non-finite samples")
                        continue
                    out["peers"][f"{p.label}@{nfe}"] = {**score(x, se0, y0), "nfe": calls, "seconds": tm.s}
            if peer_cache is not None:
                peer_cache[(case.name, fam_key)] = out["peers"]
                peer_cache[(case.name, fam_key, "failures")] = out.get("peer_failures", [])
    out["reference"] = {"solves": len(refs.cache), "oracle_calls": refs.calls}
    return out


def best_peer(res: dict, nfe: int) -> tuple[str, dict]:
    """The peer configuration with the lowest RMSE using at most ``nfe`` calls at budget ``nfe``."""
    items = [(k.rsplit("@", 1)[0], v) for k, v in res["peers"].items() if k.endswith(f"@{nfe}")]
    return min(items, key=lambda kv: kv[1]["rmse"])


# ---- the report run ------------------------------------------------------------------------------------

TARGETS_WORST = {5: 0.8, 10: 0.8, 20: 0.8, 50: 1.0}
TARGETS_MEDIAN = {5: 0.6, 10: 0.6}


def summarize(results: dict, label: str) -> tuple[list[Target], dict]:
    """Targets on the given (case, schedule) results for our method ``label``."""
    ratios: dict[int, list[tuple[float, str]]] = {n: [] for n in TARGETS_WORST}
    mono_fail = []
    for key, res in results.items():
        for nfe in TARGETS_WORST:
            ratios[nfe].append((res["ours"][f"{label}@{nfe}"]["rmse"] / best_peer(res, nfe)[1]["rmse"], key))
        errs = [res["ours"][f"{label}@{n}"]["rmse"] for n in NFES]
        if not all(b < a for a, b in zip(errs, errs[1:])):
            mono_fail.append(key)
    targets = []
    for nfe, thr in TARGETS_WORST.items():
        worst, where = max(ratios[nfe])
        targets.append(Target(f"worst RMSE ratio to the best peer @ NFE {nfe}", worst, thr, detail=where))
    for nfe, thr in TARGETS_MEDIAN.items():
        targets.append(Target(f"median RMSE ratio to the best peer @ NFE {nfe}", float(np.median([r for r, _ in ratios[nfe]])), thr))
    n_cases = len(results)
    targets.append(Target("(case, schedule) pairs whose RMSE falls monotonically NFE 5->100", n_cases - len(mono_fail),
                          n_cases, op=">=", detail=("fails: " + ", ".join(mono_fail)) if mono_fail else "all"))
    return targets, {str(n): [{"ratio": r, "case": k} for r, k in sorted(v)] for n, v in ratios.items()}


def main(argv: Optional[list[str]] = None) -> int:
    """Run the suite on the reporting half (or ``--tune``: candidates on the tuning half)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tune", action="store_true", help="evaluate tuning candidates on the tuning half")
    ap.add_argument("--candidates", choices=("search", "final"), default="final",
                    help="with --tune: the first grid/solver search, or the final rule against its parts")
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: the half's cases)")
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--readme", action="store_true", help="print the README's table from results/sampler_suite.json")
    ap.add_argument("--part", default=None, metavar="FILE.json",
                    help="write only this run's raw results there (run several --cases subsets in parallel)")
    ap.add_argument("--merge", default=None, metavar="A.json,B.json", help="report from --part files instead of running")
    args = ap.parse_args(argv)
    if args.readme:
        print(readme_table(json.loads((RESULTS_DIR / f"{NAME}.json").read_text())))
        return 0
    torch.set_num_threads(1)
    half = "tune" if args.tune else "report"
    cases = [c for c in CASES if c.half == half]
    if args.cases:
        want = args.cases.split(",")
        bad = [w for w in want if w not in {c.name for c in CASES}]
        if bad:
            print(f"sampler_suite: unknown case(s) {bad}; valid: {[c.name for c in CASES]}", file=sys.stderr)
            return 2
        cases = [c for c in CASES if c.name in want]
    scheds = args.schedules.split(",")
    if args.merge:
        results, seconds = {}, 0.0
        for f in args.merge.split(","):
            part = json.loads(Path(f).read_text())
            results.update(part["results"])
            seconds += part["seconds"]
        names = {k.split("|")[0] for k in results}
        report(results, [c for c in CASES if c.name in names], scheds, seconds)
        return 0
    methods = (tuning_candidates() if args.candidates == "search" else final_candidates()) if args.tune else {"default": None}
    t0 = time.time()
    results, peer_cache = {}, {}
    for c in cases:
        for sn in scheds:
            with Timer() as tm:
                results[f"{c.name}|{sn}"] = evaluate(c, sn, methods, True, print, peer_cache)
            print(f"{c.name:20s} {sn:9s} {tm.s:6.1f}s  ref {results[f'{c.name}|{sn}']['reference']}", flush=True)
    if args.part:
        Path(args.part).write_text(json.dumps({"results": results, "seconds": time.time() - t0}))
        return 0
    if args.tune:
        write_json(f"{NAME}_tune_{args.candidates}", {"cases": [c.name for c in cases], "candidates": methods, "results": results,
                                    "seconds": time.time() - t0, "environment": environment()})
        print_tune(results, methods)
        return 0
    report(results, cases, scheds, time.time() - t0)
    return 0


def tuning_candidates() -> dict[str, Optional[dict]]:
    """Configurations compared on the tuning half (see samplers/defaults.py for how the rule was chosen).

    Solvers with the analytical first step on the polynomial log-sigma grid, whose last level
    shrinks with the step count n as se_last = a (10/n)^q (q=0: the old fixed 0.025).
    """
    out: dict[str, Optional[dict]] = {"default": None}
    solvers = {"ipndm3": dict(sampler="ipndm", afs=True, order=3), "unipc3": dict(sampler="unipc", afs=True, order=3),
               "unipc2": dict(sampler="unipc", afs=True, order=2), "dpmpp_3m": dict(sampler="dpmpp_3m", afs=True)}
    for sname, scfg in solvers.items():
        for p in (0.7, 1.0):
            for q in (0.0, 1.0, 1.5, 2.0):
                out[f"{sname} p={p} q={q}"] = dict(scfg, grid="polynomial", grid_opts={"p": p}, se_last_rule=(0.025, q))
    return out


def final_candidates() -> dict[str, Optional[dict]]:
    """The chosen rule ("default") against its two halves alone and the old fixed-se_last default."""
    ip = dict(sampler="ipndm", afs=True, order=3)
    return {"default": None,
            "old default (polynomial p=0.7, se_last 0.025 fixed)": dict(ip, grid="polynomial", grid_opts={"p": 0.7, "se_last": 0.025}),
            "polynomial p=0.7, se_last 0.025 (10/n) at every NFE": dict(ip, grid="polynomial", grid_opts={"p": 0.7},
                                                                        se_last_rule=(0.025, 1.0)),
            "flow_uniform, se_last 0.02 (10/n) at every NFE": dict(ip, grid="flow_uniform", grid_opts={"shift": 1.0},
                                                                   se_last_rule=(0.02, 1.0))}


def print_tune(results: dict, methods: dict) -> None:
    """Per candidate: worst and median ratio at each target NFE, and monotonicity failures."""
    for label in methods:
        targets, _ = summarize(results, label)
        print(f"== {label}")
        for t in targets:
            print("  " + t.line())


def report(results: dict, cases: list[Case], scheds: list[str], seconds: float) -> None:
    """Write results/sampler_suite.{md,json,png}."""
    targets, ratios = summarize(results, "default")
    rows = []
    for key, res in results.items():
        for nfe in NFES:
            o = res["ours"][f"default@{nfe}"]
            if nfe in PEER_NFES:
                pn, p = best_peer(res, nfe)
                rows.append([key.replace("|", " / "), nfe, o["rmse"], pn, p["rmse"], o["rmse"] / p["rmse"],
                             o["median"] / max(p["median"], 1e-300), f"{o['flip_pct']:.1f} / {p['flip_pct']:.1f}",
                             f"{o['seconds']:.2f} / {p['seconds']:.2f}"])
            else:
                rows.append([key.replace("|", " / "), nfe, o["rmse"], "-", float("nan"), float("nan"), float("nan"),
                             f"{o['flip_pct']:.1f} / -", f"{o['seconds']:.2f} / -"])
    cfg = samplers.defaults.describe()
    md = [f"# Sampler suite: the default vs every applicable diffusers configuration",
          "",
          f"Reporting half ({len(cases)} cases x {len(scheds)} schedules; the default was chosen on the other half). "
          f"Exact mixture denoiser; error = RMSE/dim against dopri5 (rtol=atol={REF_TOL:g}) from each method's own start. "
          "Peers get the exact denoiser in the form they expect; the best peer is chosen per (case, schedule, NFE). "
          "Both flow schedules share the same peers (their PF-ODE in the EDM view is identical).",
          "",
          f"Default rule (samplers/defaults.py): {cfg}",
          "",
          "## Targets", "",
          *[f"- {t.line()}" for t in targets],
          "", "![RMSE vs NFE](sampler_suite.png)", "",
          "## Cases", "",
          markdown_table(["case", "dim", "modes", "half", "samples", "what"],
                         [[c.name, c.make().dim, c.make().K, c.half, c.n, c.note] for c in CASES]),
          "", "## Per case, schedule and NFE", "",
          markdown_table(["case / schedule", "NFE", "ours RMSE", "best peer", "peer RMSE", "RMSE ratio", "median ratio",
                          "flips % ours / peer", "wall s ours / peer"], rows),
          "", f"Wall time {seconds:.0f} s on one thread."]
    write_markdown(NAME, "\n".join(md))
    write_json(NAME, {"targets": targets, "ratios": ratios, "results": results, "default_rule": cfg,
                      "cases": {c.name: {"half": c.half, "n": c.n, "note": c.note} for c in CASES},
                      "nfes": NFES, "peer_nfes": PEER_NFES, "seconds": seconds, "environment": environment()})
    panels = {}
    for sn in scheds:
        series = []
        for key, res in results.items():
            if key.endswith("|" + sn):
                cname = key.split("|")[0]
                series.append(Series(list(NFES), [res["ours"][f"default@{n}"]["rmse"] for n in NFES], f"{cname} default",
                                     dict(marker="o", lw=1.5)))
                series.append(Series(list(PEER_NFES), [best_peer(res, n)[1]["rmse"] for n in PEER_NFES],
                                     f"{cname} best peer", dict(ls="--", lw=1, color=series[-1].style.get("color"))))
        panels[sn] = series
    _plot(panels)
    for t in targets:
        print(t.line())


def readme_table(payload: dict) -> str:
    """Markdown summary of a report run: per NFE the default's RMSE ratio to the best peer, median and worst."""
    res = payload["results"]
    rows = []
    for nfe in (5, 10, 20, 50):
        ratios = sorted((r["ours"][f"default@{nfe}"]["rmse"] / best_peer(r, nfe)[1]["rmse"], k) for k, r in res.items())
        vals = [v for v, _ in ratios]
        wins = sum(v < 1 for v in vals)
        worst, where = ratios[-1]
        flips_o = np.median([r["ours"][f"default@{nfe}"]["flip_pct"] for r in res.values()])
        flips_p = np.median([best_peer(r, nfe)[1]["flip_pct"] for r in res.values()])
        rows.append([nfe, f"{np.median(vals):.2f}" + (f" (≤ {TARGETS_MEDIAN[nfe]})" if nfe in TARGETS_MEDIAN else ""),
                     f"{worst:.2f} (≤ {TARGETS_WORST[nfe]}; {where.replace('|', ' / ')})", f"{wins} of {len(vals)}",
                     f"{flips_o:.1f} / {flips_p:.1f}"])
    table = markdown_table(["NFE", "median ratio (target)", "worst ratio (target; where)", "cases the default wins",
                            "median mode flips % ours / best peer"], rows)
    verdicts = "; ".join(f"{t['name']}: {t['verdict']}" for t in payload["targets"])
    return table + "\n\n" + verdicts


def _plot(panels: dict) -> None:
    """results/sampler_suite.png: one panel per schedule, default (solid) vs best peer per NFE (dashed), per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, series) in zip(axes[0], panels.items()):
        for j in range(0, len(series), 2):
            col = colors[(j // 2) % len(colors)]
            ours, peer = series[j], series[j + 1]
            ax.loglog(ours.x, ours.y, "o-", color=col, lw=1.4, ms=3, label=ours.label.replace(" default", ""))
            ax.loglog(peer.x, peer.y, "--", color=col, lw=0.9)
        ax.set_title(f"{title}: default (solid) vs best peer (dashed)", fontsize=9)
        ax.set_xlabel("NFE")
        ax.set_xticks(list(NFES))
        ax.set_xticklabels([str(n) for n in NFES])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("RMSE/dim vs dopri5")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS_DIR / f"{NAME}.png", dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
