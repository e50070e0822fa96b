"""Exponential moving average of a network's weights, kept as a full network copy for sampling."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``ema <- decay_n * ema + (1 - decay_n) * net`` after every optimizer step."""

    def __init__(self, net: nn.Module, decay: float = 0.999, warmup: bool = True, foreach: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1); got {decay}")
        self.net = copy.deepcopy(net).eval().requires_grad_(False)
        self.decay, self.warmup, self.foreach = float(decay), bool(warmup), bool(foreach)
        self.num_updates = 0

    def current_decay(self) -> float:
        """Decay for the next update: with warm-up, min(decay, (1+n)/(10+n)) so the init is forgotten fast."""
        n = self.num_updates  # a Python int: the decay never needs a value from the device
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        """Move the average towards ``net``'s current parameters; buffers are copied as they are."""
        d = self.current_decay()
        ema_p, new_p = list(self.net.parameters()), [p.detach() for p in net.parameters()]
        if len(ema_p) != len(new_p):
            raise ValueError(f"EMA network has {len(ema_p)} parameter tensors, the training network {len(new_p)}")
        new_p = [p if p.dtype == q.dtype else p.to(q.dtype) for q, p in zip(ema_p, new_p)]
        if self.foreach:  # one multi-tensor kernel launch per dtype/device group instead of one per tensor
            torch._foreach_lerp_(ema_p, new_p, 1.0 - d)
        else:
            for q, p in zip(ema_p, new_p):
                q.lerp_(p, 1.0 - d)
        ema_b, new_b = list(self.net.buffers()), list(net.buffers())
        if ema_b:
            if self.foreach:
                torch._foreach_copy_(ema_b, new_b)
            else:
                for b_ema, b in zip(ema_b, new_b):
                    b_ema.copy_(b)
        self.num_updates += 1
