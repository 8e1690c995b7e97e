"""The user's documentation holds together: every relative link in README.md and docs/*.md reaches a
file of the repository (and a heading of it, when it names one), and every page of docs/ is linked from
the README, so a newcomer who starts there can reach all of it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# [text](target) outside code: inline links only (the docs use no reference-style links).
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _links(page: Path) -> list[str]:
    """The link targets of `page`, code blocks and code spans left out (a `[x](y)` there is not a link)."""
    text = _CODE.sub("", _FENCE.sub("", page.read_text()))
    return _LINK.findall(text)


def _local(target: str) -> bool:
    return not re.match(r"[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto: are not files here


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of `page`: lower case, punctuation dropped, spaces to hyphens."""
    text = _FENCE.sub("", page.read_text())
    headings = re.findall(r"^#+\s+(.+?)\s*$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_reaches_a_file_and_its_heading():
    broken = []
    for page in _pages():
        for target in filter(_local, _links(page)):
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == [], "links that lead nowhere:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    readme = ROOT / "README.md"
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in filter(_local, _links(readme))}
    pages = sorted(DOCS.glob("*.md"))
    assert len(pages) >= 2  # the reference lives in docs/, not only the design
    unlinked = [p.relative_to(ROOT).as_posix() for p in pages if p.resolve() not in linked]
    assert unlinked == [], f"docs pages the README does not link: {unlinked}"


def test_the_link_reader_finds_links_and_skips_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\nSee [the spec](docs/spec.md#fields) and [web](https://example.org).\n"
        "`[not](a-link.md)`\n\n```\n[nor](this.md)\n```\n![img](pic.png)\n"
    )
    assert _links(page) == ["docs/spec.md#fields", "https://example.org"]
    assert list(filter(_local, _links(page))) == ["docs/spec.md#fields"]
    assert _anchors(page) == {"a-page"}
