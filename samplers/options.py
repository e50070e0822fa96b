"""Command-line sampler choices: ``k=v`` option parsing and validation of grid names / grid and sampler options.

Used by sample.py's ``--grid NAME``, ``--grid-opt k=v`` and ``--opt k=v`` so that any row of
benchmarks/sampler_suite.py can be reproduced from the command line; every mistake is one
ValueError naming the bad value and the valid choices.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Optional

from . import grids
from .registry import spec

#: grid-function parameters filled in by ``grids.make`` / ``sample`` rather than by the user
_GRID_FIXED = ("n", "schedule")


def parse_value(text: str) -> Any:
    """'true'/'false' -> bool, then int, then float, else the string itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_kv(items: Optional[Iterable[str]], flag: str) -> dict:
    """['k=v', ...] -> {k: parsed v}; ValueError naming ``flag`` on a malformed or repeated item."""
    out: dict = {}
    for item in items or ():
        key, sep, val = item.partition("=")
        if not sep or not key.strip() or not val.strip():
            raise ValueError(f"{flag} expects key=value; got {item!r}")
        key = key.strip()
        if key in out:
            raise ValueError(f"{flag} {key} given twice ({out[key]!r} and {val!r})")
        out[key] = parse_value(val)
    return out


def grid_options(kind: str) -> list[str]:
    """Parameters the grid family ``kind`` accepts (``grid_schedule`` only via the Python API)."""
    if kind not in grids.GRIDS:
        raise ValueError(f"unknown grid {kind!r}; valid grids: {grids.available()}")
    params = inspect.signature(grids.GRIDS[kind]).parameters
    return [p for p in params if p not in _GRID_FIXED]


def check_grid_choice(kind: Optional[str], grid_opts: dict) -> None:
    """Validate ``--grid`` and ``--grid-opt`` together (grid options need a named grid)."""
    if kind is None:
        if grid_opts:
            raise ValueError(f"--grid-opt {sorted(grid_opts)} needs --grid NAME; valid grids: {grids.available()}")
        return
    valid = grid_options(kind)
    bad = sorted(set(grid_opts) - set(valid))
    if bad:
        raise ValueError(f"grid {kind!r} has no option(s) {bad}; valid options: {valid}")
    for k, v in grid_opts.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ValueError(f"grid option {k}={v!r} must be a number")


def check_sampler_options(sampler: str, opts: dict) -> None:
    """Validate ``--opt`` against the sampler's keyword options."""
    valid = [o for o in spec(sampler).options() if o not in ("generator", "callback", "class_labels", "progress")]
    bad = sorted(set(opts) - set(valid))
    if bad:
        raise ValueError(f"sampler {sampler!r} has no option(s) {bad}; valid options: {valid}")


__all__ = ["parse_value", "parse_kv", "grid_options", "check_grid_choice", "check_sampler_options"]
