"""Code that cites the design cites a section that exists: every `docs/design.md §N` names a `## N.`
heading of docs/design.md, and nothing cites a design document that is not in the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
CITATION = re.compile(r"docs/design\.md (§\d+(?:(?:, | and )§\d+)*)")


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    files = [ROOT / name for name in out.stdout.split()]
    return [f for f in files if f.suffix in {".py", ".md", ".yaml", ".toml", ".sh", ""} and f.is_file()]


def _sections() -> set[int]:
    return {int(m) for m in re.findall(r"^## (\d+)\. ", DESIGN.read_text(), flags=re.MULTILINE)}


def test_every_design_citation_names_a_section_that_exists():
    sections = _sections()
    assert sections == set(range(1, 12))  # the numbers the code cites stay stable
    cited, broken = 0, []
    for path in _tracked_text_files():
        if path == DESIGN:
            continue
        for line_no, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            for group in CITATION.findall(line):
                for number in map(int, re.findall(r"§(\d+)", group)):
                    cited += 1
                    if number not in sections:
                        broken.append(f"{path.relative_to(ROOT)}:{line_no}: §{number}")
    assert broken == [], f"citations of sections docs/design.md does not have: {broken}"
    assert cited >= 50  # the code does cite it (the pattern still matches how it cites)


def test_nothing_cites_a_design_document_outside_the_repository():
    stale = [
        f"{path.relative_to(ROOT)}:{line_no}"
        for path in _tracked_text_files()
        for line_no, line in enumerate(path.read_text(errors="replace").splitlines(), start=1)
        if re.search(r"\bDESIGN §\d", line)
    ]
    assert stale == [], f"cite docs/design.md §N instead of DESIGN §N: {stale}"
