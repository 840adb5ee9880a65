"""Integrity mode, src side: answer a reader's request for digests of the bytes it will
read (and, to locate a corruption, for the bytes of a few pieces). Pure digests are in
`ssm_split.integrity`; the protocol is described in `_guard.py`.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import numpy as np

from ..errors import TransferError
from ..integrity._digests import DIGEST_ALGORITHM, PageMemory, plan_pieces, pieces_from, src_digests
from ..plan._plan import plan_reads
from ._handshake import spec_fingerprint
from ._sidechannel import recv_exact

__all__ = ["INTEGRITY_REQUEST", "MAX_REQUEST_NBYTES", "MAX_ANSWER_NBYTES", "LENGTH", "page_memory",
           "answer_integrity"]

INTEGRITY_REQUEST = b"SSMSPLIT INTEGRITY 1\n"
MAX_REQUEST_NBYTES = 16 << 20
MAX_ANSWER_NBYTES = 256 << 20
MAX_PAGES = 1 << 20
LENGTH = struct.Struct(">Q")


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
    (length,) = LENGTH.unpack(recv_exact(conn, LENGTH.size))
    try:
        if length > MAX_REQUEST_NBYTES:
            raise ValueError(f"request of {length} bytes exceeds {MAX_REQUEST_NBYTES}")
        request = json.loads(recv_exact(conn, length).decode("utf-8"))
        header, raw = _answer(endpoint, request)
    except Exception as error:  # a peer's request must never kill the side channel thread
        header, raw = {"ok": False, "kind": "refused", "error": f"{type(error).__name__}: {error}"}, b""
    encoded = json.dumps(header).encode()
    conn.sendall(LENGTH.pack(len(encoded)) + encoded + LENGTH.pack(len(raw)) + raw)
