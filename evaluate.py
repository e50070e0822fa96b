"""Evaluate samples and models: FID/KID (clean-fid), PF-ODE bits/dim, offline digits measures.

    python evaluate.py fid --samples DIR --ref cifar10-train|DIR|stats.npz [--protocol clean|legacy-tf|edm] [--features NAME]
    python evaluate.py fid50k --run RUN --ref edm-ref.npz --samples-dir DIR   # 3 x 50k images, min and mean
    python evaluate.py nll --run RUN_DIR | --pretrained DIR_OR_HUB_ID [--data NAME] [--num N]
    python evaluate.py digits --samples DIR

Each prints one JSON record (and writes it to --out when given). Published FID numbers use 50,000
images; a record on fewer images says so.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from diffusion.cli import HelpFormatter, check_device, run_main


def build_parser() -> argparse.ArgumentParser:
    """The evaluate.py argument parser with its three sub-commands."""
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fid", help="FID and KID of a samples folder against a reference (clean-fid)",
                       formatter_class=HelpFormatter)
    f.add_argument("--samples", required=True, help="folder of generated images (sample.py output)")
    f.add_argument("--ref", required=True, help="cifar10-train | cifar10-test | folder of images | statistics .npz")
    f.add_argument("--features", default="inception", help="inception (default), randconv, pixels, or module:factory")
    f.add_argument("--inception", default=None, help="local inception-2015-12-05.pt (else $UD_INCEPTION_WEIGHTS, cache, download)")
    f.add_argument("--batch-size", type=int, default=64, help="images per feature-network batch")
    f.add_argument("--no-kid", action="store_true", help="skip KID (clean-fid's estimator: 100 subsets of up to 1000 images)")
    f.add_argument("--no-manifest", action="store_true",
                   help="score a folder of images that sample.py did not write (no samples.json): provenance unknown")
    f.add_argument("--protocol", default="clean", choices=["clean", "legacy-tf", "edm"],
                   help="clean: clean-fid; legacy-tf: TF-Inception resizing (StyleGAN, TTUR); edm: legacy-tf against an "
                        "EDM/ADM reference .npz (EDM, AMED, SiD, GITS)")

    k = sub.add_parser("fid50k", help="EDM's recipe: sample 3 disjoint seed sets of 50k images, FID each, min and mean",
                       formatter_class=HelpFormatter)
    ksrc = k.add_mutually_exclusive_group(required=True)
    ksrc.add_argument("--run", help="run folder written by train.py")
    ksrc.add_argument("--pretrained", help="diffusers pipeline folder")
    k.add_argument("--ref", required=True, help="reference: EDM/ADM statistics .npz (edm protocol) or as for fid")
    k.add_argument("--protocol", default="edm", choices=["clean", "legacy-tf", "edm"], help="FID protocol (see fid)")
    k.add_argument("--samples-dir", required=True, help="folder for the sample sets (one subfolder per seed range)")
    k.add_argument("--sampler", default=None, help="sampler (default: sample.py's default)")
    k.add_argument("--nfe", type=int, default=None, help="network-evaluation budget per image")
    k.add_argument("--num", type=int, default=50_000, help="images per seed set (published numbers: 50000)")
    k.add_argument("--seed-sets", type=int, default=3, help="disjoint seed ranges 0.., num.., 2 num.. (EDM: 3, min reported)")
    k.add_argument("--features", default="inception", help="inception, or a stand-in (randconv, pixels, module:factory)")
    k.add_argument("--inception", default=None, help="local inception-2015-12-05.pt")
    k.add_argument("--batch-size", type=int, default=64, help="images per batch (sampling and features)")

    n = sub.add_parser("nll", help="negative log-likelihood in bits/dim through the PF-ODE", formatter_class=HelpFormatter)
    src = n.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder written by train.py")
    src.add_argument("--pretrained", help="diffusers pipeline folder or Hub id")
    n.add_argument("--data", default=None, help="dataset name (default: the run's dataset; required with --pretrained)")
    n.add_argument("--data-root", default=None, help="dataset root (cifar10, folder)")
    n.add_argument("--num", type=int, default=256, help="number of data points (a seeded random subset)")
    n.add_argument("--batch-size", type=int, default=64, help="data points per ODE solve")
    n.add_argument("--trace", choices=["hutchinson", "exact"], default="hutchinson",
                   help="divergence estimator: Hutchinson (one Rademacher probe) or the exact trace (D backward passes)")
    n.add_argument("--rtol", type=float, default=1e-5, help="dopri5 relative tolerance")
    n.add_argument("--atol", type=float, default=1e-5, help="dopri5 absolute tolerance")
    n.add_argument("--t-eps", type=float, default=1e-5, help="start time of the ODE (clean data at t=0)")
    n.add_argument("--bits", type=int, default=None, help="bit depth for dequantisation (default 8 for images, none for vectors)")
    n.add_argument("--seed", type=int, default=0, help="subset, dequantisation noise and Hutchinson probes")
    n.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")

    d = sub.add_parser("digits", help="offline digits measures: pixel Frechet distance and a digit-classifier score",
                       formatter_class=HelpFormatter)
    d.add_argument("--samples", required=True, help="folder of generated digit images")
    d.add_argument("--no-manifest", action="store_true", help="score a folder without samples.json (see fid)")

    for s in (f, n, d, k):
        s.add_argument("--out", default=None, help="also write the JSON record to this file")
        s.add_argument("--device", default="cpu", help="torch device")
        s.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def manifest_info(samples: str | Path) -> Optional[dict]:
    """Sampler, NFE, grid and checkpoint from a samples folder's samples.json (None without one)."""
    path = Path(samples) / "samples.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    return {k: m.get(k) for k in ("sampler", "nfe", "grid", "checkpoint", "seeds", "skip_tuning", "cfg_scale",
                                  "class_label", "wall_time_s")}


_SAMPLE_FILE = re.compile(r"^\d{6}\.png$")


def check_provenance(samples: str | Path, allow_missing: bool) -> None:
    """Refuse a samples folder whose images and samples.json disagree, so one run is never scored as another's."""
    folder = Path(samples)
    path = folder / "samples.json"
    if not folder.is_dir():
        return  # list_images names the missing folder
    if not path.is_file():
        if allow_missing:
            return
        raise ValueError(f"samples folder {folder} has no samples.json: not written by sample.py, or its run was "
                         f"interrupted; pass --no-manifest to score images of unknown origin")
    try:
        m = json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"{path} is not valid JSON (a damaged manifest); rerun sample.py with --overwrite") from None
    if m.get("status", "complete") != "complete":
        raise ValueError(f"samples folder {folder} is from an interrupted sample.py run ({path} has status "
                         f"{m.get('status')!r}, expected 'complete'); rerun sample.py with --overwrite")
    files = m.get("files")
    if files is None:
        raise ValueError(f"{path} lists no image files (vector samples go to {m.get('npz')!r}); fid/digits need images")
    if len(files) != m.get("num", len(files)):
        raise ValueError(f"{path} lists {len(files)} files but records num={m.get('num')}; the manifest is inconsistent")
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"samples folder {folder}: {len(missing)} of the {len(files)} images in samples.json are "
                         f"missing (e.g. {missing[0]}); the folder is incomplete")
    extra = sorted(set(p.name for p in folder.iterdir() if _SAMPLE_FILE.match(p.name)) - set(files))
    if extra:
        raise ValueError(f"samples folder {folder} holds {len(extra)} numbered image(s) that samples.json does not "
                         f"list (e.g. {extra[0]}): images of another run are mixed in")


def check_finite_record(rec: dict, what: str, keys: Sequence[str]) -> dict:
    """Stop rather than print a NaN/Inf measurement (not valid JSON, and not a measurement)."""
    bad = {k: rec[k] for k in keys if isinstance(rec.get(k), float) and not math.isfinite(rec[k])}
    if bad:
        raise ValueError(f"{what} came out non-finite ({', '.join(f'{k}={v}' for k, v in bad.items())}) on "
                         f"{rec.get('num_images', '?')} images; the samples are degenerate or too few (FID needs "
                         f">= 2 images, and many more to mean anything)")
    return rec


def cmd_fid(args: argparse.Namespace) -> dict:
    """evaluate.py fid."""
    from diffusion.metrics import fid_kid, list_images

    check_provenance(args.samples, args.no_manifest)
    n = len(list_images(args.samples))
    if n < 2:
        raise ValueError(f"FID needs at least 2 sample images; {args.samples} has {n}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    rec = fid_kid(args.samples, args.ref, features=args.features, inception=args.inception,
                  batch_size=args.batch_size, device=args.device, progress=not args.no_progress, kid=not args.no_kid,
                  protocol=args.protocol)
    check_finite_record(rec, "FID/KID", ("fid", "kid"))
    info = manifest_info(args.samples)
    return {"metric": "fid", "samples": str(args.samples), **rec, "seeds": (info or {}).get("seeds"), "sampling": info}


def cmd_fid50k(args: argparse.Namespace) -> dict:
    """evaluate.py fid50k: sample the seed sets with sample.py, FID each against one reference."""
    import importlib.util

    from diffusion.fid_protocols import check_protocol, fid50k
    from diffusion.metrics import fid_kid

    check_protocol(args.protocol, args.ref)
    spec = importlib.util.spec_from_file_location("sample_for_fid50k", Path(__file__).resolve().parent / "sample.py")
    sample_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample_cli)
    source = ["--run", args.run] if args.run else ["--pretrained", args.pretrained]
    opts = (["--sampler", args.sampler] if args.sampler else []) + (["--nfe", str(args.nfe)] if args.nfe else [])

    def draw(first_seed: int, folder: Path) -> None:
        argv = [*source, *opts, "--num", str(args.num), "--seed", str(first_seed), "--out", str(folder),
                "--batch-size", str(args.batch_size), "--device", args.device] + (["--no-progress"] if args.no_progress else [])
        if sample_cli.main(argv) != 0:
            raise ValueError(f"sampling seeds {first_seed}..{first_seed + args.num - 1} failed (see above)")

    def score(folder: Path) -> dict:
        rec = fid_kid(folder, args.ref, features=args.features, inception=args.inception, batch_size=args.batch_size,
                      device=args.device, progress=not args.no_progress, kid=False, protocol=args.protocol)
        return check_finite_record(rec, f"FID of {folder}", ("fid",))

    res = fid50k(draw, score, args.samples_dir, num=args.num, sets=args.seed_sets)
    first = res.pop("first_record")
    return {"metric": "fid50k", **res, "protocol": first["protocol"], "protocol_matches": first["protocol_matches"],
            "reference": first["reference"], "features": first["features"], "features_info": first["features_info"],
            "num_images": args.num * args.seed_sets, "sampling": manifest_info(res["seed_sets"][0]["folder"]),
            "note": first["note"]}


def cmd_digits(args: argparse.Namespace) -> dict:
    """evaluate.py digits."""
    from diffusion.metrics import digits_metrics_folder

    check_provenance(args.samples, args.no_manifest)
    return {"metric": "digits", "samples": str(args.samples), **digits_metrics_folder(args.samples),
            "sampling": manifest_info(args.samples)}


def nll_data(args: argparse.Namespace, shape: tuple[int, ...]) -> tuple[str, torch.utils.data.Dataset]:
    """The dataset to score: --data, else the run's own dataset, at the model's resolution."""
    from diffusion.data import build_dataset

    name = args.data
    options: dict = {}
    if name is None:
        if args.run is None:
            raise ValueError("--pretrained needs --data NAME (the dataset to score, e.g. cifar10 with --data-root)")
        from diffusion.checkpoint import CONFIG_NAME
        from diffusion.config import load_config

        cfg = load_config(Path(args.run) / CONFIG_NAME)
        name, options = cfg.data.name, dict(cfg.data.options or {})
        args.data_root = args.data_root or cfg.data.root
    options.pop("hflip", None)  # score the data as it is, not mirrored copies
    resolution = shape[-1] if len(shape) == 3 else None
    ds = build_dataset(name, root=args.data_root, resolution=resolution, **options)
    return name, ds


def cmd_nll(args: argparse.Namespace) -> dict:
    """evaluate.py nll."""
    from diffusion.likelihood import evaluate_nll
    from diffusion.pretrained import load_source, sample_shape

    if args.num < 1 or args.batch_size < 1:
        raise ValueError(f"--num and --batch-size must be >= 1; got {args.num}, {args.batch_size}")
    for flag, v in (("--rtol", args.rtol), ("--atol", args.atol)):
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{flag} must be a finite number > 0 (e.g. 1e-5); got {v}")
    if not 0 < args.t_eps < 1:
        raise ValueError(f"--t-eps must lie in (0, 1) (e.g. 1e-5, or 1e-3 for discrete-time models); got {args.t_eps}")
    if args.bits is not None and not 1 <= args.bits <= 16:
        raise ValueError(f"--bits must lie in 1..16 (8 for ordinary images); got {args.bits}")
    model, ckpt = load_source(args.run, args.pretrained, ema=not args.no_ema, device=args.device)
    shape = sample_shape(model)
    name, ds = nll_data(args, shape)
    if tuple(ds[0][0].shape) != shape:
        raise ValueError(f"data {name!r} gives items of shape {tuple(ds[0][0].shape)}, the model expects {shape}")
    bits = args.bits if args.bits is not None else (8 if len(shape) == 3 else None)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(ds), generator=g)[: min(args.num, len(ds))].tolist()
    batches = (torch.stack([ds[j][0] for j in order[i:i + args.batch_size]]).to(args.device)
               for i in range(0, len(order), args.batch_size))
    start = time.perf_counter()
    rec = evaluate_nll(model, batches, generator=g, dequantize_bits=bits or None, progress=not args.no_progress,
                       trace=args.trace, t_eps=args.t_eps, rtol=args.rtol, atol=args.atol)
    check_finite_record(rec, "the likelihood", ("bits_per_dim", "nats_per_dim"))
    return {"metric": "nll", "data": name, **rec, "trace": args.trace, "rtol": args.rtol, "atol": args.atol,
            "t_eps": args.t_eps, "solver": "dopri5", "prior": "N(0, sigma(1)^2 I)",
            "wall_time_s": time.perf_counter() - start, "checkpoint": ckpt}


def check_record_path(out: Optional[str]) -> None:
    """--out may replace an earlier evaluate.py record, never another file (a config, weights, an image)."""
    if out is None or not Path(out).exists():
        return
    try:
        ours = Path(out).is_file() and "metric" in json.loads(Path(out).read_text())
    except (ValueError, TypeError, UnicodeDecodeError):
        ours = False
    if not ours:
        raise ValueError(f"--out {out} exists and is not an evaluate.py record; choose another --out (only an "
                         f"earlier record is replaced)")


def json_safe(obj):
    """Secondary non-finite numbers (e.g. a standard error of one sample) become null: strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


COMMANDS = {"fid": cmd_fid, "fid50k": cmd_fid50k, "nll": cmd_nll, "digits": cmd_digits}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: prints the JSON record; bad input exits with status 2 and a one-line error."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        check_device(args.device)
        check_record_path(args.out)
        rec = COMMANDS[args.command](args)
        text = json.dumps(json_safe(rec), indent=1, allow_nan=False)  # never print NaN/Inf as if it were JSON
        if args.out:
            Path(args.out).write_text(text + "\n")
        print(text)
        return 0

    return run_main(f"evaluate.py {args.command}", body)


if __name__ == "__main__":
    sys.exit(main())
