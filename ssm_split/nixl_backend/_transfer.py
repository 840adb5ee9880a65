"""One NIXL READ and the rule that says when it can no longer write.

A READ is **settled** when NIXL reported it finished: `check_xfer_state` returned
"DONE", or raised an error of the READ's own while its remote agent stayed loaded since
the post (the backend then reports a failure, e.g. `nixlRemoteDisconnectError`: nothing
lands after it). Everything else is not settled, measured over UCX's tcp transport:

- `nixlNotFoundError` from a status check only says NIXL lost track of the remote side
  (its metadata was removed or invalidated): UCX goes on writing for tens of ms;
- releasing an active transfer handle (NIXL's "cancel") does not stop an RMA GET either,
  and a released handle must never be polled again (use after free);
- a handle dropped by the garbage collector is released, the same silent cancel.

So a READ's handles are held (never released, never dropped) until it is settled, and
its remote agent stays loaded (`_remotes.py`). Only destroying the local agent stops a
READ that never settles (a src stopped forever): `Endpoint.close` does that.
"""

from __future__ import annotations

from typing import Any

from ..errors import TransferError

__all__ = ["Transfer", "nixl_error"]

_HINTS = {
    "nixlNotFoundError": " A descriptor lies outside memory registered on its side: deregistered "
                         "pages, or a stale handshake (fetch a new one).",
    "nixlRemoteDisconnectError": " The src process went away or closed its endpoint, or (on a first "
                                 "READ) UCX has no zero-copy READ path to it: see Reader.warm_up.",
}


def nixl_error(what: str, error: BaseException, *, request: str | None, peer: str) -> TransferError:
    """A NIXL exception as a `TransferError` with a hint about its usual cause."""
    return TransferError(f"{what}: {type(error).__name__}: {error}.{_HINTS.get(type(error).__name__, '')}",
                         request=request, peer=peer)


class Transfer:
    """One READ of a batch: its transfer handle, the descriptor lists it owns (prepared
    for this READ alone) and the lists it shares (prepared once per peer, `PeerLists`).

    `state`: "new" (not posted), "active" (posted, may write), "done" (NIXL said DONE),
    "ended" (NIXL reported its failure), "abandoned" (its agent was destroyed).
    """

    __slots__ = ("src_rank", "peer", "handles", "shared", "xfer", "state", "load_id")

    def __init__(self, src_rank: int, peer: str):
        self.src_rank, self.peer = src_rank, peer
        self.handles: list = []  # prepped dlist handles owned by this READ
        self.shared = None  # a PeerLists this READ uses, dropped once settled
        self.xfer = None
        self.state = "new"
        self.load_id: int | None = None

    @property
    def settled(self) -> bool:
        return self.state != "active"

    def check(self, agent: Any, remotes: Any) -> tuple[str, BaseException | None]:
        """Poll an active READ: `("PROC", None)`, `("DONE", None)`, `("ERR", error)` (settled:
        its failure came from the backend) or `("LOST", error)` (NIXL could not say: not
        settled, the handles are kept). Settled READs release their handles here."""
        try:
            state = agent.check_xfer_state(self.xfer)
        except Exception as error:  # NIXL exceptions derive from Exception
            if type(error).__name__ == "nixlNotFoundError" or remotes.load_id(self.peer) != self.load_id:
                return "LOST", error
            self.finish("ended")
            return "ERR", error
        if state == "DONE":
            self.finish("done")
            return "DONE", None
        if state == "PROC":
            return "PROC", None
        self.finish("ended")  # "ERR": the binding raises instead, but be safe
        return "ERR", None

    def finish(self, state: str) -> None:
        """The READ can no longer write (or was never posted): release its handles."""
        for handle in ([self.xfer] if self.xfer is not None else []) + self.handles:
            try:
                handle.release()
            except Exception:  # noqa: BLE001 - releasing must not hide the original error
                pass
        self.xfer, self.handles, self.state = None, [], state
        if self.shared is not None:
            shared, self.shared = self.shared, None
            shared.drop()

    def abandon(self) -> None:
        """The local agent is being destroyed: let go of every handle without polling."""
        self.xfer, self.handles, self.state = None, [], "abandoned"
        if self.shared is not None:
            shared, self.shared = self.shared, None
            shared.abandon()
