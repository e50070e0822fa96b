"""Sample images from a trained run or a pretrained diffusers model.

    python sample.py --run RUN_DIR --sampler mvt --nfe 5 --num 64 --out samples/ --grid grid.png
    python sample.py --pretrained DIFFUSERS_DIR_OR_HUB_ID --sampler ddim --nfe 50 --num 1000 --out samples/
    accelerate launch sample.py --run RUN_DIR --nfe 10 --num 50000 --out samples/   # seeds split across processes

Image i (file ``{i:06d}.png``) is drawn from seed ``S + i`` whatever the batch size or the number
of processes. ``samples.json`` in the output folder records the sampler, grid, NFE actually used,
seeds, checkpoint hash and wall time; ``evaluate.py fid`` reads it. The manifest is written first
with ``"status": "incomplete"`` and completed at the end, so an interrupted run is never scored as
finished, and a folder that already holds anything is only reused with ``--overwrite`` (which
first removes the old manifest and numbered samples).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from diffusion.checkpoint import write_text_atomic
from diffusion.cli import HelpFormatter, check_device, folder_is_used, refuse_overwrite, run_main

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
GRID_MAX_IMAGES = 256
GRID_MIN_TILE = 32  # pixels: smaller samples are enlarged in the grid picture only


GUIDANCE_KINDS = ("cfg", "interval", "apg", "cfgpp", "cfgzero", "auto")


class UsageError(ValueError):
    """Bad command-line input; printed as ``error: ...`` with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The sample.py argument parser."""
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder written by train.py (config.yaml + safetensors weights)")
    src.add_argument("--pretrained", help="diffusers pipeline folder (DDPMPipeline layout) or Hub id")
    p.add_argument("--sampler", default=None, help="sampler name (default: the measured default; see samplers.available())")
    p.add_argument("--nfe", type=int, default=None, help="network-evaluation budget (not for adaptive samplers)")
    p.add_argument("--num", type=int, required=True, help="number of images")
    p.add_argument("--batch-size", type=int, default=64, help="images per network call (does not change the images)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i")
    p.add_argument("--out", required=True, help="output folder for PNGs and samples.json")
    p.add_argument("--grid", default=None, metavar="NAME|FILE.png",
                   help="sampling grid family (samplers.grids.available(): karras, polynomial, ...); a value ending in "
                        f".png instead writes a picture of the first {GRID_MAX_IMAGES} images there")
    p.add_argument("--grid-opt", action="append", default=None, metavar="K=V",
                   help="grid option, repeatable (e.g. --grid polynomial --grid-opt p=0.7 --grid-opt se_last=0.01)")
    p.add_argument("--opt", action="append", default=None, metavar="K=V",
                   help="sampler option, repeatable (e.g. --sampler unipc --opt order=3 --opt variant=bh1)")
    p.add_argument("--npz", default=None, metavar="FILE", help="also write all images as uint8 NHWC 'images' in an npz")
    p.add_argument("--class-label", type=int, default=None, help="class for every image (conditional models)")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale w (1 = none)")
    g = p.add_argument_group("guidance (samplers/guidance.py)")
    g.add_argument("--guidance", choices=GUIDANCE_KINDS, default=None,
                   help="cfg, interval (cfg in a sigma band), apg, cfgpp, cfgzero or auto (autoguidance by --guide-run)")
    g.add_argument("--guidance-scale", type=float, default=None, metavar="W", help="guidance scale (cfgpp: lambda in (0, 1])")
    g.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only for EDM sigma in [LO, HI] (required by interval; allowed with every kind)")
    g.add_argument("--guide-run", default=None, metavar="RUN", help="the weaker guide model for --guidance auto")
    g.add_argument("--resolution", type=int, default=None, metavar="R",
                   help="sample at R x R (a multiple of the training size) with upsample guidance")
    g.add_argument("--upsample-scale", type=float, default=1.0, metavar="W",
                   help="upsample guidance weight (1: the pooled image follows the model at its training size)")
    p.add_argument("--skip-tuning", type=float, default=None, metavar="RHO_BOTTOM", help="Skip-Tuning factor of the deepest skip")
    p.add_argument("--predictor", default=None, help="learned AMED predictor (.safetensors) for --sampler mvt")
    p.add_argument("--eta", type=float, default=None, help="eta for ddim (0 deterministic, 1 DDPM ancestral)")
    p.add_argument("--afs", action="store_true", help="analytical first step (saves 1 NFE; euler, dpmpp_2m, ipndm, mvt); "
                   "implied when the NFE budget is only reachable with it, e.g. mvt at an odd NFE")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="network dtype")
    p.add_argument("--device", default=None, help="torch device (default: accelerate's choice)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="reuse an output folder (and --grid/--npz files) that already exist; old samples are removed")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the network (backend default inductor; aot_eager for debugging)")
    return p


# ---- conditioning ----------------------------------------------------------------------------------


def check_conditioning(model, class_label: Optional[int], cfg_scale: Optional[float]) -> None:
    """Class label and guidance only for conditional models, labels within range."""
    k = model.num_classes
    if class_label is not None:
        if k == 0:
            raise UsageError(f"--class-label {class_label} given, but the model is unconditional")
        if not 0 <= class_label < k:
            raise UsageError(f"--class-label {class_label} out of range: the model has {k} classes (0..{k - 1})")
    if cfg_scale is not None and cfg_scale != 1.0:
        if k == 0:
            raise UsageError(f"--cfg-scale {cfg_scale} needs a class-conditional model; this one is unconditional")
        if not math.isfinite(cfg_scale):
            raise UsageError(f"--cfg-scale must be finite; got {cfg_scale}")


def image_labels(indices: Sequence[int], model, class_label: Optional[int], cfg_scale: Optional[float]) -> Optional[torch.Tensor]:
    """Per-image labels: the given class; with guidance but no class, image i gets class i mod K."""
    if class_label is not None:
        return torch.full((len(indices),), class_label, dtype=torch.long)
    if cfg_scale is not None and cfg_scale != 1.0:
        # depends on the image index only, so labels too are independent of batching
        return torch.tensor([i % model.num_classes for i in indices], dtype=torch.long)
    return None


def needs_afs(sampler: Optional[str], nfe: Optional[int], opts: dict) -> bool:
    """True when the budget is reachable only with the analytical first step (mvt: 2n-1 NFE)."""
    import samplers
    from samplers.registry import spec

    if sampler is None or nfe is None or "predictor" in opts or "afs" not in spec(sampler).options():
        return False  # a learned predictor brings its own AFS setting
    try:
        samplers.steps_for_nfe(sampler, nfe, **opts)
        return False
    except ValueError:
        try:
            samplers.steps_for_nfe(sampler, nfe, **opts, afs=True)
            return True
        except ValueError:
            return False  # unreachable either way: sample() reports the valid budgets


def check_budget(sampler: Optional[str], nfe: Optional[int], opts: dict) -> None:
    """An unreachable NFE budget is reported before the output folder is touched."""
    import samplers
    from samplers import defaults

    if nfe is None or "predictor" in opts:
        return  # no budget, or a learned predictor that brings its own grid
    name, o = (sampler, opts) if sampler else (defaults.SAMPLER, {**defaults.OPTIONS, **opts})
    try:
        samplers.steps_for_nfe(name, nfe, **o)
    except ValueError as e:
        raise UsageError(f"--nfe {nfe}: {e}") from None


def guide_model(model, args, shape: tuple, dtype, device) -> tuple:
    """(guided model, sample shape, guidance record or None, scale deciding per-image labels) from the flags."""
    from diffusion.pretrained import load_source, sample_shape
    from samplers.guidance import Guided, check_compatible

    kind, scale = args.guidance, args.guidance_scale
    if args.cfg_scale is not None:  # the old flag is an alias of --guidance cfg --guidance-scale W
        if kind not in (None, "cfg") or (scale is not None and scale != args.cfg_scale):
            raise UsageError(f"--cfg-scale {args.cfg_scale} is --guidance cfg --guidance-scale {args.cfg_scale}; "
                             f"it cannot be combined with --guidance {kind} --guidance-scale {scale}")
        kind, scale = "cfg", args.cfg_scale
    if kind is None and (scale is not None or args.guidance_interval or args.guide_run):
        raise UsageError(f"--guidance-scale/--guidance-interval/--guide-run need --guidance; valid: {', '.join(GUIDANCE_KINDS)}")
    if kind is not None and scale is None:
        raise UsageError(f"--guidance {kind} needs --guidance-scale W")
    if args.guide_run and kind != "auto":
        raise UsageError(f"--guide-run is the guide model of --guidance auto (got --guidance {kind})")
    record, guided = None, model
    if kind is not None and not (kind == "cfg" and scale == 1.0):
        if not math.isfinite(scale):
            raise UsageError(f"--guidance-scale must be finite; got {scale}")
        if kind != "auto" and model.num_classes == 0:
            raise UsageError(f"--guidance {kind} --guidance-scale {scale} needs a class-conditional model; this one is "
                             f"unconditional (use --guidance auto --guide-run RUN)")
        if kind == "interval" and args.guidance_interval is None:
            raise UsageError("--guidance interval needs --guidance-interval LO HI (EDM sigma)")
        if args.guidance_interval is not None:
            lo, hi = args.guidance_interval
            if not (0 <= lo < hi):
                raise UsageError(f"--guidance-interval {lo} {hi} is empty: expected 0 <= LO < HI (EDM sigma)")
        opts = {"interval": args.guidance_interval}
        if kind == "auto":
            if args.guide_run is None:
                raise UsageError("--guidance auto needs --guide-run RUN (a weaker model of the same task)")
            guide, info = load_source(args.guide_run, None, ema=not args.no_ema, device=device)
            if tuple(sample_shape(guide)) != tuple(shape) or guide.num_classes != model.num_classes:
                raise UsageError(f"--guide-run {args.guide_run} makes samples of shape {list(sample_shape(guide))} with "
                                 f"{guide.num_classes} classes; the model's are {list(shape)} with {model.num_classes}")
            try:
                check_compatible(model, guide)
            except ValueError as e:
                raise UsageError(f"--guide-run {args.guide_run}: {e}") from None
            guide.net.to(dtype)
            opts["guide"] = guide
        if kind == "cfgzero":
            opts["zero_init_steps"] = 1
        guided = Guided(model, kind, scale, **opts)
        record = {"kind": kind, "scale": scale, "interval": args.guidance_interval, "guide_run": args.guide_run,
                  "guide_sha256": info["sha256"] if kind == "auto" else None}
    if args.resolution is not None:
        native = shape[-1]
        if len(shape) != 3 or args.resolution % native or args.resolution <= native:
            raise UsageError(f"--resolution {args.resolution} must be a multiple (>= 2x) of the model's image size "
                             f"{native} (image models only)")
        guided = Guided(guided, "upsample", args.upsample_scale, factor=args.resolution // native)
        shape = (shape[0], args.resolution, args.resolution)
        record = {**(record or {}), "upsample": {"resolution": args.resolution, "factor": args.resolution // native,
                                                 "scale": args.upsample_scale}}
    label_scale = scale if kind is not None and model.num_classes else None
    return guided, shape, record, label_scale


# ---- writing --------------------------------------------------------------------------------------


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Samples in [-1, 1] [B, C, H, W] -> uint8 [B, H, W, C] (values outside are clipped)."""
    return (x.float() * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_png(img: np.ndarray, path: Path) -> None:
    """Write an HWC uint8 image (1 channel as grayscale)."""
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)


def write_grid(images: np.ndarray, path: Path) -> None:
    """A square-ish grid of uint8 NHWC images, 2-pixel padding (torchvision.utils.make_grid).

    Images smaller than GRID_MIN_TILE pixels are enlarged by an integer factor (nearest) so 8x8
    digits stay visible; the PNG files themselves keep the native size.
    """
    from torchvision.utils import make_grid

    t = torch.from_numpy(images[:GRID_MAX_IMAGES]).permute(0, 3, 1, 2)
    k = max(1, math.ceil(GRID_MIN_TILE / t.shape[-1]))
    t = t.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)
    grid = make_grid(t, nrow=int(math.ceil(math.sqrt(t.shape[0]))), padding=2, pad_value=255)
    save_png(grid.permute(1, 2, 0).numpy(), path)


def write_vector_grid(x: np.ndarray, path: Path) -> None:
    """Scatter plot of 2-D samples (first two coordinates) for vector data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(x[:, 0], x[:, 1], s=2)
    ax.set_aspect("equal")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---- provenance ----------------------------------------------------------------------------------

MANIFEST = "samples.json"
SAMPLE_FILE = re.compile(r"^\d{6}\.(png|npy)$")


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse to reuse a non-empty output folder or existing --grid/--npz files without --overwrite."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; expected a folder for the samples")
    if folder_is_used(out) and not args.overwrite:
        refuse_overwrite("output folder", out)
    for flag, f in (("--grid", args.grid), ("--npz", args.npz)):
        if f and Path(f).exists() and not args.overwrite and Path(f).resolve().parent != out.resolve():
            refuse_overwrite(f"{flag} file", Path(f))


def prepare_out(out: Path, args: argparse.Namespace, ckpt: dict) -> None:
    """Clear an old run's manifest and samples (--overwrite), then record this run as incomplete."""
    out.mkdir(parents=True, exist_ok=True)
    old = out / MANIFEST
    if old.exists():
        old.unlink()  # first: from here on the folder can never be credited to the old run
    for p in out.iterdir():
        if SAMPLE_FILE.match(p.name) or p.name == "samples.npz":
            p.unlink()
    write_text_atomic(old, json.dumps({
        "status": "incomplete", "num": args.num, "seeds": {"start": args.seed, "count": args.num},
        "checkpoint": ckpt, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "note": "written before the first image; replaced by the full manifest when sampling completes"}, indent=1))


# ---- main -----------------------------------------------------------------------------------------


def distilled_kind(run_dir: str) -> Optional[str]:
    """'generator' or 'reflow' for run folders written by ``python -m distill``, else None."""
    from omegaconf import OmegaConf

    cfg_path = Path(run_dir) / "config.yaml"
    if not cfg_path.is_file():
        return None  # load_source raises the clear "not a run folder" error
    kind = OmegaConf.load(cfg_path).get("kind")
    return kind if kind in ("generator", "reflow") else None


def load_distilled_run(run_dir: str, ema: bool, device) -> tuple:
    """(model, checkpoint info, sig_init or None) of a distilled run; sig_init is set for one-step generators."""
    from diffusion.checkpoint import EMA_NAME, MODEL_NAME
    from diffusion.metrics import sha256_file
    from distill.common import load_distilled

    model, cfg = load_distilled(run_dir, ema=ema, device=device)
    weights = Path(run_dir) / (EMA_NAME if ema else MODEL_NAME)
    ckpt = {"kind": cfg.kind, "run": str(run_dir), "weights": str(weights), "sha256": sha256_file(weights), "ema": ema}
    sig_init = float(cfg.generator.sig_init) if cfg.kind == "generator" else None
    return model, ckpt, sig_init


def generate_one_step(model, noise: torch.Tensor, sig_init: float, labels: Optional[torch.Tensor]):
    """One network call per image, x = G(sig_init * noise, sig_init), as a SampleResult."""
    from distill.sid import generate
    from samplers.api import SampleResult

    model.reset_nfe()
    with torch.no_grad():
        x = generate(model, noise, sig_init, labels)
    return SampleResult(x=x, nfe=model.nfe, grid=torch.tensor([sig_init, 0.0], dtype=torch.float64), sampler="one_step")


def runs_on_cpu(device: Optional[str]) -> bool:
    """Whether the processes sample on the CPU: asked for, or no accelerator present.

    accelerate's PartialState joins the processes of ``accelerate launch`` / torchrun into one group
    only when told it is on the CPU (gloo); otherwise each CPU process believed it was alone and drew
    every image.
    """
    if device is not None:
        return torch.device(device).type == "cpu"
    acc = getattr(torch, "accelerator", None)
    return not (acc.is_available() if acc is not None else torch.cuda.is_available())


def run(args: argparse.Namespace) -> dict:
    """Sample as the arguments say; returns the manifest (also written to OUT/samples.json)."""
    import samplers
    from diffusion.pretrained import load_source, sample_shape
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    if args.num < 1 or args.batch_size < 1:
        raise UsageError(f"--num and --batch-size must be >= 1; got {args.num}, {args.batch_size}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0; got {args.seed}")
    check_outputs(args)
    check_device(args.device)
    sampler = args.sampler
    if sampler is not None and sampler not in samplers.available():
        raise UsageError(f"unknown sampler {sampler!r}; available samplers: {', '.join(samplers.available())}")
    if args.predictor and sampler != "mvt":
        raise UsageError(f"--predictor is for --sampler mvt (got --sampler {sampler})")
    opts = {}
    if args.predictor:
        if not Path(args.predictor).is_file():
            raise UsageError(f"--predictor {args.predictor!r}: no such file")
        opts["predictor"] = args.predictor
    if args.eta is not None:
        opts["eta"] = args.eta
    # --grid NAME picks the sampling grid; --grid FILE.png keeps its old meaning (a picture of the images)
    from samplers import options as sopts

    grid_name = args.grid if args.grid and not args.grid.lower().endswith(".png") else None
    args.grid = None if grid_name else args.grid
    grid_opts = sopts.parse_kv(args.grid_opt, "--grid-opt")
    sopts.check_grid_choice(grid_name, grid_opts)
    opts.update(sopts.parse_kv(args.opt, "--opt"))
    sopts.check_sampler_options(sampler or samplers.defaults.SAMPLER, opts)
    if args.afs or needs_afs(sampler, args.nfe, opts):
        opts["afs"] = True

    batch_size = args.batch_size
    if sampler == "adaptive" and batch_size > 1:
        # dopri5's step-size control spans its batch: one image per solve keeps image i independent of batching
        print("sample.py: adaptive solves one image at a time (its error control would couple a batch)", file=sys.stderr)
        batch_size = 1

    state = PartialState(cpu=runs_on_cpu(args.device))
    device = torch.device(args.device) if args.device else state.device
    device = torch.device("cpu") if device.type == "cpu" else device  # some launchers say cpu:0, which safetensors rejects
    one_step = None  # sig_init of a distilled one-step generator run
    if args.run is not None and distilled_kind(args.run) is not None:
        model, ckpt, one_step = load_distilled_run(args.run, ema=not args.no_ema, device=device)
        if one_step is not None and (sampler is not None or args.nfe not in (None, 1)):
            raise UsageError(f"{args.run} is a one-step generator: it samples with one network call; "
                             f"drop --sampler/--nfe (got --sampler {sampler}, --nfe {args.nfe})")
    else:
        model, ckpt = load_source(args.run, args.pretrained, ema=not args.no_ema, device=device)
    check_conditioning(model, args.class_label, args.cfg_scale)
    native_grid, native_opts, native_scale = None, {}, 1.0
    # --pretrained: the scheduler's own sampler takes the pipeline's steps, unless a grid is named
    if getattr(model, "diffusers_scheduler", None) is not None and grid_name is None and not grid_opts:
        from diffusion.scheduler_fields import native_noise_scale, native_sampling

        native_grid, native_opts = native_sampling(model, model.diffusers_scheduler, sampler, args.nfe, opts)
        if native_grid is not None:  # and starts where the pipeline starts
            native_scale = native_noise_scale(model, model.diffusers_scheduler, native_grid)
    # the pipeline's own steps (--pretrained with its scheduler's sampler), else a named grid family or the default
    grid_args = ({"grid": native_grid} if native_grid is not None
                   else {"grid": grid_name, "grid_opts": grid_opts or None})
    dtype = DTYPES[args.dtype]
    model.net.to(dtype)
    if args.compile:  # in place: compiles on the first batch, later batches of the same shape reuse it
        model.net.compile(backend=args.compile)
    shape = sample_shape(model)
    if one_step is None:
        check_budget(sampler, args.nfe, opts)
    model, shape, guidance, label_scale = guide_model(model, args, shape, dtype, device)
    out = Path(args.out)
    state.wait_for_everyone()  # every process has checked the folder before the main one touches it
    if state.is_main_process:
        prepare_out(out, args, ckpt)
    state.wait_for_everyone()

    start = time.perf_counter()
    records = []  # (first index, nfe, grid) per batch of this process
    with contextlib.ExitStack() as stack:
        factors = (stack.enter_context(samplers.skip_tuning(model, args.skip_tuning))
                   if args.skip_tuning is not None else None)
        mine = stack.enter_context(state.split_between_processes(list(range(args.num))))
        batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
        # counts images (this process's share), not batches: one batch would show only 0/1 then 1/1
        bar = tqdm(total=len(mine), desc="sampling", unit="img", disable=args.no_progress or not state.is_main_process)
        for idx in batches:
            gens = samplers.noise.generators(args.seed, len(idx), offset=idx[0])
            noise = samplers.noise.randn((len(idx), *shape), gens).to(device=device, dtype=dtype)
            noise = noise * native_scale if native_scale != 1.0 else noise
            labels = image_labels(idx, model, args.class_label, label_scale)
            labels = None if labels is None else labels.to(device)
            if one_step is not None:
                res = generate_one_step(model, noise, one_step, labels)
            else:
                res = samplers.sample(model, noise, sampler=sampler, nfe=args.nfe, generator=gens,
                                      class_labels=labels, **grid_args, **opts, **native_opts)
            bad = int((~torch.isfinite(res.x)).reshape(len(idx), -1).any(1).sum())
            if bad:
                raise FloatingPointError(f"{bad} of {len(idx)} samples in images {idx[0]}..{idx[-1]} are not finite "
                                         f"(sampler {res.sampler}, NFE {res.nfe}); nothing was dropped, stopping")
            if len(shape) == 3:
                for i, img in zip(idx, to_uint8(res.x)):
                    save_png(img, out / f"{i:06d}.png")
            else:
                np.save(out / f"{idx[0]:06d}.npy", res.x.float().cpu().numpy())
            records.append((idx[0], res.nfe, res.grid.tolist(), res.sampler, state.process_index, len(idx)))
            bar.update(len(idx))
        bar.close()
    records = gather_object(records) if state.num_processes > 1 else records
    state.wait_for_everyone()
    wall = time.perf_counter() - start
    if not state.is_main_process:
        return {}

    records.sort()
    nfes = [r[1] for r in records]
    grid = records[0][2]
    manifest = {
        "sampler": records[0][3], "nfe": max(nfes), "nfe_per_batch": nfes if len(set(nfes)) > 1 else None,
        "grid": grid, "num": args.num, "image_shape": list(shape),
        "seeds": {"start": args.seed, "count": args.num, "rule": "image i (file i) uses seed start + i"},
        "batch_size": batch_size, "num_processes": state.num_processes,
        "images_per_process": [sum(r[5] for r in records if r[4] == p) for p in range(state.num_processes)],
        "checkpoint": ckpt, "dtype": args.dtype, "device": str(device),
        "class_label": args.class_label, "cfg_scale": args.cfg_scale, "guidance": guidance,
        "skip_tuning": None if factors is None else {"rho_bottom": args.skip_tuning, "factors": factors},
        "predictor": args.predictor, "options": {k: v for k, v in {**opts, **native_opts}.items() if k != "predictor"},
        "grid_name": grid_name, "grid_options": grid_opts,
        "wall_time_s": wall, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": "sample.py " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("sample.py") else None,
    }
    if len(shape) == 3:
        files = [f"{i:06d}.png" for i in range(args.num)]
        manifest["files"] = files
        if args.npz or args.grid:
            images = np.stack([np.asarray(Image.open(out / f)) for f in files])
            images = images[..., None] if images.ndim == 3 else images
            if args.npz:
                np.savez(args.npz, images=images, seeds=np.arange(args.seed, args.seed + args.num))
            if args.grid:
                write_grid(images, Path(args.grid))
    else:
        parts = sorted(out.glob("[0-9]*.npy"))
        x = np.concatenate([np.load(p, allow_pickle=False) for p in parts])
        for p in parts:
            p.unlink()
        np.savez(args.npz or out / "samples.npz", samples=x, seeds=np.arange(args.seed, args.seed + args.num))
        manifest["npz"] = str(args.npz or out / "samples.npz")
        if args.grid:
            write_vector_grid(x, Path(args.grid))
    manifest["status"] = "complete"
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; bad input exits with status 2 and a one-line error (non-finite samples: status 1)."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        m = run(args)
        if m:
            print(f"wrote {m['num']} samples to {args.out} ({m['sampler']}, NFE {m['nfe']}, {m['wall_time_s']:.1f} s)")
        return 0

    return run_main("sample.py", body)


if __name__ == "__main__":
    sys.exit(main())
