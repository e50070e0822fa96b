"""Every config key with its type, default and meaning, read from diffusion/config.py's typed schema.

    python -m diffusion.config_docs > docs/configs.md     # regenerate (tests/test_config_docs.py compares)

Types and defaults come from the dataclasses; meanings from each field's trailing ``# comment`` in
config.py, or from MEANINGS below for fields without one. A key with neither fails the sync test.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from typing import Any, Optional

from . import config as config_module
from .config import RunConfig

# meanings of fields whose line in config.py carries no comment
MEANINGS = {
    "name": "run name; also names the run folder",
    "run_dir": "run folder (weights, config.yaml, checkpoints, logs)",
    "model.preset": "named size of the backbone (see diffusion/models: tiny, small, ddpm_cifar, ddpmpp_cifar, B/2 ...)",
    "optim.lr": "peak learning rate (AdamW)",
    "optim.betas": "AdamW (beta1, beta2)",
    "optim.weight_decay": "AdamW decoupled weight decay",
    "optim.eps": "AdamW epsilon",
    "optim.warmup_steps": "linear learning-rate warm-up from 0 over this many steps",
    "ema.decay": "EMA decay per optimizer step",
    "train.grad_accum": "micro-batches accumulated per optimizer step (through accelerate)",
    "train.seed": "seed of the initial weights, data order and noise draws",
    "train.log_every": "log loss, lr, grad norm and throughput every N steps",
    "preview.n": "images in each preview grid",
    "preview.nfe": "network evaluations per preview image",
}
_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+?)\s*$")


def _comments(cls: type) -> dict[str, str]:
    return {m.group(1): m.group(2) for line in inspect.getsource(cls).splitlines() if (m := _COMMENT.match(line))}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        return None if dataclasses.is_dataclass(value) else value
    return None


def rows(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, meaning) for every field, sections first then their keys."""
    out = []
    notes = _comments(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        sub = getattr(config_module, str(f.type), None) if isinstance(f.type, str) else f.type
        meaning = notes.get(f.name) or MEANINGS.get(key, "")
        if dataclasses.is_dataclass(sub):
            out.append((key, "section", None, (sub.__doc__ or "").strip() or meaning))
            out += rows(sub, key + ".")
        else:
            out.append((key, str(f.type), _default(f), meaning))
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if not isinstance(value, str) else (value or '""')


def markdown() -> str:
    """docs/configs.md: one table per section."""
    lines = ["# Config keys", "",
             "Generated from `diffusion/config.py` by `python -m diffusion.config_docs > docs/configs.md`; do not edit.",
             "Set any key in a recipe (`configs/*.yaml`) or on the command line: `python train.py --config FILE key=value`.",
             "`python train.py --print-config ...` prints the merged result.", ""]
    section: Optional[str] = None
    for key, typ, default, meaning in rows():
        if typ == "section":
            section = key
            lines += ["", f"## `{key}`: {meaning}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
            continue
        if section is None or not key.startswith(section + "."):
            if section is not None or not lines[-1].startswith("|"):
                lines += ["", "## top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
            section = None
        lines.append(f"| `{key}` | `{typ}` | `{_fmt(default)}` | {meaning.replace('|', '/')} |")
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def help_epilog() -> str:
    """A short key listing for ``train.py --help``."""
    keys = [k for k, t, _, _ in rows() if t != "section"]
    return "config keys (key=value; types, defaults and meanings in docs/configs.md):\n  " + ", ".join(keys)


def main() -> int:
    """Print docs/configs.md to stdout."""
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
