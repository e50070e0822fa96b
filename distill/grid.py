"""``python -m distill grid``: learn a sampler's sigma grid by matching a teacher solve ("Align Your Steps" / GITS spirit).

The first level (the start se_0, where ``samplers.sample`` scales the noise) and the final 0 stay
fixed; every level in between, ``se_last`` included, is learned. The levels are parametrised as
``log se_i = log se_0 - sum_{j<=i} softplus(theta_j)``, so every theta is a valid, strictly
decreasing grid. The objective is the mean squared distance between the sampler's output and the
teacher's accurate ODE solution from the same noise, over training noises.

The samplers are black boxes here: they run under ``no_grad`` and read the grid as floats, so the
gradient in theta is a central finite difference on a fixed batch (common random numbers; exact to
O(h^2) for a deterministic sampler). That is what lets one learner serve any deterministic sampler
in the registry, one call per step or not, with any model, trained nets included.

The learned grid is saved as JSON (levels + sampler + options) and used through ``grid=``::

    lg = load_grid("grid.json")
    samplers.sample(model, noise, sampler=lg.sampler, grid=lg.grid, **lg.options)

Shared with ``distill amed``: per-image training noises (seeds ``seed + i``) and the teacher solve;
teachers are loaded by ``distill.common.load_teacher`` as for every distiller (``oracle:NAME`` on the
EDM schedule, ``pretrained:DIR`` or a run folder).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from diffusion.cli import HelpFormatter
import samplers
from samplers.noise import generators, randn

from .common import Teacher, add_tracker_args, load_teacher

#: Default first per-image seed of training noises (image i uses TRAIN_SEED + i). Benchmarks draw
#: their evaluation noises from a disjoint seed range and check it with ``check_disjoint_seeds``.
TRAIN_SEED = 1_000_000
FORMAT = "unified-diffusion/learned-grid"
#: Lowest level of an adaptive teacher before its final x0 readout: the ODE moves a sample by
#: ~se^2/std^2 of its distance to the mode below it, i.e. < 1e-6 for data std >= 0.05.
TEACHER_FLOOR = 1e-4
TEACHER_SOLVERS = ("adaptive", "heun")


# ---------------------------------------------------------------------------------------------
# Training noises (shared with distill.amed)
# ---------------------------------------------------------------------------------------------


def training_noise(n: int, shape: Sequence[int], seed: int = TRAIN_SEED, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """n unit-Gaussian noises with per-image seeds ``seed + i`` (independent of how they are batched)."""
    if n < 1:
        raise ValueError(f"need at least one training noise; got n={n}")
    return randn((n, *shape), generators(seed, n), device=device, dtype=dtype)


def check_disjoint_seeds(train_seed: int, n_train: int, eval_seed: int, n_eval: int) -> None:
    """Raise unless the per-image seed ranges [seed, seed + n) of training and evaluation are disjoint."""
    if train_seed < eval_seed + n_eval and eval_seed < train_seed + n_train:
        raise ValueError(f"training seeds [{train_seed}, {train_seed + n_train}) overlap evaluation seeds "
                         f"[{eval_seed}, {eval_seed + n_eval}): learned solvers must never see the evaluation noises")


def _insert_nodes(grid: Sequence[float], m: int) -> tuple[list[float], list[int]]:
    """Grid with ``m`` extra nodes per interval (log-uniform; linear in the last one, which ends at 0)."""
    out, idx = [float(grid[0])], [0]
    for hi, lo in zip(grid[:-1], grid[1:]):
        for k in range(1, m + 1):
            f = k / (m + 1)
            out.append(hi * (lo / hi) ** f if lo > 0 else hi * (1 - f))
        out.append(float(lo))
        idx.append(len(out) - 1)
    return out, idx


@torch.no_grad()
def teacher_states(model, noise: torch.Tensor, grid: torch.Tensor, *, solver: str = "adaptive", extra_nodes: int = 1,
                   rtol: float = 1e-6, atol: float = 1e-6, batch: int = 1024) -> list[torch.Tensor]:
    """The teacher's EDM-view states y at every level of ``grid`` (index 0: the start, last: x0 at 0).

    ``adaptive``: torchdiffeq dopri5 through the levels (output times), down to TEACHER_FLOOR, then
    the x0 readout. ``heun``: the same solver family as the student with ``extra_nodes`` inserted
    per interval (docs/theory.md §7.1's teacher, M=1 there). Both start where ``samplers.sample`` does.
    """
    g = samplers.grids.check_grid(grid).tolist()
    if g[-1] != 0:
        raise ValueError(f"teacher grid must end at 0; got {g[-1]}")
    if solver == "adaptive":
        fine = g[:-1] + ([TEACHER_FLOOR] if g[-2] > TEACHER_FLOOR else []) + [0.0]
        keep = list(range(len(g) - 1)) + [len(fine) - 1]
        opts: dict[str, Any] = {"rtol": rtol, "atol": atol}
    elif solver == "heun":
        if extra_nodes < 0:
            raise ValueError(f"extra_nodes must be >= 0; got {extra_nodes}")
        fine, keep = _insert_nodes(g, extra_nodes)
        opts = {}
    else:
        raise ValueError(f"unknown teacher solver {solver!r}; valid: {list(TEACHER_SOLVERS)}")
    fine_t = torch.tensor(fine, dtype=torch.float64)
    chunks: list[list[torch.Tensor]] = []
    for lo in range(0, noise.shape[0], batch):  # bounded memory; adaptive's error norm is per chunk
        eps = noise[lo:lo + batch]
        seen: dict[int, torch.Tensor] = {0: eps * fine[0]}  # y_T = se_0 eps (samplers.sample's start)
        cb = lambda d: seen.__setitem__(d["i"] + 1, d["y"])  # noqa: E731  (state after step i, at level i+1)
        samplers.sample(model, eps, sampler=solver, grid=fine_t, callback=cb, **opts)
        chunks.append([seen[k] for k in keep])
    return [torch.cat([c[j] for c in chunks]) for j in range(len(keep))]


# ---------------------------------------------------------------------------------------------
# Grid parametrisation and fitting
# ---------------------------------------------------------------------------------------------


def _softplus_inv(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))  # log(e^x - 1), stable for large x


def grid_to_theta(grid: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(se_0, theta) with softplus(theta_j) = log se_{j-1} - log se_j over the nonzero levels."""
    g = samplers.grids.check_grid(grid)
    if g[-1] != 0 or not math.isfinite(float(g[0])) or g.numel() < 3:
        raise ValueError(f"a learnable grid needs a finite start, >= 1 free level and a final 0; got {g.tolist()}")
    logs = torch.log(g[:-1])
    return float(g[0]), _softplus_inv(logs[:-1] - logs[1:])


def theta_to_grid(top: float, theta: torch.Tensor) -> torch.Tensor:
    """Inverse of ``grid_to_theta``: a strictly decreasing grid [se_0, ..., se_last, 0] (float64), se_0 exact."""
    logs = math.log(top) - torch.cumsum(F.softplus(theta.double()), 0)
    return torch.cat([torch.tensor([top], dtype=torch.float64), logs.exp(), torch.zeros(1, dtype=torch.float64)])


@dataclass
class GridFit:
    """A learned grid and how it was obtained."""

    grid: torch.Tensor
    sampler: str
    options: dict
    loss_init: float
    loss_final: float
    history: list[float] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def sample_with_grid(model, noise: torch.Tensor, grid: torch.Tensor, sampler: str, options: dict) -> torch.Tensor:
    """The sampler's final samples from unit noise on ``grid`` (through ``samplers.sample``)."""
    return samplers.sample(model, noise, sampler=sampler, grid=grid, **options).x


def fit_grid(model, noise: torch.Tensor, target: torch.Tensor, init_grid: torch.Tensor, sampler: str,
             options: Optional[dict] = None, *, max_evals: int = 30, fd_step: float = 1e-3,
             log: Optional[Callable[[str], None]] = None, progress: bool = False,
             track: Optional[Callable[[dict, int], None]] = None) -> GridFit:
    """Least squares (scipy's trust-region LM) on theta: residuals = sampler output - ``target`` (teacher finals).

    ``track(values, evaluation)`` gets the MSE of every residual evaluation (for the experiment trackers).

    The objective is a sum of squares over a fixed batch, so a Gauss-Newton method with a
    finite-difference Jacobian (p + 1 sampler runs per iteration for p levels) converges in a
    handful of iterations where first-order methods oscillate on this steep, narrow valley.
    """
    from scipy.optimize import least_squares

    options = dict(options or {})
    if samplers.registry.spec(sampler).stochastic and not (sampler == "ddim" and options.get("eta", 1.0) == 0):
        raise ValueError(f"sampler {sampler!r} is stochastic: a grid can only be fitted for deterministic samplers "
                         f"(valid: {[n for n in samplers.available() if not samplers.registry.spec(n).stochastic]})")
    if noise.shape != target.shape:
        raise ValueError(f"noise {tuple(noise.shape)} and teacher target {tuple(target.shape)} must match")
    if max_evals < 1 or fd_step <= 0:
        raise ValueError(f"need max_evals >= 1 and fd_step > 0; got {max_evals}, {fd_step}")
    top, theta0 = grid_to_theta(init_grid)
    tgt = target.double().reshape(-1)
    scale = 1 / math.sqrt(tgt.numel())  # residuals scaled so that |r|^2 is the per-value MSE
    history: list[float] = []
    from tqdm.auto import tqdm

    bar = tqdm(desc="grid fit", unit="solve", disable=not progress)  # one sampler run per residual evaluation

    def residuals(th: np.ndarray) -> np.ndarray:
        g = theta_to_grid(top, torch.as_tensor(th, dtype=torch.float64))
        r = (sample_with_grid(model, noise, g, sampler, options).double().reshape(-1) - tgt) * scale
        if not bool(torch.isfinite(r).all()):
            raise FloatingPointError(f"grid fit: {int((~torch.isfinite(r)).sum())} non-finite residuals at grid {g.tolist()}")
        history.append(float(r.pow(2).sum()))
        if track is not None:
            track({"mse": history[-1]}, len(history))
        bar.update(1)
        bar.set_postfix(mse=f"{history[-1]:.3e}")
        if log is not None and not progress:
            log(f"  eval {len(history):3d}  mse {history[-1]:.4e}  grid " + ", ".join(f"{v:.4g}" for v in g.tolist()))
        return r.numpy()

    loss_init = float(((sample_with_grid(model, noise, init_grid, sampler, options).double().reshape(-1) - tgt) * scale)
                      .pow(2).sum())
    res = least_squares(residuals, theta0.numpy(), method="trf", diff_step=fd_step, max_nfev=max_evals, x_scale="jac")
    bar.close()
    theta = torch.as_tensor(res.x, dtype=torch.float64)
    loss_final = 2 * float(res.cost)
    if loss_final > loss_init:  # never hand back a grid worse than the one we started from
        theta, loss_final = theta0, loss_init
    return GridFit(theta_to_grid(top, theta), sampler, options, loss_init, loss_final, history)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def save_grid(path: str | Path, fit: GridFit) -> Path:
    """Write the learned grid as JSON (levels, sampler, options, training record)."""
    opts = {k: v for k, v in fit.options.items() if isinstance(v, (bool, int, float, str))}
    payload = {"format": FORMAT, "grid": [float(v) for v in fit.grid], "sampler": fit.sampler, "options": opts,
               "nfe": samplers.nfe_of(fit.sampler, fit.grid.numel() - 1, **opts),
               "loss_init": fit.loss_init, "loss_final": fit.loss_final, "history": fit.history, "meta": fit.meta}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def load_grid(path: str | Path) -> GridFit:
    """Read a grid saved by ``save_grid``; ``.grid`` is a float64 tensor ready for ``grid=``."""
    d = json.loads(Path(path).read_text())
    if d.get("format") != FORMAT:
        raise ValueError(f"{path} is not a learned-grid file (format={d.get('format')!r}, expected {FORMAT!r})")
    grid = samplers.grids.check_grid(torch.tensor(d["grid"], dtype=torch.float64), f"grid in {path}")
    return GridFit(grid, d["sampler"], d.get("options", {}), d.get("loss_init", math.nan), d.get("loss_final", math.nan),
                   d.get("history", []), d.get("meta", {}))


# ---------------------------------------------------------------------------------------------
# One call that does it all (used by the CLI and the benchmark)
# ---------------------------------------------------------------------------------------------


def initial_grid(model, sampler: str, nfe: int, options: dict, kind: Optional[str] = None, **grid_opts) -> torch.Tensor:
    """The grid ``samplers.sample`` would use for this sampler and budget: the starting point of a fit."""
    n = samplers.steps_for_nfe(sampler, nfe, **options)
    return samplers.default_grid(sampler, n, model.schedule, kind, **grid_opts)


def learn(teacher: Teacher, sampler: str, nfe: int, options: Optional[dict] = None, *, n_train: int = 512,
          n_val: int = 256, seed: int = TRAIN_SEED, init: Optional[torch.Tensor] = None,
          teacher_solver: str = "adaptive", extra_nodes: int = 8, rtol: float = 1e-6, max_evals: int = 30,
          fd_step: float = 1e-3, log: Optional[Callable[[str], None]] = None, progress: bool = False,
          track: Optional[Callable[[dict, int], None]] = None) -> GridFit:
    """Draw training noises, solve the teacher once, fit the grid, and keep it only if it helps on held-out noises.

    Noises ``seed .. seed + n_train - 1`` fit the grid; the next ``n_val`` (still training seeds,
    never evaluation ones) check it: a few samples near a mode boundary can dominate a squared
    error, and a grid bent to fix those few is worse elsewhere. The fitted grid is kept only if
    its held-out MSE beats the initial grid's; otherwise the initial grid is returned (and says so).
    """
    options = dict(options or {})
    model = teacher.model
    init = initial_grid(model, sampler, nfe, options) if init is None else samplers.grids.check_grid(init)
    noise = training_noise(n_train + n_val, teacher.shape, seed, teacher.dtype)
    t0 = time.perf_counter()
    target = teacher_states(model, noise, init, solver=teacher_solver, extra_nodes=extra_nodes,
                            rtol=rtol, atol=rtol)[-1]
    fit = fit_grid(model, noise[:n_train], target[:n_train], init, sampler, options, max_evals=max_evals,
                   fd_step=fd_step, log=log, progress=progress, track=track)
    meta = {"teacher": teacher.spec, "teacher_solver": teacher_solver, "extra_nodes": extra_nodes, "rtol": rtol,
            "train_seed": seed, "n_train": n_train, "n_val": n_val, "max_evals": max_evals, "fd_step": fd_step,
            "init_grid": [float(v) for v in init]}
    if n_val > 0:
        val = lambda g: float((sample_with_grid(model, noise[n_train:], g, sampler, options).double()  # noqa: E731
                               - target[n_train:].double()).pow(2).mean())
        meta["val_mse_init"], meta["val_mse_fit"] = val(init), val(fit.grid)
        meta["kept"] = "fit" if meta["val_mse_fit"] < meta["val_mse_init"] else "init"
        if meta["kept"] == "init":
            fit.grid, fit.loss_final = init.clone(), fit.loss_init
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    fit.meta = meta
    return fit


def _parse_options(items: Sequence[str]) -> dict:
    """``k=v`` strings -> dict, values read as JSON when they parse (true, 0.5, "x")."""
    out: dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"--opt expects KEY=VALUE (e.g. --opt afs=true); got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    """CLI of ``python -m distill grid``."""
    p = argparse.ArgumentParser(prog="python -m distill grid", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--teacher", required=True, help="oracle:ring2d | oracle:mixture64d | RUN_DIR")
    p.add_argument("--sampler", default="ipndm", help="a deterministic sampler from samplers.available()")
    p.add_argument("--nfe", type=int, required=True, help="network evaluations of the learned grid")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="sampler option, e.g. --opt afs=true (repeatable)")
    p.add_argument("--init", default=None, help="initial grid family from samplers.grids (default: the sampler's default)")
    p.add_argument("--teacher-solver", default="adaptive", choices=TEACHER_SOLVERS, help="solver of the reference solves")
    p.add_argument("--extra-nodes", type=int, default=8, help="heun teacher: nodes inserted per interval")
    p.add_argument("--rtol", type=float, default=1e-6, help="adaptive teacher: rtol = atol")
    p.add_argument("--n-train", type=int, default=512, help="training noises (seeds 1000000+i)")
    p.add_argument("--n-val", type=int, default=256, help="held-out training noises that must confirm the fit")
    p.add_argument("--seed", type=int, default=TRAIN_SEED, help="first per-image seed of the training noises")
    p.add_argument("--max-evals", type=int, default=30, help="least-squares iterations (sampler runs besides the Jacobian's)")
    p.add_argument("--fd-step", type=float, default=1e-3, help="relative finite-difference step of the least-squares Jacobian")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--no-progress", action="store_true", help="print one line per evaluation instead of a tqdm progress bar")
    p.add_argument("--out", required=True, help="where to write the grid (.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (and --log-dir's logs)")
    add_tracker_args(p)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python -m distill grid``."""
    args = build_parser().parse_args(argv)
    from diffusion.cli import check_device

    from .common import check_out_file, check_trackers, open_trackers

    check_out_file(args.out, args.overwrite)
    check_trackers(args)  # a bad --log-with or a used --log-dir stops before any work
    check_device(args.device)
    options = _parse_options(args.opt)
    for flag, v in (("--nfe", args.nfe), ("--n-train", args.n_train), ("--max-evals", args.max_evals)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1; got {v}")
    if args.n_val < 0 or args.extra_nodes < 0 or args.seed < 0 or not (args.rtol > 0 and args.fd_step > 0):
        raise ValueError(f"--n-val, --extra-nodes, --seed must be >= 0 and --rtol, --fd-step > 0; got {args.n_val}, "
                         f"{args.extra_nodes}, {args.seed}, {args.rtol}, {args.fd_step}")
    import samplers

    if args.sampler not in samplers.available():
        raise ValueError(f"unknown sampler {args.sampler!r}; available samplers: {', '.join(samplers.available())}")
    teacher = load_teacher(args.teacher, args.device)
    init = None
    if args.init is not None:
        init = initial_grid(teacher.model, args.sampler, args.nfe, options, kind=args.init)
    start = initial_grid(teacher.model, args.sampler, args.nfe, options) if init is None else init
    trackers = open_trackers(args, {**vars(args), "opt": options, "init_grid": [float(v) for v in start]})
    fit = learn(teacher, args.sampler, args.nfe, options, n_train=args.n_train, n_val=args.n_val, seed=args.seed,
                init=init,
                teacher_solver=args.teacher_solver, extra_nodes=args.extra_nodes, rtol=args.rtol, max_evals=args.max_evals,
                fd_step=args.fd_step, log=print, progress=not args.no_progress, track=trackers.log)
    final = {"final/mse_init": fit.loss_init, "final/mse_fit": fit.loss_final,
             **{f"final/{k}": fit.meta[k] for k in ("val_mse_init", "val_mse_fit") if k in fit.meta},
             **{f"final/grid_{i}": float(v) for i, v in enumerate(fit.grid)}}
    trackers.log(final, step=len(fit.history))
    trackers.finish()
    if not torch.isfinite(fit.grid).all():
        raise FloatingPointError(f"the fitted grid is not finite ({fit.grid.tolist()}); nothing was written")
    path = save_grid(args.out, fit)
    print(f"grid for {fit.sampler} {fit.options} at NFE {args.nfe}: "
          + ", ".join(f"{v:.5g}" for v in fit.grid.tolist()))
    print(f"teacher MSE on {args.n_train} training noises: {fit.loss_init:.4e} -> {fit.loss_final:.4e} "
          f"({fit.meta['seconds']} s); wrote {path}")
    if args.n_val > 0:
        print(f"held-out MSE on {args.n_val} more training noises: {fit.meta['val_mse_init']:.4e} (initial grid) vs "
              f"{fit.meta['val_mse_fit']:.4e} (fitted): kept the {fit.meta['kept']} grid")
    return 0


__all__ = ["TRAIN_SEED", "Teacher", "load_teacher", "training_noise", "check_disjoint_seeds", "teacher_states",
           "grid_to_theta", "theta_to_grid", "GridFit", "fit_grid", "sample_with_grid", "save_grid", "load_grid",
           "initial_grid", "learn", "main"]
