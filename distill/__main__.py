"""``python -m distill COMMAND [args]``: sid, reflow, amed, grid (each module exposes main(argv)).

User errors become one line on stderr and exit status 2 (the modules' ``main`` raise, for API use).
"""

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
        print(f"python -m distill: error: unknown command {name!r}; valid commands: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    from diffusion.cli import run_main

    from .common import DivergenceError, NonFiniteError

    # bad input: one line, status 2; a run that went non-finite or diverged: one line, status 1
    return run_main(f"python -m distill {name}", lambda: importlib.import_module(COMMANDS[name]).main(rest),
                    faults=(NonFiniteError, DivergenceError))


if __name__ == "__main__":
    sys.exit(main())
