"""NIXL descriptor lists prepared once per peer ("prepare once, make many").

A `PeerLists` holds the two prepared lists of one src rank's `RankTables`
(`ssm_split.expand.prepare_tables`): the local list over the dst endpoint's pages and the remote
list over the src rank's pages, both in NIXL's Nx5 strided form (a few rows per layer,
whatever the block count). Every READ from that src rank reuses them with its own index
arrays (`make_prepped_xfer`).

A READ that uses the lists holds them (`acquire` / `drop`) until it is settled; lists that
are replaced (reconnect, or the dst endpoint re-registered its pages) or dropped with
their peer are `retire`d and released only once no READ holds them, so a READ that
outlives its batch never runs on released lists. `abandon` lets go of them without a
release, when the endpoint destroys its agent.
"""

from __future__ import annotations

from typing import Any

from ..expand._prepared import RankTables
from ._transfer import nixl_error

__all__ = ["LOCAL_AGENT", "PeerLists", "refresh_lists"]

LOCAL_AGENT = "NIXL_INIT_AGENT"
"""The agent name NIXL's `prep_xfer_dlist` takes for a local list."""


class PeerLists:
    """The prepared local and remote lists of one src rank.

    Args:
        agent: the dst endpoint's NIXL agent.
        tables: the rank's tables (`prepare_tables`).
        peer_name: the src rank's NIXL agent name (its metadata already loaded).
        local_mem_type, remote_mem_type: "DRAM" or "VRAM".
        generation: the dst endpoint's registration generation the local list belongs to.

    Raises:
        Exception: NIXL's own error when it refuses a list (a descriptor outside memory
            registered on its side); nothing stays prepared then.
    """

    def __init__(self, agent: Any, tables: RankTables, peer_name: str, local_mem_type: str,
                 remote_mem_type: str, generation: int):
        self.tables, self.peer_name, self.generation = tables, peer_name, generation
        self._agent = agent
        self.local = agent.prep_xfer_dlist(LOCAL_AGENT, tables.dst_table.rows.copy(), local_mem_type)
        try:
            self.remote = agent.prep_xfer_dlist(peer_name, tables.src_table.rows.copy(), remote_mem_type)
        except Exception:
            _release(self.local)
            raise
        self._users = 0
        self._retired = False

    @property
    def released(self) -> bool:
        return self.local is None

    def acquire(self) -> "PeerLists":
        """A READ starts using the lists."""
        if self._retired:
            raise RuntimeError("retired lists cannot be used by a new READ")
        self._users += 1
        return self

    def drop(self) -> None:
        """A READ that used the lists is finished (or given up and settled)."""
        self._users -= 1
        self._release_if_unused()

    def retire(self) -> None:
        """No new READ uses the lists; release them once the last user drops them."""
        self._retired = True
        self._release_if_unused()

    def abandon(self) -> None:
        """The agent is being destroyed: drop the handles without releasing them."""
        self._retired, self._agent = True, None
        self.local = self.remote = None

    def _release_if_unused(self) -> None:
        if self._retired and self._users <= 0 and self.local is not None:
            _release(self.remote)
            _release(self.local)
            self.local = self.remote = None


def refresh_lists(lists: dict, ranks, endpoint: Any, peers: Any, request: str) -> None:
    """Prepare again the lists (`{src_rank: PeerLists}`) of `ranks` whose local list
    predates the endpoint's last (de)registration: NIXL lists of deregistered memory
    must not be used. The old ones are retired.

    Raises:
        TransferError: NIXL refused the new lists.
    """
    for rank in ranks:
        old = lists[rank]
        if old.generation == endpoint.generation:
            continue
        peer = peers[rank]
        try:
            fresh = PeerLists(endpoint.agent, old.tables, peer.agent_name, endpoint.mem_type,
                              peer.handshake.mem_type, endpoint.generation)
        except Exception as error:
            raise nixl_error(f"Could not prepare the lists of src rank {rank} again after this "
                             f"endpoint re-registered", error, request=request, peer=peer.agent_name) from error
        endpoint.lists.add(fresh)
        old.retire()
        lists[rank] = fresh


def _release(handle: Any) -> None:
    try:
        handle.release()
    except Exception:  # releasing must not hide another error
        pass
