"""The training loop: accelerate for devices, data parallelism, mixed precision and accumulation.

``train(cfg, resume=None, sample_fn=None)`` runs one configured run into ``cfg.run_dir``. Exact
resume rests on three things being saved and restored: the weights, AdamW's state and the LR schedule,
our own state (EMA, step, the per-process noise generator, the global torch / numpy / Python RNGs)
and the data position, which is a pure function of the step because the data order is a deterministic
stream (diffusion/data_stream.py). All of it is written by us as safetensors + JSON rather than through
``accelerator.save_state``, whose optimizer, scheduler and RNG files are pickles (older accelerate /
torch versions unpickle them fully on resume), and this project never unpickles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from omegaconf import DictConfig
from safetensors import SafetensorError
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import build
from .checkpoint import (CHECKPOINTS, CONFIG_NAME, EMA_NAME, MODEL_NAME, CheckpointError, list_checkpoints,
                         load_optimizer, load_rng, load_weights, remove_partial, resolve_checkpoint, save_json,
                         save_optimizer, save_rng, save_run, save_weights, write_checkpoint, write_text_atomic)
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
SCHEDULER_STATE = "scheduler.json"
SCALER_STATE = "scaler.json"
#: files of a finished run: a fresh run into such a folder needs train.overwrite=true
FINISHED_MARKERS = (MODEL_NAME, EMA_NAME, "train_summary.json", "samples.json")
METRICS = "metrics.jsonl"
LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}
_SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA)
#: with logging off, the queued per-step statistics are still read (and checked) this often
SYNC_EVERY = 1000


class NonFiniteLossError(FloatingPointError):
    """Training went NaN/Inf (a per-sample loss or the gradient); raised before anything is saved from it."""


class NonFiniteWeightsError(NonFiniteLossError):
    """The weights or the EMA hold NaN/Inf although losses and gradients were finite (e.g. optim.lr=inf)."""


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
    save_rng(folder / _rank_state_name(acc.process_index), {"generator": generator})
    if acc.is_main_process:
        save_weights(ema.net, folder / EMA_NAME)
        state = {"step": step, "samples_seen": samples_seen, "ema_updates": ema.num_updates,
                 "world_size": acc.num_processes, "accelerate_step": acc.step}
        write_text_atomic(folder / TRAINER_STATE, json.dumps(state, indent=1) + "\n")
        write_text_atomic(folder / CONFIG_NAME, to_yaml(cfg))


def load_trainer_state(folder: Path, acc: Accelerator, ema: EMA, generator: torch.Generator) -> dict:
    """Restore what ``save_trainer_state`` wrote; returns the JSON state (step, samples_seen, ...)."""
    state = json.loads((folder / TRAINER_STATE).read_text())
    load_weights(ema.net, folder / EMA_NAME, acc.device)
    ema.num_updates = int(state["ema_updates"])
    acc.step = int(state.get("accelerate_step", 0))
    rank_file = folder / _rank_state_name(acc.process_index)
    if rank_file.is_file():
        load_rng(rank_file, {"generator": generator})
    else:  # more processes than when saved: this one starts a fresh (seeded) noise stream
        acc.print(f"warning: {folder} was written by {state['world_size']} process(es); process "
                  f"{acc.process_index} starts a new noise stream, so the run is not bit-identical")
    return state


def _span(first: int, last: int) -> str:
    return f"step {last}" if first == last else f"steps {first}-{last}"


def _checksum(net: torch.nn.Module) -> int:
    """A 63-bit hash of every parameter's bytes: equal on all ranks iff the replicas agree exactly."""
    h = hashlib.sha256()
    for p in net.parameters():
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 1-D: NHWC-safe
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
        finished = [n for n in FINISHED_MARKERS if (run_dir / n).is_file()]
        if finished and not cfg.train.overwrite:
            raise ConfigError(f"run folder {run_dir} already holds a finished run or outputs ({', '.join(finished)}); "
                              f"pick another run_dir=..., or set train.overwrite=true to replace them")
        if is_main and existing:
            shutil.rmtree(ckpt_root)
        return run_dir, None
    ckpt = resolve_checkpoint(resume, ckpt_root, log=print if is_main else (lambda _: None))
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
    # foreach=None is torch's own choice (multi-tensor on CUDA); fused=None rather than False keeps that choice
    opt = torch.optim.AdamW(net.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                            foreach=o.foreach, fused=True if o.fused else None)
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
        # NHWC only where there are images; the EMA copy follows so its lerp reads matching layouts
        self.channels_last = bool(tc.channels_last) and len(cfg.model.input_shape) == 3
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.ema = EMA(net, cfg.ema.decay, cfg.ema.warmup, foreach=cfg.ema.foreach)
        self.ema.net.to(acc.device)
        opt, sched = _optimizer(cfg, net)
        self.net, self.opt, self.sched = acc.prepare(net, opt, sched)
        self.unwrapped = acc.unwrap_model(self.net)
        if tc.compile:  # in place (nn.Module.compile): parameter names and state-dict keys stay unchanged
            self.unwrapped.compile(mode=tc.compile_mode, backend=tc.compile_backend)
            self.ema.net.compile(mode=tc.compile_mode, backend=tc.compile_backend)  # previews use the EMA weights
        self.model = build.build_score_model(cfg, self.net)
        # labels come from the dataset, whose class count is model.num_classes (build.resolve checks it), and
        # drop_labels only maps them to the null class: a per-step range check would be a host read every step
        self.model.validate_labels = False
        self.objective = build.build_loss(cfg)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        set_seed(tc.seed, device_specific=True)  # dropout differs across processes, as their data does
        self.generator = torch.Generator().manual_seed(tc.seed * 1_000_003 + acc.process_index)
        self.step = 0
        # per-step [loss, non-finite samples, grad norm] stay on the device until ``sync`` reads them
        self.stat_dtype = torch.float32 if acc.device.type == "mps" else torch.float64  # MPS has no float64
        self.pending: list[torch.Tensor] = []
        self.window: list[float] = []  # synced per-step losses (this process) since the last log
        self.window_mean: list[float] = []  # the same, averaged over processes
        self.last_loss, self.last_grad_norm = float("nan"), float("nan")
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
        dc = cfg.data
        pin = acc.device.type == "cuda" if dc.pin_memory is None else bool(dc.pin_memory)
        extra = {} if dc.prefetch_factor is None else {"prefetch_factor": dc.prefetch_factor}
        loader = DataLoader(self.dataset, batch_sampler=stream, num_workers=dc.num_workers, pin_memory=pin,
                            persistent_workers=dc.persistent_workers, **extra,
                            generator=torch.Generator().manual_seed(tc.seed + self.step * 7919 + acc.process_index))
        self.batches = iter(loader)

    # ---- state ---------------------------------------------------------------------------------
    def _restore(self, ckpt: Path) -> None:
        acc = self.acc
        try:
            load_weights(acc.unwrap_model(self.net), ckpt / MODEL_NAME, acc.device)
            load_optimizer(self.opt, ckpt)
            self.sched.load_state_dict(json.loads((ckpt / SCHEDULER_STATE).read_text()))
            if acc.scaler is not None and (ckpt / SCALER_STATE).is_file():
                acc.scaler.load_state_dict(json.loads((ckpt / SCALER_STATE).read_text()))
            state = load_trainer_state(ckpt, acc, self.ema, self.generator)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:  # a damaged or foreign file
            raise CheckpointError(f"cannot resume from {ckpt}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
        self.step = int(state["step"])
        if state["samples_seen"] != self.step * self.cfg.train.batch_size:
            raise ConfigError(f"{ckpt}: saw {state['samples_seen']} samples in {self.step} steps, which does not "
                              f"match train.batch_size={self.cfg.train.batch_size}")
        acc.print(f"resumed from {ckpt} at step {self.step}")

    def _open_run_dir(self, resumed: bool) -> None:
        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial(run_dir / CHECKPOINTS)
        if not resumed:  # train.overwrite=true: an old run's weights must not sit next to the new config
            for name in (*FINISHED_MARKERS, "samples.png", "loss.png"):
                (run_dir / name).unlink(missing_ok=True)
        write_text_atomic(run_dir / CONFIG_NAME, to_yaml(self.cfg))
        # a resumed run rewrites history from its checkpoint on: drop records past the resumed step
        kept = [m for m in read_metrics(run_dir / METRICS) if m.get("step", 0) <= self.step] if resumed else []
        write_text_atomic(run_dir / METRICS, "".join(json.dumps(m) + "\n" for m in kept))

    def checkpoint(self) -> Path:
        """Write checkpoints/step_N atomically (every process takes part), keeping the last K."""
        step, samples_seen = self.step, self.step * self.cfg.train.batch_size

        def write(folder: Path) -> None:
            if self.main:  # replicas agree exactly (DDP), so the main process writes the shared state
                save_weights(self.acc.unwrap_model(self.net), folder / MODEL_NAME)
                save_optimizer(self.opt, folder)
                save_json(self.sched.state_dict(), folder / SCHEDULER_STATE)
                if self.acc.scaler is not None:
                    save_json(self.acc.scaler.state_dict(), folder / SCALER_STATE)
            save_trainer_state(folder, self.acc, step, samples_seen, self.ema, self.generator, self.cfg)

        return write_checkpoint(self.run_dir / CHECKPOINTS, step, write, self.main, self.acc.wait_for_everyone,
                                self.cfg.train.keep_last)

    # ---- one optimizer step ------------------------------------------------------------------------
    def _labels(self, y: torch.Tensor) -> Optional[torch.Tensor]:
        m = self.cfg.model
        if not m.num_classes:
            return None
        return drop_labels(y.to(self.acc.device, non_blocking=True), m.label_dropout, m.num_classes, self.generator)

    def train_step(self) -> torch.Tensor:
        """Accumulate grad_accum micro-batches, clip, step, update the EMA; no host sync (see ``sync``).

        Returns this step's ``[loss, non-finite per-sample losses, grad norm]`` as a device tensor and
        queues it in ``self.pending``; nothing here reads a value back to the host, so a GPU never waits.
        """
        acc, tc = self.acc, self.cfg.train
        loss_total = torch.zeros((), dtype=self.stat_dtype, device=acc.device)
        bad = torch.zeros((), dtype=torch.int64, device=acc.device)
        grad_norm = torch.full((), float("nan"), dtype=self.stat_dtype, device=acc.device)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf  # inf: measure, never clip
        for _ in range(tc.grad_accum):
            x0, y = next(self.batches)
            x0 = x0.to(acc.device, non_blocking=True)
            if self.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            labels = self._labels(y)
            with acc.accumulate(self.net):
                per_sample = self.objective(self.model, x0, labels, self.generator)
                loss = per_sample.mean()
                acc.backward(loss)
                detached = per_sample.detach()
                bad += (~torch.isfinite(detached)).sum()
                loss_total += loss.detach().to(self.stat_dtype) / tc.grad_accum
                if acc.sync_gradients:
                    grad_norm = self._clip_grad_norm(clip).detach().to(self.stat_dtype)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.ema.update(self.unwrapped)
        self.step += 1
        stats = torch.stack([loss_total, bad.to(self.stat_dtype), grad_norm])
        self.pending.append(stats)
        return stats

    def _clip_grad_norm(self, clip: float) -> torch.Tensor:
        """The global grad norm (a device tensor), clipping to ``clip`` unless it is inf.

        Plain data parallelism needs nothing from accelerate here, so torch's functions are called
        directly (accelerate's wrapper walks the modules looking for DTensors on every call); fp16's
        gradient unscaling and sharded engines still go through ``Accelerator.clip_grad_norm_``.
        """
        acc = self.acc
        if acc.scaler is not None or acc.distributed_type in _SHARDED:
            return acc.clip_grad_norm_(self.params, clip)
        if math.isinf(clip):  # measuring only: multiplying every gradient by 1.0 would change nothing
            return torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        return torch.nn.utils.clip_grad_norm_(self.params, clip)

    def _nonfinite_weights(self) -> torch.Tensor:
        """[training-weight tensors, EMA tensors] holding a NaN/Inf, counted on the device (no sync)."""
        def count(params: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([~torch.isfinite(p.detach()).all() for p in params]).sum()

        return torch.stack([count(self.params), count(list(self.ema.net.parameters()))]).to(self.stat_dtype)

    def sync(self) -> bool:
        """Read the queued step statistics back (one transfer, one gather), check them, return the time flag.

        Called at log, preview and checkpoint steps, the last step, the time limit and every
        ``SYNC_EVERY`` steps otherwise; the same steps on every process. Raises ``NonFiniteLossError``
        when a per-sample loss or the gradient was NaN/Inf in any step since the last sync, and
        ``NonFiniteWeightsError`` when the weights or the EMA are, so nothing non-finite is ever saved.
        """
        acc, first = self.acc, self.step - len(self.pending) + 1
        over = torch.tensor([float(self.out_of_time())], dtype=self.stat_dtype).to(acc.device)
        local = torch.cat([torch.stack(self.pending).flatten() if self.pending else over[:0],
                           self._nonfinite_weights(), over])
        rows = (acc.gather(local[None]) if self.world > 1 else local[None]).cpu().tolist()  # the one sync
        n = len(self.pending)
        self.pending = []
        for rank, row in enumerate(rows):
            steps = [row[3 * i:3 * i + 3] for i in range(n)]
            for i, (_, n_bad, gnorm) in enumerate(steps):
                # under fp16 an infinite gradient is an overflow that the GradScaler handles by skipping the step
                grad_bad = not math.isfinite(gnorm) and self.cfg.train.mixed_precision != "fp16"
                if n_bad > 0 or grad_bad:
                    self._raise_loss(first + i, int(n_bad), gnorm, rank, first)
        for rank, row in enumerate(rows):
            model_bad, ema_bad = int(row[3 * n]), int(row[3 * n + 1])
            if model_bad or ema_bad:
                raise NonFiniteWeightsError(
                    f"non-finite weights after step {self.step} (checked at {_span(first, self.step)}; losses and "
                    f"gradients were finite): {model_bad} of {len(self.params)} weight tensors and {ema_bad} EMA "
                    f"tensors hold NaN/Inf on process {rank} with optim.lr={self.cfg.optim.lr}; nothing "
                    f"written from them. {self._last_good()}")
        mine = rows[acc.process_index]
        self.window += [mine[3 * i] for i in range(n)]
        self.window_mean += [sum(r[3 * i] for r in rows) / len(rows) for i in range(n)]
        if n:
            self.last_grad_norm = mine[3 * (n - 1) + 2]
            self.last_loss = mine[3 * (n - 1)]
        return any(r[-1] > 0 for r in rows)

    def _last_good(self) -> str:
        last = list_checkpoints(self.run_dir / CHECKPOINTS)
        # every checkpoint is written right after a sync that found its weights and EMA finite
        return f"Last checkpoint with finite weights: {last[-1][1] if last else 'none'}"

    def _raise_loss(self, step: int, n_bad: int, grad_norm: float, rank: int, first: int) -> None:
        window = f"{_span(first, self.step)} checked at step {self.step}"
        raise NonFiniteLossError(
            f"non-finite loss at step {step}: {n_bad} of {self.micro * self.cfg.train.grad_accum} per-sample losses "
            f"on process {rank} are NaN/Inf (grad norm {grad_norm}; {window}); stopped before saving, no checkpoint "
            f"written from those weights. {self._last_good()}")

    def out_of_time(self) -> bool:
        """Whether train.time_limit_min has passed on this process's host clock (never a device sync).

        With several processes the flags are combined inside ``sync`` so that all stop at the same step.
        """
        limit = self.cfg.train.time_limit_min
        return bool(limit) and time.perf_counter() - self.t_start > 60 * limit

    # ---- outputs -------------------------------------------------------------------------------------
    def log(self, seconds: float) -> dict:
        """Mean loss over the synced window (over processes too) to metrics.jsonl and TensorBoard."""
        steps = len(self.window)
        mean = float(sum(self.window) / steps) if self.world == 1 else float(sum(self.window_mean) / steps)
        bs = self.cfg.train.batch_size
        record = {"step": self.step, "loss": mean, "lr": self.sched.get_last_lr()[0], "grad_norm": self.last_grad_norm,
                  "steps_per_s": steps / seconds, "samples_per_s": steps * bs / seconds,
                  "epoch": self.step * bs / len(self.dataset), "elapsed_s": time.perf_counter() - self.t_start}
        if self.main:
            with open(self.run_dir / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.acc.log({k: v for k, v in record.items() if k != "step"}, step=self.step)
        self.window, self.window_mean = [], []
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

    def finish(self) -> TrainResult:
        """Final weights, config, pictures and a summary (with per-process parameter checksums)."""
        acc, run_dir = self.acc, self.run_dir
        if self.pending:  # the loop syncs on its last step; this only guards against a caller that did not
            self.sync()
        last_loss = self.last_loss
        net = self.unwrapped
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
    t_window = time.perf_counter()
    try:
        while run.step < tc.steps:
            run.train_step()
            bar.update(1)
            step, last = run.step, run.step == tc.steps
            log_now = bool(tc.log_every and step % tc.log_every == 0) or last
            preview_now = bool(tc.sample_every and step % tc.sample_every == 0) and not last
            ckpt_now = bool(tc.ckpt_every and step % tc.ckpt_every == 0)
            # one process reads its own clock every step; several agree on it inside sync()
            over = run.world == 1 and run.out_of_time()
            if not (log_now or preview_now or ckpt_now or last or over or len(run.pending) >= SYNC_EVERY):
                continue  # the common step: nothing was read back from the device
            over = run.sync()  # the only host read: losses, NaN counts, grad norm, weight finiteness, clock
            if log_now or (over and run.window):
                record = run.log(time.perf_counter() - t_window)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                t_window = time.perf_counter()
            if preview_now and not over:
                run.preview(run.run_dir / "previews" / f"step_{run.step:07d}.png")
                run.acc.wait_for_everyone()
            if ckpt_now or (over and tc.ckpt_every):
                run.checkpoint()  # a stopped run is resumable from exactly here
            if over:
                if run.main:
                    print(f"time limit of {tc.time_limit_min} min reached at step {run.step} of {tc.steps}; "
                          f"saving and stopping")
                break
    finally:
        bar.close()
    return run.finish()


@contextlib.contextmanager
def backend_flags(tf32: bool, cudnn_benchmark: bool) -> Iterator[None]:
    """TF32 matmuls and cuDNN autotuning while the block runs; torch's process-wide settings are restored after."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    try:
        if tf32:  # matmuls in TF32 ("high"); torch already lets cuDNN convolutions use TF32 by default
            torch.set_float32_matmul_precision("high")
        if cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.benchmark = saved[1]


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
        if tc.mixed_precision != "no" and not acc.native_amp:
            # accelerate would train in float32 while the banner said fp16: refuse instead of mislabelling
            raise ConfigError(f"train.mixed_precision={tc.mixed_precision} is not available on device "
                              f"{acc.device} (accelerate would silently train in float32); valid here: "
                              f"{'no, bf16' if acc.device.type == 'cpu' else 'no'}")
        with backend_flags(tf32=tc.tf32, cudnn_benchmark=tc.cudnn_benchmark):
            return _loop(_Run(acc, cfg, resume, sample_fn))
    finally:
        acc.end_training()
        # accelerate keeps its settings in process-wide singletons; reset them so a later train() in the
        # same process (tests, benchmarks, notebooks) may choose another precision or accumulation
        AcceleratorState._reset_state()
        GradientState._reset_state()
