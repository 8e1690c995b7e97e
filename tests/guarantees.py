"""The Guarantees table (`docs/guarantees.md`), read as data: which test proves each guarantee.

Used by `tests/test_guarantees.py` (every named test exists) and by the hook in `conftest.py` (under
`CI=true`, a guarantee test that skips fails the run instead of passing silently).

A row's last cell names its tests in backticks: `tests/test_x.py::test_name`, or `::test_name` for
another test of the file named just before it. Anything else in backticks there is an error: a file
alone proves nothing in particular, and a skip of "the file" could not be caught.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

GUARANTEES = "docs/guarantees.md"  # the page that holds the table, relative to the repository
HEADING = "Guarantees"  # the table is the first one after a heading (any level) that starts so
_HEADING = re.compile(rf"#+ {HEADING}")
_TEST = re.compile(r"(tests/[\w/]+\.py)?::(\w+)(\[[^\]]*\])?")


@dataclass(frozen=True)
class Guarantee:
    situation: str
    tests: tuple[tuple[str, str], ...]  # (file relative to the repository, test function name)


def read_table(page: Path) -> list[Guarantee]:
    """The table's rows, in order; raises ValueError naming a row whose test cell cannot be read."""
    rows = _table_lines(Path(page).read_text())
    return [_row(line) for line in rows]


def guarantee_tests(page: Path) -> set[tuple[str, str]]:
    """Every (file, test name) the table names."""
    return {t for g in read_table(page) for t in g.tests}


def defined_tests(path: Path) -> set[str]:
    """Names of the test functions pytest collects from `path`: module-level `test_*` functions and
    `test_*` methods of `Test*` classes (as `Class::test`)."""
    tree = ast.parse(Path(path).read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names |= {f"{node.name}::{f.name}" for f in node.body if isinstance(f, ast.FunctionDef)}
    return names


def _table_lines(text: str) -> list[str]:
    """The body rows of the first table after the Guarantees heading (header and rule skipped)."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if _HEADING.match(line))
    except StopIteration:
        raise ValueError(f"no '{HEADING}' heading") from None
    table = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            table.append(line)
        elif table:  # the first line after the table ends it
            break
    if len(table) < 3:
        raise ValueError(f"the '{HEADING}' section holds no table")
    return table[2:]


def _row(line: str) -> Guarantee:
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    situation, named = cells[0], cells[-1]
    tests, current = [], None
    for item in re.findall(r"`([^`]+)`", named):
        m = _TEST.fullmatch(item)
        if m is None or (m[1] is None and current is None):
            raise ValueError(
                f"guarantee {situation!r}: {item!r} is not `tests/<file>.py::<test>` "
                "(or `::<test>` after one): name the test that proves it"
            )
        current = m[1] or current
        tests.append((current, m[2]))
    if not tests:
        raise ValueError(f"guarantee {situation!r} names no test")
    return Guarantee(situation, tuple(tests))
