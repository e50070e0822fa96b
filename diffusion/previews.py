"""Pictures of a run: sample grids (torchvision) or scatter plots for 2-D data, and the loss curve."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

MIN_TILE = 48  # pixels: 8x8 digits are upscaled (nearest) so a grid is readable at a glance


def save_samples(x: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Save samples in [-1, 1]: images [N, C, H, W] as a grid, vectors [N, 2] as a scatter plot."""
    x = x.detach().float().cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if x.ndim == 4:
        return _save_grid(x, path)
    if x.ndim == 2 and x.shape[1] == 2:
        return _save_scatter(x, path, title)
    raise ValueError(f"cannot picture samples of shape {tuple(x.shape)}: expected images [N, C, H, W] or points [N, 2]")


def _save_grid(x: torch.Tensor, path: Path) -> Path:
    from torchvision.utils import save_image

    scale = max(1, math.ceil(MIN_TILE / x.shape[-1]))
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    nrow = max(1, int(math.ceil(math.sqrt(x.shape[0]))))
    save_image((x.clamp(-1, 1) + 1) / 2, str(path), nrow=nrow, padding=2, pad_value=0.5)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save_scatter(x: torch.Tensor, path: Path, title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    finite = torch.isfinite(x).all(1)
    r = x[finite].abs().amax(1)
    # frame the bulk (a few far outliers would shrink the picture to a dot) and say what is outside
    lim = max(1.5, 1.1 * float(torch.quantile(r, 0.99))) if len(r) else 1.5
    outside = int((~finite).sum() + (r > lim).sum())
    ax.scatter(x[finite, 0].numpy(), x[finite, 1].numpy(), s=4, alpha=0.6)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    note = f"{x.shape[0]} samples" + (f", {outside} outside the frame or non-finite" if outside else "")
    ax.set_title(f"{title}\n{note}" if title else note, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON lines of a metrics.jsonl file (missing file: empty list)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_loss_curve(metrics: Sequence[dict], path: str | Path, title: str = "") -> Optional[Path]:
    """Plot ``loss`` against ``step`` (log scale) from metrics records; None when there is nothing to plot."""
    pts = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    if not pts:
        return None
    plt = _plt()
    steps, losses = zip(*pts)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, losses, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean over log window)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
