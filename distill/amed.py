"""``python -m distill amed``: distil the AMED predictor of the ``mvt`` sampler from a finer teacher solve (docs/theory.md §7.1).

"Distil the solver, not the model": the teacher solves the same ODE from the same noises on a
finer grid (``heun`` with M extra nodes per interval, AMED's choice, or torchdiffeq's dopri5);
each student step starts at the teacher's state at its node and takes one ``mvt_step`` whose
coefficients (r, c, a) come from the predictor, and the loss is the L2 distance to the teacher's
state at the next node. Each step's first call D(y, se_c) does not depend on the predictor, so it
is computed once per training noise; a training iteration costs one network call per step.

With ``--learn-grid`` the sigma nodes are learned too, alternating with the predictor: a node
update fits the grid of the whole mvt solve (predictor fixed) to the accurate ODE solution (dopri5)
with ``distill.grid``'s least squares, then the predictor is re-trained on the teacher's states at
the new nodes. Every (grid, predictor) pair met on the way is scored by the final samples' MSE to
the dopri5 solution on the training noises, and the best one is kept. The result is one safetensors file; ``samplers.sample(..., sampler="mvt",
predictor=PATH)`` reads its grid and AFS setting from the file's metadata.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from diffusion.cli import HelpFormatter
import samplers
from samplers.core import afs_slope
from samplers.mvt import AMEDPredictor, features_of, mvt_step, save_predictor

from .common import add_tracker_args
from .grid import (TEACHER_SOLVERS, TRAIN_SEED, Teacher, fit_grid, initial_grid, load_teacher, sample_with_grid,
                   teacher_states, training_noise)


@dataclass
class AmedFit:
    """A trained predictor, the grid it was trained for, and the training record."""

    predictor: AMEDPredictor
    grid: torch.Tensor
    afs: bool
    history: list[float] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def feature_dim_of(model) -> int:
    """Width of the net's bottleneck feature (U-Net), or 0 for a net without one (the oracle)."""
    return int(getattr(model.net, "feature_dim", 0)) if hasattr(model.net, "bottleneck_features") else 0


@torch.no_grad()
def step_inputs(model, states: list[torch.Tensor], grid: list[float], afs: bool, pred: AMEDPredictor,
                batch: int = 1024) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Per student step: (D(y_i, se_i), predictor features) at the teacher's states; AFS replaces step 0's call."""
    out = []
    for i, y in enumerate(states[:-1]):
        se = grid[i]
        if afs and i == 0:  # the analytic first step, exactly as the mvt sampler does it
            x0 = y - se * afs_slope(y, se)
            feats = None if pred.feature_dim == 0 else torch.zeros(y.shape[0], pred.feature_dim, device=y.device)
            out.append((x0, feats))
            continue
        x0s, fs = [], []
        for lo in range(0, y.shape[0], batch):
            x0s.append(model.denoise(y[lo:lo + batch], se))
            f = features_of(model, pred)  # captured by the forward just made
            fs.append(None if f is None else f.detach().clone())
        out.append((torch.cat(x0s), None if fs[0] is None else torch.cat(fs)))
    return out


def step_weights(grid: list[float], sigma_data: float = 0.5) -> list[float]:
    """Weight of step i's L2: sigma_data^2/(sigma_data^2 + se_{i+1}^2).

    An error made at a high noise level is mostly washed out by the later denoising (the flow map
    shrinks y by about sigma_data/se), so every step's error is counted in units of its effect on
    the sample rather than in raw y units, which would let the first step dominate.
    """
    return [sigma_data**2 / (sigma_data**2 + s**2) for s in grid[1:]]


def train_predictor(model, grid: torch.Tensor, states: list[torch.Tensor], *, afs: bool,
                    predictor: Optional[AMEDPredictor] = None, iters: int = 300, lr: float = 5e-3, batch: int = 256,
                    seed: int = TRAIN_SEED, log: Optional[Callable[[str], None]] = None,
                    progress: bool = False, track: Optional[Callable[[dict, int], None]] = None
                    ) -> tuple[AMEDPredictor, list[float]]:
    """Adam (lr 5e-3, betas 0.9/0.999 as in AMED) on the weighted per-step L2 to the teacher's next states.

    ``track(values, iteration)`` receives every iteration's loss (for the experiment trackers).
    """
    g = grid.tolist()
    if len(states) != len(g):
        raise ValueError(f"need one teacher state per grid level ({len(g)}); got {len(states)}")
    if predictor is None:
        with torch.random.fork_rng(devices=[]):  # seeded initial weights: same seed, same predictor
            torch.manual_seed(seed)
            predictor = AMEDPredictor(feature_dim=feature_dim_of(model))
    pred = predictor
    pred = pred.double() if states[0].dtype == torch.float64 else pred
    inputs = step_inputs(model, states, g, afs, pred)
    weights = step_weights(g, getattr(model, "sigma_data", 0.5))
    opt = torch.optim.Adam(pred.parameters(), lr=lr, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(seed)
    n = states[0].shape[0]
    history: list[float] = []
    from tqdm.auto import tqdm

    bar = tqdm(range(iters), desc="amed", unit="it", disable=not progress)
    for it in bar:
        idx = torch.randperm(n, generator=gen)[: min(batch, n)]
        loss = torch.zeros((), dtype=torch.float64)
        for i in range(len(g) - 1):
            x0_c, feats = inputs[i]
            b = idx.numel()
            se_c = torch.full((b,), g[i], dtype=torch.float64)
            se_n = torch.full((b,), g[i + 1], dtype=torch.float64)
            r, c, a = pred(se_c, se_n, None if feats is None else feats[idx])
            y_next, _ = mvt_step(model, states[i][idx], g[i], g[i + 1], r, c, a, x0_c=x0_c[idx])
            loss = loss + weights[i] * (y_next - states[i + 1][idx]).double().pow(2).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"AMED training: non-finite loss at iteration {it} (grid {g})")
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        if track is not None:
            track({"weighted_l2": history[-1]}, it)
        if progress and (it % 10 == 0 or it == iters - 1):
            bar.set_postfix(weighted_l2=f"{history[-1]:.3e}")
        elif log is not None and not progress and (it % 100 == 0 or it == iters - 1):
            log(f"  iter {it:4d}  weighted L2 {history[-1]:.4e}")
    return pred.eval(), history


@torch.no_grad()
def coefficients(pred: AMEDPredictor, grid: torch.Tensor) -> list[tuple[float, float, float]]:
    """(r, c, a) per step for a featureless predictor (the oracle): what the training converged to."""
    g = grid.tolist()
    out = []
    for i in range(len(g) - 1):
        r, c, a = pred(torch.tensor([g[i]]), torch.tensor([g[i + 1]]), None)
        out.append((float(r), float(c), float(a)))
    return out


def distill(teacher: Teacher, nfe: int, afs: bool = True, *, grid: Optional[torch.Tensor] = None,
            teacher_solver: str = "heun", extra_nodes: int = 1, rtol: float = 1e-6, n_train: int = 1024,
            seed: int = TRAIN_SEED, iters: int = 300, lr: float = 5e-3, batch: int = 256, learn_grid: bool = False,
            rounds: int = 2, grid_evals: int = 20, grid_batch: int = 256,
            log: Optional[Callable[[str], None]] = None, progress: bool = False,
            track: Optional[Callable[[dict, int], None]] = None) -> AmedFit:
    """Train an AMED predictor for ``mvt`` at ``nfe`` (2 per step, one less with AFS), optionally with its nodes.

    ``track(values, step)`` gets the loss of every predictor iteration (steps count on across rounds) and
    each round's final-sample MSE.
    """
    model = teacher.model
    opts = {"afs": afs}
    g = initial_grid(model, "mvt", nfe, opts) if grid is None else samplers.grids.check_grid(grid)
    if samplers.nfe_of("mvt", g.numel() - 1, **opts) != nfe:
        raise ValueError(f"grid {g.tolist()} costs {samplers.nfe_of('mvt', g.numel() - 1, **opts)} NFE with mvt "
                         f"(afs={afs}), not {nfe}")
    if not learn_grid:
        rounds = 1
    t0 = time.perf_counter()
    noise = training_noise(n_train, teacher.shape, seed, teacher.dtype)
    pred, history, grid_log = None, [], []
    k = min(grid_batch, n_train)
    # Candidates are scored on the final samples against the accurate ODE solution (dopri5), which
    # does not depend on the nodes; the grid is fitted to it too.
    final = teacher_states(model, noise[:k], g, solver="adaptive", rtol=rtol, atol=rtol)[-1]
    best: Optional[tuple[float, torch.Tensor, dict]] = None

    def consider(mse: float, grid_: torch.Tensor) -> None:
        nonlocal best
        if best is None or mse < best[0]:
            best = (mse, grid_.clone(), copy.deepcopy(pred.state_dict()))

    for rnd in range(rounds):
        if log:
            log(f"round {rnd}: grid " + ", ".join(f"{v:.4g}" for v in g.tolist()))
        states = teacher_states(model, noise, g, solver=teacher_solver, extra_nodes=extra_nodes, rtol=rtol, atol=rtol)
        pred, h = train_predictor(model, g, states, afs=afs, predictor=pred, iters=iters, lr=lr, batch=batch,
                                  seed=seed + rnd, log=log, progress=progress,
                                  track=None if track is None else lambda v, it: track(v, len(history) + it))
        history += h
        x = sample_with_grid(model, noise[:k], g, "mvt", {"predictor": pred, "afs": afs})
        mse = float((x.double() - final.double()).pow(2).mean())
        consider(mse, g)
        entry = {"round": rnd, "final_mse_after_predictor": mse}
        if learn_grid and rnd < rounds - 1:
            fit = fit_grid(model, noise[:k], final, g, "mvt", {"predictor": pred, "afs": afs}, max_evals=grid_evals,
                           progress=progress)
            entry["final_mse_after_grid_fit"] = fit.loss_final
            g = fit.grid
            consider(fit.loss_final, g)
        grid_log.append(entry)
        if track is not None:
            track({k: v for k, v in entry.items() if k != "round"}, len(history))
        if log:
            log(f"  {entry}")
    train_mse, g, state = best
    pred.load_state_dict(state)
    meta = {"sampler": "mvt", "grid": [float(v) for v in g], "afs": bool(afs), "nfe": int(nfe),
            "teacher": teacher.spec, "teacher_solver": teacher_solver, "extra_nodes": int(extra_nodes),
            "train_seed": int(seed), "n_train": int(n_train), "iters": int(iters), "lr": lr,
            "learn_grid": bool(learn_grid), "rounds": int(rounds), "rounds_log": grid_log,
            "train_final_mse": train_mse, "n_score": int(k),
            "final_loss": history[-1] if history else math.nan, "seconds": round(time.perf_counter() - t0, 1)}
    if pred.feature_dim == 0:
        meta["coefficients"] = [list(v) for v in coefficients(pred, g)]
    pred.meta = meta
    return AmedFit(pred, g, afs, history, meta)


def save(path: str | Path, fit: AmedFit) -> Path:
    """Write the predictor (float32 weights) as safetensors, grid and training record in its metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_predictor(path, fit.predictor.float(), fit.meta)
    return path


def build_parser() -> argparse.ArgumentParser:
    """CLI of ``python -m distill amed``."""
    p = argparse.ArgumentParser(prog="python -m distill amed", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--teacher", required=True, help="oracle:ring2d | oracle:mixture64d | RUN_DIR")
    p.add_argument("--nfe", type=int, default=5, help="network evaluations of the student (2 per step, -1 with AFS)")
    p.add_argument("--no-afs", dest="afs", action="store_false", help="spend a network call on the first step too")
    p.add_argument("--grid", default=None, help="comma-separated initial levels ending in 0 (default: the mvt default grid)")
    p.add_argument("--teacher-solver", default="heun", choices=TEACHER_SOLVERS, help="solver of the reference trajectories")
    p.add_argument("--extra-nodes", type=int, default=1, help="heun teacher: nodes inserted per student interval (M)")
    p.add_argument("--rtol", type=float, default=1e-6, help="adaptive teacher: rtol = atol")
    p.add_argument("--n-train", type=int, default=1024, help="training noises (seeds 1000000+i)")
    p.add_argument("--seed", type=int, default=TRAIN_SEED, help="first per-image seed of the training noises")
    p.add_argument("--iters", type=int, default=300, help="predictor training iterations")
    p.add_argument("--lr", type=float, default=5e-3, help="predictor learning rate (Adam)")
    p.add_argument("--batch", type=int, default=256, help="trajectories per training batch")
    p.add_argument("--learn-grid", action="store_true", help="learn the sigma nodes jointly (alternating)")
    p.add_argument("--rounds", type=int, default=3, help="with --learn-grid: predictor/grid alternations")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--no-progress", action="store_true", help="print log lines instead of a tqdm progress bar")
    p.add_argument("--out", required=True, help="where to write the predictor (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (and --log-dir's logs)")
    add_tracker_args(p)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python -m distill amed``."""
    args = build_parser().parse_args(argv)
    from diffusion.cli import check_device

    from .common import check_out_file, check_trackers, check_weights_finite, open_trackers

    check_out_file(args.out, args.overwrite)
    check_trackers(args)  # a bad --log-with or a used --log-dir stops before any work
    check_device(args.device)
    for flag, v in (("--nfe", args.nfe), ("--n-train", args.n_train), ("--iters", args.iters), ("--batch", args.batch),
                    ("--rounds", args.rounds)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1; got {v}")
    if not (args.lr > 0 and args.rtol > 0) or args.extra_nodes < 0 or args.seed < 0:
        raise ValueError(f"--lr and --rtol must be > 0, --extra-nodes and --seed >= 0; got {args.lr}, {args.rtol}, "
                         f"{args.extra_nodes}, {args.seed}")
    grid = None
    if args.grid:
        try:
            grid = torch.tensor([float(v) for v in args.grid.split(",")], dtype=torch.float64)
        except ValueError:
            raise ValueError(f"--grid {args.grid!r}: expected comma-separated numbers ending in 0, e.g. 80,2,0.3,0") from None
    teacher = load_teacher(args.teacher, args.device)
    init = initial_grid(teacher.model, "mvt", args.nfe, {"afs": args.afs}) if grid is None else grid
    trackers = open_trackers(args, {**vars(args), "grid": [float(v) for v in init]})  # the resolved options
    fit = distill(teacher, args.nfe, args.afs, grid=grid, teacher_solver=args.teacher_solver,
                  extra_nodes=args.extra_nodes, rtol=args.rtol, n_train=args.n_train, seed=args.seed,
                  iters=args.iters, lr=args.lr, batch=args.batch, learn_grid=args.learn_grid, rounds=args.rounds,
                  log=print, progress=not args.no_progress, track=trackers.log)
    trackers.log({"final/weighted_l2": fit.meta["final_loss"], "final/train_mse": fit.meta["train_final_mse"],
                  **{f"final/grid_{i}": v for i, v in enumerate(fit.meta["grid"])}}, step=len(fit.history))
    trackers.finish()
    check_weights_finite({"AMED predictor": fit.predictor}, f"after {args.iters} iterations")
    path = save(args.out, fit)
    print(f"mvt predictor for NFE {args.nfe} (afs={args.afs}) on grid "
          + ", ".join(f"{v:.5g}" for v in fit.grid.tolist()))
    if "coefficients" in fit.meta:
        print("per-step (r, c, a): " + "; ".join(f"({r:.3f}, {c:.4f}, {a:.3f})" for r, c, a in fit.meta["coefficients"]))
    print(f"final weighted L2 {fit.meta['final_loss']:.4e} ({fit.meta['seconds']} s); wrote {path}")
    return 0


__all__ = ["AmedFit", "feature_dim_of", "step_inputs", "step_weights", "train_predictor", "coefficients", "distill",
           "save", "main"]
