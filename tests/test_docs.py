"""The README is a user's guide: the default sweep with its time and the tests first, the
benchmarks' figures and internals on their own pages, and every relative link and anchor in the
project's Markdown pages leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted([REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("benchmarks/**/*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _prose(text: str) -> str:
    """The page without its fenced code blocks (whose `#` lines are comments, not headings)."""
    return FENCE.sub("", text)


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as
    hyphens, a repeated heading numbered -1, -2, ..."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _prose(page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def _sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) of each `## ` section, in order, code blocks included."""
    parts = re.split(r"^## +(.+)$", text, flags=re.M)
    return list(zip(parts[1::2], parts[2::2], strict=True))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not this test's business
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, broken


def test_readme_starts_with_the_default_sweep_and_its_time_then_the_tests():
    readme = (REPO / "README.md").read_text()
    (first, install), (second, tests) = _sections(readme)[:2]
    assert "pip install . && python -m sweeper +experiment=cnn_lr" in install, first
    assert re.search(r"\d+ to \d+ minutes on 2 CPU cores", install), "the default sweep's time"
    assert "+experiment=smoke" in install and "about a minute" in install
    assert second == "Run the tests"
    assert "bash .ci/run" in tests and 'pytest -m "not slow"' in tests


def test_benchmark_figures_and_internals_live_on_their_own_pages():
    readme = (REPO / "README.md").read_text()
    assert "python -m benchmarks" not in readme
    assert "docs/PERFORMANCE.md" in readme and "docs/INTERNALS.md" in readme
    assert "python -m benchmarks" in (REPO / "docs" / "PERFORMANCE.md").read_text()
