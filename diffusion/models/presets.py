"""Build a backbone from a named preset plus keyword overrides (shared by U-Net, DiT and MLP)."""

from __future__ import annotations

from typing import Any, Callable, Mapping, TypeVar

T = TypeVar("T")


def from_preset(kind: str, presets: Mapping[str, Mapping[str, Any]], cls: Callable[..., T], preset: str,
                required: str, overrides: Mapping[str, Any]) -> T:
    """``cls(**presets[preset], **overrides)``; unknown presets and a missing ``required`` argument raise ValueError."""
    if preset not in presets:
        raise ValueError(f"unknown {kind} preset {preset!r}; valid: {sorted(presets)}")
    kwargs = {**presets[preset], **overrides}
    if required not in kwargs:
        raise ValueError(f"build_{kind.lower().replace('-', '')}({preset!r}) needs {required}=...")
    return cls(**kwargs)
