"""One-off maintenance: point the code's old spec citations at docs/theory.md.

    python tools/retarget_theory_refs.py            # rewrite the files in place
    python tools/retarget_theory_refs.py --dry-run  # only list what would change

Reads docs/theory_map.json and, in every tracked text file (``git ls-files``; a directory walk
outside git) except the map and this script, replaces

1. the map's ``per_file`` citations of that file,
2. its ``citations`` (exact strings, longest first, so "§8 item 12" is not read as "§8"),
3. any citation left over of the form ``<SPEC> §X[ item N][, §Y ...]`` through ``sections``,

where <SPEC> is the old spec's name (spelled out in ``SPEC`` below). A key matches only where it is
not followed by more of a section number, so "§8" never rewrites "§8.9". The script then lists
every mention of the old spec that is still there and exits 1 if any is, 0 otherwise. Lines that
grew past 120 characters are listed as a warning. Run it once after merging, then delete it and
the map (tests/test_theory_refs.py checks the result).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAP = Path("docs/theory_map.json")
SELF = Path("tools/retarget_theory_refs.py")
SPEC = "THE" + "ORY"  # spelled in two parts so that this file does not match its own final scan
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".json", ".sh"}
TEXT_NAMES = {"Makefile"}
SKIP_DIRS = {".git", ".venv", "runs", "node_modules", "__pycache__", ".pytest_cache", "build", "dist"}
MAX_LINE = 120

# "<SPEC>[.md] §4.7, §8 item 13" -> the run of section references after the name
_SECTION = r"§\s?\d+[a-z]?(?:\.\d+)*(?:\s+items?\s+\d+(?:\s*(?:-|,|and)\s*\d+)*)?"
_LEFTOVER = re.compile(SPEC + r"(?:\.md)?((?:\s*(?:,|/|and)?\s*" + _SECTION + r")+)")
_ONE = re.compile(r"§\s?(\d+[a-z]?(?:\.\d+)*)(?:\s+items?\s+(\d+))?")
_AFTER = r"(?!\.?\d|[a-z]\b)"  # the key must not continue as a longer section number (§8 vs §8.9, §6b)


def tracked_files(root: Path) -> list[Path]:
    """Text files of the project, relative to root (git's list when root is a checkout)."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
        names = [Path(n) for n in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):
        names = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
            names += [Path(dirpath, f).relative_to(root) for f in filenames]
    keep = [n for n in names if n.suffix in TEXT_SUFFIXES or n.name in TEXT_NAMES]
    return sorted(n for n in keep if n not in (MAP, SELF) and (root / n).is_file())


def replace_exact(text: str, table: dict[str, str]) -> tuple[str, int]:
    """Replace every key of ``table`` (longest first) where it is not followed by more of a section number."""
    count = 0
    for key in sorted(table, key=len, reverse=True):
        text, n = re.subn(re.escape(key) + _AFTER, lambda _m, v=table[key]: v, text)
        count += n
    return text, count


def replace_leftovers(text: str, sections: dict[str, str]) -> tuple[str, int]:
    """Rewrite citations no table listed, section by section; unknown sections are left for the report."""

    def one(m: re.Match) -> str:
        refs = m.group(1)
        out, ok = [], True

        def sub(r: re.Match) -> str:
            nonlocal ok
            old = "§" + r.group(1) + ("." + r.group(2) if r.group(2) else "")
            new = sections.get(old)
            if new is None:
                ok = False
                return r.group(0)
            return new

        out.append(_ONE.sub(sub, refs))
        return "docs/theory.md" + out[0] if ok else m.group(0)

    return _LEFTOVER.subn(one, text)


def long_lines(before: str, after: str) -> list[int]:
    """1-based numbers of lines longer than MAX_LINE in ``after`` that were not that long before."""
    old = {line for line in before.splitlines() if len(line) > MAX_LINE}
    return [i + 1 for i, line in enumerate(after.splitlines()) if len(line) > MAX_LINE and line not in old]


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or with --dry-run only report) the citations; exit 1 if any mention of the old spec is left."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=ROOT, help="project root (default: this checkout)")
    p.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    args = p.parse_args(argv)
    root = args.root.resolve()
    mapping = json.loads((root / MAP).read_text(encoding="utf-8"))
    per_file, citations, sections = mapping["per_file"], mapping["citations"], mapping["sections"]

    changed, left = 0, []
    for rel in tracked_files(root):
        path = root / rel
        try:
            before = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if SPEC not in before:
            continue
        text, n1 = replace_exact(before, per_file.get(rel.as_posix(), {}))
        text, n2 = replace_exact(text, citations)
        text, n3 = replace_leftovers(text, sections)
        if text != before:
            changed += 1
            print(f"{rel}: {n1 + n2 + n3} citation(s)" + (" (dry run)" if args.dry_run else ""))
            for ln in long_lines(before, text):
                print(f"  warning: {rel}:{ln} is now longer than {MAX_LINE} characters")
            if not args.dry_run:
                path.write_text(text, encoding="utf-8")
        for i, line in enumerate(text.splitlines(), 1):
            if re.search(r"\b" + SPEC + r"\b", line):
                left.append(f"{rel}:{i}: {line.strip()}")
    print(f"{changed} file(s) {'would change' if args.dry_run else 'changed'}")
    if left:
        print(f"still mentioning the old spec ({len(left)}; add them to {MAP} and rerun):", file=sys.stderr)
        for entry in left:
            print("  " + entry, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
