"""Train a diffusion / flow model: ``python train.py --config configs/NAME.yaml [key=value ...]``.

Many processes / GPUs: ``accelerate launch --multi_gpu --num_processes N train.py --config ...``.
Continue a run: ``python train.py --config ... --resume latest`` (or a checkpoint folder).
Wiring only: the loop is diffusion/training.py, previews are drawn with samplers.sample.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

import samplers
from diffusion.cli import HelpFormatter, run_main
from diffusion.config import ConfigError, load_config, to_yaml
from diffusion.score_model import ScoreModel
from diffusion.training import NonFiniteLossError, SampleFn, TrainResult, train

DEFAULT_CONFIG = "configs/digits_unet.yaml"


def preview_sampler(nfe: int, sampler: Optional[str], seed: int) -> SampleFn:
    """Preview grids: per-image seeds (image i uses seed + i) and the samplers package's entry point."""

    def draw(model: ScoreModel, n: int, shape: Sequence[int], labels: Optional[torch.Tensor]) -> torch.Tensor:
        device = next(model.parameters()).device
        noise = samplers.noise.randn((n, *shape), samplers.noise.generators(seed, n), device)
        return samplers.sample(model, noise, sampler=sampler, nfe=nfe, class_labels=labels).x

    return draw


def check_preview(nfe: int, sampler: Optional[str]) -> None:
    """Fail at the start, not after training, when preview.sampler / preview.nfe cannot be sampled."""
    from samplers import defaults
    from samplers.registry import spec

    name, opts = (sampler, {}) if sampler else (defaults.SAMPLER, dict(defaults.OPTIONS))
    try:
        if spec(name).nfe is not None:
            samplers.steps_for_nfe(name, nfe, **opts)
    except ValueError as e:
        raise ConfigError(f"preview.sampler={sampler} preview.nfe={nfe}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    """The train.py argument parser (its epilog lists every config key)."""
    from diffusion.config_docs import help_epilog

    # no abbreviations: `--resum latest` must be an error, not a silent --resume
    p = argparse.ArgumentParser(prog="train.py", description=__doc__, formatter_class=HelpFormatter,
                                epilog=help_epilog(), allow_abbrev=False)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML recipe")
    p.add_argument("--resume", default=None, metavar="latest|PATH",
                   help="continue from the newest checkpoint of the run folder, or from a checkpoint folder")
    p.add_argument("--print-config", action="store_true", help="print the merged config as YAML and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="build data, model, optimizer and loss, take one step in memory, print a summary; writes no files")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=200")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments."""
    # intermixed: key=value overrides may come before, between or after the options
    return build_parser().parse_intermixed_args(argv)


def run(argv: Optional[Sequence[str]] = None) -> TrainResult:
    """Parse, load the config and train; errors propagate (for tests and demo.py)."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    pv = cfg.preview
    check_preview(pv.nfe, pv.sampler)
    return train(cfg, resume=args.resume, sample_fn=preview_sampler(pv.nfe, pv.sampler, pv.seed))


def inspect_only(argv: Optional[Sequence[str]]) -> Optional[str]:
    """The text for --print-config / --dry-run (None when training); no files are written."""
    args = parse_args(argv)
    if not (args.print_config or args.dry_run):
        return None
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        return to_yaml(cfg).rstrip()
    from diffusion.dry_run import dry_run

    d = dry_run(cfg)
    return (f"dry run ok: {d['data']} ({d['items']} items of shape {d['shape']}), {d['model']} "
            f"({d['params'] / 1e6:.2f}M params), {d['optimizer']} lr {d['lr']:.3g}, one step on {d['batch']} items: "
            f"loss {d['loss']:.4f} ({d['seconds']:.1f} s); nothing written")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry: bad input prints one line and exits 2; a NaN/Inf stop prints one line and exits 1."""

    def body() -> int:
        text = inspect_only(argv)
        if text is not None:
            print(text)
            return 0
        res = run(argv)
        if res.is_main:
            print(f"trained {res.steps} steps in {res.seconds:.0f}s on {res.world_size} process(es), final loss "
                  f"{res.final_loss:.4f}; run folder {res.run_dir} (samples: {res.samples_png}, loss curve: "
                  f"{res.loss_png})")
        return 0

    return run_main("train.py", body, faults=(NonFiniteLossError,))


if __name__ == "__main__":
    sys.exit(main())
