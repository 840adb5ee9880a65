"""Every path or document that README.md, docs/*.md, benchmarks/README.md and the
docstrings under ssm_split/ cite exists (what counts as a citation: _citations.py)."""

from __future__ import annotations

from pathlib import Path

from ._citations import REPO, broken, citations, exists

CITING = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md",
          *sorted((REPO / "ssm_split").rglob("*.py"))]


def test_every_cited_path_exists():
    missing = broken(CITING)
    assert missing == [], "cited but not in the repository:\n" + "\n".join(map(str, missing))


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
