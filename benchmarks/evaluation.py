#!/usr/bin/env python
"""Evaluation benchmark: our pretrained adapter, FID harness and likelihood side by side with their peers.

Three measurements, each ours vs the peer in the same run:

1. **Pretrained diffusers model** (random UNet2DModel, 3x32x32, ~0.5M parameters, DDIM 20 steps,
   eta=0, batch 8): ``diffusion.pretrained`` + ``samplers`` ddim vs diffusers' own ``DDIMPipeline``
   from the same folder and the same per-image noise. Metrics: max |difference| of the final
   samples (before the pipeline's clamp) and the wall-time ratio ours/diffusers (median over
   interleaved repeats, with a paired-bootstrap 95% interval).
2. **FID harness**: ``diffusion.metrics.fid_kid`` vs ``cleanfid.fid.compute_fid`` (two folders) with
   the same deterministic feature extractor (``randconv``; Inception weights are not available
   offline), 400 vs 400 images of 32x32. Metrics: |FID difference| and the time ratio, cold (our
   reference statistics not cached yet) and warm (cached: only the samples are featurised).
3. **PF-ODE likelihood** on the 64-D Gaussian mixture with its exact density (the closed form is the
   peer): error in nats/dim of the exact trace and of Hutchinson's estimate, with NFE and time.

    python benchmarks/evaluation.py           # full run (~2-4 min on 2 busy CPU cores)
    python benchmarks/evaluation.py --quick   # smaller, writes nothing
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]  # keep `samplers` the package
sys.path.insert(0, str(_HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import samplers  # noqa: E402
from benchmarks.common import (Target, Timer, environment, markdown_table, paired_bootstrap_ratio,  # noqa: E402
                               write_json, write_markdown)
from samplers.noise import generators, randn  # noqa: E402

NAME = "evaluation"


# ---- 1. pretrained adapter vs DDIMPipeline -----------------------------------------------------------


def bench_pretrained(folder: Path, repeats: int, batch: int = 8, steps: int = 20) -> dict:
    """Same samples and relative speed of our DDIM on the adapter vs diffusers' DDIMPipeline."""
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    from diffusion.pretrained import load_pretrained

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=16)
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler(clip_sample=False)).save_pretrained(folder)
    pipe = DDIMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    finals: list[torch.Tensor] = []
    step = pipe.scheduler.step

    def recording_step(*a, **k):  # the last unclamped state (the pipeline clamps its output)
        out = step(*a, **k)
        finals.append(out.prev_sample)
        return out

    pipe.scheduler.step = recording_step
    model, _ = load_pretrained(str(folder))
    pipe.scheduler.set_timesteps(steps)
    s = model.schedule
    grid = torch.cat([s.sigma_edm(s.index_to_t(pipe.scheduler.timesteps.double())), torch.zeros(1, dtype=torch.float64)])
    ddim = samplers.get("ddim")

    in_unet = [0.0]  # seconds spent inside UNet2DModel.forward: the rest is each side's own overhead

    def timed(unet_module):
        fwd = unet_module.forward

        def forward(*a, **k):
            with Timer() as tm:
                out = fwd(*a, **k)
            in_unet[0] += tm.s
            return out

        unet_module.forward = forward

    timed(pipe.unet)
    timed(model.net.unet)
    t_ours, t_peer, o_ours, o_peer, diffs = [], [], [], [], []
    for r in range(repeats):
        gens_seed = 1000 * r
        for order in ((0, 1) if r % 2 == 0 else (1, 0)):  # interleave so drifting machine load hits both
            in_unet[0] = 0.0
            if order == 0:
                noise = randn((batch, 3, 32, 32), generators(gens_seed, batch))
                with Timer() as tm, torch.no_grad():
                    ours = ddim(model, noise, grid, eta=0.0)
                t_ours.append(tm.s)
                o_ours.append((tm.s - in_unet[0]) / in_unet[0])
            else:
                with Timer() as tm:
                    pipe(batch_size=batch, generator=generators(gens_seed, batch), eta=0.0, num_inference_steps=steps,
                         output_type="np")
                t_peer.append(tm.s)
                o_peer.append((tm.s - in_unet[0]) / in_unet[0])
        diffs.append(float((ours - finals[-1]).abs().max()))
    ratio = paired_bootstrap_ratio(t_ours, t_peer, stat="median")
    return {"batch": batch, "steps": steps, "repeats": repeats, "params": sum(p.numel() for p in unet.parameters()),
            "time_ours_s": t_ours, "time_diffusers_s": t_peer, "time_ratio": ratio, "max_abs_diff": max(diffs),
            "overhead_ours": float(np.median(o_ours)), "overhead_diffusers": float(np.median(o_peer)),
            "sample_scale": float(finals[-1].abs().max())}


# ---- 2. FID harness vs clean-fid ---------------------------------------------------------------------


def write_images(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:05d}.png")
    return folder


def bench_fid(root: Path, n: int) -> dict:
    """Our fid_kid vs clean-fid's compute_fid on two folders with the same extractor."""
    from cleanfid import fid as cfid

    from diffusion import metrics

    rng = np.random.default_rng(0)
    small = (rng.random((2 * n, 4, 4, 3)) * 255).astype(np.uint8)
    imgs = np.stack([np.asarray(Image.fromarray(s).resize((32, 32), Image.BICUBIC)) for s in small])
    noisy = np.clip(imgs[n:] + rng.normal(0, 20, imgs[n:].shape), 0, 255).astype(np.uint8)
    ref, smp = write_images(root / "ref", imgs[:n]), write_images(root / "samples", noisy)
    ex = metrics.get_features("randconv")
    with Timer() as peer_t:
        peer = cfid.compute_fid(str(smp), str(ref), mode="clean", custom_feat_extractor=ex.fn, custom_fn_resize=ex.resize,
                                num_workers=0, batch_size=64, device=torch.device("cpu"), verbose=False)
    with Timer() as cold_t:  # FID only, like compute_fid; the reference statistics get cached here
        cold = metrics.fid_kid(smp, str(ref), features="randconv", kid=False)
    with Timer() as warm_t:
        warm = metrics.fid_kid(smp, str(ref), features="randconv", kid=False)
    with Timer() as kid_t:
        with_kid = metrics.fid_kid(smp, str(ref), features="randconv")
    return {"n": n, "fid_ours": cold["fid"], "fid_cleanfid": float(peer), "fid_warm": warm["fid"], "kid_ours": with_kid["kid"],
            "abs_diff": abs(cold["fid"] - float(peer)), "time_cleanfid_s": peer_t.s, "time_ours_cold_s": cold_t.s,
            "time_ours_warm_s": warm_t.s, "time_ours_warm_with_kid_s": kid_t.s, "ratio_cold": cold_t.s / peer_t.s,
            "ratio_warm": warm_t.s / peer_t.s, "ratio_warm_with_kid": kid_t.s / peer_t.s}


# ---- 3. likelihood vs the closed form ----------------------------------------------------------------


def bench_likelihood(n: int) -> dict:
    """Exact-trace and Hutchinson PF-ODE log-likelihoods on mixture64d vs its exact density."""
    from diffusion.likelihood import log_likelihood
    from diffusion.oracle import mixture64d, oracle_model
    from diffusion.schedules import by_name

    mix = mixture64d()
    model = oracle_model(mix, by_name("vp_linear"))
    x = mix.sample(n, torch.Generator().manual_seed(0))
    exact = mix.log_prob(x)
    out = {"n": n, "dim": 64}
    for trace in ("exact", "hutchinson"):
        with Timer() as tm:
            res = log_likelihood(model, x, trace=trace, generator=torch.Generator().manual_seed(1))
        err = ((res.log_prob - exact) / 64).numpy()
        out[trace] = {"mean_err_nats_per_dim": float(err.mean()), "max_abs_err": float(np.abs(err).max()),
                      "std_err": float(err.std()), "nfe": res.nfe, "time_s": tm.s}
    return out


# ---- report ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the three measurements and write results/evaluation.{md,json}."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes; results are printed, not written")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # shared 2-core machine: one thread is faster than oversubscribed two
    from threadpoolctl import threadpool_limits

    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(1):
        os.environ["UD_CACHE"] = str(Path(tmp) / "cache")  # cold start for the FID cache measurement
        pre = bench_pretrained(Path(tmp) / "pipe", repeats=2 if args.quick else 10)
        fid = bench_fid(Path(tmp) / "fid", n=100 if args.quick else 400)
        lik = bench_likelihood(n=8 if args.quick else 32)

    hut = lik["hutchinson"]
    hut_se = hut["std_err"] / math.sqrt(lik["n"])
    targets = [
        Target("pretrained: max |ours - DDIMPipeline| / max |sample| (unclamped)", pre["max_abs_diff"] / pre["sample_scale"],
               1e-5, "<=", f"max abs diff {pre['max_abs_diff']:.3g}, sample scale {pre['sample_scale']:.3g}"),
        Target("pretrained: time outside the UNet / time inside it, ours (median)", pre["overhead_ours"], 0.05, "<=",
               f"diffusers' DDIMPipeline: {pre['overhead_diffusers']:.3g}; wall-time ratio ours/diffusers "
               f"{pre['time_ratio'].fmt()}"),
        Target("fid: |ours - clean-fid compute_fid|", fid["abs_diff"], 1e-6 * max(1.0, fid["fid_cleanfid"]), "<="),
        Target("fid: time ours (reference cached) / clean-fid compute_fid, FID only", fid["ratio_warm"], 0.75, "<="),
        Target("likelihood exact trace: max |error| nats/dim", lik["exact"]["max_abs_err"], 0.02, "<="),
        Target("likelihood Hutchinson: |mean error| / standard error (unbiased)", abs(hut["mean_err_nats_per_dim"]) / hut_se,
               3.0, "<=", f"mean error {hut['mean_err_nats_per_dim']:.3g} +- {hut_se:.3g} nats/dim, n={lik['n']}"),
    ]
    for t in targets:
        print(t.line())
    if args.quick:
        return 0

    rows_pre = [["ours: diffusion.pretrained + samplers ddim", np.median(pre["time_ours_s"]), pre["overhead_ours"],
                 pre["time_ratio"].fmt()],
                ["diffusers DDIMPipeline", np.median(pre["time_diffusers_s"]), pre["overhead_diffusers"], "1"]]
    rows_fid = [["clean-fid compute_fid (two folders)", fid["fid_cleanfid"], fid["time_cleanfid_s"], 1.0],
                ["ours fid_kid, reference not cached", fid["fid_ours"], fid["time_ours_cold_s"], fid["ratio_cold"]],
                ["ours fid_kid, reference cached", fid["fid_warm"], fid["time_ours_warm_s"], fid["ratio_warm"]],
                ["ours fid_kid, reference cached, + KID", fid["fid_warm"], fid["time_ours_warm_with_kid_s"],
                 fid["ratio_warm_with_kid"]]]
    rows_lik = [[k, lik[k]["mean_err_nats_per_dim"], lik[k]["max_abs_err"], lik[k]["nfe"], lik[k]["time_s"]]
                for k in ("exact", "hutchinson")]
    md = "\n\n".join([
        "# Evaluation benchmark (`python benchmarks/evaluation.py`)",
        "Ours and the peer measured in the same run on this machine (2 shared CPU cores, one thread).",
        "## Targets\n\n" + "\n".join(f"- {t.line()}" for t in targets),
        f"## 1. Pretrained diffusers model: DDIM {pre['steps']} steps, batch {pre['batch']}, "
        f"{pre['params'] / 1e6:.2f}M-parameter UNet2DModel at 3x32x32\n\n"
        + markdown_table(["sampler", "median wall time (s)", "time outside UNet / inside",
                          "wall-time ratio ours/diffusers [95% CI]"], rows_pre)
        + "\n\nThe wall-time ratio moves with the load of the shared machine (both sides run the same UNet "
          "in alternation); the time spent outside the UNet is the adapter's own cost."
        + f"\n\nMax |ours - diffusers| over {pre['repeats']} batches: {pre['max_abs_diff']:.3g} "
          f"(samples up to {pre['sample_scale']:.3g} in magnitude).",
        f"## 2. FID harness, {fid['n']} vs {fid['n']} images of 32x32, `randconv` features "
        "(a fixed random CNN: offline plumbing check, not Inception FID)\n\n"
        + markdown_table(["implementation", "FID", "wall time (s)", "time / clean-fid"], rows_fid)
        + "\n\nKID uses clean-fid's estimator (100 subsets); it dominates the cost at this size.",
        f"## 3. PF-ODE likelihood on the 64-D mixture ({lik['n']} points) vs its exact density\n\n"
        + markdown_table(["trace", "mean error (nats/dim)", "max abs error (nats/dim)", "NFE", "time (s)"], rows_lik)
        + "\n\nHutchinson's estimate is unbiased but noisy per sample (one Rademacher probe per sample, fixed over "
          "the solve); its mean over the points is what bits/dim reports.",
    ])
    write_markdown(NAME, md)
    write_json(NAME, {"environment": environment(), "pretrained": pre, "fid": fid, "likelihood": lik,
                      "targets": [t.as_dict() for t in targets]})
    print(f"wrote benchmarks/results/{NAME}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
