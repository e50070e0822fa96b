"""docs/theory.md is the one theory reference: every "docs/theory.md §X" citation in the project resolves
to a numbered heading there, and no file cites the external spec it replaced."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THEORY_DOC = ROOT / "docs" / "theory.md"
OLD_SPEC = "THE" + "ORY"  # split so that this file does not cite it
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".json", ".sh"}
SKIP_DIRS = {"runs", "node_modules", "build", "dist", "__pycache__"}

HEADING = re.compile(r"^(#{2,4}) (\d+(?:\.\d+)*)\.? .*?(?:<a id=\"([^\"]+)\"></a>)?\s*$")
SECTION = re.compile(r"§\s?(\d+(?:\.\d+)*)")
# "docs/theory.md §6.2, §6.3 and §13.4" (also across a line break): the run of sections after the name
CITATION = re.compile(r"docs/theory\.md((?:[\s,/-]*(?:and\s+)?§\s?\d+(?:\.\d+)*)+)")
LINK = re.compile(r"docs/theory\.md#([\w.-]+)")


def sections() -> dict[str, str]:
    """Section number -> anchor id of every numbered heading of docs/theory.md."""
    found: dict[str, str] = {}
    for line in THEORY_DOC.read_text(encoding="utf-8").splitlines():
        m = HEADING.match(line)
        if m:
            assert m.group(2) not in found, f"section {m.group(2)} appears twice in docs/theory.md"
            found[m.group(2)] = m.group(3) or ""
    return found


def project_files() -> list[Path]:
    """Text files of the project (relative paths), skipping hidden folders, virtualenvs and run outputs."""
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS
                       and not d.endswith(".egg-info")]
        for f in filenames:
            p = Path(dirpath, f)
            if p.suffix in TEXT_SUFFIXES or f == "Makefile":
                out.append(p.relative_to(ROOT))
    return sorted(out)


def cited_sections(text: str) -> list[str]:
    """Every section number cited as docs/theory.md §X (lists like '§6.2, §6.3 and §6.5' included)."""
    return [s for m in CITATION.finditer(text) for s in SECTION.findall(m.group(1))]


def test_theory_headings_are_numbered_with_matching_anchors():
    secs = sections()
    assert len(secs) >= 30, f"docs/theory.md has only {len(secs)} numbered sections"
    for number, anchor in secs.items():
        assert anchor == "s" + number, f"section {number}: anchor {anchor!r}, expected 's{number}'"
    for number in secs:  # every subsection has its chapter
        assert number.split(".")[0] in secs, f"section {number} has no chapter heading"


def test_theory_internal_references_resolve():
    secs = sections()
    text = THEORY_DOC.read_text(encoding="utf-8")
    missing = sorted({s for s in SECTION.findall(text) if s not in secs})
    assert not missing, f"docs/theory.md refers to sections it does not have: {missing}"


def test_citation_regex_reads_lists_and_line_breaks():
    text = "see (docs/theory.md §6.2, §6.3,\n§6.4 and §13.10). Then §99 is not a citation; docs/theory.md alone"
    assert cited_sections(text) == ["6.2", "6.3", "6.4", "13.10"]


def test_every_project_citation_resolves():
    secs = sections()
    bad = []
    for rel in project_files():
        if rel.suffix not in (".py", ".md", ".yaml", ".yml") or rel == Path("docs/theory.md"):
            continue
        text = (ROOT / rel).read_text(encoding="utf-8", errors="replace")
        bad += [f"{rel}: §{s}" for s in cited_sections(text) if s not in secs]
        bad += [f"{rel}: #{a}" for a in LINK.findall(text) if a not in set(secs.values())]
    assert not bad, "citations of docs/theory.md sections that do not exist:\n" + "\n".join(bad)


def test_no_file_cites_the_external_spec():
    """Cite docs/theory.md sections instead (the test lists every line that does not)."""
    word = re.compile(r"\b" + OLD_SPEC + r"\b")
    hits = []
    for rel in project_files():
        for i, line in enumerate((ROOT / rel).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if word.search(line):
                hits.append(f"{rel}:{i}: {line.strip()[:100]}")
    assert not hits, (f"{len(hits)} line(s) still cite the external spec:\n"
                      + "\n".join(hits))
