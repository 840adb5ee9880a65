"""The code blocks of the Markdown docs, and how to run them (conventions: docs/cli.md,
"Commands in the docs are tests").

`blocks(path)` parses a document into `Block`s; `run_block(block)` runs one and raises
`AssertionError` with what went wrong; `doc_blocks(paths, kind=...)` lists the blocks of
several documents, e.g. the GPU ones for `tests/gpu/test_gpu_docs.py`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SHELL = ("bash", "sh", "shell")
RUNNABLE = (*SHELL, "console", "python")
_FENCE = re.compile(r"^(`{3,}|~{3,})[ \t]*([^\n`]*)$")
_MARKER = re.compile(r"^<!--\s*docs-test:\s*(skip|gpu|needs)\b\s*(.*?)\s*-->\s*$")
_PRELUDE = textwrap.dedent("""\
    set -euo pipefail
    ssm-split() { "$SSM_SPLIT_PYTHON" -m ssm_split "$@"; }
    python() { "$SSM_SPLIT_PYTHON" "$@"; }
    python3() { "$SSM_SPLIT_PYTHON" "$@"; }
    """)


@dataclass(frozen=True)
class Block:
    """A fenced block: where it is, its language, its text, what it must print."""

    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: str = ""  # "skip", "gpu", "needs" or ""
    marker_arg: str = ""  # the reason, or the module needed
    output: str | None = None  # a python block's `output` fence

    @property
    def id(self) -> str:
        path = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path
        return f"{path}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every fenced block of the Markdown file `path`, an `output` fence folded into the
    block before it."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, info = opening.group(1), opening.group(2).strip()
        end = next((j for j in range(i + 1, len(lines))
                    if lines[j].strip().startswith(fence[0] * len(fence))
                    and not lines[j].strip().strip(fence[0])), len(lines))
        text = "\n".join(lines[i + 1:end]) + "\n"
        lang = info.split()[0].lower() if info else ""
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = _MARKER.match(previous.strip())
        if lang == "output" and found and found[-1].lang == "python" and found[-1].output is None:
            last = found[-1]
            found[-1] = Block(last.path, last.line, last.lang, last.text, last.marker,
                              last.marker_arg, text)
        else:
            found.append(Block(Path(path), i + 1, lang, text,
                               marker.group(1) if marker else "", marker.group(2) if marker else ""))
        i = end + 1
    return found


def doc_blocks(paths, *, kind: str = "runnable") -> list[Block]:
    """The blocks of `paths`: "runnable" (shell or Python, any marker), "gpu" (marked
    gpu) or "all"."""
    out = [b for p in paths for b in blocks(p)]
    if kind == "runnable":
        return [b for b in out if b.lang in RUNNABLE]
    if kind == "gpu":
        return [b for b in out if b.lang in RUNNABLE and b.marker == "gpu"]
    return out


def untested_commands(block: Block) -> list[str]:
    """Lines of a block that is not run which look like commands (they would go
    untested: label the fence, or mark it)."""
    if block.lang in RUNNABLE or block.lang == "output":
        return []
    return [line for line in block.text.splitlines()
            if line.lstrip().startswith(("$ ", "ssm-split ", "python "))]


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "SSM_SPLIT_PYTHON": sys.executable}


def _bash(script: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", _PRELUDE + script], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def check_printed(shown: str, printed: str, where: str) -> None:
    """Each non-blank line of `shown` (but `...`) equals a line of `printed`, in order."""
    actual = [line.rstrip() for line in printed.splitlines()]
    at = 0
    for want in (line.rstrip() for line in shown.splitlines()):
        if not want.strip() or want.strip() == "...":
            continue
        try:
            at = actual.index(want, at) + 1
        except ValueError:
            raise AssertionError(f"{where}: the docs show a line the command does not print "
                                 f"(or not in this order):\n  {want}\nIt printed:\n{printed}")


def console_commands(text: str) -> list[tuple[str, str]]:
    """`(command, shown output)` pairs of a console block."""
    pairs: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            pairs.append((line[2:], []))
        elif pairs:
            pairs[-1][1].append(line)
    return [(command, "\n".join(shown)) for command, shown in pairs]


def run_block(block: Block, timeout: float = 300) -> None:
    """Run `block` as the conventions say; AssertionError on failure or wrong output."""
    if block.lang in SHELL:
        done = _bash(block.text, timeout)
        assert done.returncode == 0, (f"{block.id}: exit status {done.returncode}\n"
                                      f"{done.stdout}\n{done.stderr}")
    elif block.lang == "console":
        for command, shown in console_commands(block.text):
            done = _bash(command, timeout)
            assert done.returncode == 0, (f"{block.id}: `{command}` exited {done.returncode}\n"
                                          f"{done.stdout}\n{done.stderr}")
            check_printed(shown, done.stdout, f"{block.id}: `{command}`")
    elif block.lang == "python":
        done = subprocess.run([sys.executable, "-c", block.text], cwd=REPO, env=_env(),
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{block.id}: Python block failed\n{done.stderr}"
        if block.output is not None:
            check_printed(block.output, done.stdout, block.id)
    else:
        raise AssertionError(f"{block.id}: a {block.lang or 'plain'} block is not run")
