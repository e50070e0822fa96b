"""Guidance methods side by side: the class-conditional digits DiT, the exact ring oracle, and upsample guidance.

1. Digits DiT (configs/digits_dit.yaml; runs/digits_dit, trained here if missing): every method of
   samplers/guidance.py over a grid of scales (and bands for interval CFG) at NFE 10 (ipndm, the
   default) and NFE 35 (heun). Measures: class accuracy (the digits classifier of diffusion/metrics.py
   on the label each image was asked for), pixel Frechet distance to sklearn's digits and within-class
   diversity (mean pairwise pixel distance between images of the same class; the data's is printed).
   Autoguidance's weak model is the same run's EMA at step 1000 (runs/digits_dit_step1000).
   The scale/band of each method is chosen on seeds 0..N-1 (tuning) and reported on seeds
   100000..100000+N-1 (report): never tuned and reported on the same images. NFE 10 tunes over the
   whole grid; NFE 35 (3.5x the cost) re-tunes among each method's two best NFE-10 settings.
   Choice rule: the lowest pixel FD among settings whose class accuracy is >= ACC_FLOOR; if none
   reaches it, the highest accuracy.
2. Exact oracle: ring2d with one class per mode (exact conditional and unconditional denoisers), the
   same methods, accuracy (nearest mode = label), the mean Frechet distance of each class's samples
   to its true Gaussian, and the within-class std relative to the truth (diversity).
3. Upsample guidance: the 8x8 digits U-Net (runs/digits_unet, `make demo`'s recipe) sampled at 16x16
   with and without it; measured after 2x2 average pooling back to 8x8.

    python benchmarks/guidance.py [--num 500] [--threads 1]
"""

from __future__ import annotations

import argparse
import itertools
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import samplers  # noqa: E402
from benchmarks.common import RESULTS_DIR, environment, markdown_table, write_json, write_markdown  # noqa: E402
from diffusion import oracle  # noqa: E402
from diffusion.checkpoint import load_run  # noqa: E402
from diffusion.metrics import digits_classifier, digits_metrics, digits_reference  # noqa: E402
from diffusion.schedules import by_name  # noqa: E402
from samplers.guidance import Guided, pool  # noqa: E402

NAME = "guidance"
NFES = {10: "ipndm", 35: "heun"}
TUNE_SEED, REPORT_SEED = 0, 100_000
ACC_FLOOR = 0.99  # guidance is asked to make the requested class: at least 99% of the time
BANDS = [(0.1, 2.0), (0.3, 5.0), (1.0, 1e4)]  # EDM sigma; the cosine schedule's top is ~1800


def settings(with_auto: bool) -> list[tuple[str, dict]]:
    """(method, options) over the scale grid of every method."""
    out = [("none", {"scale": 1.0})]
    out += [("cfg", {"scale": w}) for w in (1.5, 2, 3)]
    out += [("interval", {"scale": w, "interval": b}) for w, b in itertools.product((2, 3), BANDS)]
    out += [("apg", {"scale": w, "eta": 0.0, "norm_threshold": r}) for w, r in itertools.product((2, 4), (None, 1.0))]
    out += [("cfgpp", {"scale": lam}) for lam in (0.4, 0.7, 1.0)]
    out += [("cfgzero", {"scale": w, "zero_init_steps": 1}) for w in (1.5, 2, 3)]
    if with_auto:
        out += [("auto", {"scale": w}) for w in (1.5, 2, 3)]
    return out


def make(model, method: str, opts: dict, guide=None):
    """The model to sample for one setting."""
    if method == "none":
        return model
    opts = dict(opts)
    scale = opts.pop("scale")
    if method == "auto":
        opts["guide"] = guide
    return Guided(model, method, scale, **opts)


def label(method: str, opts: dict) -> str:
    """A short name of a setting."""
    if method == "none":
        return "conditional (no guidance)"
    parts = [f"w={opts['scale']:g}" if method != "cfgpp" else f"lambda={opts['scale']:g}"]
    if "interval" in opts:
        parts.append(f"sigma in [{opts['interval'][0]:g}, {opts['interval'][1]:g}]")
    if opts.get("norm_threshold"):
        parts.append(f"r={opts['norm_threshold']:g}")
    return f"{method} " + ", ".join(parts)


def draw(model, n: int, shape, seed: int, nfe: int, labels=None) -> tuple[torch.Tensor, int]:
    """n samples with per-image seeds seed+i at budget nfe; returns (x, NFE per image)."""
    noise = samplers.noise.randn((n, *shape), samplers.noise.generators(seed, n))
    res = samplers.sample(model, noise, sampler=NFES[nfe], nfe=nfe, class_labels=labels)
    if not torch.isfinite(res.x).all():
        raise FloatingPointError(f"non-finite samples ({NFES[nfe]}, NFE {nfe})")
    return res.x, res.nfe


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [N, 1, 8, 8] -> [N, 64] in [0, 1], 8-bit quantised as a PNG would be."""
    p = ((x.float().clamp(-1, 1) + 1) / 2 * 255).round() / 255
    return p.reshape(p.shape[0], -1).numpy().astype(np.float64)


def diversity(p: np.ndarray, labels: np.ndarray) -> float:
    """Mean pairwise L2 pixel distance between images of the same class, averaged over classes."""
    out = []
    for k in np.unique(labels):
        q = p[labels == k]
        if len(q) > 1:
            d = np.sqrt(((q[:, None] - q[None]) ** 2).sum(-1))
            out.append(d[np.triu_indices(len(q), 1)].mean())
    return float(np.mean(out))


def digits_measures(x: torch.Tensor, labels: np.ndarray) -> dict:
    """Class accuracy, pixel FD, classifier score and diversity of digit samples."""
    p = to_pixels(x)
    m = digits_metrics(p)
    acc = float((digits_classifier().proba(p).argmax(1) == labels).mean())
    return {"accuracy": acc, "fd": m["pixel_frechet_distance_8x8"], "score": m["digits_classifier_score"],
            "diversity": diversity(p, labels)}


def _rank(r: dict) -> tuple:
    """Sort key of the tuning rule: settings reaching ACC_FLOOR first, by FD; the rest by accuracy."""
    t = r["tune"]
    return (0, t["fd"]) if t["accuracy"] >= ACC_FLOOR else (1, -t["accuracy"])


def choose(rows: list[dict]) -> dict:
    """The tuning rule: lowest FD with accuracy >= ACC_FLOOR, else the highest accuracy."""
    return min(rows, key=_rank)


def ensure_run(run: Path, config: str, steps: int) -> None:
    """Train the recipe into ``run`` (one thread) when no finished run is there."""
    if (run / "ema.safetensors").is_file():
        return
    print(f"{run} missing: training {config} for {steps} steps (one thread)", flush=True)
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / config), f"train.steps={steps}",
                    "train.cpu_threads=1"], check=True, cwd=ROOT)


def weak_run(run: Path, step: int = 1000) -> Path:
    """A run folder holding the EMA of ``run``'s checkpoint at ``step`` (autoguidance's weak model)."""
    out = run.parent / f"{run.name}_step{step}"
    if not (out / "ema.safetensors").is_file():
        ck = run / "checkpoints" / f"step_{step:07d}"
        if not (ck / "ema.safetensors").is_file():
            return None
        out.mkdir(parents=True, exist_ok=True)
        for f in ("ema.safetensors", "model.safetensors"):
            (out / f).write_bytes((ck / f).read_bytes())
        (out / "config.yaml").write_text((run / "config.yaml").read_text())
    return out


# ---- 1. digits DiT ---------------------------------------------------------------------------------

def bench_digits(run: Path, weak: Path, n: int) -> dict:
    model, cfg = load_run(run)
    guide = load_run(weak)[0] if weak is not None else None
    shape = list(cfg.model.input_shape)
    labels = torch.arange(n) % 10
    lab_np = labels.numpy()
    rows, best, samples = [], {}, {}
    for nfe in NFES:
        grid = settings(guide is not None)
        if nfe != min(NFES):  # CPU time: re-tune among each method's two best settings at the smaller budget
            grid = [(r["method"], r["opts"]) for m in dict.fromkeys(r["method"] for r in rows)
                    for r in sorted([r for r in rows if r["method"] == m], key=_rank)[:2]]
        for method, opts in grid:
            g = make(model, method, opts, guide)
            t0 = time.perf_counter()
            x, used = draw(g, n, shape, TUNE_SEED, nfe, labels)
            rows.append({"nfe": nfe, "method": method, "setting": label(method, opts), "opts": opts, "nfe_used": used,
                         "tune": digits_measures(x, lab_np), "seconds": time.perf_counter() - t0})
            print(f"NFE {nfe:2d} {label(method, opts):40s} {rows[-1]['tune']}", flush=True)
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["nfe"] == nfe and r["method"] == method]
            b = choose(mine)
            x, used = draw(make(model, b["method"], b["opts"], guide), n, shape, REPORT_SEED, nfe, labels)
            b["report"] = digits_measures(x, lab_np)
            best[(nfe, method)] = b
            samples[(nfe, method)] = x[:20]
    ref, ref_labels = digits_reference()
    pick = np.random.default_rng(0).choice(len(ref), n, replace=False)  # n real digits: the FD floor at this n
    return {"rows": rows, "best": best, "samples": samples,
            "data": {"diversity": diversity(ref, ref_labels), "fd": digits_metrics(ref[pick])["pixel_frechet_distance_8x8"]}}


# ---- 2. exact oracle -------------------------------------------------------------------------------

def oracle_measures(x: torch.Tensor, labels: torch.Tensor, mix) -> dict:
    x = x.double()
    acc = float((mix.nearest_mode(x) == labels).double().mean())
    fds, ratio = [], []
    for k in range(mix.K):
        q = x[labels == k]
        mu, cov = mix.means[k], mix.covs[k]
        m, c = q.mean(0), torch.cov(q.T)
        # Frechet distance between N(m, c) and the class's true N(mu, cov)
        ev = torch.linalg.eigvals(c @ cov).real.clamp_min(0).sqrt().sum()
        fds.append(float(((m - mu) ** 2).sum() + torch.trace(c) + torch.trace(cov) - 2 * ev))
        ratio.append(float(torch.sqrt(torch.trace(c) / torch.trace(cov))))
    return {"accuracy": acc, "class_fd": float(np.mean(fds)), "std_ratio": float(np.mean(ratio))}


def bench_oracle(n: int) -> dict:
    s = by_name("cosine")
    mix = oracle.ring2d()
    model = oracle.class_oracle_model(mix, s)
    wide = oracle.class_oracle_model(oracle.ring2d(std=0.2), s)
    labels = torch.arange(n) % mix.K
    rows, best = [], {}
    for nfe in NFES:
        for method, opts in settings(True):
            g = make(model, method, opts, wide)
            x, used = draw(g, n, [2], TUNE_SEED, nfe, labels)
            rows.append({"nfe": nfe, "method": method, "setting": label(method, opts), "opts": opts,
                         "tune": oracle_measures(x, labels, mix)})
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["nfe"] == nfe and r["method"] == method]
            b = min(mine, key=lambda r: r["tune"]["class_fd"])  # the exact model: closeness to each class's law
            x, _ = draw(make(model, b["method"], b["opts"], wide), n, [2], REPORT_SEED, nfe, labels)
            b["report"] = oracle_measures(x, labels, mix)
            best[(nfe, method)] = b
    return {"rows": rows, "best": best}


# ---- 3. upsample guidance --------------------------------------------------------------------------

def bench_upsample(run: Path, n: int) -> dict:
    model, cfg = load_run(run)
    res = int(cfg.model.input_shape[-1])
    out, pics = [], {}
    cases = [("8x8 (training size)", None, res)] + [(f"16x16, no guidance", None, 2 * res)] + \
            [(f"16x16, upsample w={w:g}", w, 2 * res) for w in (0.5, 1.0, 1.5)]
    for nfe in NFES:
        for name, w, r in cases:
            g = model if w is None else Guided(model, "upsample", w, factor=r // res)
            x, used = draw(g, n, [1, r, r], REPORT_SEED, nfe)
            low = pool(x, r // res) if r != res else x
            m = digits_metrics(to_pixels(low))
            out.append({"nfe": nfe, "case": name, "nfe_used": used, "fd": m["pixel_frechet_distance_8x8"],
                        "score": m["digits_classifier_score"], "confidence": m["digits_mean_confidence"]})
            print(f"upsample NFE {nfe} {name:28s} {out[-1]}", flush=True)
            if nfe == 35:
                pics[name] = x[:10]
    return {"rows": out, "pictures": pics}


# ---- picture and tables ----------------------------------------------------------------------------

def picture(dit: dict, up: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{b['setting']}", dit["samples"][(35, m)][:10]) for (nfe, m), b in dit["best"].items() if nfe == 35]
    rows += [(f"U-Net {k}", v) for k, v in up.get("pictures", {}).items()]
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 0.8 * len(rows) + 0.4))
    for ax, (name, x) in zip(np.atleast_1d(axes), rows):
        x = x.float().clamp(-1, 1)
        k = 16 // x.shape[-1] if x.shape[-1] < 16 else 1
        x = x.repeat_interleave(k, -1).repeat_interleave(k, -2)
        strip = torch.cat([torch.nn.functional.pad(im[0], (1, 1, 1, 1), value=1.0) for im in x], dim=1)
        ax.imshow(strip.numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("digits DiT, NFE 35 (heun), report seeds, digits 0-9; U-Net rows: 16x16 sampling", fontsize=8)
    fig.subplots_adjust(left=0.3, right=0.98, top=0.96, bottom=0.01, hspace=0.15)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def tables(dit: dict, orc: dict, up: dict) -> str:
    lines = ["# Guidance methods (samplers/guidance.py)", "",
             f"Scale/band per method chosen on tuning seeds {TUNE_SEED}+i, reported on seeds {REPORT_SEED}+i. "
             f"Digits choice rule: lowest pixel FD with class accuracy >= {ACC_FLOOR} (else the highest accuracy). "
             f"Sampler: ipndm at NFE 10, heun at NFE 35; 'NFE used' counts every network call (2 per guided call).", ""]
    if dit:
        lines += ["## Digits DiT (report seeds)", "",
                  f"Data: within-class diversity {dit['data']['diversity']:.3f}; pixel FD of a random subset of real digits "
                  f"of the same size: {dit['data']['fd']:.4f} (the floor at this count).", ""]
        hdr = ["NFE", "method", "chosen setting", "NFE used", "class accuracy", "pixel FD", "diversity", "classifier score"]
        body = [[nfe, m, b["setting"], b["nfe_used"], b["report"]["accuracy"], b["report"]["fd"], b["report"]["diversity"],
                 b["report"]["score"]] for (nfe, m), b in dit["best"].items()]
        lines += [markdown_table(hdr, body), ""]
    if orc:
        lines += ["## Exact ring oracle, one class per mode (report seeds; chosen by the mean class Frechet distance)", ""]
        hdr = ["NFE", "method", "chosen setting", "accuracy", "class FD", "std / true std"]
        body = [[nfe, m, b["setting"], b["report"]["accuracy"], b["report"]["class_fd"], b["report"]["std_ratio"]]
                for (nfe, m), b in orc["best"].items()]
        lines += [markdown_table(hdr, body), ""]
    if up:
        lines += ["## Upsample guidance: digits U-Net (8x8) sampled at 16x16, measured after 2x2 pooling", ""]
        hdr = ["NFE", "case", "NFE used", "pixel FD 8x8", "classifier score", "mean confidence"]
        lines += [markdown_table(hdr, [[r["nfe"], r["case"], r["nfe_used"], r["fd"], r["score"], r["confidence"]]
                                       for r in up["rows"]]), ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=128, help="images per setting and seed range (digits; CPU time)")
    p.add_argument("--oracle-num", type=int, default=2000)
    p.add_argument("--dit", default="runs/digits_dit")
    p.add_argument("--unet", default="runs/digits_unet")
    p.add_argument("--dit-steps", type=int, default=2500, help="training steps when the DiT run is missing")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", nargs="*", default=[], choices=["digits", "oracle", "upsample"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    dit = orc = up = {}
    if "digits" not in args.skip:
        run = ROOT / args.dit
        ensure_run(run, "configs/digits_dit.yaml", args.dit_steps)
        dit = bench_digits(run, weak_run(run), args.num)
    if "oracle" not in args.skip:
        orc = bench_oracle(args.oracle_num)
    if "upsample" not in args.skip:
        run = ROOT / args.unet
        ensure_run(run, "configs/digits_unet.yaml", 1500)
        up = bench_upsample(run, args.num)
    text = tables(dit, orc, up)
    write_markdown(NAME, text + f"\nTotal wall time {time.perf_counter() - t0:.0f} s on {args.threads} thread(s).\n")
    strip = lambda d: {f"nfe{k[0]}_{k[1]}": {kk: vv for kk, vv in v.items()} for k, v in d.items()}
    payload = {"environment": environment(), "num": args.num, "tune_seed": TUNE_SEED, "report_seed": REPORT_SEED,
               "acc_floor": ACC_FLOOR,
               "digits": {"rows": dit.get("rows"), "best": strip(dit.get("best", {})), "data": dit.get("data")},
               "oracle": {"rows": orc.get("rows"), "best": strip(orc.get("best", {}))},
               "upsample": up.get("rows")}
    write_json(NAME, payload)
    if dit:
        picture(dit, up, RESULTS_DIR / f"{NAME}.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
