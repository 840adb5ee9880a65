"""Integrity digests: which bytes a dst rank reads, digests of them, and where a
corrupted byte is. Pure: numpy and hashlib, no NIXL.

A plan's reads can cross segment boundaries (`B|C|T0` is one read). Cut at the dst
page's segment boundaries they become `Piece`s: every piece lies inside one dst segment,
and the pieces of a plan tile the dst content `[0, dst_content_nbytes)` in dst order.
For a batch the digest is one 64-bit number per (layer, request, piece):

    digest = first 8 bytes of sha256(piece bytes), read as a little-endian uint64

The src side digests the bytes at `src_offset` of its own pages (`src_digests`), the
dst side the bytes at `dst_offset` of the pages it received (`dst_digests`); equal
arrays mean every byte read arrived as it was when the src digested it (a corrupted
piece passes with probability 2**-64). Padding and pages outside the batch are never
digested. Where a digest differs, `locate` compares the src's bytes of that piece with
the received ones and names each differing byte by request, layer, segment and offset.

Why sha256: on a CPU with SHA extensions (most x86 since 2019) hashlib's sha256 runs at
about 1-1.4 GB/s, against 0.5-0.8 GB/s for blake2b and 0.3 GB/s for a numpy weighted
byte sum (docs/reliability.md); per call it costs about 1 us, so small pieces are bound
by call count, not bytes. hashlib releases the GIL on buffers over 2 KiB, so batches of
at least 4 MiB in pieces of 64 KiB or more are digested on several threads.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from ..errors import BlockRangeError, PlanError
from ..layout._regions import RegionSet
from ..layout._layout import page_layout
from ..plan._plan import Plan


DIGEST_ALGORITHM = "sha256/64"
"""Name of the digest, as both sides state it on the wire."""
_THREADED_NBYTES = 4 << 20  # digest batches at least this large, of pieces at least
_THREADED_PIECE_NBYTES = 64 << 10  # this large on average, on several threads
_MAX_THREADS = 8


@dataclass(frozen=True, slots=True)
class Piece:
    """Bytes `[src_offset, src_offset + nbytes)` of src rank `src_rank`'s page that land
    at `[dst_offset, dst_offset + nbytes)` of the dst page, inside one dst segment.

    Attributes:
        segment: label of the dst segment (`"conv.B"`, `"conv.x[row 1]"`, `"temporal"`).
        segment_offset: `dst_offset` minus the segment's first byte.
    """

    src_rank: int
    src_offset: int
    dst_offset: int
    nbytes: int
    segment: str
    segment_offset: int


@lru_cache(maxsize=1024)
def plan_pieces(plan: Plan) -> tuple[Piece, ...]:
    """The plan's reads cut at dst segment boundaries, in ascending dst offset.

    Raises:
        PlanError: `plan` is not a Plan.
    """
    if not isinstance(plan, Plan):
        raise PlanError(f"plan must be a Plan (from plan_reads), got {type(plan).__name__}.")
    layout = page_layout(plan.spec, plan.dst_tp, plan.dst_rank)
    pieces = []
    for read in plan.reads:
        for segment in layout.segments_overlapping(read.dst_offset, read.nbytes):
            start = max(read.dst_offset, segment.offset)
            stop = min(read.dst_end, segment.end)
            shift = start - read.dst_offset
            pieces.append(Piece(read.src_rank, read.src_offset + shift, start, stop - start,
                                segment.label, start - segment.offset))
    return tuple(sorted(pieces, key=lambda p: p.dst_offset))


def pieces_from(plan: Plan, src_rank: int) -> tuple[int, ...]:
    """Indices into `plan_pieces(plan)` of the pieces read from `src_rank`, ascending."""
    return tuple(i for i, p in enumerate(plan_pieces(plan)) if p.src_rank == src_rank)


@dataclass(frozen=True, slots=True, eq=False)
class PageMemory:
    """One side's pages as bytes: `buffers[i]` is a 1-D uint8 array holding the
    `regions.buffers[i].nbytes` bytes at `regions.buffers[i].addr`.

    Raises:
        PlanError: not one uint8 array of the right size per buffer.
    """

    regions: RegionSet
    buffers: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.regions, RegionSet):
            raise PlanError(f"PageMemory.regions must be a RegionSet, got {type(self.regions).__name__}.")
        if len(self.buffers) != len(self.regions.buffers):
            raise PlanError(f"PageMemory has {len(self.buffers)} arrays for "
                            f"{len(self.regions.buffers)} buffers: pass one per buffer, in order.")
        for i, (array, buffer) in enumerate(zip(self.buffers, self.regions.buffers)):
            if (not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 1
                    or array.size != buffer.nbytes):
                raise PlanError(f"PageMemory.buffers[{i}] must be a 1-D uint8 array of "
                                f"{buffer.nbytes} bytes, got {getattr(array, 'dtype', type(array))} "
                                f"of shape {getattr(array, 'shape', '?')}.")

    def page(self, layer: int, block: int) -> np.ndarray:
        """The page of `block` in `layer`, a view of `page_nbytes` bytes (no range check)."""
        region = self.regions.layers[layer]
        buffer = self.regions.buffers[region.buffer]
        start = region.base_addr - buffer.addr + block * region.page_stride_nbytes
        return self.buffers[region.buffer][start: start + region.page_nbytes]


def _check_batch(memory: PageMemory, layers: object, blocks: object, side: str,
                 end_nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(memory, PageMemory):
        raise PlanError(f"memory must be a PageMemory, got {type(memory).__name__}.")
    layer_ids = np.asarray(layers, dtype=np.int64).reshape(-1)
    block_ids = np.asarray(blocks, dtype=np.int64).reshape(-1)
    regions = memory.regions
    for layer in layer_ids.tolist():
        if not 0 <= layer < regions.num_layers:
            raise BlockRangeError(f"Layer {layer} is out of range: the {side} side has "
                                  f"{regions.num_layers} layers.")
        region = regions.layers[layer]
        if block_ids.size and (block_ids.min() < 0 or block_ids.max() >= region.num_blocks):
            bad = int(block_ids.min() if block_ids.min() < 0 else block_ids.max())
            raise BlockRangeError(f"{side} block id {bad} is out of range for layer {layer}, "
                                  f"which has {region.num_blocks} blocks.")
        if region.page_nbytes < end_nbytes:
            raise PlanError(f"The {side} pages of layer {layer} are {region.page_nbytes} bytes, "
                            f"but the pieces reach byte {end_nbytes}.")
    return layer_ids, block_ids


def digest_bytes(data: np.ndarray) -> int:
    """The digest of a C-contiguous byte array (see the module docstring)."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


def digest_pages(memory: PageMemory, layers: object, blocks: object,
                 offsets: Sequence[int], lengths: Sequence[int], *, side: str = "page") -> np.ndarray:
    """Digests of byte ranges of many pages.

    Args:
        memory: the side's pages.
        layers: shape `(m,)` layer ids.
        blocks: shape `(N,)` block ids, one per request.
        offsets, lengths: shape `(k,)` byte ranges inside a page.
        side: name used in error messages.

    Returns:
        shape `(m, N, k)` uint64: the digest of range `j` of the page of `blocks[n]` in
        `layers[i]`.

    Raises:
        BlockRangeError: a layer or block id outside `memory`.
        PlanError: a range past the end of a page.
    """
    ends = [o + n for o, n in zip(offsets, lengths)]
    layer_ids, block_ids = _check_batch(memory, layers, blocks, side, max(ends, default=0))
    out = np.empty((layer_ids.size, block_ids.size, len(ends)), dtype=np.uint64)
    ranges = list(zip(offsets, ends))
    jobs = [(i, n, layer, block) for i, layer in enumerate(layer_ids.tolist())
            for n, block in enumerate(block_ids.tolist())]

    def run(chunk: list[tuple[int, int, int, int]]) -> None:
        for i, n, layer, block in chunk:
            page = memory.page(layer, block)
            out[i, n] = [digest_bytes(page[start:stop]) for start, stop in ranges]

    workers = min(os.cpu_count() or 1, _MAX_THREADS)
    big = len(jobs) * sum(lengths) >= _THREADED_NBYTES and sum(lengths) >= _THREADED_PIECE_NBYTES * len(ranges)
    if workers > 1 and len(jobs) > 1 and big:
        # hashlib releases the GIL on buffers over 2 KiB: large pieces hash in parallel
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, [jobs[k::workers] for k in range(workers)]))
    else:
        run(jobs)
    return out


def src_digests(plan: Plan, src_rank: int, memory: PageMemory, src_blocks: object,
                layers: object) -> np.ndarray:
    """What src rank `src_rank` says the dst rank of `plan` will receive from it: shape
    `(m, N, k_r)` uint64, one digest per (layer, request, piece of `pieces_from(plan,
    src_rank)`), computed over the src's own pages."""
    pieces = [plan_pieces(plan)[i] for i in pieces_from(plan, src_rank)]
    return digest_pages(memory, layers, src_blocks, [p.src_offset for p in pieces],
                        [p.nbytes for p in pieces], side=f"src rank {src_rank}")


def dst_digests(plan: Plan, memory: PageMemory, dst_blocks: object, layers: object) -> np.ndarray:
    """Digests of what the dst rank of `plan` received: shape `(m, N, k)` uint64, one per
    (layer, request, piece of `plan_pieces(plan)`)."""
    pieces = plan_pieces(plan)
    return digest_pages(memory, layers, dst_blocks, [p.dst_offset for p in pieces],
                        [p.nbytes for p in pieces], side="dst")


def merge_src_digests(plan: Plan, per_rank: dict[int, np.ndarray]) -> np.ndarray:
    """Put every src rank's `src_digests` in dst piece order: shape `(m, N, k)`.

    Raises:
        PlanError: a src rank of the plan is missing, or shapes do not agree.
    """
    pieces = plan_pieces(plan)
    out = None
    for rank in plan.src_ranks:
        digests = per_rank.get(rank)
        index = pieces_from(plan, rank)
        if not isinstance(digests, np.ndarray) or digests.ndim != 3 or digests.shape[2] != len(index):
            raise PlanError(f"Digests of src rank {rank} must have shape (m, N, {len(index)}), "
                            f"got {getattr(digests, 'shape', digests)!r}.")
        if out is None:
            out = np.zeros(digests.shape[:2] + (len(pieces),), dtype=np.uint64)
        if digests.shape[:2] != out.shape[:2]:
            raise PlanError(f"Digests of src rank {rank} cover {digests.shape[:2]} (layers, "
                            f"requests), others {out.shape[:2]}.")
        out[:, :, list(index)] = digests
    if out is None:
        raise PlanError("The plan reads from no src rank.")
    return out


def mismatches(expected: np.ndarray, received: np.ndarray) -> np.ndarray:
    """Shape `(n, 3)` int64 `(layer index, request index, piece index)` where two digest
    arrays of equal shape differ, in that order."""
    if expected.shape != received.shape:
        raise PlanError(f"Digest arrays differ in shape: {expected.shape} and {received.shape}.")
    return np.argwhere(expected != received).astype(np.int64)


@dataclass(frozen=True, slots=True)
class Corruption:
    """A byte (or, when the src's bytes are unknown, a piece) that did not arrive intact.

    Attributes:
        request: the request id.
        layer: the layer id.
        segment: label of the dst segment.
        page_offset: byte offset in the dst page (the piece's first byte if not located).
        segment_offset: the same offset counted from the segment's first byte.
        nbytes: 1 for a located byte; the piece's length when not located.
        src_rank, src_block, dst_block: where the byte was read from and went.
        expected, received: the byte values (0..255), None when not located.
    """

    request: str
    layer: int
    segment: str
    page_offset: int
    segment_offset: int
    nbytes: int
    src_rank: int
    src_block: int
    dst_block: int
    expected: int | None = None
    received: int | None = None

    @property
    def located(self) -> bool:
        return self.expected is not None

    def __str__(self) -> str:
        where = (f"request {self.request!r} layer {self.layer} {self.segment} byte "
                 f"{self.segment_offset} (page offset {self.page_offset}, dst block "
                 f"{self.dst_block}, from src rank {self.src_rank} block {self.src_block})")
        if self.located:
            return f"{where}: expected {self.expected:#04x}, received {self.received:#04x}"
        return f"{where}: {self.nbytes} bytes whose src copy changed; not located"


def locate(plan: Plan, piece_index: int, *, request: str, layer: int, src_block: int,
           dst_block: int, expected: np.ndarray | None, received: np.ndarray,
           limit: int = 64) -> tuple[Corruption, ...]:
    """The corrupted bytes of one piece of one (request, layer).

    Args:
        plan, piece_index: the piece (`plan_pieces(plan)[piece_index]`).
        request, layer, src_block, dst_block: what the piece belongs to (for the report).
        expected: the src's bytes of the piece (1-D uint8, `piece.nbytes` long), or None
            when they are not known; then one unlocated `Corruption` covers the piece.
        received: the dst's bytes of the piece.
        limit: report at most this many bytes (the first ones).

    Returns:
        One `Corruption` per differing byte, by offset (at most `limit`); empty when the
        bytes are equal.
    """
    piece = plan_pieces(plan)[piece_index]
    received = np.asarray(received, dtype=np.uint8).reshape(-1)
    if received.size != piece.nbytes or (expected is not None and np.asarray(expected).size != piece.nbytes):
        raise PlanError(f"locate: piece {piece_index} has {piece.nbytes} bytes, got "
                        f"{received.size} received and "
                        f"{None if expected is None else np.asarray(expected).size} expected.")
    common = dict(request=request, layer=layer, segment=piece.segment, src_rank=piece.src_rank,
                  src_block=src_block, dst_block=dst_block)
    if expected is None:
        return (Corruption(page_offset=piece.dst_offset, segment_offset=piece.segment_offset,
                           nbytes=piece.nbytes, **common),)
    expected = np.asarray(expected, dtype=np.uint8).reshape(-1)
    where = np.flatnonzero(expected != received)[:limit]
    return tuple(Corruption(page_offset=piece.dst_offset + int(j),
                            segment_offset=piece.segment_offset + int(j), nbytes=1,
                            expected=int(expected[j]), received=int(received[j]), **common)
                 for j in where)
