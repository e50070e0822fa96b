#!/usr/bin/env python
"""Sampler overhead: wall time of a sampler / (NFE x one forward of the same net), ours and diffusers' side by side.

Net: the tiny U-Net (``build_model("unet", preset="tiny")``, 16x16x1, batch 64, float32, CPU,
random weights: the cost of a forward does not depend on what it learned), wrapped in a
``ScoreModel`` (cosine schedule, eps prediction). One forward = the bare ``net(x, c_noise)`` call,
so the ratio charges everything else to the sampler: the ScoreModel wrapper (schedule
coefficients, parametrization conversion), the grid, the update arithmetic, the per-step checks.
The peer is diffusers' scheduler loop (``scale_model_input`` + ``step``) around the same bare net.

Timing on a shared machine drifts, so "one forward" is measured inside each sampler run: forward
pre/post hooks on the net add up the time spent in its calls, and ratio = wall / (NFE x mean
in-run forward) = wall / time in the net. Both sides of the ratio see the same load; the hook
also checks that the net ran exactly the NFE the sampler reported. Median over ``--reps``
repetitions. Target: <= 1.05.

    python benchmarks/sampler_overhead.py [--nfe 10] [--reps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]  # don't let this folder shadow packages
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402

import samplers  # noqa: E402
from benchmarks.common import Target, environment, markdown_table, write_json, write_markdown  # noqa: E402
from diffusion.models import build_model  # noqa: E402
from diffusion.schedules import by_name  # noqa: E402
from diffusion.score_model import ScoreModel  # noqa: E402

NAME = "sampler_overhead"
TARGET = 1.05
BATCH, RES = 64, 16


def budget_for(name: str, nfe: int) -> tuple[int, dict]:
    """(NFE budget, options) a sampler can meet near ``nfe`` (Heun and friends need odd budgets)."""
    opts: dict = {}
    if name == "adaptive":
        return 0, {"rtol": 1e-2, "atol": 1e-2}
    if name == "ddim":
        opts = {"eta": 0.0}
    for b in (nfe, nfe - 1, nfe + 1):
        try:
            samplers.steps_for_nfe(name, b, **opts)
            return b, opts
        except ValueError:
            continue
    raise ValueError(f"no budget near {nfe} for {name}")


class NetClock:
    """Forward pre/post hooks adding up the wall time spent inside a module's calls."""

    def __init__(self, module: torch.nn.Module):
        self.total, self.calls, self._t0 = 0.0, 0, 0.0
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def reset(self) -> None:
        """Zero the totals."""
        self.total, self.calls = 0.0, 0

    def _start(self, *_: object) -> None:
        self._t0 = time.perf_counter()

    def _stop(self, *_: object) -> None:
        self.total += time.perf_counter() - self._t0
        self.calls += 1


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def diffusers_loop(net, cls_name: str, steps: int, noise: torch.Tensor, **kw) -> Callable[[], int]:
    """A diffusers sampling loop around the bare net (eps prediction, the DDPM betas); returns calls made."""
    import diffusers

    def run() -> int:
        sched = getattr(diffusers, cls_name)(num_train_timesteps=1000, beta_schedule="linear", **kw)
        sched.set_timesteps(steps)
        x = noise * sched.init_noise_sigma
        calls = 0
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t)
            out = net(inp, t.float().expand(x.shape[0]))
            calls += 1
            x = sched.step(out, t, x).prev_sample
        return calls

    return run


def main(argv: Optional[list[str]] = None) -> int:
    """Measure every sampler's overhead ratio and write sampler_overhead.{md,json}."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="2 repetitions, nothing written unless --write")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps = 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_model("unet", preset="tiny", resolution=RES, in_channels=1).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    model = ScoreModel(net, by_name("cosine"), parametrization="eps", conditioning="t")
    noise = samplers.noise.randn((BATCH, 1, RES, RES), samplers.noise.generators(0, BATCH))
    x_probe, c_probe = noise.clone(), torch.full((BATCH,), 0.5)

    def forward() -> float:
        with torch.no_grad():
            return timed(lambda: net(x_probe, c_probe))

    for _ in range(3):  # warm-up: allocator, oneDNN kernels
        forward()
    base = [forward() for _ in range(3)]
    clock = NetClock(net)
    print(f"one forward of the tiny U-Net (batch {BATCH}, {RES}x{RES}, {args.threads} thread(s)): "
          f"{1e3 * statistics.median(base):.1f} ms", flush=True)

    jobs: list[tuple[str, str, Callable[[], int]]] = []
    skipped: dict[str, str] = {}
    for name in samplers.available():
        try:
            budget, opts = budget_for(name, args.nfe)
        except ValueError as e:
            skipped[name] = str(e)
            continue
        if name == "adaptive":
            grid = samplers.grids.make("polynomial", 2, model.schedule, se_last=0.02)  # dopri5 from se_max to 0.02, then x0
            run = lambda o=opts, g=grid: samplers.sample(model, noise, sampler="adaptive", grid=g, **o).nfe  # noqa: E731
        else:
            run = lambda n=name, b=budget, o=opts: samplers.sample(model, noise, sampler=n, nfe=b,  # noqa: E731
                                                                   generator=torch.Generator().manual_seed(1), **o).nfe
        jobs.append(("ours", name, run))
    jobs.append(("ours", "default (sample(nfe=N))", lambda: samplers.sample(model, noise, nfe=args.nfe).nfe))
    for label, cls, kw in (("DDIMScheduler", "DDIMScheduler", dict(clip_sample=False, timestep_spacing="trailing")),
                           ("EulerDiscreteScheduler", "EulerDiscreteScheduler", {}),
                           ("DPMSolverMultistepScheduler (2M)", "DPMSolverMultistepScheduler", {}),
                           ("UniPCMultistepScheduler", "UniPCMultistepScheduler", {})):
        jobs.append(("diffusers", label, diffusers_loop(net, cls, args.nfe, noise, **kw)))

    rows, results, targets = [], [], []
    for family, name, run in jobs:
        with torch.no_grad():
            run()  # warm-up (first-call costs: imports, tqdm, scheduler construction caches)
        ratios, walls, fwds, extra, nfe = [], [], [], [], 0
        for _ in range(args.reps):
            clock.reset()
            with torch.no_grad():
                t0 = time.perf_counter()
                nfe = run()
                wall = time.perf_counter() - t0
            if clock.calls != nfe:
                raise RuntimeError(f"{name}: reported NFE {nfe} but the net ran {clock.calls} times")
            fwd = clock.total / clock.calls  # one forward, timed inside this very run
            ratios.append(wall / (nfe * fwd))
            extra.append((wall - clock.total) / nfe)  # seconds per call spent outside the net
            walls.append(wall)
            fwds.append(fwd)
        ratio = statistics.median(ratios)
        res = {"family": family, "sampler": name, "nfe": nfe, "wall_s": statistics.median(walls),
               "forward_s": statistics.median(fwds), "ratio": ratio, "ratio_range": [min(ratios), max(ratios)],
               "overhead_per_call_ms": 1e3 * statistics.median(extra),
               "reps": args.reps}
        results.append(res)
        rows.append([family, name, nfe, 1e3 * res["wall_s"], 1e3 * res["forward_s"], res["overhead_per_call_ms"], ratio,
                     f"{min(ratios):.3f}..{max(ratios):.3f}"])
        print(f"{family:9s} {name:34s} NFE {nfe:3d}  wall {1e3 * res['wall_s']:8.1f} ms  forward "
              f"{1e3 * res['forward_s']:7.1f} ms  ratio {ratio:.3f}", flush=True)
        if family == "ours":
            targets.append(Target(f"overhead {name}", ratio, TARGET))
    for t in targets:
        print(t.line())
    if args.quick and not args.write:
        return 0
    env = environment()
    write_json(NAME, {"benchmark": NAME, "setup": {"net": "unet tiny", "batch": BATCH, "resolution": RES, "channels": 1,
                                                   "schedule": "cosine", "parametrization": "eps", "threads": args.threads,
                                                   "nfe": args.nfe, "reps": args.reps, "target": TARGET},
                      "environment": env, "results": results, "skipped": skipped,
                      "targets": [t.as_dict() for t in targets]})
    md = [f"# Sampler overhead: wall time / (NFE x one forward), tiny U-Net, batch {BATCH}, {RES}x{RES}x1, CPU", "",
          f"Generated by `python benchmarks/sampler_overhead.py` ({args.threads} torch thread(s), median of {args.reps} "
          f"repetitions; one forward is timed inside each run by hooks on the net, so both sides see the same load; torch {env['torch']}, diffusers {env['diffusers']}). One forward = the bare `net(x, c_noise)` "
          f"call ({1e3 * statistics.median(base):.1f} ms); everything else (ScoreModel wrapper, schedule coefficients, "
          "grid, update arithmetic, finiteness checks) counts as overhead. diffusers rows: its scheduler loop around the "
          f"same bare net (no wrapper at all), for scale. Target for ours: ratio <= {TARGET}.", "", "## Targets", ""]
    md += [f"- {t.line()}" for t in targets]
    md += ["", "## All samplers", "",
           markdown_table(["family", "sampler", "NFE", "wall ms", "forward ms (in run)", "outside-net ms per call", "ratio",
                           "range over reps"], rows),
           "", "The outside-net time per call is what to compare with a faster forward (more threads, a GPU): the "
           "ratio there is about 1 + (outside-net ms) / (forward ms)."]
    if skipped:
        md += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    write_markdown(NAME, "\n".join(md))
    print(f"wrote benchmarks/results/{NAME}.md/.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
