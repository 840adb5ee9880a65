"""Running `ssm-split` in tests: in-process through `main` (fast) or as
`python -m ssm_split` in a subprocess (what a user runs; child processes' output
included), with the repository first on PYTHONPATH."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Result:
    rc: int
    out: str
    err: str


def env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess: this checkout first on PYTHONPATH."""
    base = {k: v for k, v in os.environ.items() if k not in extra}
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**base, "PYTHONPATH": path, **extra}


def run_subprocess(*argv: str, timeout: float = 120, **extra_env: str) -> Result:
    """`python -m ssm_split ARGV` in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-m", "ssm_split", *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=env(**extra_env))
    return Result(done.returncode, done.stdout, done.stderr)


def run_main(capsys, *argv: str) -> Result:
    """`main(ARGV)` in this process, output captured by pytest's `capsys`."""
    from ssm_split.cli._main import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return Result(rc, out, err)
