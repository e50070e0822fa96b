"""SiD one-step generators vs their teacher, the exact mixture oracle, sampled by the project's samplers.

For the 2-D ring and the 64-D mixture (diffusion.oracle) this runs, in one process:

* the teacher = exact oracle denoiser, sampled by ``samplers.sample`` at NFE 1, 5, 10, 35 (the
  measured default sampler) and by Heun at 35 NFE (EDM's CIFAR-10 setting);
* SiD (distill.sid: alpha 1.2, sig_init 2.5, t_max 0.8, Adam beta1 = 0) from an MLP pre-fitted to
  the oracle, until the benchmark's wall-clock budget (``--wall``, 585 s) leaves just enough time to
  measure, evaluating the EMA generator along the way. SiD's
  per-sample weight 1/mean|x_g - fr| is off here (``normalize=False``): on these toys it gives the
  badly placed samples, whose |x_g - fr| is large, the least weight, and sweeps converged faster
  without it (ring SW 0.028 vs 0.062 after 2 min);

and measures against fresh true data samples (same n for every row): sliced Wasserstein-2 (256
projections), the mode-coverage error (total variation of mode shares), the fraction of samples
beyond 4 std of every mode (chi^2 tail of the 1-D 4-std mass) and the worst per-mode spread
|log(mean Mahalanobis^2 / D)|. A data-vs-data row gives the Monte-Carlo floor of each measure, and
the SW of data, teacher and SiD is repeated over 10 fresh draws: in 2-D a single draw's SW varies by
~25% (exact data samples meet the 35-NFE target in about 1 draw of 10).

Targets (issue 6): 2-D one-step SW <= teacher's at 35 NFE; 64-D one-step SW <= teacher's at 10 NFE;
no divergence. Writes benchmarks/results/distill_oracle.{md,json,png}.

The two cases run at once, one process and one torch thread each (this CPU has 2 cores):

    .venv/bin/python benchmarks/distill_oracle.py            # ~10 min wall
    .venv/bin/python benchmarks/distill_oracle.py --sequential --wall 300            # in one process, ~5 min
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import samplers  # noqa: E402
from benchmarks.common import RESULTS_DIR, Target, environment, markdown_table, write_json, write_markdown  # noqa: E402
from distill.common import (DivergenceError, NonFiniteError, PrefitConfig, load_teacher, mode_stats,  # noqa: E402
                            prefit, sliced_wasserstein)
from distill.sid import SiD, SiDConfig  # noqa: E402

NAME = "distill_oracle"

SETTINGS = {
    # chosen by short sweeps (2-3 min each) over preset, pre-fit length, lr, fake-score lr, batch,
    # t_max and the per-sample weight: a pre-fit that samples the ring well (small, 3000 steps: SW
    # 0.016 at 35 NFE vs 0.045 for tiny/800) and a fake score with a 3x larger lr helped most
    "ring2d": dict(n=20000, prefit=PrefitConfig(preset="small", steps=3000, batch=256), target_nfe=35,
                   sid=SiDConfig(lr=1e-4, lr_fake=3e-4, batch=256, ema_halflife_kimg=50.0, normalize=False),
                   eval_every=800, reserve_s=80.0),
    # 64-D: the 3000-step pre-fit (SW 0.0116 at 35 NFE, 1.2% far samples vs 16% after 1000 steps)
    # costs ~80 s more but starts SiD lower (SW 0.014 vs 0.018 after ~220 s)
    "mixture64d": dict(n=4000, prefit=PrefitConfig(preset="small", steps=3000, batch=256), target_nfe=10,
                       sid=SiDConfig(lr=3e-4, lr_fake=1e-3, batch=256, ema_halflife_kimg=50.0, normalize=False),
                       eval_every=400, reserve_s=50.0),
}
TEACHER_NFE = (1, 5, 10, 35)
DRAWS = 10  # independent sample draws for the SW spread (the single-draw SW of a 2-D sample varies by ~25%)


def measures(x: torch.Tensor, data: torch.Tensor, mixture) -> dict:
    """SW to the data sample plus the mode statistics."""
    ms = mode_stats(x, mixture)
    return {"sw": sliced_wasserstein(x, data), "coverage_error": ms["coverage_error"], "far_fraction": ms["far_fraction"],
            "spread_worst_abs_log": ms["spread_worst_abs_log"], "modes_hit": ms["modes_hit"]}


def teacher_rows(teacher, z: torch.Tensor, data: torch.Tensor) -> list[dict]:
    """The exact oracle sampled by the default sampler at each NFE, and by Heun at 35."""
    rows = []
    for sampler, nfe in [(None, n) for n in TEACHER_NFE] + [("heun", 35)]:
        t0 = time.perf_counter()
        res = samplers.sample(teacher.model, z, sampler=sampler, nfe=nfe)
        sec = time.perf_counter() - t0
        rows.append({"method": f"teacher {res.sampler}", "nfe": res.nfe, "seconds": sec,
                     **measures(res.x.float(), data, teacher.mixture)})
        print(f"  teacher {res.sampler:6s} NFE {res.nfe:2d}: SW {rows[-1]['sw']:.4f} ({sec:.1f}s)", flush=True)
    return rows


def run_sid(teacher, spec: dict, z: torch.Tensor, data: torch.Tensor, budget_s: float, deadline: float) -> dict:
    """Pre-fit, then SiD for ``budget_s`` seconds of training or until ``deadline`` (time.time()), whichever
    comes first; the EMA generator is evaluated after every block of ``eval_every`` iterations."""
    t0 = time.perf_counter()
    init, _ = prefit(teacher, spec["prefit"], cache_dir=None, log=lambda m: None)
    prefit_s = time.perf_counter() - t0
    print(f"  pre-fit {spec['prefit'].steps} steps: {prefit_s:.0f}s", flush=True)
    sid = SiD(teacher, init, spec["sid"])
    curve, train_s, error = [], 0.0, None
    with torch.no_grad():
        curve.append({"iteration": 0, "train_seconds": 0.0, **measures(sid.sample(z).float(), data, teacher.mixture)})
    try:
        block_s = 0.0  # a block is started only if one more (as long as the last) ends before the deadline
        while train_s < budget_s and time.time() + block_s < deadline:
            t1 = time.perf_counter()
            for _ in range(spec["eval_every"]):
                sid.step()
            block_s = time.perf_counter() - t1
            train_s += block_s
            with torch.no_grad():
                curve.append({"iteration": sid.step_count, "train_seconds": train_s,
                              **measures(sid.sample(z).float(), data, teacher.mixture)})
            print(f"  sid it {sid.step_count:5d} {train_s:6.1f}s: SW {curve[-1]['sw']:.4f}", flush=True)
    except (DivergenceError, NonFiniteError) as e:  # reported, never hidden
        error = f"{type(e).__name__}: {e}"
        print(f"  sid stopped: {error}", flush=True)
    with torch.no_grad():
        x = sid.sample(z).float()
    return {"prefit_seconds": prefit_s, "train_seconds": train_s, "iterations": sid.step_count,
            "kimg": sid.step_count * spec["sid"].batch / 1000, "nan_samples": sid.nan.bad, "samples_seen": sid.nan.total,
            "error": error, "curve": curve, "final": {"method": "SiD one-step (EMA)", "nfe": 1, **measures(x, data, teacher.mixture)},
            "x": x, "sample": lambda noise: sid.sample(noise)}


def sw_draws(draw, data: torch.Tensor, k: int = DRAWS) -> dict:
    """SW to the fixed data sample over ``k`` independent draws (``draw(i)`` -> samples): its Monte-Carlo spread."""
    v = torch.tensor([sliced_wasserstein(draw(i).float(), data) for i in range(k)])
    return {"k": k, "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
            "values": v.tolist()}


def first_time_below(curve: list[dict], level: float) -> float | None:
    """Training seconds until the EMA generator's SW first reached ``level`` (None: never)."""
    for c in curve:
        if c["sw"] <= level:
            return c["train_seconds"]
    return None


def plot(path: Path, ring: dict, results: dict) -> None:
    """Ring: data | teacher 35 NFE | SiD one-step; and SW against training time for both teachers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(22, 4.4))
    m = 4000
    for ax, (title, x) in zip(axes[:3], [("data (ring2d)", ring["data"]), ("teacher: exact oracle, ipndm 35 NFE", ring["teacher35"]),
                                         ("SiD one-step (1 NFE)", ring["onestep"])]):
        ax.scatter(x[:m, 0], x[:m, 1], s=1.5, alpha=0.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(-1.5, 1.5)
        ax.set_ylim(-1.5, 1.5)
        ax.set_aspect("equal")
    for ax, name in zip(axes[3:], ("ring2d", "mixture64d")):
        r = results[name]
        cur = r["sid"]["curve"]
        ax.semilogy([c["train_seconds"] for c in cur], [c["sw"] for c in cur], label="SiD one-step (EMA)")
        for row in r["teacher"]:
            if row["method"].endswith("heun"):
                continue
            ax.axhline(row["sw"], ls="--", lw=0.8, color=f"C{1 + TEACHER_NFE.index(row['nfe'])}",
                       label=f"teacher {row['nfe']} NFE")
        ax.axhline(r["floor"]["sw"], color="k", lw=0.8, label="data vs data (floor)")
        ax.set_xlabel("SiD training seconds (1 CPU thread)")
        ax.set_ylabel("sliced W2 to data")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_case(name: str, budget: float, deadline: float) -> tuple[dict, dict]:
    """One oracle: floor, teacher rows and a SiD run; returns (results, ring pictures or {})."""
    spec = SETTINGS[name]
    print(f"== {name}", flush=True)
    teacher = load_teacher(f"oracle:{name}")
    n, d = spec["n"], teacher.shape[0]
    data = teacher.sample_data(n, torch.Generator().manual_seed(100))
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(200))
    floor = {"method": "data vs data (floor)", "nfe": 0,
             **measures(teacher.sample_data(n, torch.Generator().manual_seed(300)), data, teacher.mixture)}
    rows = teacher_rows(teacher, z, data)
    sid = run_sid(teacher, spec, z, data, budget, deadline - spec["reserve_s"])
    target_row = next(r for r in rows if r["nfe"] == spec["target_nfe"] and not r["method"].endswith("heun"))
    # the same comparison repeated on fresh draws: how much of a gap is sampling noise
    noise = lambda i: torch.randn(n, d, generator=torch.Generator().manual_seed(1000 + i))  # noqa: E731
    spread = {"data vs data": sw_draws(lambda i: teacher.sample_data(n, torch.Generator().manual_seed(300 + i)), data),
              f"teacher {spec['target_nfe']} NFE": sw_draws(
                  lambda i: samplers.sample(teacher.model, noise(i), nfe=spec["target_nfe"]).x, data),
              "SiD one-step (EMA)": sw_draws(lambda i: sid["sample"](noise(i)), data)}
    result = {"n": n, "floor": floor, "teacher": rows, "sid": {k: v for k, v in sid.items() if k not in ("x", "sample")},
              "sw_over_draws": spread,
              "target_nfe": spec["target_nfe"], "target_sw": target_row["sw"],
              "time_to_target_s": first_time_below(sid["curve"], target_row["sw"]),
              "settings": {"prefit": asdict(spec["prefit"]), "sid": asdict(spec["sid"]), "budget_s": budget}}
    pics = {}
    if name == "ring2d":
        m = 4000
        pics = {"data": data[:m], "teacher35": samplers.sample(teacher.model, z[:m], nfe=35).x.float(), "onestep": sid["x"][:m]}
    return result, pics


def run_parallel(budgets: dict[str, float], threads: int, deadline: float) -> tuple[dict, dict]:
    """Both cases at once, each in its own process (``--case``), results passed back as JSON files."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for name, budget in budgets.items():
            cmd = [sys.executable, __file__, "--case", name, "--case-out", f"{tmp}/{name}.json",
                   f"--budget-{'2d' if name == 'ring2d' else '64d'}", str(budget), "--threads", str(threads), "--deadline", str(deadline)]
            procs[name] = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        bad = {name: p.wait() for name, p in procs.items()}
        if any(bad.values()):
            raise RuntimeError(f"a case process failed (exit codes {bad}); its output is above")
        out = {name: json.loads(Path(f"{tmp}/{name}.json").read_text()) for name in budgets}
    pics = {k: torch.tensor(v) for k, v in out["ring2d"].pop("pics").items()} if "ring2d" in out else {}
    return {name: out[name]["result"] for name in budgets}, pics


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-2d", type=float, default=600.0, help="at most this many SiD training seconds on the ring")
    p.add_argument("--budget-64d", type=float, default=600.0, help="at most this many SiD training seconds on the 64-D mixture")
    p.add_argument("--wall", type=float, default=585.0,
                   help="wall-clock seconds for the whole benchmark: SiD stops early enough to measure and plot in time")
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # time.time() by which a worker's case is done
    p.add_argument("--threads", type=int, default=1, help="torch threads per case")
    p.add_argument("--sequential", action="store_true", help="run the cases one after the other in this process")
    p.add_argument("--case", choices=sorted(SETTINGS), help=argparse.SUPPRESS)  # a worker of the parallel run
    p.add_argument("--case-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    budgets = {"ring2d": args.budget_2d, "mixture64d": args.budget_64d}
    if args.case:
        result, pics = run_case(args.case, budgets[args.case], args.deadline)
        payload = {"result": result, "pics": {k: v.tolist() for k, v in pics.items()}}
        Path(args.case_out).write_text(json.dumps(payload, default=float))
        return 0
    t_start = time.perf_counter()
    deadline = time.time() + args.wall - 5.0  # the last seconds are for the markdown, JSON and plot
    if args.sequential:
        results, ring_pics = {}, {}
        for name, budget in budgets.items():
            # one after the other: each case gets its share of the wall budget
            share = (deadline - time.time()) / (len(budgets) - len(results))
            results[name], pics = run_case(name, budget, time.time() + share)
            ring_pics = pics or ring_pics
    else:
        results, ring_pics = run_parallel(budgets, args.threads, deadline)
    total = time.perf_counter() - t_start

    targets = []
    for name in results:
        r = results[name]
        targets.append(Target(f"{name}: one-step SW <= teacher SW at {r['target_nfe']} NFE", r["sid"]["final"]["sw"],
                              r["target_sw"], "<=", f"floor {r['floor']['sw']:.4f}"))
    targets.append(Target("runs without divergence (count of stopped runs)",
                          float(sum(results[k]["sid"]["error"] is not None for k in results)), 0.0, "<="))
    targets.append(Target("benchmark wall time (s)", total, 600.0, "<="))
    for t in targets:
        print(t.line())

    lines = [f"# SiD one-step distillation vs the exact-oracle teacher\n",
             f"Produced by `benchmarks/distill_oracle.py` in {total:.0f} s wall on this CPU ("
             f"{'one process' if args.sequential else 'the two cases in parallel, one process each'}, {args.threads} torch "
             f"thread{'s' if args.threads > 1 else ''} per case). "
             "Every row is measured on the same n fresh data samples; the teacher rows use the same noise as SiD. "
             "SW = sliced Wasserstein-2 (256 projections); coverage = total variation of mode shares; far = share of "
             "samples beyond 4 std of every mode (chi^2 tail); spread = worst |log(per-mode mean Mahalanobis^2 / D)|.\n"]
    for name, r in results.items():
        s = r["sid"]
        lines.append(f"## {name} (n = {r['n']})\n")
        head = ["method", "NFE", "SW", "coverage err", "far frac", "spread |log|", "seconds"]
        body = [[row["method"], row["nfe"], row["sw"], row["coverage_error"], row["far_fraction"],
                 row["spread_worst_abs_log"], row.get("seconds", float("nan"))] for row in [r["floor"]] + r["teacher"]]
        f = s["final"]
        body.append([f["method"], 1, f["sw"], f["coverage_error"], f["far_fraction"], f["spread_worst_abs_log"],
                     s["prefit_seconds"] + s["train_seconds"]])
        lines.append(markdown_table(head, body) + "\n")
        ttt = r["time_to_target_s"]
        lines.append(f"SiD: pre-fit {s['prefit_seconds']:.0f} s, then {s['iterations']} iterations ({s['kimg']:.0f} kimg) in "
                     f"{s['train_seconds']:.0f} s of training; non-finite samples {s['nan_samples']} of {s['samples_seen']}; "
                     f"{'stopped: ' + s['error'] if s['error'] else 'no divergence'}. Time until the EMA generator first "
                     f"reached the target SW {r['target_sw']:.4f}: {'not reached' if ttt is None else f'{ttt:.0f} s'}. "
                     f"Best SW along the run: {min(c['sw'] for c in s['curve']):.4f}.\n")
        k = next(iter(r["sw_over_draws"].values()))["k"]
        lines.append(f"SW to the same data sample over {k} fresh draws of samples (and of noise), to show which gaps "
                     f"exceed sampling noise:\n")
        lines.append(markdown_table(
            ["samples", "mean SW", "std", "min", "max", f"draws <= target {r['target_sw']:.4f}"],
            [[who, v["mean"], v["std"], v["min"], v["max"], f"{sum(x <= r['target_sw'] for x in v['values'])}/{v['k']}"]
             for who, v in r["sw_over_draws"].items()]) + "\n")
    lines.append("## Targets\n")
    lines += [f"- {t.line()}" for t in targets]
    lines.append("\n![data, teacher and one-step samples; SW against time](distill_oracle.png)\n")
    write_markdown(NAME, "\n".join(lines))
    write_json(NAME, {"results": results, "targets": [t.as_dict() for t in targets], "wall_seconds": total,
                      "environment": environment()})
    plot(RESULTS_DIR / f"{NAME}.png", ring_pics, results)
    print(f"wrote {RESULTS_DIR / NAME}.{{md,json,png}} in {total:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
