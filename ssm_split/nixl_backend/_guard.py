"""The reader's checks after a batch's bytes landed, and its read-done notifications.

Generation fence. NIXL does not notice when a src deregisters memory: a READ of it
still completes (docs/reliability.md). A src endpoint therefore writes its new
generation into its scratch header *before* it deregisters. After a batch's data READs
complete, the reader READs every involved src rank's 16-byte header (one small READ per
src rank) and compares the generation with its handshake's: if any data byte came from
memory deregistered before that READ, the header it sees afterwards already shows the
bump. A mismatch is a `StaleHandshakeError` and the batch is not received.

While a check runs (by default), the read-done notification does not ride on the READ:
the reader sends it (`send_notif`) only once every check passed, so a src never hears
"done" for a batch the reader refused, and keeps the pages for a second attempt.
Notifications are tagged for the session each src rank opened at the handshake
(`_notify.py`); a peer connected without a session is not notified.

Integrity mode (`Reader(..., integrity=True)`): `_integrity_dst.py`.

The headers (and the warm-up READs) land in a small registered buffer of the reader's.
If such a READ did not settle (a src that stopped answering), the buffer is handed to
the endpoint, which frees it once the READ settled, and a new one is made.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import StaleHandshakeError, TransferError
from ._integrity_dst import fetch_expected, verify
from ._memory import read_bytes, zeros_like_memory
from ._pending import label as _label
from ._scratch import HEADER_NBYTES, header_desc, parse_header

__all__ = ["Guard", "ReadSmall"]

ReadSmall = Callable[[Mapping[int, tuple[np.ndarray, np.ndarray]], tuple[str, ...], float, object], None]
"""How the guard runs its own small READs: `read_small({src_rank: (dst_descs, src_descs)},
request_ids, timeout_s, token)` posts one READ per src rank into the buffer `token` and
waits for them (the reader's executor), raising `TransferError` on failure."""

_tokens = itertools.count(1)


class Guard:
    """A reader's checks after a batch's bytes landed.

    Args:
        endpoint: the dst endpoint the batches land in (its agent, memory and identity).
        peers: the reader's connected src ranks, `{src_rank: Peer}` (read, never changed).
        read_small: runs the guard's own small READs (`ReadSmall`).
        clients: `{src_rank: SideChannelClient}` of peers found with `connect_to`.
        notifiers: `{src_rank: Notifier}` of peers that opened a session.
        check_generation: run the generation fence after every batch.
        integrity: integrity mode.
    """

    def __init__(self, endpoint: Any, peers: Mapping[int, Any], read_small: ReadSmall, *,
                 clients: Mapping[int, Any], notifiers: Mapping[int, Any], check_generation: bool,
                 integrity: bool):
        self.endpoint, self.peers, self.read_small = endpoint, peers, read_small
        self.clients, self.notifiers = clients, notifiers
        self.check_generation, self.integrity = check_generation, integrity
        self._landing: Any = None
        self._landing_buffer: Any = None
        self._landing_reg = None
        self._token: object = None

    @property
    def defers_notification(self) -> bool:
        """True when some check runs: the read-done notification then goes to the src
        ranks only after the checks passed, instead of riding on the READ."""
        return self.check_generation or self.integrity

    def landing(self, count: int) -> tuple[Any, np.ndarray, object]:
        """A landing buffer of at least `count` header slots no READ still writes:
        `(memory, slot descriptor (1, 3), token)`."""
        endpoint = self.endpoint
        if (self._landing is None or self._landing.shape[0] < count * HEADER_NBYTES
                or endpoint.inflight.busy(self._token)):
            self.close()
            memory = zeros_like_memory(endpoint.mem_type, endpoint.scratch.device_id,
                                       max(count, 8) * HEADER_NBYTES)
            self._landing_buffer, self._landing_reg = endpoint.register_buffer(memory)
            self._landing, self._token = memory, next(_tokens)
        return self._landing, header_desc(self._landing_buffer), self._token

    def close(self) -> None:
        """Let go of the landing buffer: deregistered now, or by the endpoint once the
        READs still writing it settled."""
        if self._landing_reg is not None and self.endpoint.agent is not None:
            if self.endpoint.inflight.busy(self._token):
                self.endpoint.inflight.retire(self._token, self._landing, self._landing_reg)
            else:
                try:
                    self.endpoint.agent.deregister_memory(self._landing_reg)
                except Exception:  # noqa: BLE001
                    pass
        self._landing = self._landing_buffer = self._landing_reg = self._token = None

    def fence(self, src_ranks: list[int], ids: tuple[str, ...], deadline: float) -> None:
        """Read every src rank's generation header; raise `StaleHandshakeError` naming
        the request and the peer on any mismatch (`TransferError` if the READ fails)."""
        landing, slot, token = self.landing(len(src_ranks))
        slots = slot.repeat(len(src_ranks), axis=0)
        slots[:, 0] += np.arange(len(src_ranks), dtype=np.uint64) * np.uint64(HEADER_NBYTES)
        posts = {rank: (slots[i:i + 1], header_desc(self.peers[rank].handshake.scratch))
                 for i, rank in enumerate(src_ranks)}
        self.read_small(posts, ids, max(deadline - time.monotonic(), 0.001), token)
        for i, rank in enumerate(src_ranks):
            peer = self.peers[rank]
            generation = parse_header(read_bytes(landing, i * HEADER_NBYTES, HEADER_NBYTES))
            if generation != peer.handshake.generation or generation % 2 == 0:
                raise StaleHandshakeError(
                    f"src rank {rank} is at registration generation {generation}, but the "
                    f"handshake the bytes were read with says {peer.handshake.generation}: the "
                    f"src deregistered or re-registered its pages, so they may have been freed "
                    f"or re-used. The batch is not received; fetch a new handshake "
                    f"(connect_to) and read again.", request=_label(ids), peer=peer.agent_name)

    def prepare(self, plan: Any, src_ranks: list[int], layer_ids: np.ndarray, pairs: np.ndarray,
                request_ids: Any, ids: tuple[str, ...], deadline: float,
                before_check: Callable[[Any], None] | None = None, notify: bool = False
                ) -> Callable[[Any], None] | None:
        """Before posting: fetch digests (integrity mode) for a batch of `plan` that reads
        from `src_ranks`. Returns the check to run once the bytes landed (it first calls
        `before_check(pending)`, fault injection in tests, and ends by notifying the src
        ranks), or None when there is nothing to check and `notify` is False (then the
        notification rides on the READs)."""
        ranks = list(src_ranks)
        if not ranks or not (self.defers_notification or notify):
            return None
        layers = layer_ids.tolist()
        expected = None
        if self.integrity:
            expected = fetch_expected(self.endpoint, plan, self.peers, self.clients, layers,
                                      pairs[:, 0].tolist(), deadline, _label(ids))
        row_ids = [request_ids] * pairs.shape[0] if isinstance(request_ids, str) else list(request_ids)

        def check(pending: Any) -> None:
            if before_check is not None:
                before_check(pending)
            if self.check_generation:
                self.fence(ranks, ids, pending.deadline)
            if expected is not None:
                verify(self.endpoint, plan, expected, pairs, row_ids, layers, self.peers, self.clients,
                       _label(ids), pending.deadline)
            self.notify(ranks, ids)

        return check

    def notes(self, posts: Mapping[int, Any], ids: tuple[str, ...]) -> dict[int, bytes] | None:
        """The notification each src rank's READ carries when no check runs, or None when
        one does not fit a single message (it is then sent after the READs)."""
        notes = {}
        for rank in posts:
            notifier = self.notifiers.get(rank)
            if notifier is not None:
                messages = notifier.messages(ids)
                if len(messages) != 1:
                    return None
                notes[rank] = messages[0]
        return notes

    def notify(self, ranks: list[int], ids: tuple[str, ...]) -> None:
        """Send the read-done notification of `ids` to every rank of `ranks` that opened
        a session with this reader."""
        for rank in ranks:
            notifier = self.notifiers.get(rank)
            if notifier is None:
                continue
            peer = self.peers[rank]
            try:
                for message in notifier.messages(ids):
                    self.endpoint.agent.send_notif(peer.agent_name, message)
            except Exception as error:
                raise TransferError(f"The bytes arrived intact, but the read-done notification "
                                    f"to src rank {rank} failed: {type(error).__name__}: {error}",
                                    request=_label(ids), peer=peer.agent_name) from error
