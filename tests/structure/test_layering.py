"""The package's import graph: no circles, and no stage importing a later stage.

The pipeline's stages, in order (docs/architecture.md); a module may import its own stage
and earlier ones, never a later one. Imports inside functions count: a circle dodged
with a function-level import is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ssm_split

PACKAGE = Path(ssm_split.__file__).parent

STAGES = {
    "errors": 0, "_text": 0,
    "specs": 1,
    "layout": 2,
    "plan": 3,
    "expand": 4, "reference": 4,
    "strategies": 5, "integrity": 5,
    "nixl_backend": 6,
    "integrations": 7,
    "bench": 8,
    "cli": 9,
    "__init__": 10, "__main__": 10,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every `ssm_split` module `path` imports, at any depth of its code."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ssm_split")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("ssm_split"):
                continue
            for alias in node.names:  # `from . import reference` names a module
                sub = f"{target}.{alias.name}"
                found.add(sub if _exists(sub) else target)
    return found - {name}


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _stage(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    return STAGES[key]


def test_every_module_has_a_stage():
    unknown = sorted(m for m in _graph() if len(m.split(".")) > 1 and m.split(".")[1] not in STAGES)
    assert unknown == [], f"add these to STAGES (and to docs/architecture.md): {unknown}"


def test_no_stage_imports_a_later_stage():
    graph = _graph()
    wrong = sorted((m, t) for m, targets in graph.items() for t in targets
                   if t in graph and _stage(t) > _stage(m))
    assert wrong == [], "later-stage imports (module, imported): " + repr(wrong)


def test_no_import_circles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert cycles == [], f"import circles: {cycles}"


def test_the_graph_sees_function_level_imports():
    # the checker itself must not miss an import hidden in a function
    source = PACKAGE / "cli" / "_vllm_check.py"  # imports the reference model inside `_run`
    assert "ssm_split.reference" in _imports(source)
