"""Integrity mode, src side: the side channel handlers that answer a reader's requests
for digests of the bytes it will read, and for the bytes of a few pieces it found
corrupted. Pure digests are in `ssm_split.integrity`; the reader's side is `_guard.py`.

Requests (JSON bodies; every one names the reader's `dst_tp`, `dst_rank`, the spec
`fingerprint` and the handshake's `generation`):

- op `"digests"`, `{"layers": [...], "src_blocks": [...]}`: one 8-byte digest per
  (layer, block, piece this src rank serves to that dst rank), as the payload; the
  answer body says `{"algorithm", "shape"}`.
- op `"pieces"`, `{"items": [[layer, src_block, piece], ...]}`: the bytes of those
  pieces, concatenated; only pieces that dst rank reads from this src rank anyway, at
  most `MAX_PIECES_PER_REQUEST` of them.

Bounds: at most `MAX_PAGES_PER_REQUEST` pages and `MAX_DIGEST_NBYTES` digested bytes per
request (the reader splits larger batches), work in chunks that stop as soon as the
requester disconnects or stops waiting; the side channel caps requests in flight per
connection and per host. Wrong generation: `{"ok": false, "kind": "stale"}`; anything
else wrong: `"refused"`. DRAM pages only (a VRAM src refuses).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..errors import TransferError
from ..integrity._digests import DIGEST_ALGORITHM, PageMemory, plan_pieces, pieces_from, src_digests
from ..plan._plan import plan_reads
from ._handshake import spec_fingerprint

__all__ = ["MAX_PAGES_PER_REQUEST", "MAX_DIGEST_NBYTES", "MAX_PIECES_PER_REQUEST", "page_memory",
           "integrity_handlers"]

MAX_PAGES_PER_REQUEST = 1 << 16
"""Pages (layers x blocks) one digests request may cover."""
MAX_DIGEST_NBYTES = 512 << 20
"""Bytes one digests request may make the src hash."""
MAX_PIECES_PER_REQUEST = 16
"""Pieces one pieces request may fetch."""
_CHUNK_NBYTES = 16 << 20  # bytes digested between two cancellation checks


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


def _plan_for(endpoint: Any, request: dict):
    """The reader's plan, once its generation, fingerprint and TP check out; or a stale
    answer."""
    generation = request.get("generation")
    if type(generation) is not int or generation != endpoint.generation or not endpoint.registered:
        return None, {"ok": False, "kind": "stale",
                      "error": f"the reader's handshake says generation {generation!r}, "
                               f"this endpoint is at generation {endpoint.generation}"
                               + ("" if endpoint.registered else " and its pages are deregistered")}
    if request.get("fingerprint") != spec_fingerprint(endpoint.spec):
        raise ValueError("the reader's spec fingerprint differs from this endpoint's spec")
    dst_tp, dst_rank = request.get("dst_tp"), request.get("dst_rank")
    if type(dst_tp) is not int or type(dst_rank) is not int or not 0 <= dst_rank < dst_tp <= 4096:
        raise ValueError("`dst_tp` and `dst_rank` must be ints with 0 <= dst_rank < dst_tp <= 4096")
    return plan_reads(endpoint.spec, endpoint.tp, dst_tp, dst_rank), None


def _digests(endpoint: Any, request: dict, context: Any) -> tuple[dict, bytes]:
    plan, stale = _plan_for(endpoint, request)
    if stale is not None:
        return stale, b""
    memory = page_memory(endpoint)
    layers = _ints(request.get("layers"), "layers", MAX_PAGES_PER_REQUEST)
    blocks = _ints(request.get("src_blocks"), "src_blocks", MAX_PAGES_PER_REQUEST)
    pieces = [plan_pieces(plan)[i] for i in pieces_from(plan, endpoint.rank)]
    num_pages = len(layers) * len(blocks)
    nbytes = num_pages * sum(p.nbytes for p in pieces)
    if num_pages > MAX_PAGES_PER_REQUEST or nbytes > MAX_DIGEST_NBYTES:
        raise ValueError(f"{len(layers)} layers x {len(blocks)} blocks ({nbytes} bytes to digest) exceed "
                         f"{MAX_PAGES_PER_REQUEST} pages or {MAX_DIGEST_NBYTES} bytes per request: "
                         f"split the batch")
    step = max(1, _CHUNK_NBYTES // max(1, len(layers) * sum(p.nbytes for p in pieces)))
    parts = []
    for start in range(0, len(blocks), step):
        context.check()  # the requester left or stopped waiting: stop hashing
        parts.append(src_digests(plan, endpoint.rank, memory, blocks[start: start + step], layers))
    digests = np.concatenate(parts, axis=1) if parts else np.zeros((len(layers), 0, len(pieces)), np.uint64)
    return ({"algorithm": DIGEST_ALGORITHM, "shape": list(digests.shape)}, digests.astype("<u8").tobytes())


def _pieces(endpoint: Any, request: dict, context: Any) -> tuple[dict, bytes]:
    plan, stale = _plan_for(endpoint, request)
    if stale is not None:
        return stale, b""
    memory = page_memory(endpoint)
    pieces, own = plan_pieces(plan), set(pieces_from(plan, endpoint.rank))
    items = request.get("items")
    if not isinstance(items, list) or not 0 < len(items) <= MAX_PIECES_PER_REQUEST:
        raise ValueError(f"`items` must be a list of 1..{MAX_PIECES_PER_REQUEST} [layer, src_block, piece]")
    chunks, total = [], 0
    regions = endpoint.regions
    for item in items:
        if not isinstance(item, list) or len(item) != 3:
            raise ValueError(f"item {item!r} is not [layer, src_block, piece]")
        layer, block, index = _ints(item, "items[i]", 3)
        if index not in own:
            raise ValueError(f"item {item!r} does not name a piece this src rank serves to dst rank "
                             f"{request['dst_rank']}")
        if not 0 <= layer < regions.num_layers or not 0 <= block < regions.layers[layer].num_blocks:
            raise ValueError(f"item {item!r} names a page outside this endpoint's regions")
        piece = pieces[index]
        total += piece.nbytes
        chunks.append(memory.page(layer, block)[piece.src_offset: piece.src_offset + piece.nbytes].tobytes())
    return {"nbytes": total}, b"".join(chunks)


def integrity_handlers(endpoint: Any, count: Callable[[], None]) -> dict[str, Callable]:
    """The side channel handlers of integrity mode for a src `endpoint`; `count()` is
    called once per request received."""

    def digests(request: dict, payload: bytes, context: Any) -> tuple[dict, bytes]:
        count()
        return _digests(endpoint, request, context)

    def pieces(request: dict, payload: bytes, context: Any) -> tuple[dict, bytes]:
        count()
        return _pieces(endpoint, request, context)

    return {"digests": digests, "pieces": pieces}
