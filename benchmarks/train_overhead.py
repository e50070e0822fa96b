"""Trainer overhead: steps/s of ``diffusion.training.train`` vs a bare PyTorch loop, same model/batch/data.

Both sides run the default recipe's network (configs/digits_unet.yaml), the same ScoreModel and
objective, the same batch size and the same in-memory digits. The bare loop is forward, loss,
backward, AdamW step and nothing else. The trainer adds accelerate's wrappers, the DataLoader over
the resumable stream, EMA (foreach lerp), gradient-norm clipping, the on-device loss/NaN/grad-norm
bookkeeping with its amortised read-back and weight-finiteness check every ``log_every`` steps, tqdm,
JSONL + TensorBoard logging.

This machine is shared with other jobs whose load changes by the second, so the two sides are
interleaved step by step: each iteration of the trainer's loop first runs one bare step (timed
alone), then the trainer's own step. A trainer iteration's time is the time from one loop iteration
to the next minus the bare step inside it, so logging, tqdm and EMA are all counted, and both sides
see the same load. Ratio of mean step times with a paired bootstrap interval. Target: trainer >= 0.97x the
bare loop that does the same training math (clip + EMA, as the recipe); the plainer loop is shown beside it.

    .venv/bin/python benchmarks/train_overhead.py [--steps 300]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (Target, environment, markdown_table, paired_bootstrap_ratio,  # noqa: E402
                               write_json, write_markdown)
from diffusion import build  # noqa: E402
from diffusion.config import load_config  # noqa: E402
from diffusion.ema import EMA  # noqa: E402
from diffusion.training import _Run, train  # noqa: E402

NAME = "train_overhead"
CONFIG = ROOT / "configs" / "digits_unet.yaml"
WARMUP = 10
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where accelerate will train too


class BareLoop:
    """The plainest loop over the same model, objective, optimizer settings, batch and data.

    ``recipe=True`` adds what the recipe's math needs besides AdamW (grad-norm clipping to
    ``optim.grad_clip`` and the EMA update), written by hand: the trainer against it shows what the
    framework itself costs (accelerate, DataLoader, bookkeeping, logging).
    """

    def __init__(self, cfg, device: torch.device, recipe: bool = False) -> None:
        torch.manual_seed(cfg.train.seed)
        self.data = build.build_data(cfg).images.to(device)  # the digits live in memory: index them directly
        self.net = net = build.build_network(cfg).to(device)
        self.model = build.build_score_model(cfg, net)
        self.objective = build.build_loss(cfg)
        o = cfg.optim
        self.opt = torch.optim.AdamW(net.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                     weight_decay=o.weight_decay)
        self.clip = o.grad_clip if recipe and o.grad_clip > 0 else None
        self.ema = EMA(net, cfg.ema.decay, cfg.ema.warmup) if recipe else None
        self.g = torch.Generator().manual_seed(0)
        self.b, self.i = cfg.train.batch_size, 0

    def step(self) -> None:
        """One optimizer step on a random batch."""
        idx = torch.randint(0, len(self.data), (self.b,), generator=self.g).to(self.data.device)
        loss = self.objective(self.model, self.data[idx], None, self.g).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip)
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.net)


def interleaved(cfg, steps: int, tmp: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-step seconds (bare, bare + clip + EMA, trainer) from one trainer run with both bare steps inside
    each of its iterations."""
    bares = [BareLoop(cfg, DEVICE), BareLoop(cfg, DEVICE, recipe=True)]
    enters, bare_s = [], [[], []]
    real = _Run.train_step

    def paired(run: _Run):
        enters.append(time.perf_counter())
        for loop, times in zip(bares, bare_s):
            t0 = time.perf_counter()
            loop.step()
            if DEVICE.type == "cuda":  # finish the bare step's kernels so they are not billed to the trainer
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return real(run)

    cfg = cfg.copy()
    cfg.train.steps, cfg.run_dir, cfg.train.overwrite = steps + 1, str(tmp / "run"), True
    _Run.train_step = paired
    try:
        train(cfg)  # no preview sampler: sampling is not training overhead
    finally:
        _Run.train_step = real
    iteration = np.diff(np.array(enters))  # iteration i runs from enter i to enter i+1 (the last has no end)
    bare, recipe = (np.array(t) for t in bare_s)
    trainer = iteration - bare[:-1] - recipe[:-1]
    return bare[WARMUP:-1], recipe[WARMUP:-1], trainer[WARMUP:]


def _hardware() -> str:
    if DEVICE.type == "cuda":
        return (f"GPU {torch.cuda.get_device_name()} (the bare step ends with a CUDA sync so that its kernels are "
                f"not billed to the trainer; the trainer itself reads the device only every log_every steps)")
    return f"{torch.get_num_threads()} torch thread(s), CPU ({os.cpu_count()} cores, shared with other jobs)"


def main(argv: list[str] | None = None) -> int:
    """Measure, print the verdict and write benchmarks/results/train_overhead.{md,json}."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="timed steps (after a warm-up of %d)" % WARMUP)
    args = p.parse_args(argv)

    cfg = load_config(CONFIG, ["train.ckpt_every=0", "train.sample_every=0", "train.log_every=25"])
    if cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    cfg = build.resolve(cfg, build.build_data(cfg))
    name = NAME if DEVICE.type == "cpu" else f"{NAME}_{DEVICE.type}"
    with tempfile.TemporaryDirectory() as d:
        bare, recipe, ours = interleaved(cfg, WARMUP + args.steps, Path(d))
    slow = paired_bootstrap_ratio(ours, bare, stat="mean")  # trainer time / bare time
    ratio, ci = 1 / slow.value, (1 / slow.hi, 1 / slow.lo)
    slow_r = paired_bootstrap_ratio(ours, recipe, stat="mean")
    ratio_r, ci_r = 1 / slow_r.value, (1 / slow_r.hi, 1 / slow_r.lo)
    # the target compares equal training math: the recipe clips gradients and keeps an EMA, so its bare
    # loop does too; the loop without them is shown next to it (what clipping + EMA themselves cost)
    target = Target("trainer steps/s / bare loop (same recipe: clip + EMA) steps/s", ratio_r, 0.97, ">=",
                    detail=f"95% CI {ci_r[0]:.3f}..{ci_r[1]:.3f}; {cfg.model.kind} {dict(cfg.model.options)} "
                           f"{list(cfg.model.input_shape)}, batch {cfg.train.batch_size}")
    print(target.line())
    print(f"trainer / bare loop without clip and EMA: {ratio:.4f} (95% CI {ci[0]:.3f}..{ci[1]:.3f})")
    rows = [["bare loop (forward, loss, backward, AdamW)", 1 / bare.mean(), 1000 * bare.mean(), 1000 * np.median(bare)],
            ["bare loop + grad clip + EMA (the recipe's math by hand)", 1 / recipe.mean(), 1000 * recipe.mean(),
             1000 * np.median(recipe)],
            ["trainer", 1 / ours.mean(), 1000 * ours.mean(), 1000 * np.median(ours)]]
    table = markdown_table(["side", "steps/s", "mean ms/step", "median ms/step"], rows)
    md = f"""# Trainer overhead

`python benchmarks/train_overhead.py --steps {args.steps}`

Same network ({cfg.model.kind}, preset {cfg.model.preset}, options {dict(cfg.model.options)}), objective
{cfg.objective.name}, AdamW settings, batch {cfg.train.batch_size}, in-memory digits {list(cfg.model.input_shape)},
{_hardware()}. The bare loop is
forward + loss + backward + AdamW; the trainer adds accelerate, the DataLoader over the resumable stream, EMA
(foreach), grad-norm clipping, the on-device NaN/loss/grad-norm bookkeeping (read back with the weights'
finiteness check every {cfg.train.log_every} steps), tqdm and JSONL/TensorBoard logging. A second bare loop
adds the recipe's grad clipping ({cfg.optim.grad_clip}) and EMA by hand: the same training math as the trainer,
so the trainer against it is the framework's own cost, and that is the target. The three are interleaved step by step ({args.steps} timed steps each after {WARMUP}
warm-up steps), so all see the same machine load; each trainer step is timed from one loop iteration to the
next minus the bare steps run inside it.

{table}

**{target.line()}**

Trainer / bare loop without the recipe's clipping and EMA: **{ratio:.4f}** (95% CI {ci[0]:.3f}..{ci[1]:.3f};
not the target: that loop does less work than the recipe, so the gap includes what clipping and EMA cost).
"""
    write_markdown(name, md)
    write_json(name, {"target": target, "ratio_ci95": ci, "bare_mean_s": bare.mean(), "trainer_mean_s": ours.mean(),
                      "recipe_bare_mean_s": recipe.mean(), "ratio_vs_recipe_bare": ratio_r, "ratio_vs_recipe_bare_ci95": ci_r,
                      "bare_median_s": float(np.median(bare)), "trainer_median_s": float(np.median(ours)),
                      "steps": args.steps, "config": str(CONFIG.relative_to(ROOT)), "environment": environment()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
