"""Paths and documents the docs and docstrings cite, and whether they exist.

What counts as a citation:

- a repository path: text starting `docs/`, `ssm_split/`, `benchmarks/`, `tests/`,
  `scripts/` or `.ci/` (`tests/gpu`, `ssm_split/bench/_run.py`), or a path to a `.py`
  file below one of them written from inside the package (`bench/_rank.py`);
- a Markdown link target that is not a URL (`[reliability.md](reliability.md)`);
- a Markdown document named on its own (`design.md`, "nixl.md §9").

Relative names resolve against the citing file's folder, the repository root, `docs/`,
`ssm_split/` and `tests/`; a citation exists when any of them holds it. Patterns (`data/*.json`,
`<name>`) are not citations. Paths of other projects are told apart by the word before
them (`vLLM's tests/v1/...`): see `EXTERNAL`.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_ROOTS = ("docs", "ssm_split", "benchmarks", "tests", "scripts", ".ci")
_REPO_PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./*<>-]*)" % "|".join(re.escape(r) for r in _ROOTS))
_PY_PATH = re.compile(r"(?<![\w./-])((?:\w+/)+\w+\.py)\b")
_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
_MD_NAME = re.compile(r"(?<![\w./-])([\w-]+(?:\.[\w-]+)*\.md)\b")
EXTERNAL = re.compile(r"vLLM|vllm|upstream|NIXL's|nixl/|pytorch|jax|zarr|equinox", re.I)
"""Words that, within 40 characters before a path, say it belongs to another project."""


@dataclass(frozen=True)
class Citation:
    source: str  # "docs/backend.md:12" or "ssm_split/reference.py:5"
    text: str

    def __str__(self) -> str:
        return f"{self.source}: {self.text}"


def _candidates(text: str) -> list[tuple[int, str]]:
    found = {}  # one citation per place, whichever patterns match it
    for pattern in (_REPO_PATH, _PY_PATH, _LINK, _MD_NAME):
        for match in pattern.finditer(text):
            found.setdefault(match.start(1), match.group(1))
    return sorted(found.items())


def _is_pattern(text: str) -> bool:
    return any(c in text for c in "*<>{}") or text.startswith(("http:", "https:", "mailto:"))


def citations(text: str, source: str, first_line: int = 1) -> list[Citation]:
    """Every citation in `text`, tagged with its line."""
    out = []
    for start, raw in _candidates(text):
        cited = raw.rstrip(".,:;)")
        before = text[max(0, start - 40): start]
        if _is_pattern(cited) or EXTERNAL.search(before):
            continue
        line = first_line + text.count("\n", 0, start)
        out.append(Citation(f"{source}:{line}", cited))
    return out


def exists(cited: str, citing_file: Path) -> bool:
    """Whether `cited` is a file or folder; `tests/nixl/_peer.SrcEngine` (a module and a
    name in it) exists when `tests/nixl/_peer.py` does."""
    path = cited.rstrip("/")
    bases = (citing_file.parent, REPO, REPO / "docs", REPO / "ssm_split", REPO / "tests")
    head, _, last = path.rpartition("/")
    module = f"{head}/{last.split('.')[0]}.py" if "." in last and not last.endswith(
        (".py", ".md", ".json", ".sh", ".png", ".txt", ".toml")) else None
    return any((base / path).exists() or (module and (base / module).exists()) for base in bases)


def docstrings(path: Path) -> list[tuple[int, str]]:
    """`(line, text)` of every module, class and function docstring of a Python file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                found.append((body[0].lineno, body[0].value.value))
    return found


def broken(files: list[Path]) -> list[Citation]:
    """The citations of `files` (Markdown whole, Python by docstrings) that do not exist."""
    missing = []
    for path in files:
        rel = str(path.relative_to(REPO))
        texts = docstrings(path) if path.suffix == ".py" else [(1, path.read_text("utf-8"))]
        for line, text in texts:
            missing += [c for c in citations(text, rel, line) if not exists(c.text, path)]
    return missing
