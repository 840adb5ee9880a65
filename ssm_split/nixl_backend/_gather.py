"""GPU gather: copy many byte ranges between device buffers in one kernel launch.

The staged strategy (`ssm_split.strategies`) READs a superset span of each src page into a
staging buffer with one NIXL descriptor, then moves the bytes the dst page needs out of
staging. The pure core lists those moves as absolute `(src_addr, dst_addr, nbytes)`
rows; this module only executes them:

- `GatherTable.build(src_addrs, dst_addrs, nbytes, anchor=tensor)` splits every move into
  chunks of at most `chunk_nbytes`, picks the widest word (4, 2 or 1 bytes) that divides
  every address and length, and keeps three int64 device arrays of word offsets relative
  to `anchor` (any CUDA tensor of the process; offsets may be negative);
- `run_gather(table)` launches one Triton program per chunk. With every address and
  length a multiple of 16 bytes, loads and stores are 16 bytes wide.

Build the table once per batch (it depends on block ids) and launch it after the READs
complete; `run_gather` allocates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["GatherTable", "run_gather", "DEFAULT_CHUNK_NBYTES", "PagedTable", "run_paged"]

DEFAULT_CHUNK_NBYTES = 64 << 10
"""Bytes one program copies at most (a balance of per-program work and parallelism)."""

_BLOCK = 4096  # words per loop iteration of one program


def _chunk(src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray, chunk: int):
    """Split rows longer than `chunk` bytes into `chunk`-sized pieces (vectorized)."""
    pieces = (nbytes + chunk - 1) // chunk
    pieces = np.maximum(pieces, 1)
    row = np.repeat(np.arange(nbytes.size), pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    k = np.arange(row.size) - first
    start = k * chunk
    length = np.minimum(nbytes[row] - start, chunk)
    return src[row] + start, dst[row] + start, length


@dataclass(frozen=True, slots=True, eq=False)
class GatherTable:
    """Chunked moves ready for `run_gather`.

    Attributes:
        anchor: the tensor whose address the offsets are relative to (viewed as words).
        src_words, dst_words, len_words: int64 CUDA tensors of shape `(chunks,)`.
        word_nbytes: 4, 2 or 1.
        align_words: every offset and length is a multiple of this (4 when 16-byte
            aligned, for wide loads; else 1).
        num_moves, nbytes: moves before chunking, and bytes moved.
    """

    anchor: object
    src_words: object
    dst_words: object
    len_words: object
    word_nbytes: int
    align_words: int
    num_moves: int
    nbytes: int

    @property
    def num_chunks(self) -> int:
        return int(self.len_words.shape[0])

    @classmethod
    def build(cls, src_addrs, dst_addrs, nbytes, *, anchor, chunk_nbytes: int = DEFAULT_CHUNK_NBYTES) -> "GatherTable":
        """A table moving `nbytes[i]` bytes from `src_addrs[i]` to `dst_addrs[i]`.

        Args:
            src_addrs, dst_addrs, nbytes: 1-D integer arrays of equal length (absolute
                device addresses in this process, and byte counts > 0).
            anchor: a CUDA tensor of this process; every address must be reachable from
                it (any allocation on the same device is).
            chunk_nbytes: the most bytes one program copies (a multiple of 16).
        """
        import torch

        src = np.asarray(src_addrs, dtype=np.int64).ravel()
        dst = np.asarray(dst_addrs, dtype=np.int64).ravel()
        lengths = np.asarray(nbytes, dtype=np.int64).ravel()
        if not (src.size == dst.size == lengths.size):
            raise ValueError(f"GatherTable.build: src_addrs, dst_addrs and nbytes must have the same "
                             f"length, got {src.size}, {dst.size}, {lengths.size}.")
        if lengths.size and int(lengths.min()) <= 0:
            raise ValueError("GatherTable.build: every move must have nbytes > 0.")
        base = int(anchor.data_ptr())
        rel_src, rel_dst = src - base, dst - base
        both = np.bitwise_or.reduce(np.concatenate([rel_src, rel_dst, lengths, [chunk_nbytes]])) if lengths.size else 16
        word = 4 if both % 4 == 0 else 2 if both % 2 == 0 else 1
        align = 16 // word if both % 16 == 0 else 1
        s, d, n = _chunk(rel_src, rel_dst, lengths, int(chunk_nbytes))
        dtype = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[word]
        dev = anchor.device
        as_dev = lambda a: torch.from_numpy(np.ascontiguousarray(a // word)).to(dev)  # noqa: E731
        return cls(anchor.view(dtype) if anchor.dtype != dtype else anchor,
                   as_dev(s), as_dev(d), as_dev(n), word, align, int(lengths.size), int(lengths.sum()))


_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def gather_kernel(anchor, src_ptr, dst_ptr, len_ptr, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
        pid = tl.program_id(0)
        s = tl.multiple_of(tl.load(src_ptr + pid), ALIGN)
        d = tl.multiple_of(tl.load(dst_ptr + pid), ALIGN)
        n = tl.multiple_of(tl.load(len_ptr + pid), ALIGN)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            v = tl.load(anchor + s + offs, mask=mask)
            tl.store(anchor + d + offs, v, mask=mask)

    _KERNEL = gather_kernel
    return _KERNEL


def run_gather(table: GatherTable, stream=None, *, block: int = _BLOCK, num_warps: int = 16) -> None:
    """Launch the copies of `table` on the current (or given) CUDA stream; returns at once.

    `block` (words per loop step) and `num_warps` are tuning knobs (see
    `benchmarks/tune_gather.py`)."""
    if table.num_chunks == 0:
        return
    import torch

    kernel = _kernel()
    ctx = torch.cuda.stream(stream) if stream is not None else _null()
    with torch.cuda.device(table.anchor.device), ctx:
        kernel[(table.num_chunks,)](table.anchor, table.src_words, table.dst_words, table.len_words,
                                  BLOCK=block, ALIGN=table.align_words, num_warps=num_warps)


@dataclass(frozen=True, slots=True, eq=False)
class PagedTable:
    """A `PagedCopies` on the GPU, in words relative to `anchor` (see `build`).

    Attributes:
        anchor: a tensor of this process viewed as words of `word_nbytes`.
        tables: one int64 CUDA tensor: src layers `(R, m, 2)`, dst layers `(m, 2)`, pairs
            `(N, 2)` and pieces `(k, 4)`, flattened one after the other; bases are word
            offsets from `anchor`, strides, offsets and lengths are in words.
        num_layers, num_requests, num_pieces: `m`, `N`, `k`.
        word_nbytes, align_words: as `GatherTable`.
    """

    anchor: object
    tables: object
    num_layers: int
    num_requests: int
    num_pieces: int
    num_src_ranks: int
    word_nbytes: int
    align_words: int

    @classmethod
    def build(cls, paged, *, anchor) -> "PagedTable":
        """Upload `paged` (a `ssm_split.strategies.PagedCopies`) for `run_paged`."""
        import torch

        src, dst = paged.src_layers.copy(), paged.dst_layers.copy()
        base = int(anchor.data_ptr())
        src[..., 0] -= base
        dst[:, 0] -= base
        pieces = paged.pieces
        both = int(np.bitwise_or.reduce(np.concatenate(
            [src.ravel(), dst.ravel(), pieces[:, 1:].ravel(), [16]]))) if pieces.size else 16
        word = 4 if both % 4 == 0 else 2 if both % 2 == 0 else 1
        align = 16 // word if both % 16 == 0 else 1
        words = pieces.copy()
        words[:, 1:] //= word
        flat = np.concatenate([(src // word).ravel(), (dst // word).ravel(), paged.pairs.ravel(), words.ravel()])
        dtype = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[word]
        tables = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.int64)).to(anchor.device)
        return cls(anchor.view(dtype) if anchor.dtype != dtype else anchor, tables, int(dst.shape[0]),
                   int(paged.pairs.shape[0]), int(pieces.shape[0]), int(src.shape[0]), word, align)


_PAGED_KERNEL = None


def _paged_kernel():
    global _PAGED_KERNEL
    if _PAGED_KERNEL is not None:
        return _PAGED_KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def paged_kernel(anchor, tables, num_src, L, N, K, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
        pid = tl.program_id(0)
        j = pid % K
        n = (pid // K) % N
        layer = pid // (K * N)
        dst_layers = tables + num_src * L * 2
        pairs = dst_layers + L * 2
        pieces = pairs + N * 2
        rank = tl.load(pieces + j * 4)
        src_off = tl.load(pieces + j * 4 + 1)
        dst_off = tl.load(pieces + j * 4 + 2)
        count = tl.load(pieces + j * 4 + 3)
        src_block = tl.load(pairs + n * 2)
        dst_block = tl.load(pairs + n * 2 + 1)
        src_row = (rank * L + layer) * 2
        s = tl.load(tables + src_row) + src_block * tl.load(tables + src_row + 1) + src_off
        d = tl.load(dst_layers + layer * 2) + dst_block * tl.load(dst_layers + layer * 2 + 1) + dst_off
        s = tl.multiple_of(s, ALIGN)
        d = tl.multiple_of(d, ALIGN)
        for start in range(0, count, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < count
            tl.store(anchor + d + offs, tl.load(anchor + s + offs, mask=mask), mask=mask)

    _PAGED_KERNEL = paged_kernel
    return _PAGED_KERNEL


def run_paged(table: PagedTable, stream=None, *, block: int = _BLOCK, num_warps: int = 8) -> None:
    """Launch one program per (layer, request, piece) of `table` on the current (or
    given) CUDA stream; returns at once."""
    programs = table.num_layers * table.num_requests * table.num_pieces
    if programs == 0:
        return
    import torch

    kernel = _paged_kernel()
    with torch.cuda.device(table.anchor.device), (torch.cuda.stream(stream) if stream is not None else _null()):
        kernel[(programs,)](table.anchor, table.tables, table.num_src_ranks, table.num_layers, table.num_requests,
                            table.num_pieces, BLOCK=block, ALIGN=table.align_words, num_warps=num_warps)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
