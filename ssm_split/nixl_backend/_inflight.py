"""Per dst endpoint: the batches whose READs may still write into its memory.

Every batch a reader posts is tracked here until it was received, or failed and every
one of its READs is settled (`_transfer.py`). While tracked, its dst pages (per layer
and block) are refused to every reader of the endpoint (`check_free`), so a page that a
late READ may still overwrite is never handed to another request; closing a reader does
not end the tracking. Small READs that land in a scratch buffer (warm-up, generation
fence) are tracked by the buffer's token instead: a busy buffer is retired here and
freed only once its READs settled.

The registry holds the batches (and so their NIXL handles) strongly: a handle the
garbage collector released would silently "cancel" a READ that goes on writing.
`abandon()` drops them all when the endpoint destroys its agent, the one thing that stops
a READ that never settles.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from ..errors import PlanError

__all__ = ["InFlight"]


class _Entry:
    __slots__ = ("pending", "blocks", "layers", "token")

    def __init__(self, pending: Any, blocks: frozenset, layers: frozenset, token: object):
        self.pending, self.blocks, self.layers, self.token = pending, blocks, layers, token

    @property
    def finished(self) -> bool:
        status = self.pending.status
        return status == "received" or (status != "in flight" and self.pending.settled)


class InFlight:
    """The batches of one dst endpoint that are in flight, or failed and not settled.

    Args:
        deregister: `deregister(registration)` undoes a retired buffer's registration.
    """

    def __init__(self, deregister: Callable[[Any], None]):
        self._entries: list[_Entry] = []
        self._retired: list[tuple[object, Any, Any]] = []  # (token, memory, registration)
        self._deregister = deregister

    def add(self, pending: Any, *, blocks: Iterable[int] = (), layers: Iterable[int] = (),
            token: object = None) -> None:
        """Track `pending`, which writes dst `blocks` x `layers`, or the buffer `token`."""
        self._entries.append(_Entry(pending, frozenset(blocks), frozenset(layers), token))

    def poll(self) -> int:
        """Forget finished batches and free retired buffers no READ writes any more;
        returns how many batches are still tracked."""
        self._entries = [e for e in self._entries if not e.finished]
        if self._retired:
            busy = {e.token for e in self._entries}
            keep = []
            for token, memory, registration in self._retired:
                if token in busy:
                    keep.append((token, memory, registration))
                else:
                    self._deregister(registration)
            self._retired = keep
        return len(self._entries)

    def check_free(self, blocks: set[int], layers: set[int]) -> None:
        """Raise `PlanError` if a tracked batch may still write one of these dst pages."""
        self.poll()
        for entry in self._entries:
            clash = blocks & entry.blocks
            if clash and layers & entry.layers:
                pending = entry.pending
                what = ("is still in flight" if pending.status == "in flight" else
                        f"{pending.status} while its READs were moving, and NIXL may still be writing "
                        f"them (wait for it to settle: Endpoint.settle(timeout_s))")
                raise PlanError(f"dst block {min(clash)} is being written by batch {pending.request!r}, "
                                f"which {what}. Read into another block.")

    def busy(self, token: object) -> bool:
        """True while a tracked READ may write the buffer `token`."""
        if token is None:
            return False
        self.poll()
        return any(e.token == token for e in self._entries)

    def retire(self, token: object, memory: Any, registration: Any) -> None:
        """Keep a buffer (and its registration) alive until no READ writes it."""
        self._retired.append((token, memory, registration))
        self.poll()

    def uses_remote(self, name: str) -> bool:
        """True while a tracked READ from the agent `name` is not settled."""
        return any(name in e.pending.peers for e in self._entries)

    def settle(self, timeout_s: float) -> bool:
        """Poll until every tracked batch is finished, for up to `timeout_s`; returns
        whether they all are. Batches still in flight count as not finished: poll them."""
        deadline = time.monotonic() + timeout_s
        while self.poll():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)
        return True

    def abandon(self) -> tuple[int, list]:
        """Drop every tracked batch's handles (the agent is about to be destroyed);
        returns how many batches were not settled, and the retired buffers' memory, which
        the caller keeps alive until the agent is gone."""
        self.poll()
        count = len(self._entries)
        for entry in self._entries:
            entry.pending.abandon()
        memory = [m for _, m, _ in self._retired]
        self._entries, self._retired = [], []
        return count, memory
