"""``train.py --dry-run``: resolve the config, build data, model, optimizer and loss, take one step; write nothing."""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig

from . import build


def dry_run(cfg: DictConfig) -> dict:
    """One optimizer step on one micro-batch of the real data, in memory; returns what was built."""
    from .training import _optimizer  # the trainer's own AdamW + lr schedule

    if cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    start = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    data = build.build_data(cfg)
    cfg = build.resolve(cfg, data)
    net = build.build_network(cfg)
    model, loss_fn = build.build_score_model(cfg, net), build.build_loss(cfg)
    opt, sched = _optimizer(cfg, net)
    n = min(cfg.train.batch_size // cfg.train.grad_accum, len(data))
    items = [data[i] for i in range(n)]
    x0 = torch.stack([torch.as_tensor(x) for x, _ in items]).float()
    labels = torch.tensor([int(y) for _, y in items]) if cfg.model.num_classes else None
    loss = loss_fn(model, x0, labels, torch.Generator().manual_seed(cfg.train.seed)).mean()
    loss.backward()
    opt.step()
    sched.step()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"dry run: the first loss is {loss.item()} (not finite)")
    return {"data": cfg.data.name, "items": len(data), "shape": list(cfg.model.input_shape),
            "model": f"{cfg.model.kind}/{cfg.model.preset}", "params": sum(p.numel() for p in net.parameters()),
            "optimizer": type(opt).__name__, "lr": sched.get_last_lr()[0], "batch": n, "loss": float(loss.detach()),
            "seconds": time.perf_counter() - start, "config": cfg}


__all__ = ["dry_run"]
