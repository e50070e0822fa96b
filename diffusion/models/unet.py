"""U-Net backbone: diffusers' ``UNet2DModel`` behind the project's net contract.

Contract: ``net(x [B,C,H,W], c_noise [B] float, class_labels [B] long | None) -> [B,C,H,W]``.
The net knows nothing about schedules; ``c_noise`` is whatever scalar the ScoreModel chose
(``t``, ``1000 t``, ``log(sigma)/4``...), fed to a sinusoidal embedding without range assumptions.

Two sampler-side hooks live here:
- Skip-Tuning (docs/theory.md §8): ``set_skip_scales`` multiplies skip ``i`` (0 = nearest the input,
  ``num_skips - 1`` = deepest) right before the decoder concatenates it.
- AMED bottleneck feature (docs/theory.md §7.1): ``bottleneck_features()`` is the spatial mean of the
  mid-block output of the latest forward, shape ``[B, feature_dim]``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from diffusers import UNet2DModel
from torch import nn

from .hooks import UNet2DHooks
from .presets import from_preset

UNET_PRESETS: dict[str, dict[str, Any]] = {
    # ~2.8M parameters: CPU demos on 8x8 / 16x16 digits.
    "tiny": dict(block_out_channels=(64, 128), layers_per_block=1, attention_levels=(1,), dropout=0.0),
    # ~6.5M: 32x32 on a small GPU or a patient CPU.
    "small": dict(block_out_channels=(64, 128, 128), layers_per_block=2, attention_levels=(1,), dropout=0.1),
    # Ho et al. DDPM CIFAR-10 layout (~36M): 4 levels, 2 blocks, attention at 16x16.
    "ddpm_cifar": dict(block_out_channels=(128, 256, 256, 256), layers_per_block=2, attention_levels=(1,),
                       dropout=0.1),
    # EDM's DDPM++ CIFAR-10 layout (~59M here, 56M in EDM): 3 levels of 256 channels, 4 blocks,
    # attention at 16x16, dropout 0.13.
    "ddpmpp_cifar": dict(block_out_channels=(256, 256, 256), layers_per_block=4, attention_levels=(1,),
                         dropout=0.13),
}


class UNet(UNet2DHooks, nn.Module):
    """A class-conditional U-Net (diffusers ``UNet2DModel``) with Skip-Tuning and bottleneck hooks."""

    def __init__(self, resolution: int, in_channels: int = 1, out_channels: Optional[int] = None,
                 block_out_channels: Sequence[int] = (64, 128), layers_per_block: int = 1,
                 attention_levels: Sequence[int] = (1,), dropout: float = 0.0, num_classes: int = 0,
                 norm_groups: int = 32, attention_head_dim: Optional[int] = None,
                 mid_attention: bool = True) -> None:
        super().__init__()
        levels = len(block_out_channels)
        if levels < 1:
            raise ValueError("block_out_channels must name at least one level")
        if resolution % 2 ** (levels - 1) != 0:
            raise ValueError(f"U-Net resolution {resolution} must be divisible by 2**(num_levels-1) = "
                             f"{2 ** (levels - 1)} for {levels} levels {tuple(block_out_channels)}")
        bad = [c for c in block_out_channels if c % norm_groups != 0]
        if bad:
            raise ValueError(f"block_out_channels {tuple(block_out_channels)}: {bad} not divisible by "
                             f"norm_groups={norm_groups} (GroupNorm)")
        bad_levels = [a for a in attention_levels if not 0 <= a < levels]
        if bad_levels:
            raise ValueError(f"attention_levels {tuple(attention_levels)}: {bad_levels} outside 0..{levels - 1}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.img_resolution = int(resolution)
        self.img_channels = int(in_channels)
        self.out_channels = int(out_channels if out_channels is not None else in_channels)
        self.num_classes = int(num_classes)
        attn = set(attention_levels)
        down = tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(levels))
        # Up blocks run deepest-first, so level index = levels - 1 - position.
        up = tuple("AttnUpBlock2D" if levels - 1 - j in attn else "UpBlock2D" for j in range(levels))
        self.net = UNet2DModel(
            sample_size=resolution, in_channels=in_channels, out_channels=self.out_channels,
            down_block_types=down, up_block_types=up, block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block, dropout=dropout, norm_num_groups=norm_groups,
            attention_head_dim=attention_head_dim, add_attention=mid_attention,
            # One extra row: index num_classes is the "null" label for classifier-free guidance.
            num_class_embeds=num_classes + 1 if num_classes > 0 else None,
        )
        self._setup_unet2d_hooks(self.net)

    # ---- contract ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor,
                class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predict a [B,C,H,W] tensor from x, the conditioning scalar c_noise and optional labels."""
        if x.ndim != 4 or x.shape[1] != self.img_channels:
            raise ValueError(f"U-Net expects x of shape [B, {self.img_channels}, H, W], got {tuple(x.shape)}")
        div = 2 ** (len(self.net.down_blocks) - 1)
        if x.shape[2] % div or x.shape[3] % div:
            raise ValueError(f"U-Net input size {tuple(x.shape[2:])} must be divisible by {div}")
        c = _batch_scalar(c_noise, x)
        labels = _resolve_labels(class_labels, self.num_classes, x)
        return self.net(x, c, class_labels=labels, return_dict=False)[0]

    def _unet2d(self) -> nn.Module:
        return self.net


def build_unet(preset: str = "tiny", **overrides: Any) -> UNet:
    """A U-Net from a named preset; keyword overrides (resolution, in_channels, num_classes...) win."""
    return from_preset("U-Net", UNET_PRESETS, UNet, preset, "resolution", overrides)


# ---- helpers shared with the DiT ----------------------------------------------------------------

def _batch_scalar(c_noise: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """c_noise as a float32 [B] tensor on x's device (a scalar is broadcast to the batch)."""
    # float32: the sinusoidal embedding is computed in float32 anyway, and float64 inputs would
    # otherwise leak into half-precision nets.
    c = torch.as_tensor(c_noise, device=x.device).to(torch.float32)
    if c.numel() == 1:
        return c.reshape(1).expand(x.shape[0])
    if c.numel() != x.shape[0]:
        raise ValueError(f"c_noise must have one value per batch item ({x.shape[0]}), got shape {tuple(c.shape)}")
    return c.reshape(x.shape[0])


def _resolve_labels(class_labels: Optional[torch.Tensor], num_classes: int,
                    x: torch.Tensor) -> Optional[torch.Tensor]:
    """Validate labels; a conditional net given None sees the null label (index num_classes)."""
    if num_classes == 0:
        if class_labels is not None:
            raise ValueError("class_labels given to an unconditional net (num_classes=0)")
        return None
    if class_labels is None:
        return torch.full((x.shape[0],), num_classes, dtype=torch.long, device=x.device)
    labels = torch.as_tensor(class_labels, device=x.device).long().reshape(-1)
    if labels.numel() != x.shape[0]:
        raise ValueError(f"class_labels must have {x.shape[0]} entries, got {labels.numel()}")
    if labels.min() < 0 or labels.max() > num_classes:
        raise ValueError(f"class labels must lie in 0..{num_classes} ({num_classes} = null label), "
                         f"got range {int(labels.min())}..{int(labels.max())}")
    return labels
