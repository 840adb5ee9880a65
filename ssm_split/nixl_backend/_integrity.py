"""The reader's checks after a batch's bytes landed: registration generation (always on
unless turned off) and integrity digests (integrity mode). The pure part is
`ssm_split._integrity`; this module moves its inputs between processes.

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
import struct
import time
from typing import Any, Callable

import numpy as np

from ..errors import HandshakeError, IntegrityError, StaleHandshakeError, TransferError
from ..integrity._digests import (
    DIGEST_ALGORITHM,
    PageMemory,
    digest_bytes,
    dst_digests,
    locate,
    merge_src_digests,
    mismatches,
    plan_pieces,
    pieces_from,
    src_digests,
)
from ..plan._plan import plan_reads
from ._handshake import spec_fingerprint
from ._pending import label as _label
from ._sidechannel import _recv_exact

__all__ = ["INTEGRITY_REQUEST", "answer_integrity", "Guard"]

INTEGRITY_REQUEST = b"SSMSPLIT INTEGRITY 1\n"
MAX_REQUEST_NBYTES = 16 << 20
MAX_ANSWER_NBYTES = 256 << 20
MAX_LOCATED_PIECES = 16
MAX_PAGES = 1 << 20
_LENGTH = struct.Struct(">Q")
_MAGIC = b"SSMSPLIT"
_HEADER_NBYTES = 16


# --- src side -----------------------------------------------------------------------------


def page_memory(endpoint: Any) -> PageMemory:
    """An endpoint's pages as numpy bytes (no copy); DRAM only.

    Raises:
        TransferError: the pages are not in host memory.
    """
    if endpoint.mem_type != "DRAM":
        raise TransferError(f"Integrity mode needs DRAM pages; {endpoint.name!r} holds "
                            f"{endpoint.mem_type}.")
    arrays = []
    for memory in endpoint.memory:
        array = memory.numpy() if not isinstance(memory, np.ndarray) else memory
        arrays.append(array.reshape(-1).view(np.uint8))
    return PageMemory(endpoint.regions, tuple(arrays))


def _ints(value: object, name: str, limit: int) -> list[int]:
    if not isinstance(value, list) or len(value) > limit or not all(
            type(v) is int and -(1 << 62) < v < 1 << 62 for v in value):
        raise ValueError(f"`{name}` must be a list of at most {limit} ints of at most 62 bits")
    return value


def _answer(endpoint: Any, request: dict) -> tuple[dict, bytes]:
    if not isinstance(request, dict) or request.get("op") not in ("digests", "bytes"):
        raise ValueError("`op` must be \"digests\" or \"bytes\"")
    generation = request.get("generation")
    if type(generation) is not int or generation != endpoint.generation or not endpoint.registered:
        return {"ok": False, "kind": "stale",
                "error": f"the reader's handshake says generation {generation!r}, "
                         f"this endpoint is at generation {endpoint.generation}"
                         + ("" if endpoint.registered else " and its pages are deregistered")}, b""
    if request.get("fingerprint") != spec_fingerprint(endpoint.spec):
        raise ValueError("the reader's spec fingerprint differs from this endpoint's spec")
    dst_tp, dst_rank = request.get("dst_tp"), request.get("dst_rank")
    if type(dst_tp) is not int or type(dst_rank) is not int or not 0 <= dst_rank < dst_tp <= 4096:
        raise ValueError("`dst_tp` and `dst_rank` must be ints with 0 <= dst_rank < dst_tp <= 4096")
    plan = plan_reads(endpoint.spec, endpoint.tp, dst_tp, dst_rank)
    memory = page_memory(endpoint)
    if request["op"] == "digests":
        layers = _ints(request.get("layers"), "layers", 1 << 16)
        blocks = _ints(request.get("src_blocks"), "src_blocks", 1 << 22)
        if len(layers) * len(blocks) > MAX_PAGES:
            raise ValueError(f"{len(layers)} layers x {len(blocks)} blocks exceed {MAX_PAGES} pages")
        digests = src_digests(plan, endpoint.rank, memory, blocks, layers)
        return ({"ok": True, "algorithm": DIGEST_ALGORITHM, "shape": list(digests.shape)},
                digests.astype("<u8").tobytes())
    pieces, own = plan_pieces(plan), set(pieces_from(plan, endpoint.rank))
    items = request.get("items")
    if not isinstance(items, list) or len(items) > 1 << 16:
        raise ValueError("`items` must be a list of at most 65536 [layer, src_block, piece]")
    chunks, total = [], 0
    for item in items:
        if not isinstance(item, list) or len(item) != 3:
            raise ValueError(f"item {item!r} is not [layer, src_block, piece]")
        layer, block, index = _ints(item, "items[i]", 3)
        if index not in own:
            raise ValueError(f"item {item!r} does not name a piece this src rank serves")
        regions = endpoint.regions
        if not 0 <= layer < regions.num_layers or not 0 <= block < regions.layers[layer].num_blocks:
            raise ValueError(f"item {item!r} names a page outside this endpoint's regions")
        piece = pieces[index]
        total += piece.nbytes
        if total > MAX_ANSWER_NBYTES:
            raise ValueError(f"the pieces asked for exceed {MAX_ANSWER_NBYTES} bytes")
        chunks.append(memory.page(layer, block)[piece.src_offset: piece.src_offset + piece.nbytes].tobytes())
    return {"ok": True, "nbytes": total}, b"".join(chunks)


def answer_integrity(endpoint: Any, conn: socket.socket) -> None:
    """Side channel handler of `INTEGRITY_REQUEST` (after the request line was read).
    Bad requests are answered with `{"ok": false, "kind": "refused"}`, never a crash."""
    (length,) = _LENGTH.unpack(_recv_exact(conn, _LENGTH.size))
    try:
        if length > MAX_REQUEST_NBYTES:
            raise ValueError(f"request of {length} bytes exceeds {MAX_REQUEST_NBYTES}")
        request = json.loads(_recv_exact(conn, length).decode("utf-8"))
        header, raw = _answer(endpoint, request)
    except Exception as error:  # a peer's request must never kill the side channel thread
        header, raw = {"ok": False, "kind": "refused", "error": f"{type(error).__name__}: {error}"}, b""
    encoded = json.dumps(header).encode()
    conn.sendall(_LENGTH.pack(len(encoded)) + encoded + _LENGTH.pack(len(raw)) + raw)


# --- dst side -----------------------------------------------------------------------------


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
            conn.sendall(INTEGRITY_REQUEST + _LENGTH.pack(len(body)) + body)
            (length,) = _LENGTH.unpack(_recv_exact(conn, _LENGTH.size))
            if length > MAX_REQUEST_NBYTES:
                raise EOFError(f"answer header of {length} bytes")
            header = json.loads(_recv_exact(conn, length))
            (length,) = _LENGTH.unpack(_recv_exact(conn, _LENGTH.size))
            if length > MAX_ANSWER_NBYTES:
                raise EOFError(f"answer of {length} bytes")
            raw = _recv_exact(conn, length)
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


def _landing_like(endpoint: Any, nbytes: int) -> Any:
    if endpoint.mem_type == "DRAM":
        return np.zeros(nbytes, dtype=np.uint8)
    import torch

    return torch.zeros(nbytes, dtype=torch.uint8, device=f"cuda:{endpoint.scratch.device_id}")


class Guard:
    """A reader's checks: owns a small registered landing buffer for generation headers.

    Args:
        reader: the `Reader` it checks for.
        check_generation: run the generation fence after every `start_read`.
        integrity: integrity mode.
    """

    def __init__(self, reader: Any, *, check_generation: bool, integrity: bool):
        self.reader, self.check_generation, self.integrity = reader, check_generation, integrity
        self._landing: Any = None
        self._landing_reg = None

    @property
    def defers_notification(self) -> bool:
        """True when some check runs: the read-done notification then goes to the src
        ranks only after the checks passed, instead of riding on the READ."""
        return self.check_generation or self.integrity

    def _landing_for(self, count: int):
        endpoint = self.reader.endpoint
        if self._landing is None or self._landing.shape[0] < count * _HEADER_NBYTES:
            self.close()
            self._landing = _landing_like(endpoint, max(count, 8) * _HEADER_NBYTES)
            from ._endpoint import describe_memory

            info = describe_memory(self._landing)
            table = np.array([[info.addr, info.nbytes, info.device_id]], dtype=np.uint64)
            self._landing_reg = endpoint.agent.get_reg_descs(table, endpoint.mem_type)
            endpoint.agent.register_memory(self._landing_reg)
        return self._landing

    def close(self) -> None:
        """Deregister the landing buffer (it is re-made on the next check)."""
        if self._landing_reg is not None and self.reader.endpoint.agent is not None:
            try:
                self.reader.endpoint.agent.deregister_memory(self._landing_reg)
            except Exception:
                pass
        self._landing, self._landing_reg = None, None

    def fence(self, src_ranks: list[int], ids: tuple[str, ...], deadline: float) -> None:
        """Read every src rank's generation header; raise `StaleHandshakeError` naming
        the request and the peer on any mismatch (`TransferError` if the READ fails)."""
        from ._endpoint import describe_memory, read_bytes

        landing = self._landing_for(len(src_ranks))
        base, device = describe_memory(landing).addr, self.reader.endpoint.scratch.device_id
        arrays = {}
        for i, rank in enumerate(src_ranks):
            scratch = self.reader.peers[rank].handshake.scratch
            arrays[rank] = (np.array([[base + i * _HEADER_NBYTES, _HEADER_NBYTES, device]], np.uint64),
                            np.array([[scratch.addr, _HEADER_NBYTES, scratch.device_id]], np.uint64))
        timeout = max(deadline - time.monotonic(), 0.001)
        self.reader._start(arrays, ids, timeout, b"", (0, 0, 0)).wait()
        for i, rank in enumerate(src_ranks):
            peer = self.reader.peers[rank]
            header = read_bytes(landing, i * _HEADER_NBYTES, _HEADER_NBYTES)
            generation = int.from_bytes(header[8:], "little") if header[:8] == _MAGIC else None
            if generation != peer.handshake.generation or generation % 2 == 0:
                raise StaleHandshakeError(
                    f"src rank {rank} is at registration generation {generation}, but the "
                    f"handshake the bytes were read with says {peer.handshake.generation}: the "
                    f"src deregistered or re-registered its pages, so they may have been freed "
                    f"or re-used. The batch is not received; fetch a new handshake "
                    f"(connect_to) and read again.", request=_label(ids), peer=peer.agent_name)

    def prepare(self, batch: Any, pairs: np.ndarray, request_ids: Any, ids: tuple[str, ...],
                deadline: float) -> Callable[[Any], None] | None:
        """Before posting: fetch digests (integrity mode). `batch` is the batch's
        `Expansion` or `IndexedBatch`. Returns the check to run once the bytes landed, or
        None when there is nothing to check."""
        plan, reader = batch.plan, self.reader
        ranks = [r.src_rank for r in batch.ranks if r.num_descriptors]
        if not ranks or not self.defers_notification:
            return None
        layers = batch.layers.tolist()
        expected = None
        if self.integrity:
            common = {"fingerprint": spec_fingerprint(reader.endpoint.spec),
                      "dst_tp": reader.endpoint.tp, "dst_rank": reader.endpoint.rank}
            per_rank = {}
            for rank in plan.src_ranks:
                peer = reader.peers[rank]
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
            hook = getattr(reader, "before_check", None)
            if hook is not None:
                hook(pending)
            if self.check_generation:
                self.fence(ranks, ids, pending.deadline)
            if expected is not None:
                self._verify(plan, expected, pairs, row_ids, layers, ids, pending.deadline)
            self._notify(ranks, ids)

        return check

    def _verify(self, plan, expected, pairs, row_ids, layers, ids, deadline) -> None:
        reader = self.reader
        dst_memory = page_memory(reader.endpoint)
        bad = mismatches(expected, dst_digests(plan, dst_memory, pairs[:, 1], layers))
        if not bad.size:
            return
        pieces = plan_pieces(plan)
        shown = bad[:MAX_LOCATED_PIECES].tolist()
        truth: dict[tuple[int, int, int], np.ndarray] = {}
        for rank in sorted({pieces[j].src_rank for _, _, j in shown}):
            wanted = [(i, n, j) for i, n, j in shown if pieces[j].src_rank == rank]
            request = {"op": "bytes", "generation": reader.peers[rank].handshake.generation,
                       "fingerprint": spec_fingerprint(reader.endpoint.spec),
                       "dst_tp": reader.endpoint.tp, "dst_rank": reader.endpoint.rank,
                       "items": [[layers[i], int(pairs[n, 0]), j] for i, n, j in wanted]}
            try:
                _, raw = _ask(reader.peers[rank], request, deadline=deadline + 10.0, label=_label(ids))
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
        peer = reader.peers[pieces[shown[0][2]].src_rank].agent_name
        raise IntegrityError(f"{bad.shape[0]} piece(s) of the batch arrived corrupted; first: "
                             f"{first}. The batch is not received and the src was not notified; "
                             f"read it again.", request=_label(ids), peer=peer,
                             corruptions=tuple(corruptions))

    def _notify(self, ranks: list[int], ids: tuple[str, ...]) -> None:
        from ._endpoint import encode_notification

        message = encode_notification(ids)
        for rank in ranks:
            peer = self.reader.peers[rank]
            try:
                self.reader.endpoint.agent.send_notif(peer.agent_name, message)
            except Exception as error:
                raise TransferError(f"The bytes arrived intact, but the read-done notification "
                                    f"to src rank {rank} failed: {type(error).__name__}: {error}",
                                    request=_label(ids), peer=peer.agent_name) from error
