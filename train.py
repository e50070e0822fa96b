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
from diffusion.config import ConfigError, load_config
from diffusion.data import UnreadableImageError
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


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML recipe (default {DEFAULT_CONFIG})")
    p.add_argument("--resume", default=None, metavar="latest|PATH",
                   help="continue from the newest checkpoint of the run folder, or from a checkpoint folder")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=200")
    return p.parse_args(argv)


def run(argv: Optional[Sequence[str]] = None) -> TrainResult:
    """Parse, load the config and train; errors propagate (for tests and demo.py)."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    pv = cfg.preview
    return train(cfg, resume=args.resume, sample_fn=preview_sampler(pv.nfe, pv.sampler, pv.seed))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry: bad input prints one clear line and exits non-zero instead of a traceback."""
    try:
        res = run(argv)
    except (ConfigError, FileNotFoundError, UnreadableImageError, NonFiniteLossError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    if res.is_main:
        print(f"trained {res.steps} steps in {res.seconds:.0f}s on {res.world_size} process(es), final loss "
              f"{res.final_loss:.4f}; run folder {res.run_dir} (samples: {res.samples_png}, loss curve: {res.loss_png})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
