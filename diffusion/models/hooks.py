"""Small forward-hook objects used by the backbones (Skip-Tuning, bottleneck capture).

They are callable objects rather than closures on purpose: ``copy.deepcopy`` (used for EMA copies)
copies an object's state into the copy, whereas a closure would keep pointing at the original net.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import nn


class SpatialMeanCapture:
    """Forward hook that keeps the spatial mean ``[B, C]`` of a module's ``[B, C, H, W]`` output."""

    def __init__(self) -> None:
        self.value: Optional[torch.Tensor] = None

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        # Detached: the feature feeds a separate small predictor (AMED), never the net's own gradient.
        self.value = output.detach().mean(dim=(2, 3))


class SkipScaler:
    """Forward pre-hook for a decoder block: multiplies the skip tensors it is about to concatenate.

    ``factors[m]`` applies to element ``m`` of the block's ``res_hidden_states_tuple``. Only the
    decoder's copy is scaled, so the encoder path (which already ran) is untouched.
    """

    def __init__(self, factors: Sequence[float]) -> None:
        self.factors = tuple(float(f) for f in factors)

    def _scale(self, res: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if len(res) != len(self.factors):
            raise RuntimeError(f"decoder block got {len(res)} skips, Skip-Tuning expected {len(self.factors)}")
        # Factor 1.0 keeps the very same tensor: no multiply, so untouched skips stay bit-exact.
        return tuple(r if f == 1.0 else r * f for r, f in zip(res, self.factors))

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if "res_hidden_states_tuple" in kwargs:
            kwargs = {**kwargs, "res_hidden_states_tuple": self._scale(kwargs["res_hidden_states_tuple"])}
        else:  # diffusers' UNet2DModel calls up blocks positionally: (sample, res_samples, temb)
            args = (args[0], self._scale(args[1]), *args[2:])
        return args, kwargs


class UNet2DHooks:
    """Skip-Tuning and bottleneck-feature hooks for a project net that wraps a diffusers ``UNet2DModel``.

    Shared by our own ``UNet`` and the pretrained-model adapter. Skip i (0 = nearest the input) is
    element i of diffusers' ``down_block_res_samples``: the conv_in output, then every resnet /
    downsampler output of each down block, in order.
    """

    def _unet2d(self) -> nn.Module:
        """The wrapped UNet2DModel (a method, not a stored reference, so deep copies stay independent)."""
        raise NotImplementedError

    def _setup_unet2d_hooks(self, unet: nn.Module) -> None:
        """Register the bottleneck capture and work out which decoder block consumes which skips."""
        self._mid = SpatialMeanCapture()
        if getattr(unet, "mid_block", None) is not None:
            unet.mid_block.register_forward_hook(self._mid)
        self.feature_dim = int(unet.config.block_out_channels[-1])
        self.num_skips = 1 + sum(len(b.resnets) + (1 if getattr(b, "downsamplers", None) is not None else 0)
                                 for b in unet.down_blocks)
        consumed = [len(b.resnets) for b in unet.up_blocks]
        if sum(consumed) != self.num_skips:
            raise ValueError(f"decoder consumes {sum(consumed)} skips, encoder makes {self.num_skips}: unknown U-Net layout")
        # up block j (deepest first) takes the trailing slice of the skips still unused
        ends = [self.num_skips - sum(consumed[:j]) for j in range(len(consumed))]
        self._skip_ranges = [(e - n, e) for e, n in zip(ends, consumed)]
        self._skip_handles: list = []
        self._skip_scales: Optional[list[float]] = None

    @property
    def skip_scales(self) -> Optional[list[float]]:
        """The active Skip-Tuning factors (None when no scaling is active)."""
        return None if self._skip_scales is None else list(self._skip_scales)

    def set_skip_scales(self, scales: Optional[Sequence[float]]) -> None:
        """Scale skip i by scales[i] before the decoder concat; None (or all 1.0) removes every hook."""
        for h in self._skip_handles:
            h.remove()
        self._skip_handles, self._skip_scales = [], None
        if scales is None:
            return
        scales = [float(s) for s in scales]
        if len(scales) != self.num_skips:
            raise ValueError(f"set_skip_scales got {len(scales)} factors, this U-Net has num_skips={self.num_skips}")
        if not all(math.isfinite(s) for s in scales):
            raise ValueError(f"skip scales must be finite, got {scales}")
        self._skip_scales = scales
        for block, (lo, hi) in zip(self._unet2d().up_blocks, self._skip_ranges):
            # no hook at all where nothing changes: rho == 1 stays bit-exact by construction
            if any(f != 1.0 for f in scales[lo:hi]):
                self._skip_handles.append(block.register_forward_pre_hook(SkipScaler(scales[lo:hi]), with_kwargs=True))

    def bottleneck_features(self) -> torch.Tensor:
        """Spatial mean of the mid-block output from the latest forward, shape [B, feature_dim] (AMED)."""
        if self._mid.value is None:
            raise RuntimeError("bottleneck_features() needs a forward pass first (or the U-Net has no mid block)")
        return self._mid.value
