#!/usr/bin/env python
"""Sampler benchmark: our samplers vs diffusers' schedulers at equal NFE, on exact Gaussian-mixture oracles.

Setup (issue 3, item 5):

* data: the 2-D ring of 8 modes (``ring2d``) and the 64-D mixture of 10 anisotropic modes
  (``mixture64d``); the model is the exact denoiser on the DDPM schedule (linear betas 1e-4..0.02,
  T=1000), so every error below is the solver's and the grid's, never the network's;
* error = distance to the PF-ODE solution from the *same* start state, computed by torchdiffeq's
  dopri5 in float64 at rtol = atol = 1e-8 with a max-norm error control (every sample meets the
  tolerance, not just the batch average);
* every method gets the same unit noise eps (per-image seeds EVAL_SEED + i). Each starts where it
  chooses: ours at y_T = se_max eps (se_max = 157.4, t = 1), diffusers' VP schedulers at x_T = eps
  (y_T = sqrt(1 + se_0^2) eps), Euler/Heun at y_T = se_0 eps with se_0 rounded to float32. Those
  start states differ slightly, so the reference is solved from each method's own start (one dopri5
  solve per distinct start): the error measured is the solver's, not the start's;
* diffusers' schedulers are fed the exact denoiser at the noise level the scheduler believes it is
  at (``sigmas[step_index]``, or alphas_cumprod[t] for DDIM), as the epsilon they expect, from the
  model input they pass (VP scaled), and NFE is the number of oracle calls actually made; Heun at an
  even budget runs the largest step count that fits (2n - 1 calls) and is reported with its real NFE;
* learned solvers (mvt + AMED predictor, ipndm + learned grid) are trained by ``distill.amed`` /
  ``distill.grid`` on noises with seeds TRAIN_SEED + i, a range disjoint from the evaluation seeds
  (checked), and cached under ``benchmarks/results/samplers.learned/`` (``--retrain`` redoes them).

Metrics per (method, dimension, NFE): RMSE per dimension over samples, the median per-sample RMS
error, % of samples whose nearest mode differs from the reference's, and the NFE actually used.
Ratios to the best diffusers configuration carry a 95% paired-bootstrap interval over samples.

    python benchmarks/samplers.py            # full run (< 10 min on 2 CPU cores with the learned cache)
    python benchmarks/samplers.py --quick    # smoke run, small sample counts, writes nothing by default
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

_HERE = Path(__file__).resolve().parent
# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# `samplers` package: put the repository root there instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchdiffeq import odeint  # noqa: E402

import samplers  # noqa: E402
from benchmarks.common import (RESULTS_DIR, Series, Target, Timer, environment, loglog_plot, markdown_table,  # noqa: E402
                               paired_bootstrap_ratio, write_json, write_markdown)
from diffusion import oracle as oracle_lib  # noqa: E402
from diffusion.schedules import by_name  # noqa: E402
from distill import amed as amed_lib  # noqa: E402
from distill import grid as grid_lib  # noqa: E402
from distill.common import Teacher, oracle_teacher  # noqa: E402

NAME = "samplers"
EVAL_SEED = 0  # evaluation noise of image i: per-image seed EVAL_SEED + i
NFES = (4, 5, 6, 8, 10, 15, 20)
REF_TOL = 1e-8
CASES = {"ring2d": (4000, 400), "mixture64d": (1000, 150)}  # (full, --quick) evaluation sample counts
LEARNED_DIR = RESULTS_DIR / f"{NAME}.learned"
LEARNED_NFES = (4, 5, 6, 8, 10)

# How the learned solvers are trained (part of the cache key: change it and they are retrained).
AMED_SETTINGS = dict(nfe=5, afs=True, teacher_solver="adaptive", extra_nodes=1, n_train=512, iters=150, batch=256,
                     learn_grid=True, rounds=3, grid_evals=20, grid_batch=256)
# The learned grid is fitted for the default solver (samplers/defaults.py), so it isolates what the grid buys.
GRID_SETTINGS = dict(sampler=samplers.defaults.SAMPLER, options=dict(samplers.defaults.OPTIONS), n_train=512,
                     n_val=256, teacher_solver="adaptive", rtol=1e-7, max_evals=30)

# ---- peers: diffusers' schedulers on the DDPM training schedule ---------------------------------

DDPM_CONFIG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                   prediction_type="epsilon")


@dataclass
class Peer:
    """One diffusers configuration."""

    label: str
    cls_name: str
    kwargs: dict = field(default_factory=dict)
    step_kwargs: dict = field(default_factory=dict)
    calls_per_step: str = "1"  # "1" or "heun" (2n-1)


def peers() -> list[Peer]:
    """Every scheduler with its default spacing, Karras sigmas and trailing spacing (where supported)."""
    out = [Peer("DDIM trailing", "DDIMScheduler", dict(clip_sample=False, timestep_spacing="trailing",
                                                       set_alpha_to_one=True), dict(eta=0.0))]
    families = [("Euler", "EulerDiscreteScheduler", {}, "1"), ("Heun", "HeunDiscreteScheduler", {}, "heun"),
                ("DPM++2M", "DPMSolverMultistepScheduler", dict(solver_order=2, algorithm_type="dpmsolver++"), "1"),
                ("DPM++3M", "DPMSolverMultistepScheduler", dict(solver_order=3, algorithm_type="dpmsolver++"), "1"),
                ("UniPC", "UniPCMultistepScheduler", {}, "1"), ("DEIS", "DEISMultistepScheduler", {}, "1")]
    for label, cls, kw, calls in families:
        out.append(Peer(label, cls, kw, calls_per_step=calls))
        out.append(Peer(f"{label} karras", cls, {**kw, "use_karras_sigmas": True}, calls_per_step=calls))
        out.append(Peer(f"{label} trailing", cls, {**kw, "timestep_spacing": "trailing"}, calls_per_step=calls))
    return out


@dataclass
class Run:
    """One (method, case, NFE) result: final samples, calls made and the exact start state."""

    method: str
    family: str  # "ours", "learned" or "diffusers"
    case: str
    nfe_target: int
    nfe: int
    x: torch.Tensor
    se0: float
    y0: torch.Tensor
    config: dict = field(default_factory=dict)
    err: Optional[np.ndarray] = None
    flip: Optional[np.ndarray] = None

    def row(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"method": self.method, "family": self.family, "case": self.case, "dim": int(self.x.shape[1]),
                "nfe_target": self.nfe_target,
                "nfe": self.nfe, "rmse": float(np.sqrt(np.mean(self.err**2))), "median": float(np.median(self.err)),
                "mode_flip_pct": float(100 * self.flip.mean()), "start_sigma": self.se0, "config": self.config}


def run_peer(peer: Peer, mix: oracle_lib.GaussianMixture, eps: torch.Tensor, nfe: int) -> Optional[Run]:
    """Drive a diffusers scheduler with the exact epsilon at the sigma it believes it is at."""
    import diffusers

    steps = (nfe + 1) // 2 if peer.calls_per_step == "heun" else nfe
    if steps < 1:
        return None
    sched = getattr(diffusers, peer.cls_name)(**DDPM_CONFIG, **peer.kwargs)
    sched.set_timesteps(steps)
    x = eps * sched.init_noise_sigma
    calls, start = 0, None
    is_ddim = isinstance(sched, diffusers.DDIMScheduler)
    for i, t in enumerate(sched.timesteps):
        m = sched.scale_model_input(x, t)  # the model's input: always VP-scaled x_t = y / sqrt(1 + se^2)
        if is_ddim:
            acp = float(sched.alphas_cumprod[int(t)])
            se = math.sqrt((1 - acp) / acp)
        else:
            idx = sched.step_index if sched.step_index is not None else i
            if idx != i:
                raise RuntimeError(f"{peer.label}: scheduler step_index {idx} != model call {i}")
            se = float(sched.sigmas[idx])
        y = m.double() * math.sqrt(1 + se * se)
        if start is None:
            start = (se, y.clone())
        eps_hat = -se * mix.score(y, 1.0, se)  # = (y - D(y, se))/se, the exact epsilon at (x_t, se)
        calls += 1
        x = sched.step(eps_hat.to(m.dtype), t, x, **peer.step_kwargs).prev_sample
    return Run(peer.label, "diffusers", "", nfe, calls, x.double(), start[0], start[1],
               {"scheduler": peer.cls_name, **peer.kwargs, "num_inference_steps": steps})


def run_ours(model, eps: torch.Tensor, label: str, nfe: int, family: str = "ours", sampler: Optional[str] = None,
             grid: Optional[torch.Tensor | str] = None, config: Optional[dict] = None, **opts) -> Run:
    """One of our samplers through the public entry point; the start is y_T = se_0 eps (samplers.api)."""
    res = samplers.sample(model, eps, sampler=sampler, nfe=None if isinstance(grid, torch.Tensor) else nfe, grid=grid, **opts)
    se0 = float(res.grid[0])
    cfg = {"sampler": res.sampler, "grid": [round(float(v), 6) for v in res.grid], **(config or {})}
    cfg.update({k: v for k, v in opts.items() if isinstance(v, (bool, int, float, str))})
    return Run(label, family, "", nfe, res.nfe, res.x.double(), se0, eps.double() * se0, cfg)


def our_methods(nfe: int) -> list[tuple[str, dict]]:
    """(label, sample() kwargs) for our deterministic samplers at budget ``nfe`` (None when it cannot be met)."""
    odd = nfe % 2 == 1
    heun_nfe = nfe if odd else nfe - 1
    mvt_steps_afs = odd  # mvt costs 2n, or 2n - 1 with AFS
    out = [
        ("ours: default", {}),
        ("euler", dict(sampler="euler")),
        ("ddim eta=0 (uniform t)", dict(sampler="ddim", eta=0.0)),
        ("heun", dict(sampler="heun", nfe=heun_nfe)),
        ("dpmpp_2m", dict(sampler="dpmpp_2m")),
        ("dpmpp_2m+afs", dict(sampler="dpmpp_2m", afs=True)),
        ("ipndm", dict(sampler="ipndm")),
        # the default solver on the textbook grids: how much of the default's lead is its grid
        ("default solver, karras grid", dict(sampler=samplers.defaults.SAMPLER, grid="karras", **samplers.defaults.OPTIONS)),
        ("default solver, uniform logSNR grid", dict(sampler=samplers.defaults.SAMPLER, grid="uniform_logsnr",
                                                     **samplers.defaults.OPTIONS)),
        ("default solver, vp-time-uniform grid", dict(sampler=samplers.defaults.SAMPLER, grid="vp_time_uniform",
                                                      **samplers.defaults.OPTIONS)),
        ("mvt r=1/2" + (" +afs" if mvt_steps_afs else ""), dict(sampler="mvt", afs=mvt_steps_afs)),
    ]
    return out


# ---- reference ----------------------------------------------------------------------------------


def reference(mix: oracle_lib.GaussianMixture, y0: torch.Tensor, se0: float, tol: float = REF_TOL) -> tuple[torch.Tensor, int]:
    """PF-ODE solution at se=0 from (y0, se0): dy/dse = (y - D)/se = -se * score, dopri5 in float64."""
    calls = [0]

    def f(se: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return -se * mix.score(y, 1.0, se)  # finite at se=0, unlike (y - D)/se

    span = torch.tensor([se0, 0.0], dtype=torch.float64)
    out = odeint(f, y0.double(), span, method="dopri5", rtol=tol, atol=tol, options={"norm": lambda v: v.abs().max()})
    return out[-1], calls[0]


class References:
    """One dopri5 solve per distinct start state (se_0, y_0), shared by every method starting there."""

    def __init__(self, mix: oracle_lib.GaussianMixture):
        self.mix, self.cache, self.solves = mix, {}, []

    def key(self, se0: float, y0: torch.Tensor) -> tuple[float, str]:
        """Exact identity of a start state."""
        return se0, hashlib.sha1(y0.double().contiguous().numpy().tobytes()).hexdigest()

    def get(self, se0: float, y0: torch.Tensor) -> torch.Tensor:
        """The reference final samples for this start (solved on first use)."""
        k = self.key(se0, y0)
        if k not in self.cache:
            with Timer() as tm:
                ref, calls = reference(self.mix, y0, se0)
            self.cache[k] = ref
            self.solves.append({"start_sigma": se0, "oracle_calls": calls, "seconds": round(tm.s, 1)})
        return self.cache[k]


def reference_self_check(mix: oracle_lib.GaussianMixture, y0: torch.Tensor, se0: float, n: int = 64) -> float:
    """Max |ref(1e-8) - ref(1e-11)| over n samples: how exact the reference itself is."""
    a, _ = reference(mix, y0[:n], se0, REF_TOL)
    b, _ = reference(mix, y0[:n], se0, 1e-11)
    return float((a - b).abs().max())


# ---- learned solvers ----------------------------------------------------------------------------


def n_training_noises() -> int:
    """How many per-image training seeds (from TRAIN_SEED) the learned solvers use."""
    return max(GRID_SETTINGS["n_train"] + GRID_SETTINGS["n_val"], AMED_SETTINGS["n_train"])


def _settings_key(d: dict) -> str:
    return hashlib.sha1(repr(sorted(d.items())).encode()).hexdigest()[:12]


def learned_grid(case: str, teacher: Teacher, nfe: int, retrain: bool, log: Callable[[str], None]) -> grid_lib.GridFit:
    """The default solver's grid for ``nfe``, fitted on training noises (cached)."""
    s = GRID_SETTINGS
    key = _settings_key({**s, "nfe": nfe, "seed": grid_lib.TRAIN_SEED, "options": repr(s["options"])})
    path = LEARNED_DIR / f"{case}_grid_{s['sampler']}_nfe{nfe}.json"
    if path.is_file() and not retrain:
        fit = grid_lib.load_grid(path)
        if fit.meta.get("settings_key") == key:
            return fit
    log(f"  training grid: {case} {s['sampler']} {s['options']} NFE {nfe}")
    fit = grid_lib.learn(teacher, s["sampler"], nfe, s["options"], n_train=s["n_train"], n_val=s["n_val"],
                         teacher_solver=s["teacher_solver"],
                         rtol=s["rtol"], max_evals=s["max_evals"])
    fit.meta["settings_key"] = key
    grid_lib.save_grid(path, fit)
    return fit


def learned_amed(case: str, teacher: Teacher, retrain: bool, log: Callable[[str], None]) -> Path:
    """mvt predictor (+ its learned nodes) for AMED_SETTINGS['nfe'], trained on training noises (cached)."""
    s = AMED_SETTINGS
    key = _settings_key({**s, "seed": grid_lib.TRAIN_SEED})
    path = LEARNED_DIR / f"{case}_amed_nfe{s['nfe']}.safetensors"
    if path.is_file() and not retrain:
        if samplers.load_predictor(path).meta.get("settings_key") == key:
            return path
    log(f"  training AMED predictor: {case} NFE {s['nfe']}")
    fit = amed_lib.distill(teacher, s["nfe"], s["afs"], teacher_solver=s["teacher_solver"], extra_nodes=s["extra_nodes"],
                           n_train=s["n_train"], iters=s["iters"], batch=s["batch"], learn_grid=s["learn_grid"],
                           rounds=s["rounds"], grid_evals=s["grid_evals"], grid_batch=s["grid_batch"])
    fit.meta["settings_key"] = key
    fit.predictor.meta = fit.meta
    amed_lib.save(path, fit)
    return path


# ---- the benchmark ------------------------------------------------------------------------------


def evaluate_case(case: str, n: int, nfes: tuple[int, ...], retrain: bool, learned: bool,
                  log: Callable[[str], None]) -> tuple[list[Run], dict]:
    """Every method at every NFE on one oracle; fills each run's per-sample errors and mode flips."""
    mix = oracle_lib.preset(case)
    model = oracle_lib.oracle_model(mix, by_name("ddpm"))
    eps = samplers.noise.randn((n, mix.dim), samplers.noise.generators(EVAL_SEED, n), dtype=torch.float64)
    runs: list[Run] = []
    info: dict[str, Any] = {}
    with Timer() as tm:
        for nfe in nfes:
            for p in peers():
                r = run_peer(p, mix, eps, nfe)
                if r is not None:
                    runs.append(r)
    info["seconds_diffusers"] = round(tm.s, 1)
    with Timer() as tm:
        for nfe in nfes:
            for label, kw in our_methods(nfe):
                kw = dict(kw)
                budget = kw.pop("nfe", nfe)
                runs.append(run_ours(model, eps, label, budget, **kw))
                runs[-1].nfe_target = nfe
    info["seconds_ours"] = round(tm.s, 1)
    if learned:
        grid_lib.check_disjoint_seeds(grid_lib.TRAIN_SEED, n_training_noises(), EVAL_SEED, n)
        teacher = oracle_teacher(mix, f"oracle:{case}", "ddpm")  # the same DDPM-schedule oracle as `model`
        with Timer() as tm:
            for nfe in [v for v in LEARNED_NFES if v in nfes]:
                fit = learned_grid(case, teacher, nfe, retrain, log)
                runs.append(run_ours(model, eps, "learned: default solver, learned grid", nfe, "learned", sampler=fit.sampler,
                                     grid=fit.grid, config={"train_seed": fit.meta.get("train_seed")}, **fit.options))
            if AMED_SETTINGS["nfe"] in nfes:
                path = learned_amed(case, teacher, retrain, log)
                runs.append(run_ours(model, eps, "learned: mvt+AMED predictor", AMED_SETTINGS["nfe"], "learned",
                                     sampler="mvt", predictor=str(path),
                                     config={"predictor": str(path.relative_to(_HERE.parent))}))
        info["seconds_learned"] = round(tm.s, 1)
    for r in runs:
        r.case = case
    refs = References(mix)
    with Timer() as tm:
        ref_modes = {}
        for r in runs:
            ref = refs.get(r.se0, r.y0)
            k = refs.key(r.se0, r.y0)
            if k not in ref_modes:
                ref_modes[k] = mix.nearest_mode(ref)
            if not torch.isfinite(r.x).all():
                bad = int((~torch.isfinite(r.x)).any(1).sum())
                raise FloatingPointError(f"{r.method} at NFE {r.nfe} on {case}: {bad} samples are not finite")
            r.err = ((r.x - ref).pow(2).mean(1).sqrt()).numpy()
            r.flip = (mix.nearest_mode(r.x) != ref_modes[k]).numpy()
    info["seconds_reference"] = round(tm.s, 1)
    info["reference_solves"] = refs.solves
    info["reference_self_check_max_abs"] = reference_self_check(mix, eps * by_name("ddpm").sigma_edm_max,
                                                                by_name("ddpm").sigma_edm_max)
    info["n_eval"] = n
    return runs, info


def best_peer(runs: list[Run], case: str, nfe: int) -> Optional[Run]:
    """The diffusers configuration with the lowest RMSE among those using at most ``nfe`` calls."""
    cands = [r for r in runs if r.family == "diffusers" and r.case == case and r.nfe <= nfe and r.nfe_target == nfe]
    return min(cands, key=lambda r: float(np.sqrt(np.mean(r.err**2)))) if cands else None


def find(runs: list[Run], case: str, method: str, nfe: int) -> Optional[Run]:
    """The run of ``method`` at target budget ``nfe`` on ``case``."""
    for r in runs:
        if r.case == case and r.method == method and r.nfe_target == nfe:
            return r
    return None


def check_targets(runs: list[Run], cases: list[str], n_boot: int) -> list[Target]:
    """The issue's targets, each as a ratio to the best diffusers configuration with a paired-bootstrap CI."""
    out: list[Target] = []
    for case in cases:
        for nfe, thr in ((5, 0.6), (10, 0.6), (20, 1.0)):
            d, b = find(runs, case, "ours: default", nfe), best_peer(runs, case, nfe)
            if d is None or b is None:
                continue
            ci = paired_bootstrap_ratio(d.err, b.err, "rms", n_boot)
            out.append(Target(f"default RMSE / best diffusers ({b.method}) RMSE, {case}, NFE {nfe}", ci.value, thr,
                              ci=ci))
            if nfe == 20:
                ci = paired_bootstrap_ratio(d.err, b.err, "median", n_boot)
                out.append(Target(f"default median / best diffusers ({b.method}) median, {case}, NFE 20", ci.value, 0.5,
                                  ci=ci))
        b8 = best_peer(runs, case, 8)
        learned = [r for r in runs if r.case == case and r.family == "learned" and r.nfe_target == 5]
        if b8 is not None and learned:
            best = min(learned, key=lambda r: float(np.sqrt(np.mean(r.err**2))))
            for r in learned:
                ci = paired_bootstrap_ratio(r.err, b8.err, "rms", n_boot)
                tag = " [best learned]" if r is best else ""
                out.append(Target(f"{r.method} NFE 5 RMSE / best diffusers at NFE 8 ({b8.method}), {case}{tag}", ci.value,
                                  0.7, ci=ci, detail=f"mode flips {100 * r.flip.mean():.2f}% vs {100 * b8.flip.mean():.2f}%"))
    return out


def write_results(runs: list[Run], infos: dict, targets: list[Target], args: argparse.Namespace, seconds: float) -> None:
    """samplers.md / .json / .png."""
    cases = list(infos)
    rows = [r.row() for r in runs]
    payload = {"benchmark": NAME, "setup": {"schedule": "ddpm (linear betas 1e-4..0.02, T=1000)", "cases": infos,
                                            "nfes": list(args.nfes), "reference": f"torchdiffeq dopri5, float64, rtol=atol={REF_TOL}, max-norm",
                                            "eval_seed": EVAL_SEED, "train_seed": grid_lib.TRAIN_SEED,
                                            "amed_settings": AMED_SETTINGS, "grid_settings": GRID_SETTINGS,
                                            "quick": args.quick, "seconds": round(seconds, 1)},
               "environment": environment(), "results": rows, "targets": [t.as_dict() for t in targets],
               "best_diffusers": {c: {str(n): (lambda b: b.method if b else None)(best_peer(runs, c, n)) for n in args.nfes}
                                  for c in cases}}
    write_json(NAME, payload)

    md = [f"# Samplers vs diffusers at equal NFE (exact mixture oracles, DDPM schedule)", "",
          "Generated by `python benchmarks/samplers.py`" + (" --quick" if args.quick else "") + f" in {seconds:.0f} s. "
          f"Error = distance to the PF-ODE solution (dopri5, rtol=atol={REF_TOL}) from each method's own start state; "
          "RMSE per dimension over samples, median of per-sample RMS errors, mode flip = nearest mode differs from the "
          "reference's. NFE = network (oracle) calls actually made. Learned solvers were trained on noises with seeds "
          f"{grid_lib.TRAIN_SEED}+i, evaluation uses seeds {EVAL_SEED}+i.", "", "## Targets", ""]
    md += [f"- {t.line()}" for t in targets]
    for case in cases:
        info = infos[case]
        md += ["", f"## {case} ({info['n_eval']} evaluation samples)", "",
               f"Reference: {len(info['reference_solves'])} dopri5 solves (one per distinct start); self-check "
               f"max |ref(1e-8) - ref(1e-11)| = {info['reference_self_check_max_abs']:.2e}.", "",
               "### RMSE by NFE (best diffusers configuration per NFE in the last rows)", ""]
        methods = list(dict.fromkeys(r.method for r in runs if r.case == case))
        table = []
        for m in methods:
            cells = []
            for nfe in args.nfes:
                r = find(runs, case, m, nfe)
                cells.append("" if r is None else f"{float(np.sqrt(np.mean(r.err**2))):.3g}" + ("" if r.nfe == nfe else f" ({r.nfe})"))
            fam = next(r.family for r in runs if r.case == case and r.method == m)
            table.append([f"{m}" + (" *" if fam == "diffusers" else ""), *cells])
        bests = [best_peer(runs, case, nfe) for nfe in args.nfes]
        table.append(["**best diffusers**", *[f"{float(np.sqrt(np.mean(b.err ** 2))):.3g}" if b else "" for b in bests]])
        table.append(["(which)", *[b.method if b else "" for b in bests]])
        md += [markdown_table(["method \\ NFE", *[str(v) for v in args.nfes]], table),
               "", "`*` diffusers; `(k)`: the method used k calls (Heun needs 2n-1). diffusers' DEIS has no final "
               "step to sigma=0 (no `final_sigmas_type`): it returns its state at sigma=0.01 (default spacing: "
               "alphas_cumprod[0]; Karras: sigma_min), which is part of its measured error.", "",
               "### Key rows: RMSE / median / mode flip % / NFE used", ""]
        key_rows = []
        for nfe in args.nfes:
            for r in [find(runs, case, "ours: default", nfe), best_peer(runs, case, nfe),
                      *[x for x in runs if x.case == case and x.family == "learned" and x.nfe_target == nfe]]:
                if r is None:
                    continue
                row = r.row()
                key_rows.append([nfe, r.method, row["rmse"], row["median"], row["mode_flip_pct"], r.nfe])
        md += [markdown_table(["NFE", "method", "RMSE", "median", "mode flip %", "NFE used"], key_rows)]
    md += ["", "![error vs NFE](samplers.png)", "", "Per-row data (every method, case and NFE): `samplers.json`."]
    write_markdown(NAME, "\n".join(md))

    panels = {}
    for case in cases:
        series = []
        methods = list(dict.fromkeys(r.method for r in runs if r.case == case))
        for m in methods:
            rs = sorted([r for r in runs if r.case == case and r.method == m], key=lambda r: r.nfe)
            fam = rs[0].family
            style = {"ours": dict(lw=1.2, marker="o", ms=3), "learned": dict(lw=0, marker="*", ms=12),
                     "diffusers": dict(lw=0.8, ls="--", alpha=0.55)}[fam]
            if m == "ours: default":
                style = dict(lw=3, marker="o", color="black")
            series.append(Series([r.nfe for r in rs], [float(np.sqrt(np.mean(r.err**2))) for r in rs], m, style))
        bests = [(nfe, best_peer(runs, case, nfe)) for nfe in args.nfes]
        series.append(Series([n for n, b in bests if b], [float(np.sqrt(np.mean(b.err**2))) for _, b in bests if b],
                             "best diffusers (envelope)", dict(lw=2.5, ls=":", color="red")))
        panels[f"{case}: RMSE vs reference"] = series
    # above RMSE 1 a run has diverged (Heun with 1-2 steps): clip so the interesting range stays readable
    loglog_plot(NAME, panels, "NFE (network evaluations)", "RMSE per dimension vs dopri5 reference (clipped at 1)",
                "Exact mixture oracle, DDPM schedule: ours (solid), learned (stars), diffusers (dashed)",
                xticks=args.nfes, ylim=(None, 1.0))


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark; print every target as PASS/MISS."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sample counts (smoke run)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--nfes", nargs="+", type=int, default=list(NFES))
    ap.add_argument("--no-learned", dest="learned", action="store_false", help="skip the learned solvers")
    ap.add_argument("--retrain", action="store_true", help="retrain the learned solvers even when cached")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--write", action="store_true", help="with --quick: still write benchmarks/results/samplers.*")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared; more oversubscribes)")
    args = ap.parse_args(argv)
    args.nfes = tuple(sorted(set(args.nfes)))
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    runs, infos = [], {}
    for case in args.cases:
        n = CASES[case][1 if args.quick else 0]
        log(f"[{case}] {n} evaluation samples, NFE {list(args.nfes)}")
        r, info = evaluate_case(case, n, args.nfes, args.retrain, args.learned, log)
        runs += r
        infos[case] = info
        log(f"[{case}] done: " + ", ".join(f"{k}={v}" for k, v in info.items() if k.startswith("seconds")))
    targets = check_targets(runs, list(infos), args.n_boot)
    seconds = time.perf_counter() - t0
    for t in targets:
        print(t.line())
    if not args.quick or args.write:
        write_results(runs, infos, targets, args, seconds)
        print(f"wrote {RESULTS_DIR / NAME}.md/.json/.png in {seconds:.0f} s")
    else:
        print(f"quick run: {seconds:.0f} s (nothing written; add --write to write the results)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
