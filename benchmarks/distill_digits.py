"""SiD on the digits demo teacher: one-step generator vs the teacher at NFE 5/10/20 (offline digits measures).

The teacher is the demo's run folder (``make demo`` -> runs/digits_unet; another run folder can be
passed). SiD runs through ``distill.sid.train_sid`` into runs/sid_digits (a normal generator run
folder) for a wall-clock budget, with the paper's loss and sig_init; the learning rate is raised from
the paper's CIFAR-10 1e-5 because this budget is minutes, not days, and the fake score learns 3x
faster than the generator (5-minute sweeps, pixel FD: lr 5e-5 alone 0.17, with fake lr 1.5e-4 0.12,
1e-4 / 3e-4 0.11, 2e-4 / 6e-4 0.12; dropping the per-sample weight did not help here). Measures (diffusion.metrics,
offline): Frechet distance of the 64 pixel values to sklearn's digits and the digit-classifier
score, on the same number of samples for every row, the teacher sampled by ``samplers.sample``.

    .venv/bin/python benchmarks/distill_digits.py [--teacher runs/digits_unet] [--budget 300]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import samplers  # noqa: E402
from benchmarks.common import RESULTS_DIR, Target, environment, markdown_table, write_json, write_markdown  # noqa: E402
from diffusion.metrics import digits_metrics, digits_reference  # noqa: E402
from distill.common import load_teacher  # noqa: E402
from distill.sid import SiDConfig, generate, load_generator, train_sid  # noqa: E402

NAME = "distill_digits"
TEACHER_NFE = (1, 5, 10, 20)


def pixels(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [N, 1, 8, 8] -> [N, 64] in [0, 1], quantised to 8 bits as a saved PNG would be."""
    p = ((x.float().clamp(-1, 1) + 1) / 2 * 255).round() / 255
    return p.reshape(p.shape[0], -1).cpu().numpy().astype(np.float64)


def measure(x: torch.Tensor) -> dict:
    """The headline digits measures of images in [-1, 1]."""
    return measure_pixels(pixels(x))


def measure_pixels(p: np.ndarray) -> dict:
    """Pixel Frechet distance, classifier score and mean confidence of [N, 64] pixels in [0, 1]."""
    m = digits_metrics(p)
    return {"fd": m["pixel_frechet_distance_8x8"], "score": m["digits_classifier_score"],
            "confidence": m["digits_mean_confidence"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="runs/digits_unet", help="teacher run folder (make demo writes runs/digits_unet)")
    p.add_argument("--out", default="runs/sid_digits", help="SiD run folder to write (replaced)")
    p.add_argument("--budget", type=float, default=300.0, help="SiD training seconds")
    p.add_argument("--n", type=int, default=1000, help="samples per measured row")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-fake", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    teacher = load_teacher(args.teacher)
    z = torch.randn(args.n, *teacher.shape, generator=torch.Generator().manual_seed(0))
    rows = []
    for nfe in TEACHER_NFE:
        t0 = time.perf_counter()
        res = samplers.sample(teacher.model, z, nfe=nfe)
        rows.append({"method": f"teacher {res.sampler}", "nfe": res.nfe, "seconds": time.perf_counter() - t0, **measure(res.x)})
        print(f"teacher NFE {res.nfe}: {rows[-1]}", flush=True)
    import shutil

    shutil.rmtree(args.out, ignore_errors=True)
    curve = []
    z_eval = z[:500]

    def track(sid, row):
        with torch.no_grad():
            curve.append({"iteration": row["step"], "train_seconds": row["time_s"], **measure(sid.sample(z_eval))})
        print(f"sid it {row['step']}: {curve[-1]}", flush=True)

    cfg = SiDConfig(lr=args.lr, lr_fake=args.lr_fake, batch=64, iters=100_000, ema_halflife_kimg=2.0, log_every=50, checkpoint_every=100_000)
    t0 = time.perf_counter()
    sid = train_sid(teacher, args.out, cfg, progress=False, callback=track, time_limit_s=args.budget)
    sid_s = time.perf_counter() - t0
    G, gcfg = load_generator(args.out)  # through the run folder, as sample.py would
    G.reset_nfe()
    with torch.no_grad():
        x1 = generate(G, z, gcfg.generator.sig_init)
    one = {"method": "SiD one-step (EMA)", "nfe": G.nfe, "seconds": sid_s, **measure(x1)}
    data_row = {"method": "data (sklearn digits vs itself)", "nfe": 0, "seconds": 0.0, **measure_pixels(digits_reference()[0])}
    total = time.perf_counter() - t_start

    by_nfe = {r["nfe"]: r for r in rows}
    targets = [Target(f"one-step pixel FD <= teacher's at {n} NFE", one["fd"], by_nfe[n]["fd"], "<=") for n in (5, 10, 20)]
    targets.append(Target("runs without divergence or NaN stop", float(sid.nan.bad), 0.0, "<="))
    for t in targets:
        print(t.line())
    head = ["method", "NFE", "pixel FD (lower better)", "classifier score (higher better)", "mean confidence", "seconds"]
    body = [[r["method"], r["nfe"], r["fd"], r["score"], r["confidence"], r["seconds"]] for r in [data_row] + rows + [one]]
    text = [f"# SiD one-step generator vs its digits teacher\n",
            f"Produced by `benchmarks/distill_digits.py` in {total:.0f} s ({args.threads} torch thread). Teacher: "
            f"`{args.teacher}`; SiD: {sid.step_count} iterations of batch 64 ({sid.step_count * 64 / 1000:.0f} kimg) in "
            f"{sid_s:.0f} s, lr {args.lr} (fake score {args.lr_fake}), alpha {cfg.alpha}, sig_init {cfg.sig_init}. {args.n} samples per row, same noise "
            f"for every row; measures from `diffusion.metrics.digits_metrics` (offline proxies, not FID).\n",
            markdown_table(head, body), "\n## Targets\n", *[f"- {t.line()}" for t in targets],
            "\n![teacher 20 NFE (left) and SiD one-step (right), same noise](distill_digits.png)\n"]
    write_markdown(NAME, "\n".join(text))
    write_json(NAME, {"rows": [data_row] + rows + [one], "curve": curve, "targets": [t.as_dict() for t in targets],
                      "sid": {"iterations": sid.step_count, "seconds": sid_s, "lr": args.lr, "lr_fake": args.lr_fake, "run": args.out},
                      "wall_seconds": total, "environment": environment()})
    from torchvision.utils import make_grid, save_image

    t20 = samplers.sample(teacher.model, z[:64], nfe=20).x
    grids = [make_grid((x.clamp(-1, 1) + 1) / 2, nrow=8, padding=1, pad_value=0.5) for x in (t20, x1[:64])]
    pic = torch.cat([grids[0], torch.full((3, grids[0].shape[1], 4), 1.0), grids[1]], dim=2)
    save_image(torch.nn.functional.interpolate(pic[None], scale_factor=4, mode="nearest")[0], str(RESULTS_DIR / f"{NAME}.png"))
    print(f"wrote {RESULTS_DIR / NAME}.{{md,json,png}} in {total:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
