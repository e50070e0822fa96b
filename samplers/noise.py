"""Noise sources with per-image seeds: image i of seed s is the same whatever the batch it sits in.

A *generator* argument is ``None`` (global RNG), one ``torch.Generator`` (one stream for the whole
batch: reproducible for a fixed batch size only) or a list of generators, one per image
(``generators(seed, n)`` makes image i use seed ``seed + i``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

GeneratorLike = Union[None, torch.Generator, Sequence[torch.Generator]]


def generators(seed: int, n: int, offset: int = 0, device: Union[str, torch.device] = "cpu") -> list[torch.Generator]:
    """One generator per image: image i (counting from ``offset``) uses seed ``seed + offset + i``."""
    if n < 0:
        raise ValueError(f"number of generators must be >= 0; got {n}")
    return [torch.Generator(device=device).manual_seed(int(seed) + int(offset) + i) for i in range(n)]


def _draw(shape: Sequence[int], g: Optional[torch.Generator], device, dtype) -> torch.Tensor:
    # Draw on the generator's own device, then move: the stream (and so the samples) does not
    # depend on where the model runs.
    gen_device = g.device if g is not None else device
    return torch.randn(tuple(shape), generator=g, device=gen_device, dtype=dtype).to(device)


def randn(shape: Sequence[int], generator: GeneratorLike = None, device: Union[str, torch.device, None] = None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape``; with a list of generators, row i comes from generator i."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if generator is None or isinstance(generator, torch.Generator):
        return _draw(shape, generator, device, dtype)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"got {len(gens)} per-image generators for a batch of {shape[0]} "
                         f"(shape {tuple(shape)}); give exactly one per image")
    return torch.stack([_draw(shape[1:], g, device, dtype) for g in gens])


def randn_like(x: torch.Tensor, generator: GeneratorLike = None) -> torch.Tensor:
    """``randn`` with x's shape, device and dtype."""
    return randn(x.shape, generator, x.device, x.dtype)


__all__ = ["GeneratorLike", "generators", "randn", "randn_like"]
