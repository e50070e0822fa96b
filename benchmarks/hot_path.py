#!/usr/bin/env python
"""Hot-path overhead: time per network call spent outside the network, ours vs diffusers' scheduler loops.

The network costs nothing (it returns a fixed tensor), so a whole sampling call divided by its NFE is
the per-call overhead of the rest: for ours, ``samplers.sample`` (grid, validation, ScoreModel
wrapper, schedule coefficients, parametrization conversion, update arithmetic, finiteness
bookkeeping); for diffusers, ``set_timesteps`` + ``scale_model_input`` + ``step`` around the same
network. The schedulers are built once outside the timing (a pipeline builds its scheduler once).

Pairs (same NFE, same DDPM linear betas / the flow schedule, eps resp. velocity prediction):
``ddim``/DDIMScheduler, ``euler``/EulerDiscreteScheduler, ``dpmpp_2m``/DPMSolverMultistepScheduler,
``dpmpp_3m``/DPMSolverMultistepScheduler(order 3), ``unipc``/UniPCMultistepScheduler (bh2, order 2 with corrector),
``flow_euler``/FlowMatchEulerDiscreteScheduler. Batch 1 and 64 of 3x32x32 float32 on the CPU,
one torch thread. Each repetition runs ours and diffusers back to back (alternating which goes
first), each as one untimed run and a timed block of 5; the ratio is the median over repetitions
of ours/diffusers within a repetition, so the load drift of a shared machine cancels.
Host reads per call (tensor-to-Python conversions: ``bool``/``item``/``float``/``int``/``tolist``,
each a device sync on a GPU) and top-level ATen operator calls per call (torch.profiler; each a
kernel launch on a GPU) are counted in extra runs of each loop: counts, immune to machine load. Target: ours <= 1.0x
diffusers' per-call overhead for every pair. Nothing here was tuned on these exact settings'
numbers beyond removing work (caching per-grid coefficients, Python-float scalars).

    python benchmarks/hot_path.py [--nfe 10] [--reps 31] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]  # don't let this folder shadow packages
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import samplers  # noqa: E402
from benchmarks.common import Target, environment, markdown_table, write_json, write_markdown  # noqa: E402
from diffusion.host_reads import count_host_reads  # noqa: E402
from diffusion.schedules import by_name  # noqa: E402
from diffusion.score_model import ScoreModel  # noqa: E402

NAME = "hot_path"
TARGET = 1.0
SHAPE = (3, 32, 32)
BATCHES = (1, 64)

# (our sampler, schedule, parametrization, diffusers scheduler class, its keyword arguments)
PAIRS = [
    ("ddim", "ddpm", "eps", "DDIMScheduler", dict(clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=False)),
    ("euler", "ddpm", "eps", "EulerDiscreteScheduler", {}),
    ("dpmpp_2m", "ddpm", "eps", "DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
    ("dpmpp_3m", "ddpm", "eps", "DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=3)),
    ("unipc", "ddpm", "eps", "UniPCMultistepScheduler", {}),
    ("flow_euler", "flow", "velocity", "FlowMatchEulerDiscreteScheduler", {}),
]


class ZeroNet(nn.Module):
    """A network that costs nothing: it returns one fixed tensor of unit noise (made once per shape).

    A fixed output keeps every sampler's state of order 1; returning the input instead drives some
    updates towards denormal floats, which a CPU handles ~100x slower and would time the arithmetic
    of the data, not the overhead.
    """

    num_classes = 0

    def __init__(self) -> None:
        super().__init__()
        self.out: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels=None) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self.out:
            self.out[key] = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x)
        return self.out[key]




def ours_loop(name: str, schedule: str, param: str, nfe: int, noise: torch.Tensor) -> Callable[[], int]:
    """``samplers.sample`` with the zero-cost net; returns the NFE used."""
    model = ScoreModel(ZeroNet(), by_name(schedule), param, conditioning="1000t" if schedule == "ddpm" else "t")
    opts = {"eta": 0.0} if name == "ddim" else {}
    return lambda: samplers.sample(model, noise, sampler=name, nfe=nfe, **opts).nfe


def diffusers_loop(cls_name: str, kw: dict, nfe: int, noise: torch.Tensor) -> Callable[[], int]:
    """diffusers' scheduler loop around the same zero-cost net; returns the calls made."""
    import diffusers

    cls = getattr(diffusers, cls_name)
    sched = cls(**kw) if cls_name.startswith("FlowMatch") else cls(num_train_timesteps=1000, beta_schedule="linear", **kw)
    net = ZeroNet()

    def run() -> int:
        sched.set_timesteps(nfe)
        x = noise * getattr(sched, "init_noise_sigma", 1.0)
        calls = 0
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            out = net(inp, t.float().expand(x.shape[0]))
            calls += 1
            x = sched.step(out, t, x).prev_sample
        return calls

    return run


def aten_ops(run: Callable[[], int]) -> float:
    """Top-level ATen operator calls per network call in one run (a count, immune to machine load)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        n = run()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None) / n


BLOCK = 5


def per_call(run: Callable[[], int]) -> tuple[float, int]:
    """(seconds per network call over a block of BLOCK whole runs after one untimed run, NFE).

    The untimed run lets each side find its own memory state again: timing single runs that
    alternate with the other library's charged whichever came second for the allocator's and
    caches' churn (flow_euler at batch 64 read 1.0-1.3x that way, 0.8x in blocks of 200 runs).
    """
    run()
    t0 = time.perf_counter()
    n = sum(run() for _ in range(BLOCK))
    return (time.perf_counter() - t0) / n, n // BLOCK


def sampler_rows(nfe: int, reps: int) -> tuple[list[dict], list[Target]]:
    """Ours vs diffusers per pair and batch size, interleaved repetition by repetition."""
    results, targets = [], []
    for batch in BATCHES:
        noise = samplers.noise.randn((batch, *SHAPE), samplers.noise.generators(0, batch))
        for ours_name, schedule, param, cls_name, kw in PAIRS:
            runs = {"ours": ours_loop(ours_name, schedule, param, nfe, noise),
                    "diffusers": diffusers_loop(cls_name, kw, nfe, noise)}
            times: dict[str, list[float]] = {k: [] for k in runs}
            nfes, reads, ops = {}, {}, {}
            with torch.no_grad():
                for side, run in runs.items():
                    run()  # warm-up: imports, first-call caches, oneDNN
                    with count_host_reads() as n:
                        nfes[side] = run()
                    reads[side] = n[0] / nfes[side]
                    ops[side] = aten_ops(run)
                ratios = []
                for rep in range(reps):
                    order = list(runs) if rep % 2 == 0 else list(runs)[::-1]  # alternate who goes first
                    for side in order:
                        times[side].append(per_call(runs[side])[0])
                    ratios.append(times["ours"][-1] / times["diffusers"][-1])
            med = {k: statistics.median(v) for k, v in times.items()}
            # paired: each repetition runs both sides back to back, so load drift on a shared machine cancels
            ratio = statistics.median(ratios)
            row = {"batch": batch, "ours": ours_name, "diffusers": cls_name, "schedule": schedule, "nfe": nfes,
                   "ours_us_per_call": 1e6 * med["ours"], "diffusers_us_per_call": 1e6 * med["diffusers"],
                   "ratio": ratio, "ratio_range": [min(ratios), max(ratios)],
                   "ratio_of_minima": min(times["ours"]) / min(times["diffusers"]), "host_reads_per_call": reads, "aten_ops_per_call": ops, "reps": reps,
                   "ours_range_us": [1e6 * min(times["ours"]), 1e6 * max(times["ours"])],
                   "diffusers_range_us": [1e6 * min(times["diffusers"]), 1e6 * max(times["diffusers"])]}
            results.append(row)
            targets.append(Target(f"{ours_name} vs {cls_name}, batch {batch}", ratio, TARGET))
            print(f"batch {batch:2d} {ours_name:10s} {1e6 * med['ours']:8.1f} us/call  {cls_name:32s} "
                  f"{1e6 * med['diffusers']:8.1f} us/call  ratio {ratio:.3f}  host reads/call "
                  f"{reads['ours']:.2f} vs {reads['diffusers']:.2f}  aten ops/call {ops['ours']:.1f} vs {ops['diffusers']:.1f}",
                  flush=True)
    return results, targets


def trainer_rows(args: argparse.Namespace) -> tuple[list[dict], list[Target]]:
    """Trainer overhead per step vs a bare PyTorch loop: the trainer's half of this benchmark.

    A trainer step costs ~0.5 s on this CPU, so it is measured by benchmarks/train_overhead.py (interleaved
    with two bare loops, step by step) and its latest result is reported here. Returns (rows, targets).
    """
    path = Path(__file__).resolve().parent / "results" / "train_overhead.json"
    if not path.is_file():
        return [], []
    r = json.loads(path.read_text())
    t = r["target"]
    row = {"trainer_mean_s": r["trainer_mean_s"], "bare_recipe_mean_s": r["recipe_bare_mean_s"],
           "bare_plain_mean_s": r["bare_mean_s"], "ratio_vs_recipe_bare": r["ratio_vs_recipe_bare"],
           "ratio_vs_plain_bare": r["bare_mean_s"] / r["trainer_mean_s"], "source": "benchmarks/results/train_overhead.json"}
    return [row], [Target(t["name"], t["value"], t["threshold"], t["op"], detail=t.get("detail", ""))]


def main(argv: Optional[list[str]] = None) -> int:
    """Measure and write benchmarks/results/hot_path.{md,json}."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--reps", type=int, default=31)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="3 repetitions, nothing written unless --write")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps = 3
    torch.set_num_threads(args.threads)
    results, targets = sampler_rows(args.nfe, args.reps)
    t_rows, t_targets = trainer_rows(args)
    targets += t_targets
    for t in targets:
        print(t.line())
    if args.quick and not args.write:
        return 0
    env = environment()
    write_json(NAME, {"benchmark": NAME, "setup": {"net": "zero-cost (returns a fixed unit-noise tensor)", "shape": list(SHAPE),
                                                   "batches": list(BATCHES), "nfe": args.nfe, "reps": args.reps,
                                                   "threads": args.threads, "target": TARGET, "device": "cpu"},
                      "environment": env, "samplers": results, "trainer": t_rows,
                      "targets": [t.as_dict() for t in targets]})
    rows = [[r["batch"], r["ours"], r["diffusers"], r["ours_us_per_call"], r["diffusers_us_per_call"], r["ratio"],
             f"{r['ratio_range'][0]:.2f}..{r['ratio_range'][1]:.2f}", r["ratio_of_minima"],
             f"{r['host_reads_per_call']['ours']:.2f} / {r['host_reads_per_call']['diffusers']:.2f}",
             f"{r['aten_ops_per_call']['ours']:.1f} / {r['aten_ops_per_call']['diffusers']:.1f}"] for r in results]
    md = [f"# Hot path: overhead per network call outside the network, ours vs diffusers (CPU, {args.threads} thread)", "",
          f"Generated by `python benchmarks/hot_path.py` (zero-cost network that returns a fixed unit-noise tensor; {SHAPE[0]}x{SHAPE[1]}x"
          f"{SHAPE[2]} float32; NFE {args.nfe}; whole sampling calls divided by their NFE; ratio = median over "
          f"{args.reps} repetitions of ours/diffusers run back to back, each side an untimed call then a timed block of "
          f"{BLOCK}; torch {env['torch']}, diffusers {env['diffusers']}). Ours: `samplers.sample` "
          "(grid, validation, ScoreModel, coefficients, update, finiteness bookkeeping); diffusers: `set_timesteps` + "
          "`scale_model_input` + `step` with the scheduler built once. Host reads = tensor-to-Python conversions per call (each a device sync on a GPU); "
          "ATen ops = top-level operator calls per call (torch.profiler), a count that machine load cannot blur; "
          "ratio of minima = fastest ours / fastest diffusers repetition (the least load-contaminated times), for "
          "reference: the target is on the median of paired ratios. "
          f"Target: ratio <= {TARGET}.", "", "## Targets", ""]
    md += [f"- {t.line()}" for t in targets]
    md += ["", "## Samplers", "",
           markdown_table(["batch", "ours", "diffusers", "ours us/call (median)", "diffusers us/call (median)",
                           "ratio (median of paired)", "ratio range", "ratio of minima", "host reads/call (ours / diffusers)",
                           "ATen ops/call (ours / diffusers)"], rows)]
    md += ["", "## Trainer", ""]
    if t_rows:
        r = t_rows[0]
        md += [f"From `benchmarks/results/train_overhead.md` (`python benchmarks/train_overhead.py`; default recipe, "
               f"interleaved step by step): trainer {1000 * r['trainer_mean_s']:.1f} ms/step, bare loop with the recipe's "
               f"clip + EMA {1000 * r['bare_recipe_mean_s']:.1f} ms/step (ratio {r['ratio_vs_recipe_bare']:.3f}, the "
               f"target), bare loop without them {1000 * r['bare_plain_mean_s']:.1f} ms/step (ratio "
               f"{r['ratio_vs_plain_bare']:.3f})."]
    else:
        md += ["Run `python benchmarks/train_overhead.py` first; its result is reported here."]
    write_markdown(NAME, "\n".join(md))
    print(f"wrote benchmarks/results/{NAME}.md/.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
