"""The parent's side of `ssm-split demo`: start the rank processes, collect what they
report, show their progress, and turn a failing child into one clean error.

Messages from a child are tuples `(kind, role, rank, payload)`:

- `("progress", role, rank, (phase, done, total))`: drawn as a status line on a terminal;
- `("error", role, rank, (message, traceback_text))`: the child failed; `message` is one
  line, the traceback is shown only with `-v`;
- anything else (`"ready"`, `"done"`, `"freed"`) is what `collect` waits for.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from multiprocessing.connection import wait
from typing import Any

from ..errors import TransferError
from ._console import Progress, bar

__all__ = ["Children"]


class Children:
    """The demo's processes and their pipes."""

    def __init__(self, timeout_s: float, progress: Progress, verbose: int = 0):
        self.ctx = mp.get_context("spawn")
        self.procs: list = []
        self.conns: dict[tuple[str, int], Any] = {}
        self.timeout_s = timeout_s
        self.progress = progress
        self.verbose = verbose
        self.phases: dict[tuple[str, int], tuple[str, int, int]] = {}

    def start(self, role: str, rank: int, target, *args) -> None:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=target, args=(*args[:1], rank, child, *args[1:]),
                                name=f"ssm-split-demo-{role}-{rank}", daemon=True)
        proc.start()
        child.close()
        self.procs.append(proc)
        self.conns[role, rank] = parent

    def send(self, role: str, message: Any) -> None:
        for (r, _), conn in self.conns.items():
            if r == role:
                conn.send(message)

    def collect(self, kind: str, role: str, count: int) -> dict[int, Any]:
        """Wait for `count` messages `kind` from `role`; show progress meanwhile.

        Raises:
            TransferError: a child failed or exited early, or `timeout_s` passed.
        """
        got: dict[int, Any] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(got) < count:
            ready = wait(list(self.conns.values()), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TransferError(f"The demo's {role} processes did not report {kind!r} within "
                                    f"{self.timeout_s:g} s: give them more time with --timeout.")
            for conn in ready:
                try:
                    message = conn.recv()
                except (EOFError, OSError):  # gone: fine once it said what we wait for
                    key = next(k for k, c in self.conns.items() if c is conn)
                    del self.conns[key]
                    if key[0] == role and key[1] not in got:
                        raise TransferError(f"The demo's {key[0]} rank {key[1]} process exited "
                                            f"before reporting {kind!r}.") from None
                    continue
                self._handle(message, kind, role, got)
        return got

    def _handle(self, message: tuple, kind: str, role: str, got: dict) -> None:
        what, who, rank, payload = message
        if what == "error":
            text, details = payload
            self.progress.clear()
            if self.verbose:
                print(f"--- {who} rank {rank} ---\n{details}", file=sys.stderr)
            raise TransferError(f"The demo's {who} rank {rank} process failed: {text}")
        if what == "progress":
            self.phases[who, rank] = payload
            self.progress.show(_status(self.phases), force=payload[1] == payload[2])
            return
        if what == kind and who == role:
            got[rank] = payload

    def close(self) -> None:
        self.progress.clear()
        for conn in self.conns.values():
            conn.close()
        for proc in self.procs:
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5.0)


def _status(phases: dict[tuple[str, int], tuple[str, int, int]]) -> str:
    """`demo: filling pages [####....] 12/16, reading batches [##......] 2/8`, summed
    over the ranks in each phase; finished phases drop out while others run."""
    totals: dict[str, list[int]] = {}
    for phase, done, total in phases.values():
        entry = totals.setdefault(phase, [0, 0])
        entry[0] += done
        entry[1] += total
    busy = {phase: t for phase, t in totals.items() if t[0] < t[1]} or totals
    return "demo: " + ", ".join(f"{phase} {bar(done, total, 16)} {done}/{total}"
                                for phase, (done, total) in busy.items())
