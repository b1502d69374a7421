"""The front page and the docs pages hold together: every relative link resolves (files and #anchors), the README
stays a front page, and it shows the exact set-up and test commands that CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Pages other branches are writing (merged by the lead after this one). The README links them under "More"; a
# link to one of these that does not exist yet is skipped. The lead removes this set once they are merged.
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FRONT_PAGE_BYTES = 15_500


def prose(text: str) -> str:
    """``text`` without its fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return "\n".join(lines)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in prose(path.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", prose(path.read_text()))  # a link inside inline code is not a link
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def test_slug_follows_github():
    assert slug("Tuning a schedule: `tc-export tune`") == "tuning-a-schedule-tc-export-tune"
    assert slug("Methods on the tower's output") == "methods-on-the-towers-output"
    assert slug("Sweeps, int8, baselines") == "sweeps-int8-baselines"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        file, _, anchor = target.partition("#")
        destination = (page.parent / file).resolve() if file else page
        if file and not destination.exists():
            broken.append(f"{target}: no file {destination.relative_to(ROOT)}")
            continue
        if anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading #{anchor} in {destination.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)


def test_link_checker_sees_breakage(tmp_path):
    """The checker itself: a missing file and a missing anchor are caught, an existing anchor is not."""
    (tmp_path / "a.md").write_text("# Title\n\n## Sub part\n\n[ok](#sub-part) [bad](#nope) [gone](b.md)\n")
    page = tmp_path / "a.md"
    targets = links(page)
    assert targets == ["#sub-part", "#nope", "b.md"]
    assert "sub-part" in anchors(page) and "nope" not in anchors(page)
    assert not (tmp_path / "b.md").exists()


def test_readme_is_a_front_page():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= FRONT_PAGE_BYTES, f"README.md is {size} bytes: move the long material to a docs/ page"


def test_readme_shows_what_ci_runs():
    """.ci/run runs the README's install and test commands: they must stay exactly as the README shows them."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ('pip install -e ".[dev]" && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)',
                    "python -m pytest -n 2 --dist loadfile"):
        assert command in ci and command in readme, command


def test_every_docs_page_is_linked_from_the_readme():
    linked = {Path(target.partition("#")[0]).name for target in links(ROOT / "README.md")}
    missing = [page.name for page in PAGES[1:] if page.name not in linked]
    assert not missing, f"README.md does not link {missing}"
