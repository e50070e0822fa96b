"""A compact Diffusion Transformer (DiT, Peebles & Xie) behind the project's net contract.

Pipeline: patchify (strided conv) + fixed 2-D sin-cos positions -> ``depth`` blocks modulated by
``c = emb(c_noise) + emb(label)`` through adaLN-Zero -> adaLN final layer -> unpatchify.
Output has the input's channels only: variance learning and guidance live outside the net.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed
from torch import nn

from .presets import from_preset
from .unet import _batch_scalar, _resolve_labels

DIT_PRESETS: dict[str, dict[str, Any]] = {
    # ~1.3M parameters: CPU tests and demos on 8x8 / 16x16.
    "tiny": dict(hidden_size=128, depth=4, num_heads=4, patch_size=2),
    # The paper's sizes (S/B/L/XL); patch size can be overridden, e.g. patch_size=4.
    "S/2": dict(hidden_size=384, depth=12, num_heads=6, patch_size=2),
    "B/2": dict(hidden_size=768, depth=12, num_heads=12, patch_size=2),
    "L/2": dict(hidden_size=1024, depth=24, num_heads=16, patch_size=2),
    "XL/2": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2),
}


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample affine transform of normalised tokens (shift/scale are [B, 1, D])."""
    return x * (1 + scale) + shift


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens via PyTorch's fused scaled-dot-product kernel."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over the token axis of x [B, N, D]."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by c; gates start at zero (adaLN-Zero)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Update tokens x [B, N, D] under conditioning c [B, D]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a linear map from each token to its patch's pixels."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, D] -> per-patch pixels [B, N, p*p*C]."""
        shift, scale = self.ada(c)[:, None].chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer: net(x, c_noise, class_labels) -> tensor shaped like x."""

    def __init__(self, resolution: int, in_channels: int = 1, patch_size: int = 2, hidden_size: int = 128,
                 depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0, num_classes: int = 0,
                 out_channels: Optional[int] = None, freq_dim: int = 256) -> None:
        super().__init__()
        if resolution % patch_size != 0:
            raise ValueError(f"DiT resolution {resolution} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads != 0:
            raise ValueError(f"DiT hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if hidden_size % 4 != 0:  # 2-D sin-cos positions split the width into 4 equal parts
            raise ValueError(f"DiT hidden_size {hidden_size} must be divisible by 4")
        if depth < 1 or num_classes < 0:
            raise ValueError(f"DiT needs depth >= 1 and num_classes >= 0, got depth={depth}, num_classes={num_classes}")
        self.img_resolution = int(resolution)
        self.img_channels = int(in_channels)
        self.out_channels = int(out_channels if out_channels is not None else in_channels)
        self.num_classes = int(num_classes)
        self.patch_size = int(patch_size)
        self.grid = resolution // patch_size
        self.feature_dim = int(hidden_size)
        self.num_skips = 0  # no U-Net skips: Skip-Tuning does not apply

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        # base_size=grid keeps plain integer positions 0..grid-1 (diffusers rescales otherwise).
        pos = get_2d_sincos_pos_embed(hidden_size, self.grid, base_size=self.grid, output_type="pt")
        self.register_buffer("pos_embed", pos.float()[None], persistent=False)
        self.time_proj = Timesteps(freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(freq_dim, hidden_size)
        # Row num_classes is the "null" label used for classifier-free guidance.
        self.class_embed = nn.Embedding(num_classes + 1, hidden_size) if num_classes > 0 else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(hidden_size, patch_size, self.out_channels)
        # The AMED feature: output of the block that ends the first half of the stack.
        self.feature_block = (depth - 1) // 2
        self._features: Optional[torch.Tensor] = None
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's init: Xavier linears, small embeddings, and zeros on every adaLN / output map."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for lin in (self.time_embed.linear_1, self.time_embed.linear_2):
            nn.init.normal_(lin.weight, std=0.02)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        # Zero modulation => every block starts as the identity; zero output => the net starts at 0.
        for ada in [b.ada for b in self.blocks] + [self.final.ada]:
            nn.init.zeros_(ada[-1].weight)
            nn.init.zeros_(ada[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor,
                class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predict a [B,C,H,W] tensor from x, the conditioning scalar c_noise and optional labels."""
        expected = (self.img_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"DiT expects x of shape [B, {', '.join(map(str, expected))}], got {tuple(x.shape)}")
        c = self.time_embed(self.time_proj(_batch_scalar(c_noise, x)).to(x.dtype))
        labels = _resolve_labels(class_labels, self.num_classes, x)
        if labels is not None:
            c = c + self.class_embed(labels)
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        for i, block in enumerate(self.blocks):
            h = block(h, c)
            if i == self.feature_block:
                self._features = h.detach().mean(dim=1)  # detached: only the AMED predictor reads it
        return self._unpatchify(self.final(h, c))

    def _unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] tokens in row-major patch order -> [B, C, H, W] image."""
        b, g, p, ch = tokens.shape[0], self.grid, self.patch_size, self.out_channels
        return tokens.reshape(b, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4).reshape(b, ch, g * p, g * p)

    def bottleneck_features(self) -> torch.Tensor:
        """Token mean of the middle block's output from the latest forward, shape [B, feature_dim]."""
        if self._features is None:
            raise RuntimeError("bottleneck_features() needs a forward pass first")
        return self._features

    @property
    def skip_scales(self) -> None:
        """Always None: a transformer has no U-Net skips."""
        return None

    def set_skip_scales(self, scales: Optional[Sequence[float]]) -> None:
        """Clearing (None) is a no-op; any factors raise, since Skip-Tuning needs a U-Net backbone."""
        if scales is not None:
            raise NotImplementedError("Skip-Tuning scales U-Net skip connections; the DiT backbone has none "
                                      "(num_skips = 0). Use a U-Net ('unet') backbone for Skip-Tuning.")


def build_dit(preset: str = "tiny", **overrides: Any) -> DiT:
    """A DiT from a named preset ('tiny', 'S/2', 'B/2', 'L/2', 'XL/2'); keyword overrides win."""
    return from_preset("DiT", DIT_PRESETS, DiT, preset, "resolution", overrides)