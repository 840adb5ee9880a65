"""Every path or document that README.md, docs/*.md, benchmarks/README.md and the
docstrings under ssm_split/ cite exists (what counts as a citation: _citations.py)."""

from __future__ import annotations

from pathlib import Path

from ._citations import REPO, broken, citations, exists

CITING = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md",
          *sorted((REPO / "ssm_split").rglob("*.py"))]


# Broken citations in files this test's author may not edit, reported to their owners:
# (citing file, cited path) -> why it is allowed for now. The second test fails once one
# is fixed, so the list only shrinks.
KNOWN_BROKEN: dict[tuple[str, str], str] = {}
"""(citing file, cited path) pairs known to be broken, each with why (empty: none)."""


def _key(citation) -> tuple[str, str]:
    return citation.source.rsplit(":", 1)[0], citation.text


def test_every_cited_path_exists():
    missing = [c for c in broken(CITING) if _key(c) not in KNOWN_BROKEN]
    assert missing == [], "cited but not in the repository:\n" + "\n".join(map(str, missing))


def test_known_broken_citations_are_still_broken():
    still = {_key(c) for c in broken(CITING)}
    fixed = [key for key in KNOWN_BROKEN if key not in still]
    assert fixed == [], f"fixed: remove them from KNOWN_BROKEN: {fixed}"


def test_the_scanner_finds_citations_and_tells_patterns_apart(tmp_path: Path):
    text = ("See `docs/cli.md`, [backend](backend.md#gpus), design.md and tests/gpu/.\n"
            "Presets are `ssm_split/specs/data/<name>.json`; vLLM's tests/v1/x.py is theirs;\n"
            "ranks in `bench/_rank.py`, notes in nixl.md §9.")
    found = sorted(c.text for c in citations(text, "doc.md"))
    assert found == sorted(["docs/cli.md", "tests/gpu/", "bench/_rank.py", "backend.md",
                            "design.md", "nixl.md"])
    doc = REPO / "docs" / "cli.md"
    assert exists("docs/cli.md", doc) and exists("backend.md", doc) and exists("tests/gpu/", doc)
    assert exists("bench/_rank.py", doc)  # below ssm_split/
    assert exists("tests/nixl/_peer.SrcEngine", doc)  # a name in tests/nixl/_peer.py
    assert not exists("design.md", doc) and not exists("nixl.md", doc)
    assert not exists("ssm_split/ssm_split/bench/_run.py", doc)
