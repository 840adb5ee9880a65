"""The src agents a dst endpoint has loaded, kept loaded across readers and reconnects.

NIXL's `remove_remote_agent` leaks a socket on both sides per call (measured: 200
reader lifecycles, +200 sockets each side; the src then runs out of descriptors), and
after it, every transfer still moving to that agent answers status checks with
`nixlNotFoundError` while UCX goes on writing. So a dst endpoint loads each src agent's
metadata once, keyed by agent name and metadata digest, shares it between its readers
(`acquire` / `release`), re-loads metadata only when it changed (NIXL accepts new
metadata for a loaded agent without a removal, and keeps serving READs already posted),
and never removes an agent that a reader uses or that a READ not yet settled targets.
Agents are removed only beyond `MAX_REMOTE_AGENTS`, least recently used first.

Loading new metadata for a name does not drop the regions of the old one (NIXL keeps the
union): refusing stale regions is the handshake's and the generation fence's job. A src
that restarted under the same agent name has new connection information, which NIXL
refuses to load over the old (`nixlNotAllowedError`): the old agent is then removed
first (one leaked socket per restart), unless a READ to it is not settled yet.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter, OrderedDict
from typing import Any, Callable

from ..errors import HandshakeError

__all__ = ["RemoteAgents", "MAX_REMOTE_AGENTS"]

MAX_REMOTE_AGENTS = 1024


class RemoteAgents:
    """Remote agents loaded into one NIXL agent.

    Args:
        agent: the local NIXL agent.
        in_use: `in_use(name)` is True while a READ to that agent is not settled.
    """

    def __init__(self, agent: Any, in_use: Callable[[str], bool]):
        self._agent, self._in_use = agent, in_use
        self._by_digest: dict[bytes, str] = {}
        self._digest_of: OrderedDict[str, bytes] = OrderedDict()  # least recently used first
        self._load_ids: dict[str, int] = {}
        self._refs: Counter[str] = Counter()
        self._ids = itertools.count(1)
        self.num_loads = 0  # add_remote_agent calls, for tests and statistics

    def load(self, metadata: bytes, expected_name: str) -> str:
        """Load `metadata` unless it is loaded already; returns the agent name it names.
        `expected_name` is the name the handshake gives: if an agent of that name is
        loaded with other connection information (the src restarted), it is replaced.

        Raises:
            HandshakeError: the src restarted while a READ to its previous process is
                not settled yet.
            Exception: NIXL's own error when it rejects the metadata.
        """
        digest = hashlib.sha256(metadata).digest()
        name = self._by_digest.get(digest)
        if name is None:
            try:
                name = self._agent.add_remote_agent(metadata)
            except Exception as error:  # NIXL errors derive from Exception
                if type(error).__name__ != "nixlNotAllowedError" or expected_name not in self._digest_of:
                    raise
                self._remove(expected_name)
                name = self._agent.add_remote_agent(metadata)
            name = name.decode() if isinstance(name, bytes) else str(name)
            self.num_loads += 1
            old = self._digest_of.get(name)
            if old is not None:
                del self._by_digest[old]
            self._by_digest[digest] = name
            self._digest_of[name] = digest
            self._load_ids.setdefault(name, next(self._ids))  # a new id only after a removal
            self._evict()
        self._digest_of.move_to_end(name)
        return name

    def acquire(self, name: str) -> None:
        """A reader uses the agent: it is not removed until `release`."""
        self._refs[name] += 1

    def release(self, name: str) -> None:
        self._refs[name] -= 1
        if self._refs[name] <= 0:
            del self._refs[name]

    def load_id(self, name: str) -> int | None:
        """An id of the agent's current loading (None if not loaded): a READ posted under
        one id and checked under another may have lost its remote agent."""
        return self._load_ids.get(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._digest_of)

    def _remove(self, name: str) -> None:
        """Remove a src agent that restarted (its old process is gone)."""
        if self._in_use(name):
            raise HandshakeError(f"src agent {name!r} restarted (its metadata carries new connection "
                                 f"information), but a READ to its previous process is not settled yet: "
                                 f"wait for it (Endpoint.settle) and connect again.")
        self._forget(name)

    def _forget(self, name: str) -> None:
        try:
            self._agent.remove_remote_agent(name)
        except Exception:  # noqa: BLE001 - forgetting it is all that matters here
            pass
        del self._by_digest[self._digest_of.pop(name)]
        del self._load_ids[name]

    def _evict(self) -> None:
        for name in list(self._digest_of):
            if len(self._digest_of) <= MAX_REMOTE_AGENTS:
                return
            if not self._refs[name] and not self._in_use(name):
                self._forget(name)
