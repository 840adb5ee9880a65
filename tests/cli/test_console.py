"""Progress on a terminal only, and logging quiet unless asked for with -v (issue 15)."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import pty
import subprocess
import sys

import pytest

from ssm_split.cli._console import Progress, verbosity
from ._run import REPO, env


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_only():
    tty, pipe = _Terminal(), io.StringIO()
    for stream, enabled in ((tty, True), (pipe, True), (_Terminal(), False)):
        progress = Progress(enabled=enabled, stream=stream, interval_s=0)
        progress.show("reading 1/4")
        progress.show("reading 2/4")
        progress.clear()
    assert tty.getvalue().startswith("\rreading 1/4\rreading 2/4")
    assert tty.getvalue().endswith("\r")  # cleared before the result is printed
    assert pipe.getvalue() == ""


def test_verbosity_sets_and_restores_the_environment(monkeypatch):
    monkeypatch.delenv("NIXL_LOG_LEVEL", raising=False)
    monkeypatch.delenv("UCX_WARN_UNUSED_ENV_VARS", raising=False)
    with verbosity(0):
        assert os.environ["NIXL_LOG_LEVEL"] == "WARN"
        assert os.environ["UCX_WARN_UNUSED_ENV_VARS"] == "n"
        assert logging.getLogger("nixl").getEffectiveLevel() == logging.WARNING
    assert "NIXL_LOG_LEVEL" not in os.environ and "UCX_WARN_UNUSED_ENV_VARS" not in os.environ
    monkeypatch.setenv("NIXL_LOG_LEVEL", "ERROR")
    with verbosity(0):
        assert os.environ["NIXL_LOG_LEVEL"] == "ERROR"  # the user's choice wins when quiet
    with verbosity(2):
        assert os.environ["NIXL_LOG_LEVEL"] == "DEBUG"  # -vv wins over it
        assert logging.getLogger("ssm_split").getEffectiveLevel() == logging.DEBUG
    assert os.environ["NIXL_LOG_LEVEL"] == "ERROR"


def _demo_on_a_terminal(*argv: str) -> tuple[int, str, str]:
    """Run the demo with stderr on a pseudo-terminal; return (rc, stdout, stderr)."""
    main_fd, term_fd = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ssm_split", *argv], cwd=REPO,
                            env=env(UCX_CUDA_IPC_ENABLE_GET_ZCOPY="y"),
                            stdout=subprocess.PIPE, stderr=term_fd)
    os.close(term_fd)
    err = b""
    while True:
        try:
            chunk = os.read(main_fd, 1 << 16)
        except OSError:  # the terminal closed: the process is done with it
            break
        if not chunk:
            break
        err += chunk
    out = proc.communicate(timeout=120)[0]
    os.close(main_fd)
    return proc.returncode, out.decode(), err.decode(errors="replace")


@pytest.mark.skipif(importlib.util.find_spec("nixl") is None, reason="needs nixl")
def test_demo_shows_progress_on_a_terminal_and_is_quiet_otherwise():
    argv = ("demo", "--requests", "8", "--layers", "1", "--batch", "2")
    rc, out, err = _demo_on_a_terminal(*argv)
    assert rc == 0 and "verified:" in out
    assert "\rdemo: " in err and "reading batches" in err and "/4" in err
    assert "NIXL" not in err and "UCX" not in err  # quiet by default, even with the UCX variable
    # -v --json: NIXL's INFO lines on stderr, no progress line, stdout one JSON document
    rc, out, err = _demo_on_a_terminal("-v", *argv, "--json")
    assert rc == 0 and json.loads(out)["verified"]
    assert "NIXL INFO" in err and "\rdemo: " not in err
