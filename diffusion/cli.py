"""Shared command-line pieces: one help formatter (raw description + every option's default)."""

from __future__ import annotations

import argparse


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


__all__ = ["HelpFormatter", "option_actions"]
