"""Exponential moving average of a network's weights, kept as a full network copy for sampling."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``ema <- decay_n * ema + (1 - decay_n) * net`` after every optimizer step."""

    def __init__(self, net: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1); got {decay}")
        self.net = copy.deepcopy(net).eval().requires_grad_(False)
        self.decay, self.warmup = float(decay), bool(warmup)
        self.num_updates = 0

    def current_decay(self) -> float:
        """Decay for the next update: with warm-up, min(decay, (1+n)/(10+n)) so the init is forgotten fast."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        """Move the average towards ``net``'s current parameters; buffers are copied as they are."""
        d = self.current_decay()
        ema_p, new_p = list(self.net.parameters()), list(net.parameters())
        if len(ema_p) != len(new_p):
            raise ValueError(f"EMA network has {len(ema_p)} parameter tensors, the training network {len(new_p)}")
        for q, p in zip(ema_p, new_p):
            q.lerp_(p.detach().to(q.dtype), 1.0 - d)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1
