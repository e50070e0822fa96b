"""The trainer's step reads nothing back from the device: tensor-to-Python conversions are counted.

Allowed counts (the contract, also in README "Training"):
- per training step between sync points: **0** conversions in the trainer's own code paths (data, labels,
  backward, clipping, AdamW, LR schedule, EMA, the loop's bookkeeping);
- per sync point (log_every / preview / checkpoint / last step / time limit / every SYNC_EVERY steps): **1**
  (one ``tolist`` of the queued per-step statistics plus weight finiteness and the clock flag).
AdamW without ``fused``/``capturable`` keeps its step counter on the CPU by design and reads it with
``.item()``; that is a host-memory read, not a device sync, so those reads are excluded by tensor identity
(and ``optim.fused=true`` is checked with no exclusion at all).
Two things are not the trainer's and are paused while counting:
- the DataLoader (``next(batches)``): the sampler and ``Dataset.__getitem__`` index host (CPU) tensors,
  in worker processes when ``data.num_workers > 0``; reading host memory is not a device sync;
- the objective's forward (diffusion/losses.py + ScoreModel + schedules, their own hot path with their
  own counting test): today ``schedules.as_time`` still validates t with ``bool`` reads on every call.
  Set ``STRICT_OBJECTIVE = True`` once the objectives are sync-free to count them here too
  (runs here use the ``eps`` and ``flow`` objectives).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from diffusion import training
from diffusion.config import load_config
from diffusion.host_reads import CONVERSIONS

WARMUP, TIMED = 2, 6
STRICT_OBJECTIVE = True  # the objectives are sync-free too (tests/test_hot_path.py counts them alone)


class _Paused:
    """Wraps an iterator or callable so that the counter is off while it runs."""

    def __init__(self, inner, counter: "ConversionCounter") -> None:
        self.inner, self.counter = inner, counter

    def _run(self, fn, *a, **k):
        was, self.counter.on = self.counter.on, False
        try:
            return fn(*a, **k)
        finally:
            self.counter.on = was

    def __next__(self):
        return self._run(next, self.inner)

    def __call__(self, *a, **k):
        return self._run(self.inner, *a, **k)


class ConversionCounter:
    """Counts Tensor -> Python conversions while ``on`` (AdamW's host-side step counters excluded)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.on, self.counts, self.exclude = False, Counter(), set()
        for name in CONVERSIONS:
            real = getattr(torch.Tensor, name)

            def counted(t, *a, _real=real, _name=name, **k):
                if self.on and id(t) not in self.exclude:
                    self.counts[_name] += 1
                return _real(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


def _cfg(tmp: Path, objective: str, extra: list[str]):
    return load_config(None, [f"run_dir={tmp / 'run'}", "data.name=gmm2d", "model.kind=mlp",
                              "model.options={hidden: 32, depth: 1, emb_dim: 16}", "model.parametrization=eps",
                              f"objective.name={objective}", "schedule.name=flow" if objective == "flow" else
                              "schedule.name=cosine", "train.batch_size=16", "train.tensorboard=false",
                              "train.log_every=0", "train.ckpt_every=0", f"train.steps={WARMUP + TIMED}", *extra])


@pytest.mark.parametrize("objective,extra", [("eps", []), ("flow", ["model.parametrization=velocity"]),
                                             ("eps", ["optim.fused=true", "ema.decay=0.9"]),
                                             ("eps", ["train.grad_accum=2", "model.num_classes=0"])],
                         ids=["eps", "flow", "eps-fused", "eps-accum2"])
def test_no_host_sync_between_sync_points(tmp_path: Path, monkeypatch, objective: str, extra: list[str]) -> None:
    counter = ConversionCounter(monkeypatch)
    cfg = _cfg(tmp_path, objective, extra)
    real_step, real_sync, syncs = training._Run.train_step, training._Run.sync, []

    def step(run):
        if run.step == WARMUP:  # optimizer state exists by now: exclude AdamW's CPU step counters, start counting
            counter.exclude = {id(s["step"]) for s in run.opt.optimizer.state.values()
                               if not cfg.optim.fused}
            run.batches = _Paused(run.batches, counter)  # host-side data pipeline
            if not STRICT_OBJECTIVE:
                run.objective = _Paused(run.objective, counter)
            counter.on = True
        return real_step(run)

    def sync(run):
        before = sum(counter.counts.values())
        counter.counts["<steps>"] = before  # conversions of all timed steps, frozen before the sync
        out = real_sync(run)
        syncs.append(sum(counter.counts.values()) - before)
        counter.on = False
        return out

    monkeypatch.setattr(training._Run, "train_step", step)
    monkeypatch.setattr(training._Run, "sync", sync)
    res = training.train(cfg)
    assert res.steps == WARMUP + TIMED and res.final_loss == res.final_loss  # finite, read at the sync
    assert counter.counts["<steps>"] == 0, dict(counter.counts)  # 0 per step over TIMED steps
    assert syncs == [1]  # one read-back at the last step: the queued statistics


def test_sync_reads_back_what_the_steps_queued(tmp_path: Path, monkeypatch) -> None:
    """The amortised statistics are the per-step values: each log is the mean of its window's step losses."""
    cfg = _cfg(tmp_path, "eps", ["train.log_every=4", "train.steps=8", "train.grad_accum=2"])
    real_step, queued = training._Run.train_step, []

    def step(run):
        stats = real_step(run)
        queued.append(stats.clone())
        return stats

    monkeypatch.setattr(training._Run, "train_step", step)
    res = training.train(cfg)
    from diffusion.previews import read_metrics

    m = read_metrics(res.run_dir / "metrics.jsonl")
    steps = torch.stack(queued).tolist()  # [loss, non-finite samples, grad norm] per step
    assert [r["step"] for r in m] == [4, 8]
    assert m[0]["loss"] == sum(s[0] for s in steps[:4]) / 4 and m[1]["loss"] == sum(s[0] for s in steps[4:]) / 4
    assert m[1]["grad_norm"] == steps[-1][2] and all(s[1] == 0 for s in steps)
    assert res.final_loss == steps[-1][0] and len({s[0] for s in steps}) == 8  # eight different batches


def test_with_logging_off_the_queue_is_still_read_every_sync_every_steps(tmp_path: Path, monkeypatch) -> None:
    """log_every=0: read-backs at steps 3, 6 and the last (8); the one log at the end spans all 8 steps."""
    monkeypatch.setattr(training, "SYNC_EVERY", 3)
    cfg = _cfg(tmp_path, "eps", ["train.steps=8"])
    real_step, real_sync, queued, synced_at = training._Run.train_step, training._Run.sync, [], []

    def step(run):
        stats = real_step(run)
        queued.append(stats.clone())
        return stats

    def sync(run):
        synced_at.append(run.step)
        return real_sync(run)

    monkeypatch.setattr(training._Run, "train_step", step)
    monkeypatch.setattr(training._Run, "sync", sync)
    res = training.train(cfg)
    from diffusion.previews import read_metrics

    m = read_metrics(res.run_dir / "metrics.jsonl")
    assert synced_at == [3, 6, 8] and [r["step"] for r in m] == [8]
    assert m[0]["loss"] == sum(torch.stack(queued)[:, 0].tolist()) / 8
