"""``python -m distill COMMAND [args]``: sid, reflow, amed, grid (each module exposes main(argv))."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "sid": "distill.sid",        # one-step generator by Score identity Distillation
    "reflow": "distill.reflow",  # rectified-flow reflow and one-step distillation
    "amed": "distill.amed",      # learn the AMED / mean-value-theorem solver's predictor
    "grid": "distill.grid",      # learn a sampling time grid from a teacher solve
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the sub-command's ``main``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + "\ncommands: " + ", ".join(COMMANDS))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(COMMANDS[name]).main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
