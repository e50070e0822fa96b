"""The training loop: accelerate for devices, data parallelism, mixed precision and accumulation.

``train(cfg, resume=None, sample_fn=None)`` runs one configured run into ``cfg.run_dir``. Exact
resume rests on three things being saved and restored: accelerate's state (weights, AdamW, LR
schedule, RNGs), our own state in safetensors/JSON (EMA, step, the per-process noise generator,
the global torch RNG) and the data position, which is a pure function of the step because the
data order is a deterministic stream (diffusion/data_stream.py). Custom state is written by us
rather than through ``accelerator.register_for_checkpointing`` because accelerate unpickles
registered objects by unpickling them (weights_only off), and this project never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration, set_seed
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import build
from .checkpoint import (CHECKPOINTS, CONFIG_NAME, EMA_NAME, MODEL_NAME, list_checkpoints, load_weights,
                         remove_partial, resolve_checkpoint, save_run, save_weights, write_checkpoint,
                         write_text_atomic)
from .config import ConfigError, differences, load_config, to_yaml
from .data_stream import StreamBatchSampler
from .ema import EMA
from .models import drop_labels
from .previews import read_metrics, save_loss_curve, save_samples
from .score_model import ScoreModel
from .trackers import check_log_with, log_image
from .trackers import start as start_trackers

#: (model, n, sample shape, class labels or None) -> samples [n, *shape]; train.py wires samplers.sample
SampleFn = Callable[[ScoreModel, int, Sequence[int], Optional[torch.Tensor]], torch.Tensor]

TRAINER_STATE = "trainer_state.json"
METRICS = "metrics.jsonl"
LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/Inf; raised before the optimizer step, so no weights are touched."""


@dataclass
class TrainResult:
    """Where a finished run put its outputs and how it went."""

    run_dir: Path
    steps: int
    seconds: float
    final_loss: float
    world_size: int
    is_main: bool
    samples_png: Optional[Path]
    loss_png: Optional[Path]


# ---- small helpers -------------------------------------------------------------------------------


def _rank_state_name(rank: int) -> str:
    return f"rng_state_{rank}.safetensors"


def save_trainer_state(folder: Path, acc: Accelerator, step: int, samples_seen: int, ema: EMA,
                       generator: torch.Generator, cfg: DictConfig) -> None:
    """Our part of a checkpoint: EMA weights, step and data position (main), RNG streams (every process)."""
    rng = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(folder / _rank_state_name(acc.process_index)))
    if acc.is_main_process:
        save_weights(ema.net, folder / EMA_NAME)
        state = {"step": step, "samples_seen": samples_seen, "ema_updates": ema.num_updates,
                 "world_size": acc.num_processes}
        write_text_atomic(folder / TRAINER_STATE, json.dumps(state, indent=1) + "\n")
        write_text_atomic(folder / CONFIG_NAME, to_yaml(cfg))


def load_trainer_state(folder: Path, acc: Accelerator, ema: EMA, generator: torch.Generator) -> dict:
    """Restore what ``save_trainer_state`` wrote; returns the JSON state (step, samples_seen, ...)."""
    state = json.loads((folder / TRAINER_STATE).read_text())
    load_weights(ema.net, folder / EMA_NAME, acc.device)
    ema.num_updates = int(state["ema_updates"])
    rank_file = folder / _rank_state_name(acc.process_index)
    if rank_file.is_file():
        rng = load_file(str(rank_file))
        generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:  # more processes than when saved: this one starts a fresh (seeded) noise stream
        acc.print(f"warning: {folder} was written by {state['world_size']} process(es); process "
                  f"{acc.process_index} starts a new noise stream, so the run is not bit-identical")
    return state


def _checksum(net: torch.nn.Module) -> int:
    """A 63-bit hash of every parameter's bytes: equal on all ranks iff the replicas agree exactly."""
    h = hashlib.sha256()
    for p in net.parameters():
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def _prepare_run_dir(cfg: DictConfig, resume: Optional[str], is_main: bool) -> tuple[Path, Optional[Path]]:
    """Check the run folder against the resume request; returns (run_dir, checkpoint to resume or None)."""
    run_dir = Path(cfg.run_dir)
    ckpt_root = run_dir / CHECKPOINTS
    if resume is None:
        existing = list_checkpoints(ckpt_root)
        if existing and not cfg.train.overwrite:
            raise ConfigError(f"run folder {run_dir} already holds checkpoints (up to step {existing[-1][0]}); "
                              f"continue it with --resume latest, pick another run_dir=..., or set "
                              f"train.overwrite=true to start over (deletes them)")
        if is_main and existing:
            shutil.rmtree(ckpt_root)
        return run_dir, None
    ckpt = resolve_checkpoint(resume, ckpt_root)
    saved = load_config(ckpt / CONFIG_NAME)
    diff = differences(saved, cfg)
    if diff:
        raise ConfigError(f"cannot resume {ckpt}: the config differs from the checkpoint's in "
                          f"{len(diff)} key(s):\n  " + "\n  ".join(diff))
    return run_dir, ckpt


def _batch_split(cfg: DictConfig, world: int) -> int:
    """Per-process micro-batch: the global batch divided over processes and accumulation steps."""
    b, a = cfg.train.batch_size, cfg.train.grad_accum
    if b % (world * a):
        raise ConfigError(f"train.batch_size={b} must be divisible by num_processes x train.grad_accum = "
                          f"{world} x {a} = {world * a}")
    return b // (world * a)


def _optimizer(cfg: DictConfig, net: torch.nn.Module):
    from diffusers.optimization import get_scheduler

    o = cfg.optim
    opt = torch.optim.AdamW(net.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    sched = get_scheduler(LR_SCHEDULES[o.lr_schedule], opt, num_warmup_steps=o.warmup_steps,
                          num_training_steps=cfg.train.steps)
    return opt, sched


# ---- the run -----------------------------------------------------------------------------------------


class _Run:
    """One training run's objects and counters; ``train`` drives it step by step."""

    def __init__(self, acc: Accelerator, cfg: DictConfig, resume: Optional[str], sample_fn: Optional[SampleFn]):
        tc = cfg.train
        self.acc, self.sample_fn, self.t_start = acc, sample_fn, time.perf_counter()
        self.main, self.world = acc.is_main_process, acc.num_processes
        self.micro = _batch_split(cfg, self.world)
        self.dataset = build.build_data(cfg)
        self.cfg = cfg = build.resolve(cfg, self.dataset)
        self.run_dir, ckpt = _prepare_run_dir(cfg, resume, self.main)
        acc.wait_for_everyone()

        set_seed(tc.seed)  # identical initial weights on every process, whatever the world size
        net = build.build_network(cfg)
        self.ema = EMA(net, cfg.ema.decay, cfg.ema.warmup)
        self.ema.net.to(acc.device)
        opt, sched = _optimizer(cfg, net)
        self.net, self.opt, self.sched = acc.prepare(net, opt, sched)
        self.model = build.build_score_model(cfg, self.net)
        self.objective = build.build_loss(cfg)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        set_seed(tc.seed, device_specific=True)  # dropout differs across processes, as their data does
        self.generator = torch.Generator().manual_seed(tc.seed * 1_000_003 + acc.process_index)
        self.step = 0
        if ckpt is not None:
            self._restore(ckpt)
        if self.step >= tc.steps:
            raise ConfigError(f"nothing to do: the checkpoint is at step {self.step} and train.steps={tc.steps}")
        if self.main:
            self._open_run_dir(resumed=ckpt is not None)
        # tensorboard alone keeps its folder RUN/tensorboard; other trackers get the run name as project
        start_trackers(acc, cfg, "tensorboard" if acc.log_with and [str(getattr(t, "value", t)) for t in acc.log_with]
                       == ["tensorboard"] else cfg.name)
        stream = StreamBatchSampler(len(self.dataset), self.micro, seed=tc.seed, start=self.step * tc.batch_size,
                                    rank=acc.process_index, world_size=self.world)
        # its own generator: creating the iterator draws a worker seed, which must not consume the global
        # RNG (dropout's), or a resumed run would drift from an uninterrupted one
        loader = DataLoader(self.dataset, batch_sampler=stream, num_workers=cfg.data.num_workers,
                            pin_memory=acc.device.type == "cuda",
                            generator=torch.Generator().manual_seed(tc.seed + self.step * 7919 + acc.process_index))
        self.batches = iter(loader)

    # ---- state ---------------------------------------------------------------------------------
    def _restore(self, ckpt: Path) -> None:
        self.acc.load_state(str(ckpt))
        state = load_trainer_state(ckpt, self.acc, self.ema, self.generator)
        self.step = int(state["step"])
        if state["samples_seen"] != self.step * self.cfg.train.batch_size:
            raise ConfigError(f"{ckpt}: saw {state['samples_seen']} samples in {self.step} steps, which does not "
                              f"match train.batch_size={self.cfg.train.batch_size}")
        self.acc.print(f"resumed from {ckpt} at step {self.step}")

    def _open_run_dir(self, resumed: bool) -> None:
        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial(run_dir / CHECKPOINTS)
        write_text_atomic(run_dir / CONFIG_NAME, to_yaml(self.cfg))
        # a resumed run rewrites history from its checkpoint on: drop records past the resumed step
        kept = [m for m in read_metrics(run_dir / METRICS) if m.get("step", 0) <= self.step] if resumed else []
        write_text_atomic(run_dir / METRICS, "".join(json.dumps(m) + "\n" for m in kept))

    def checkpoint(self) -> Path:
        """Write checkpoints/step_N atomically (every process takes part), keeping the last K."""
        step, samples_seen = self.step, self.step * self.cfg.train.batch_size

        def write(folder: Path) -> None:
            self.acc.save_state(str(folder))
            save_trainer_state(folder, self.acc, step, samples_seen, self.ema, self.generator, self.cfg)

        return write_checkpoint(self.run_dir / CHECKPOINTS, step, write, self.main, self.acc.wait_for_everyone,
                                self.cfg.train.keep_last)

    # ---- one optimizer step ------------------------------------------------------------------------
    def _labels(self, y: torch.Tensor) -> Optional[torch.Tensor]:
        m = self.cfg.model
        if not m.num_classes:
            return None
        return drop_labels(y.to(self.acc.device), m.label_dropout, m.num_classes, self.generator)

    def train_step(self) -> tuple[float, float]:
        """Accumulate grad_accum micro-batches, check finiteness, clip, step; returns (loss, grad norm)."""
        acc, tc = self.acc, self.cfg.train
        loss_total, bad_samples, grad_norm = 0.0, 0, float("nan")
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf  # inf: measure, never clip
        for _ in range(tc.grad_accum):
            x0, y = next(self.batches)
            x0 = x0.to(acc.device, non_blocking=True)
            labels = self._labels(y)
            with acc.accumulate(self.net):
                per_sample = self.objective(self.model, x0, labels, self.generator)
                loss = per_sample.mean()
                acc.backward(loss)
                bad_samples += int((~torch.isfinite(per_sample.detach())).sum())
                loss_total += float(loss.detach()) / tc.grad_accum
                if acc.sync_gradients:
                    grad_norm = float(acc.clip_grad_norm_(self.params, clip))
                    self._check_finite(bad_samples, grad_norm)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.ema.update(acc.unwrap_model(self.net))
        self.step += 1
        return loss_total, grad_norm

    def _check_finite(self, bad_samples: int, grad_norm: float) -> None:
        """Stop before the optimizer step when any per-sample loss (or the gradient) is NaN/Inf."""
        # under fp16 an infinite gradient is an overflow that the GradScaler handles by skipping the step
        bad = bad_samples > 0 or (not math.isfinite(grad_norm) and self.cfg.train.mixed_precision != "fp16")
        if self.world > 1:  # every process must stop at the same step, not only the one that saw it
            bad = bool(self.acc.reduce(torch.tensor([float(bad)], device=self.acc.device), "sum").item())
        if bad:
            last = list_checkpoints(self.run_dir / CHECKPOINTS)
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step + 1}: {bad_samples} of {self.micro * self.cfg.train.grad_accum} "
                f"per-sample losses on process {self.acc.process_index} are NaN/Inf (grad norm {grad_norm}); "
                f"stopped before the optimizer step, no checkpoint written. Last good checkpoint: "
                f"{last[-1][1] if last else 'none'}")

    def out_of_time(self) -> bool:
        """Whether train.time_limit_min has passed (decided on the main process, shared with all)."""
        limit = self.cfg.train.time_limit_min
        if not limit:
            return False
        over = torch.tensor([float(time.perf_counter() - self.t_start > 60 * limit)], device=self.acc.device)
        return bool(self.acc.reduce(over, "max").item()) if self.world > 1 else bool(over.item())

    # ---- outputs -------------------------------------------------------------------------------------
    def log(self, losses: list[float], grad_norm: float, seconds: float) -> dict:
        """Mean loss over the window (over processes too) to metrics.jsonl and TensorBoard."""
        mean = float(sum(losses) / len(losses))
        if self.world > 1:
            mean = float(self.acc.reduce(torch.tensor([mean], device=self.acc.device), "mean"))
        bs = self.cfg.train.batch_size
        record = {"step": self.step, "loss": mean, "lr": self.sched.get_last_lr()[0], "grad_norm": grad_norm,
                  "steps_per_s": len(losses) / seconds, "samples_per_s": len(losses) * bs / seconds,
                  "epoch": self.step * bs / len(self.dataset), "elapsed_s": time.perf_counter() - self.t_start}
        if self.main:
            with open(self.run_dir / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.acc.log({k: v for k, v in record.items() if k != "step"}, step=self.step)
        return record

    def preview(self, path: Path) -> Optional[Path]:
        """A sample grid from the EMA weights with fixed per-image seeds (main process only)."""
        if self.sample_fn is None or not self.main:
            return None
        cfg, n = self.cfg, self.cfg.preview.n
        model = build.build_score_model(cfg, self.ema.net)
        labels = None
        if cfg.model.num_classes:
            labels = torch.arange(n, device=self.acc.device) % cfg.model.num_classes
            if cfg.preview.guidance != 1.0:
                model = model.with_guidance(cfg.preview.guidance)
        with torch.no_grad():
            x = self.sample_fn(model, n, list(cfg.model.input_shape), labels)
        out = save_samples(x, path, title=f"{cfg.name}, step {self.step}")
        if out is not None:
            log_image(self.acc, "samples", out, self.step)  # the grid in the tracker too
        return out

    def finish(self, last_loss: float) -> TrainResult:
        """Final weights, config, pictures and a summary (with per-process parameter checksums)."""
        acc, run_dir = self.acc, self.run_dir
        net = acc.unwrap_model(self.net)
        checksums = acc.gather(torch.tensor([_checksum(net)], device=acc.device)).tolist()
        samples_png = loss_png = None
        if self.main:
            save_run(run_dir, net, self.ema.net, self.cfg)
            samples_png = self.preview(run_dir / "samples.png")
            loss_png = save_loss_curve(read_metrics(run_dir / METRICS), run_dir / "loss.png", title=self.cfg.name)
            summary = {"steps": self.step, "world_size": self.world, "seconds": time.perf_counter() - self.t_start,
                       "final_loss": last_loss, "param_checksums": checksums, "device": str(acc.device)}
            write_text_atomic(run_dir / "train_summary.json", json.dumps(summary, indent=1) + "\n")
        acc.wait_for_everyone()
        return TrainResult(run_dir, self.step, time.perf_counter() - self.t_start, last_loss, self.world,
                           self.main, samples_png, loss_png)


def _loop(run: _Run) -> TrainResult:
    cfg, tc = run.cfg, run.cfg.train
    if run.main:
        n_params = sum(p.numel() for p in run.params)
        print(f"{cfg.name}: {cfg.model.kind}/{cfg.model.preset} ({n_params / 1e6:.2f}M params) on {cfg.data.name} "
              f"{list(cfg.model.input_shape)}, {run.world} process(es) x {run.micro} x {tc.grad_accum} accum = "
              f"batch {tc.batch_size}, device {run.acc.device}, precision {tc.mixed_precision} -> {run.run_dir}")
    bar = tqdm(total=tc.steps, initial=run.step, disable=not run.main, desc=cfg.name, unit="step",
               dynamic_ncols=True)
    window: list[float] = []
    last_loss, t_window = float("nan"), time.perf_counter()
    try:
        while run.step < tc.steps:
            last_loss, grad_norm = run.train_step()
            window.append(last_loss)
            bar.update(1)
            if (tc.log_every and run.step % tc.log_every == 0) or run.step == tc.steps:
                record = run.log(window, grad_norm, time.perf_counter() - t_window)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                window, t_window = [], time.perf_counter()
            if tc.sample_every and run.step % tc.sample_every == 0 and run.step < tc.steps:
                run.preview(run.run_dir / "previews" / f"step_{run.step:07d}.png")
                run.acc.wait_for_everyone()
            if tc.ckpt_every and run.step % tc.ckpt_every == 0:
                run.checkpoint()
            if run.out_of_time():
                if window:
                    run.log(window, grad_norm, time.perf_counter() - t_window)
                if tc.ckpt_every and run.step % tc.ckpt_every:
                    run.checkpoint()  # so the stopped run can be resumed from exactly here
                if run.main:
                    print(f"time limit of {tc.time_limit_min} min reached at step {run.step} of {tc.steps}; "
                          f"saving and stopping")
                break
    finally:
        bar.close()
    return run.finish(last_loss)


def train(cfg: DictConfig, resume: Optional[str] = None, sample_fn: Optional[SampleFn] = None) -> TrainResult:
    """Train as configured; ``resume`` is 'latest' or a checkpoint path. Returns where the outputs are."""
    tc = cfg.train
    if tc.cpu_threads:
        torch.set_num_threads(tc.cpu_threads)
    run_dir = str(cfg.run_dir)
    acc = Accelerator(mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum,
                      log_with=check_log_with(tc.log_with) if tc.tensorboard else None, step_scheduler_with_optimizer=False,
                      project_config=ProjectConfiguration(project_dir=run_dir, logging_dir=run_dir))
    try:
        return _loop(_Run(acc, cfg, resume, sample_fn))
    finally:
        acc.end_training()
        # accelerate keeps its settings in process-wide singletons; reset them so a later train() in the
        # same process (tests, benchmarks, notebooks) may choose another precision or accumulation
        AcceleratorState._reset_state()
        GradientState._reset_state()
