"""What every command-line script shares: user errors become one line on stderr and exit status 2.

A user error is an exception type the project raises for bad input (``ValueError`` and its
subclasses such as ``ConfigError`` / ``UsageError`` / ``CheckpointError``, or a missing / unreadable
path). A fault of the run itself (NaN/Inf, divergence) is one line and exit status 1. Anything else
is a bug and keeps its traceback. Also the one help formatter every parser uses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from .data import UnreadableImageError

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                                 FileExistsError, PermissionError, UnreadableImageError)
#: a run that went non-finite or diverged: reported in one line, exit status 1
FAULTS: tuple[type[BaseException], ...] = (FloatingPointError,)


class OverwriteError(FileExistsError):
    """An output would replace something this invocation did not create; the message names the flag."""


def one_line(e: BaseException) -> str:
    """The exception's message on one line (multi-line messages are joined with '; ')."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    for ln in lines[1:]:  # "differs in 2 key(s):\n  a\n  b" -> "differs in 2 key(s): a; b"
        text += (" " if text.endswith(":") else "; ") + ln
    return text


def run_main(prog: str, body: Callable[[], int], faults: tuple[type[BaseException], ...] = ()) -> int:
    """Call ``body``; user errors print ``PROG: error: ...`` (exit 2), faults print one line (exit 1)."""
    try:
        return int(body() or 0)
    except USER_ERRORS as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except FAULTS + tuple(faults) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 1


def check_device(name: Optional[str], flag: str = "--device") -> Optional[torch.device]:
    """Parse a device string; ValueError when it is malformed or the hardware is not there."""
    if name is None:
        return None
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {name!r} is not a torch device; expected e.g. cpu, cuda, cuda:1, mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {name}: no CUDA GPU is visible on this machine (torch.cuda.is_available() is "
                             f"False); use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {name}: only {torch.cuda.device_count()} CUDA device(s) here "
                             f"(valid: {', '.join(f'cuda:{i}' for i in range(torch.cuda.device_count()))})")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"{flag} {name}: MPS is not available on this machine; use {flag} cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu", "meta"):
        raise ValueError(f"{flag} {name}: unsupported device type {dev.type!r}; expected cpu, cuda or mps")
    return dev


def folder_is_used(folder: Path) -> bool:
    """True when ``folder`` exists and holds anything (a fresh output folder is absent or empty)."""
    return folder.is_dir() and any(folder.iterdir())


def refuse_overwrite(what: str, path: Path, flag: str = "--overwrite") -> None:
    """Raise OverwriteError naming the folder/file and the flag that allows replacing it."""
    raise OverwriteError(f"{what} {path} already exists and was not created by this command; pass {flag} to "
                         f"replace it, or choose another output")


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file or folder (after resolving links and '..')."""
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and appends ``(default: ...)`` to every option's help."""


def option_actions(parser: argparse.ArgumentParser, name: str = "") -> list[tuple[str, argparse.Action]]:
    """Every (command, action) of a parser and its sub-commands, except -h/--help."""
    out = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub, sp in a.choices.items():
                out += option_actions(sp, f"{name} {sub}".strip())
        elif not isinstance(a, argparse._HelpAction):
            out.append((name, a))
    return out


__all__ = ["HelpFormatter", "option_actions", "USER_ERRORS", "FAULTS", "OverwriteError", "one_line", "run_main", "check_device", "folder_is_used",
           "refuse_overwrite", "same_path"]
