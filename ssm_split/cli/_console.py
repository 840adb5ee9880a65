"""What every subcommand shares: one-line errors, argument types, verbosity, progress.

- `Parser`: an `argparse.ArgumentParser` whose bad-argument message is one line on stderr
  (what was wrong, then where the options are), exit status 2, no usage block.
- `positive_int`, `non_negative_int`, `positive_seconds`: argument types that reject a
  value with a message naming the range, e.g. `--tp 0`.
- `verbosity(level)`: how much the library, NIXL and UCX log during one run. Level 0 (the
  default) keeps them to warnings and silences UCX's "unused environment variable" note;
  `-v` turns on INFO lines, `-vv` DEBUG. Child processes inherit the settings.
- `Progress`: a status line redrawn in place on a terminal, silent anywhere else.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

__all__ = ["Parser", "one_line", "positive_int", "non_negative_int", "positive_seconds",
           "verbosity", "Progress", "bar"]


def one_line(text: object) -> str:
    """`text` with every run of whitespace (newlines included) turned into one space."""
    return " ".join(str(text).split())


class Parser(argparse.ArgumentParser):
    """An argument parser that answers a bad argument with one line and status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)}; see `{self.prog} --help`.\n")


def positive_int(text: str) -> int:
    """An int >= 1 (TP sizes, counts)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An int >= 0 (ranks, seeds, speculative tokens)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_seconds(text: str) -> float:
    """A time limit in seconds, > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a number > 0), got {text!r}")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


# -- logging ----------------------------------------------------------------------------

_NIXL_LEVELS = {0: "WARN", 1: "INFO", 2: "DEBUG"}
_PY_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


@contextmanager
def verbosity(level: int) -> Iterator[None]:
    """Logging of `ssm_split`, NIXL and UCX for one run; restored afterwards.

    NIXL reads `NIXL_LOG_LEVEL` when it is imported (in this process or a child), UCX
    reads `UCX_WARN_UNUSED_ENV_VARS` when a worker starts, so both are set in the
    environment. At level 0 a value the user exported wins; `-v` overrides it.
    """
    level = max(0, min(level, 2))
    saved = {k: os.environ.get(k) for k in ("NIXL_LOG_LEVEL", "UCX_WARN_UNUSED_ENV_VARS")}
    if level == 0:
        os.environ.setdefault("NIXL_LOG_LEVEL", _NIXL_LEVELS[0])
        os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    else:
        os.environ["NIXL_LOG_LEVEL"] = _NIXL_LEVELS[level]
    loggers = [logging.getLogger(name) for name in ("ssm_split", "nixl")]
    saved_levels = [logger.level for logger in loggers]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    loggers[0].addHandler(handler)
    for logger in loggers:
        logger.setLevel(_PY_LEVELS[level])
    try:
        yield
    finally:
        loggers[0].removeHandler(handler)
        for logger, saved_level in zip(loggers, saved_levels):
            logger.setLevel(saved_level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- progress ---------------------------------------------------------------------------

class Progress:
    """One status line, redrawn in place at most every `interval_s`; nothing at all
    unless `enabled` and the stream is a terminal (so `--json`, pipes and files stay
    clean)."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None,
                 interval_s: float = 0.1):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s
        self._last = 0.0
        self._width = 0

    def show(self, text: str, *, force: bool = False) -> None:
        """Replace the status line with `text` (skipped if redrawn too recently)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        text = text[: shutil.get_terminal_size().columns - 1]  # a wrapped line cannot be redrawn
        self.stream.write("\r" + text.ljust(self._width))
        self._width = len(text)
        self.stream.flush()

    def clear(self) -> None:
        """Erase the status line (before the command prints its result)."""
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


def bar(done: int, total: int, width: int = 24) -> str:
    """`[#####.....]` for `done` of `total`."""
    filled = width * done // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}]"
