"""Backbones behind one contract: ``net(x [B,C,H,W], c_noise [B], class_labels [B] | None) -> [B,C,H,W]``.

Every net exposes ``num_classes`` (0 = unconditional; otherwise the label embedding has
``num_classes + 1`` rows, the last being the null label for classifier-free guidance),
``img_channels``, ``img_resolution``, ``feature_dim`` / ``bottleneck_features()`` (AMED) and
``num_skips`` / ``set_skip_scales()`` (Skip-Tuning; U-Net only). Nets know nothing about schedules.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from .dit import DIT_PRESETS, DiT, build_dit
from .unet import UNET_PRESETS, UNet, build_unet

MODELS: dict[str, Callable[..., nn.Module]] = {"unet": build_unet, "dit": build_dit}


def build_model(kind: str, **kwargs: Any) -> nn.Module:
    """Build a backbone by kind ('unet' or 'dit'); kwargs go to build_unet / build_dit (preset=..., resolution=...)."""
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}; valid choices: {sorted(MODELS)}")
    return MODELS[kind](**kwargs)


def drop_labels(labels: torch.Tensor, p: float, num_classes: int,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Replace each label by the null label ``num_classes`` with probability p (CFG training)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label dropout probability must be in [0, 1], got {p}")
    if num_classes <= 0:
        raise ValueError(f"drop_labels needs a conditional model (num_classes > 0), got {num_classes}")
    if p == 0.0:
        return labels
    # Draw on the generator's device so a CPU generator stays reproducible whatever the labels' device.
    dev = generator.device if generator is not None else labels.device
    drop = torch.rand(labels.shape, generator=generator, device=dev).to(labels.device) < p
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["UNet", "DiT", "build_unet", "build_dit", "build_model", "drop_labels", "count_params",
           "UNET_PRESETS", "DIT_PRESETS", "MODELS"]
