"""Admitting a src rank's handshake into a reader: decoded, checked against the reader's
own state and its other peers, its plan and prepared tables worked out, and its NIXL
metadata loaded into the dst endpoint (kept loaded there, `_remotes.py`)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ..errors import HandshakeError
from ..expand._prepared import RankTables, prepare_tables
from ..plan._plan import Plan
from ..specs._stacked import check_transferable
from ._handshake import Handshake, decode_handshake

__all__ = ["admit"]


def admit(endpoint: Any, peers: Mapping[int, Any], handshake: Handshake | bytes,
          plan_for: Callable[[Handshake], Plan], prepare_once: bool
          ) -> tuple[Handshake, Plan, RankTables | None, str]:
    """`(handshake, plan, tables or None, agent name)` of a src rank a reader connects to.

    Raises:
        HandshakeError: undecodable bytes, deregistered pages, a src TP that differs from
            the other peers', metadata NIXL rejects or that names another agent.
        SpecMismatchError, ShardingError, PlanError: as `Reader.connect` says.
    """
    hs = handshake if isinstance(handshake, Handshake) else decode_handshake(handshake)
    if hs.generation % 2 == 0:
        raise HandshakeError(f"src rank {hs.rank} ({hs.agent_name!r}) has deregistered its "
                             f"pages (generation {hs.generation} is even): nothing can be "
                             f"read from it until it registers them again.")
    check_transferable(hs.spec, endpoint.spec)
    others = {p.handshake.tp for r, p in peers.items() if r != hs.rank}
    if others and others != {hs.tp}:
        raise HandshakeError(f"src rank {hs.rank} says tp={hs.tp}, but connected src ranks "
                             f"say tp={others.pop()}: one Reader reads from one src engine.")
    plan = plan_for(hs)
    tables = None
    if prepare_once and hs.rank in plan.src_ranks:
        tables = prepare_tables(plan, hs.rank, hs.regions, endpoint.regions)
    try:  # kept loaded by the endpoint: loading the same metadata again costs nothing
        name = endpoint.remotes.load(hs.agent_metadata, hs.agent_name)
    except HandshakeError:
        raise
    except Exception as error:  # NIXL errors derive from Exception
        raise HandshakeError(f"NIXL rejected the metadata of src rank {hs.rank} "
                             f"({hs.agent_name!r}): {type(error).__name__}: {error}") from error
    if name != hs.agent_name:
        raise HandshakeError(f"The handshake of src rank {hs.rank} names agent "
                             f"{hs.agent_name!r}, but its metadata belongs to {name!r}.")
    return hs, plan, tables, name
