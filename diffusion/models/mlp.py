"""A small residual MLP for vector data (gmm2d), behind the same net contract as the U-Net and DiT.

Contract: ``net(x [B, D], c_noise [B], class_labels [B] | None) -> [B, D]``. The noise scalar goes
through diffusers' sinusoidal ``Timesteps`` embedding (no range assumption, like the image nets);
labels get ``num_classes + 1`` embedding rows, the last being the null label for CFG.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from .presets import from_preset
from .unet import _resolve_labels

MLP_PRESETS: dict[str, dict[str, Any]] = {
    # ~0.1M parameters: enough for the 8-mode 2-D ring in a few thousand CPU steps.
    "tiny": dict(hidden=128, depth=3, emb_dim=64),
    "small": dict(hidden=256, depth=4, emb_dim=128),
}


class ResidualBlock(nn.Module):
    """x + Linear(SiLU(Linear(LayerNorm(x) + emb))): pre-norm so depth stays easy to train."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """One residual update conditioned additively on the embedding."""
        return x + self.fc2(self.act(self.fc1(self.norm(x) + emb)))


class MLP(nn.Module):
    """Residual MLP denoiser for [B, D] vectors, conditioned on c_noise and optional class labels."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, emb_dim: int = 64, num_classes: int = 0) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1 or emb_dim < 2 or emb_dim % 2:
            raise ValueError(f"MLP needs dim, hidden, depth >= 1 and an even emb_dim >= 2; "
                             f"got dim={dim}, hidden={hidden}, depth={depth}, emb_dim={emb_dim}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.dim, self.num_classes = int(dim), int(num_classes)
        self.img_channels, self.img_resolution = None, None
        self.time_proj = Timesteps(emb_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_emb = TimestepEmbedding(emb_dim, hidden)
        self.label_emb = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))
        # Zero output layer: the net starts by predicting 0, a neutral guess for every parametrization.
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predict a [B, D] tensor from x [B, D], the noise scalar and optional labels."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP expects x of shape [B, {self.dim}], got {tuple(x.shape)}")
        c = torch.as_tensor(c_noise, device=x.device).to(torch.float32).reshape(-1).expand(x.shape[0])
        emb = self.time_emb(self.time_proj(c).to(x.dtype))
        labels = _resolve_labels(class_labels, self.num_classes, x)
        if labels is not None:
            emb = emb + self.label_emb(labels)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)


def build_mlp(preset: str = "tiny", **overrides: Any) -> MLP:
    """An MLP from a named preset; keyword overrides (dim, num_classes, hidden...) win."""
    return from_preset("MLP", MLP_PRESETS, MLP, preset, "dim", overrides)