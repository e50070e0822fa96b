"""Small forward-hook objects used by the backbones (Skip-Tuning, bottleneck capture).

They are callable objects rather than closures on purpose: ``copy.deepcopy`` (used for EMA copies)
copies an object's state into the copy, whereas a closure would keep pointing at the original net.
"""
from __future__ import annotations

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
