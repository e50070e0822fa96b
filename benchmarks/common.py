"""Shared helpers for benchmarks: paired bootstrap intervals, PASS/MISS checks and result writers.

Every benchmark measures ours and the peer side by side in one run, and writes
``benchmarks/results/<name>.md`` + ``.json`` (+ ``.png``). This module holds the generic pieces so
that each benchmark file is only its measurement.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---- statistics ------------------------------------------------------------------------------


def rms(x: np.ndarray) -> float:
    """Root mean square of a 1-D array of per-sample errors."""
    return float(np.sqrt(np.mean(np.square(x))))


def median(x: np.ndarray) -> float:
    """Median of a 1-D array."""
    return float(np.median(x))


STATISTICS: dict[str, Callable[[np.ndarray], float]] = {"rms": rms, "median": median, "mean": lambda x: float(np.mean(x))}


def _batched_stat(name: str, x: np.ndarray) -> np.ndarray:
    """The statistic over the last axis of x[R, n] (vectorised: the bootstrap calls it on many resamples)."""
    if name == "rms":
        return np.sqrt(np.mean(np.square(x), axis=-1))
    if name == "median":
        return np.median(x, axis=-1)
    if name == "mean":
        return np.mean(x, axis=-1)
    raise ValueError(f"unknown statistic {name!r}; valid: {sorted(STATISTICS)}")


@dataclass
class Ratio:
    """A ratio stat(a)/stat(b) with its paired-bootstrap percentile interval."""

    value: float
    lo: float
    hi: float
    level: float = 0.95
    n: int = 0
    n_boot: int = 0

    def fmt(self, digits: int = 3) -> str:
        """'0.512 [0.47, 0.55]'."""
        return f"{self.value:.{digits}f} [{self.lo:.{digits}g}, {self.hi:.{digits}g}]"

    def as_dict(self) -> dict[str, float]:
        """JSON-ready fields."""
        return {"value": self.value, "ci_lo": self.lo, "ci_hi": self.hi, "level": self.level, "n": self.n, "n_boot": self.n_boot}


def paired_bootstrap_ratio(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, stat: str = "rms",
                           n_boot: int = 2000, level: float = 0.95, seed: int = 0, chunk: int = 250) -> Ratio:
    """stat(a)/stat(b) with a percentile CI from resampling the *same* indices for a and b.

    ``a[i]`` and ``b[i]`` must be measured on the same evaluation item i (same noise), which is what
    makes the interval paired: shared per-item difficulty cancels in the ratio.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size < 2:
        raise ValueError(f"paired bootstrap needs two 1-D arrays of equal length >= 2; got shapes {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        bad = int((~np.isfinite(a)).sum() + (~np.isfinite(b)).sum())
        raise ValueError(f"paired bootstrap got {bad} non-finite values; refusing to drop them silently")
    if not 0 < level < 1:
        raise ValueError(f"confidence level must lie in (0, 1); got {level}")
    rng = np.random.default_rng(seed)
    value = float(_batched_stat(stat, a) / _batched_stat(stat, b))
    ratios = []
    for start in range(0, n_boot, chunk):  # chunks bound memory at chunk x n indices
        idx = rng.integers(0, a.size, size=(min(chunk, n_boot - start), a.size))
        ratios.append(_batched_stat(stat, a[idx]) / _batched_stat(stat, b[idx]))
    r = np.concatenate(ratios)
    q = (1 - level) / 2
    return Ratio(value, float(np.quantile(r, q)), float(np.quantile(r, 1 - q)), level, int(a.size), int(n_boot))


# ---- targets ----------------------------------------------------------------------------------


@dataclass
class Target:
    """One checked target: ``value <= threshold`` (or >=) with a PASS/MISS verdict."""

    name: str
    value: float
    threshold: float
    op: str = "<="
    detail: str = ""
    ci: Optional[Ratio] = None

    @property
    def passed(self) -> bool:
        """Whether the point estimate meets the threshold."""
        if self.op == "<=":
            return self.value <= self.threshold
        if self.op == ">=":
            return self.value >= self.threshold
        raise ValueError(f"unknown comparison {self.op!r}; valid: '<=', '>='")

    @property
    def verdict(self) -> str:
        """'PASS' or 'MISS'."""
        return "PASS" if self.passed else "MISS"

    def line(self) -> str:
        """One printable line."""
        ci = f" (95% CI {self.ci.lo:.3g}..{self.ci.hi:.3g})" if self.ci is not None else ""
        extra = f" — {self.detail}" if self.detail else ""
        return f"[{self.verdict}] {self.name}: {self.value:.4g} {self.op} {self.threshold:.4g}{ci}{extra}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        d = {"name": self.name, "value": self.value, "threshold": self.threshold, "op": self.op,
             "verdict": self.verdict, "detail": self.detail}
        if self.ci is not None:
            d["ci"] = self.ci.as_dict()
        return d


# ---- environment ------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """Versions, machine and git commit, so a result file says what produced it."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for mod in ("diffusers", "torchdiffeq", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # a missing optional package is recorded, not fatal
            info[mod] = None
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except Exception:
        info["git_commit"] = None
    return info


# ---- writers ----------------------------------------------------------------------------------


def _fmt_cell(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-markdown table; floats get 4 significant digits."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        if len(r) != len(headers):
            raise ValueError(f"row has {len(r)} cells, the table has {len(headers)} columns: {r}")
        lines.append("| " + " | ".join(_fmt_cell(v) for v in r) + " |")
    return "\n".join(lines)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "as_dict"):
        return o.as_dict()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")


def write_json(name: str, payload: Mapping[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``results/<name>.json`` (numpy values converted; NaN written as null is not allowed)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=_json_default, allow_nan=False) + "\n")
    return path


def write_markdown(name: str, text: str, results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``results/<name>.md``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.md"
    path.write_text(text.rstrip() + "\n")
    return path


@dataclass
class Series:
    """One line of a plot: x values, y values, a label and an optional matplotlib style."""

    x: Sequence[float]
    y: Sequence[float]
    label: str
    style: dict[str, Any] = field(default_factory=dict)


def loglog_plot(name: str, panels: Mapping[str, Sequence[Series]], xlabel: str, ylabel: str,
                suptitle: str = "", results_dir: Path = RESULTS_DIR, xticks: Optional[Sequence[float]] = None,
                ylim: Optional[tuple[Optional[float], Optional[float]]] = None) -> Path:
    """Write ``results/<name>.png``: one log-log panel per key of ``panels`` (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.2), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items()):
        for s in series:
            ax.loglog(list(s.x), list(s.y), label=s.label, **s.style)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if xticks is not None:
            ax.set_xticks(list(xticks))
            ax.set_xticklabels([f"{v:g}" for v in xticks])
            ax.minorticks_off()
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    path = results_dir / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


class Timer:
    """Context manager measuring wall time in seconds (``.s``)."""

    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.s = time.perf_counter() - self.t0


if __name__ == "__main__":  # `make bench` runs every benchmarks/*.py; this one only holds helpers
    print("benchmarks/common.py: shared helpers, nothing to measure")
