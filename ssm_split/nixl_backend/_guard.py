"""The reader's checks after a batch's bytes landed: registration generation (always on
unless turned off) and integrity digests (integrity mode). The pure part is
`ssm_split.integrity`; this module moves its inputs between processes.

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

Integrity mode (`Reader(..., integrity=True)`). Before posting, the reader asks every src
rank over the side channel for the digests of exactly the bytes it will read from it
(`b"SSMSPLIT INTEGRITY 1\\n"`, then an 8-byte length and a JSON request
`{"op": "digests", "generation", "fingerprint", "dst_tp", "dst_rank", "layers",
"src_blocks"}`); the src computes them from its own plan and pages. After the READs,
the reader digests what landed and compares. For each differing piece
(up to `MAX_LOCATED_PIECES`) the reader asks the src for the piece's bytes
(`{"op": "bytes", ..., "items": [[layer, src_block, piece], ...]}`) and names every
differing byte (`IntegrityError.corruptions`). Answers are an 8-byte length and a JSON
header, then an 8-byte length and raw bytes; errors are a header `{"ok": false, "kind",
"error"}`. DRAM pages only (a VRAM src refuses).
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import HandshakeError, IntegrityError, StaleHandshakeError, TransferError
from ..integrity._digests import (digest_bytes, dst_digests, locate, merge_src_digests, mismatches,
                                  plan_pieces, pieces_from)
from ._handshake import spec_fingerprint
from ._integrity_src import INTEGRITY_REQUEST, LENGTH, MAX_ANSWER_NBYTES, MAX_REQUEST_NBYTES, page_memory
from ._memory import describe_memory, read_bytes, zeros_like_memory
from ._notify import encode_notification
from ._pending import label as _label
from ._scratch import HEADER_NBYTES, header_desc, parse_header
from ._sidechannel import recv_exact

__all__ = ["Guard", "ReadSmall"]

MAX_LOCATED_PIECES = 16

ReadSmall = Callable[[Mapping[int, tuple[np.ndarray, np.ndarray]], tuple[str, ...], float], None]
"""How the guard runs its own small READs: `read_small({src_rank: (dst_descs, src_descs)},
request_ids, timeout_s)` posts one READ per src rank and waits for them (the reader's
executor), raising `TransferError` on failure."""


def _ask(peer: Any, request: dict, *, deadline: float, label: str) -> tuple[dict, bytes]:
    """One integrity exchange with a src rank; errors name the request and the peer."""
    if peer.address is None:
        raise HandshakeError(f"Integrity mode needs the side channel address of src rank "
                             f"{peer.handshake.rank}: connect with connect_to(host, port).")
    name = peer.agent_name
    body = json.dumps(request).encode()
    try:
        timeout = max(deadline - time.monotonic(), 0.001)
        with socket.create_connection(peer.address, timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(INTEGRITY_REQUEST + LENGTH.pack(len(body)) + body)
            (length,) = LENGTH.unpack(recv_exact(conn, LENGTH.size))
            if length > MAX_REQUEST_NBYTES:
                raise EOFError(f"answer header of {length} bytes")
            header = json.loads(recv_exact(conn, length))
            (length,) = LENGTH.unpack(recv_exact(conn, LENGTH.size))
            if length > MAX_ANSWER_NBYTES:
                raise EOFError(f"answer of {length} bytes")
            raw = recv_exact(conn, length)
    except (OSError, EOFError, ValueError) as error:
        raise TransferError(f"The integrity {request['op']} request to src rank "
                            f"{peer.handshake.rank} at {peer.address[0]}:{peer.address[1]} "
                            f"failed: {type(error).__name__}: {error}", request=label, peer=name) from None
    if not isinstance(header, dict) or header.get("ok") is not True:
        kind = header.get("kind") if isinstance(header, dict) else None
        error = header.get("error") if isinstance(header, dict) else header
        cls = StaleHandshakeError if kind == "stale" else TransferError
        raise cls(f"src rank {peer.handshake.rank} refused the integrity {request['op']} "
                  f"request: {error}", request=label, peer=name)
    return header, raw


class Guard:
    """A reader's checks after a batch's bytes landed; owns a small registered landing
    buffer for the src ranks' generation headers.

    Args:
        endpoint: the dst endpoint the batches land in (its agent, memory and identity).
        peers: the reader's connected src ranks, `{src_rank: Peer}` (read, never changed).
        read_small: runs the guard's own header READs (`ReadSmall`).
        check_generation: run the generation fence after every batch.
        integrity: integrity mode.
    """

    def __init__(self, endpoint: Any, peers: Mapping[int, Any], read_small: ReadSmall, *,
                 check_generation: bool, integrity: bool):
        self.endpoint, self.peers, self.read_small = endpoint, peers, read_small
        self.check_generation, self.integrity = check_generation, integrity
        self._landing: Any = None
        self._landing_reg = None

    @property
    def defers_notification(self) -> bool:
        """True when some check runs: the read-done notification then goes to the src
        ranks only after the checks passed, instead of riding on the READ."""
        return self.check_generation or self.integrity

    def _landing_for(self, count: int):
        endpoint = self.endpoint
        if self._landing is None or self._landing.shape[0] < count * HEADER_NBYTES:
            self.close()
            self._landing = zeros_like_memory(endpoint.mem_type, endpoint.scratch.device_id,
                                              max(count, 8) * HEADER_NBYTES)
            info = describe_memory(self._landing)
            table = np.array([[info.addr, info.nbytes, info.device_id]], dtype=np.uint64)
            self._landing_reg = endpoint.agent.get_reg_descs(table, endpoint.mem_type)
            endpoint.agent.register_memory(self._landing_reg)
        return self._landing

    def close(self) -> None:
        """Deregister the landing buffer (it is re-made on the next check)."""
        if self._landing_reg is not None and self.endpoint.agent is not None:
            try:
                self.endpoint.agent.deregister_memory(self._landing_reg)
            except Exception:
                pass
        self._landing, self._landing_reg = None, None

    def fence(self, src_ranks: list[int], ids: tuple[str, ...], deadline: float) -> None:
        """Read every src rank's generation header; raise `StaleHandshakeError` naming
        the request and the peer on any mismatch (`TransferError` if the READ fails)."""
        landing = self._landing_for(len(src_ranks))
        slots = header_desc(describe_memory(landing)).repeat(len(src_ranks), axis=0)
        slots[:, 0] += np.arange(len(src_ranks), dtype=np.uint64) * np.uint64(HEADER_NBYTES)
        posts = {rank: (slots[i:i + 1], header_desc(self.peers[rank].handshake.scratch))
                 for i, rank in enumerate(src_ranks)}
        self.read_small(posts, ids, max(deadline - time.monotonic(), 0.001))
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
        endpoint = self.endpoint
        ranks = list(src_ranks)
        if not ranks or not (self.defers_notification or notify):
            return None
        layers = layer_ids.tolist()
        expected = None
        if self.integrity:
            common = {"fingerprint": spec_fingerprint(endpoint.spec),
                      "dst_tp": endpoint.tp, "dst_rank": endpoint.rank}
            per_rank = {}
            for rank in plan.src_ranks:
                peer = self.peers[rank]
                request = {**common, "op": "digests", "generation": peer.handshake.generation,
                           "layers": layers, "src_blocks": pairs[:, 0].tolist()}
                header, raw = _ask(peer, request, deadline=deadline, label=_label(ids))
                shape = (len(layers), pairs.shape[0], len(pieces_from(plan, rank)))
                if header.get("shape") != list(shape) or len(raw) != 8 * int(np.prod(shape)):
                    raise TransferError(f"src rank {rank} answered digests of shape "
                                        f"{header.get('shape')}, expected {list(shape)}.",
                                        request=_label(ids), peer=peer.agent_name)
                per_rank[rank] = np.frombuffer(raw, dtype="<u8").reshape(shape)
            expected = merge_src_digests(plan, per_rank)
        row_ids = [request_ids] * pairs.shape[0] if isinstance(request_ids, str) else list(request_ids)

        def check(pending: Any) -> None:
            if before_check is not None:
                before_check(pending)
            if self.check_generation:
                self.fence(ranks, ids, pending.deadline)
            if expected is not None:
                self._verify(plan, expected, pairs, row_ids, layers, ids, pending.deadline)
            self._notify(ranks, ids)

        return check

    def _verify(self, plan, expected, pairs, row_ids, layers, ids, deadline) -> None:
        endpoint = self.endpoint
        dst_memory = page_memory(endpoint)
        bad = mismatches(expected, dst_digests(plan, dst_memory, pairs[:, 1], layers))
        if not bad.size:
            return
        pieces = plan_pieces(plan)
        shown = bad[:MAX_LOCATED_PIECES].tolist()
        truth: dict[tuple[int, int, int], np.ndarray] = {}
        for rank in sorted({pieces[j].src_rank for _, _, j in shown}):
            wanted = [(i, n, j) for i, n, j in shown if pieces[j].src_rank == rank]
            request = {"op": "bytes", "generation": self.peers[rank].handshake.generation,
                       "fingerprint": spec_fingerprint(endpoint.spec),
                       "dst_tp": endpoint.tp, "dst_rank": endpoint.rank,
                       "items": [[layers[i], int(pairs[n, 0]), j] for i, n, j in wanted]}
            try:
                _, raw = _ask(self.peers[rank], request, deadline=deadline + 10.0, label=_label(ids))
            except TransferError:
                continue  # report the pieces unlocated
            position = 0
            for i, n, j in wanted:
                truth[(i, n, j)] = np.frombuffer(raw, np.uint8, pieces[j].nbytes, position)
                position += pieces[j].nbytes
        corruptions = []
        for i, n, j in shown:
            piece, want = pieces[j], truth.get((i, n, j))
            got = dst_memory.page(layers[i], int(pairs[n, 1]))[piece.dst_offset: piece.dst_offset + piece.nbytes]
            if want is not None and digest_bytes(np.ascontiguousarray(want)) == int(expected[i, n, j]):
                found = locate(plan, j, request=row_ids[n], layer=layers[i], src_block=int(pairs[n, 0]),
                               dst_block=int(pairs[n, 1]), expected=want, received=got)
            else:  # the src's bytes changed since it digested them, or could not be fetched
                found = locate(plan, j, request=row_ids[n], layer=layers[i], src_block=int(pairs[n, 0]),
                               dst_block=int(pairs[n, 1]), expected=None, received=got)
            corruptions.extend(found)
        first = corruptions[0] if corruptions else None
        peer = self.peers[pieces[shown[0][2]].src_rank].agent_name
        raise IntegrityError(f"{bad.shape[0]} piece(s) of the batch arrived corrupted; first: "
                             f"{first}. The batch is not received and the src was not notified; "
                             f"read it again.", request=_label(ids), peer=peer,
                             corruptions=tuple(corruptions))

    def _notify(self, ranks: list[int], ids: tuple[str, ...]) -> None:
        message = encode_notification(ids)
        for rank in ranks:
            peer = self.peers[rank]
            try:
                self.endpoint.agent.send_notif(peer.agent_name, message)
            except Exception as error:
                raise TransferError(f"The bytes arrived intact, but the read-done notification "
                                    f"to src rank {rank} failed: {type(error).__name__}: {error}",
                                    request=_label(ids), peer=peer.agent_name) from error
