"""Prepared-once descriptor tables, and the index arrays of a batch (vectorized numpy).

NIXL's prepared path lets a reader prepare each side's descriptor list once per peer and
then, per transfer, pass only two index arrays to `make_prepped_xfer`. For one dst
rank's plan and one src rank it reads from, `prepare_tables` lays out every descriptor
the plan can ever need between the two sides' regions:

    descriptor (layer l, read j, block b)
        src: src page of (l, b) + src_offset[j], nbytes[j]
        dst: dst page of (l, b) + dst_offset[j], nbytes[j]

where the reads are the plan's reads from that src rank, merged inside a page. Each side
is a `DescriptorTable` in NIXL's Nx5 strided form `(addr, nbytes, device_id, stride,
count)`: one row per (layer, read), `count` = the layer's block count, `stride` = its
page stride. Descriptor (l, j, b) has the flat index `row_start[l, j] + b`.

`index_batch` turns a batch of `(src_block, dst_block)` pairs into, per src rank, the dst
and src index arrays, ordered by (layer, read, ascending dst block). NIXL merges
consecutive index pairs inside one row when the row is dense (`nbytes == stride`) on both
sides, so a whole-page read (equal TP, pages without padding) of blocks consecutive on
both sides becomes one descriptor per layer. Nothing merges across rows: unlike
`expand_plan`, block-major layouts keep one descriptor per (layer, block).

Example: 2 layers, 3 blocks per side, the plan reads `a` and `b` from this src rank::

    row (layer, read)   flat indices          pairs (2 -> 0), (0 -> 1):
    (0, a)              0  1  2                 dst indices [0, 1, 3, 4, 6, 7, 9, 10]
    (0, b)              3  4  5                 src indices [2, 0, 5, 3, 8, 6, 11, 9]
    (1, a)              6  7  8
    (1, b)              9 10 11             (the same rows on both sides; strides differ)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import PlanError
from ._expand import RankedBatch, check_batch, check_dst_overlap, check_pages, merged_reads
from ..plan._plan import Plan
from ..layout._regions import RegionSet

__all__ = ["DescriptorTable", "RankTables", "RankIndices", "IndexedBatch", "prepare_tables",
           "index_batch"]

_U64 = np.uint64
MAX_DESCRIPTORS = (1 << 31) - 1
"""NIXL takes int32 indices: a table holds at most this many descriptors."""


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


@dataclass(frozen=True, slots=True, eq=False)
class DescriptorTable:
    """Every descriptor of one side, as NIXL's Nx5 strided rows.

    Attributes:
        rows: shape `(num_layers * k, 5)` uint64 `(addr, nbytes, device_id, stride,
            count)`, one row per (layer, read) in that order; read-only.
        row_start: shape `(num_layers, k)` int64, the flat index of block 0 of each row.
    """

    rows: np.ndarray
    row_start: np.ndarray

    @property
    def num_descriptors(self) -> int:
        return int(self.rows[:, 4].sum())

    @property
    def dense(self) -> np.ndarray:
        """Shape `(num_layers, k)` bool: the row's descriptors are back to back
        (`nbytes == stride`), so NIXL can merge consecutive indices in it."""
        return (self.rows[:, 1] == self.rows[:, 3]).reshape(self.row_start.shape)

    def descriptors(self) -> np.ndarray:
        """The same descriptors as `(M, 3)` uint64 rows `(addr, nbytes, device_id)` in
        flat-index order (NIXL's Nx3 form)."""
        counts = self.rows[:, 4].astype(np.int64)
        first = self.row_start.ravel()
        step = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first, counts)
        out = np.empty((int(counts.sum()), 3), dtype=_U64)
        out[:, 0] = np.repeat(self.rows[:, 0], counts) + step.astype(_U64) * np.repeat(self.rows[:, 3], counts)
        out[:, 1] = np.repeat(self.rows[:, 1], counts)
        out[:, 2] = np.repeat(self.rows[:, 2], counts)
        return out


@dataclass(frozen=True, slots=True, eq=False)
class RankTables:
    """The prepared-once tables of one src rank for one dst rank's plan.

    Attributes:
        plan: the dst rank's plan.
        src_rank: the src rank read from.
        src_regions, dst_regions: the memory the tables describe.
        src_table, dst_table: the remote (src) and local (dst) descriptors; row `r` of
            one pairs with row `r` of the other and has the same `nbytes`.
        num_plan_reads: the plan's reads from `src_rank` per page, before merging.
    """

    plan: Plan
    src_rank: int
    src_regions: RegionSet
    dst_regions: RegionSet
    src_table: DescriptorTable
    dst_table: DescriptorTable
    num_plan_reads: int

    @property
    def page_nbytes(self) -> int:
        """Bytes read from `src_rank` per (layer, request)."""
        k = self.src_table.row_start.shape[1]
        return int(self.src_table.rows[:k, 1].sum()) if k else 0


def _table(regions: RegionSet, num_layers: int, offsets: np.ndarray, lengths: np.ndarray) -> DescriptorTable:
    cols = regions.columns()
    k = offsets.size
    count = np.repeat(cols["num_blocks"][:num_layers], k)
    stride = np.repeat(cols["page_stride_nbytes"][:num_layers], k)
    rows = np.empty((num_layers * k, 5), dtype=_U64)
    rows[:, 0] = (cols["base_addr"][:num_layers, None] + offsets[None, :]).ravel()
    rows[:, 1] = np.tile(lengths, num_layers)
    rows[:, 2] = np.repeat(cols["device_id"][:num_layers], k)
    rows[:, 3] = np.where(count > 1, stride, rows[:, 1])  # one block: no stride to speak of
    rows[:, 4] = count
    total = int(count.sum())
    if total > MAX_DESCRIPTORS:
        raise PlanError(f"The prepared table would hold {total} descriptors, more than NIXL's "
                        f"int32 indices reach ({MAX_DESCRIPTORS}). Use per-batch lists "
                        f"(Reader(..., prepare=\"per-batch\")) or fewer blocks per region.")
    start = np.concatenate([[0], np.cumsum(count.astype(np.int64))[:-1]]).reshape(num_layers, k)
    return DescriptorTable(_read_only(rows), _read_only(start))


def prepare_tables(plan: Plan, src_rank: int, src_regions: RegionSet,
                   dst_regions: RegionSet) -> RankTables:
    """Every descriptor of `plan`'s reads from `src_rank`, for every layer both sides
    registered and every block, as one Nx5 table per side (module docstring).

    Args:
        plan: the dst rank's plan (`plan_reads`).
        src_rank: a src rank the plan reads from.
        src_regions: that src rank's memory.
        dst_regions: the dst rank's memory.

    Returns:
        `RankTables`; sizes: `num_layers * k` rows per side, where `k` is the number of
        the plan's reads from `src_rank` once merged inside a page.

    Raises:
        PlanError: `src_rank` is not read from, pages smaller than the plan's content,
            dst pages that overlap, or more descriptors than NIXL's int32 indices reach.

    Example: qwen3.5-27b 1 -> 2, dst rank 0, 48 layers, 512 blocks per side: 4 reads per
    page, so 192 rows per side standing for 98 304 descriptors.
    """
    if not isinstance(plan, Plan):
        raise PlanError(f"plan must be a Plan (from plan_reads), got {type(plan).__name__}.")
    if src_rank not in plan.src_ranks:
        raise PlanError(f"The plan reads nothing from src rank {src_rank}; it reads from "
                        f"{list(plan.src_ranks)}.")
    for name, regions in (("src_regions", src_regions), ("dst_regions", dst_regions)):
        if not isinstance(regions, RegionSet):
            raise PlanError(f"{name} must be a RegionSet, got {type(regions).__name__}.")
    num_layers = min(src_regions.num_layers, dst_regions.num_layers)
    layer_ids = np.arange(num_layers, dtype=np.int64)
    check_pages("dst", dst_regions, layer_ids, plan.dst_content_nbytes)
    check_pages(f"src rank {src_rank}", src_regions, layer_ids, plan.src_content_nbytes)
    src_off, dst_off, lengths = merged_reads(plan, src_rank)
    src_table = _table(src_regions, num_layers, src_off, lengths)
    dst_table = _table(dst_regions, num_layers, dst_off, lengths)
    num_blocks = dst_regions.columns()["num_blocks"][:num_layers].astype(np.int64)
    first_block = np.repeat(np.cumsum(num_blocks) - num_blocks, num_blocks)
    check_dst_overlap(dst_regions, np.repeat(layer_ids, num_blocks),
                      np.arange(int(num_blocks.sum()), dtype=np.int64) - first_block)
    return RankTables(plan, src_rank, src_regions, dst_regions, src_table, dst_table,
                      len(plan.reads_from(src_rank)))


@dataclass(frozen=True, slots=True, eq=False)
class RankIndices:
    """The indices of one src rank's READ into its prepared tables.

    Attributes:
        src_rank: the src rank read from.
        dst_indices, src_indices: shape `(M,)` int32, pairwise: descriptor
            `dst_indices[i]` of the dst table receives descriptor `src_indices[i]` of the
            src table; ordered by (layer, read, ascending dst block); read-only.
        num_reads: plan reads x layers x requests, before merging.
        num_descriptors: descriptors once NIXL merged consecutive dense indices.
        nbytes: bytes moved.
    """

    src_rank: int
    dst_indices: np.ndarray
    src_indices: np.ndarray
    num_reads: int
    num_descriptors: int
    nbytes: int


@dataclass(frozen=True, slots=True, eq=False)
class IndexedBatch(RankedBatch):
    """A batch as indices into prepared tables (`index_batch`): `ranks` holds one
    `RankIndices` per src rank, by ascending src rank."""


def _indices(table: DescriptorTable, layer_ids: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    flat = table.row_start[layer_ids][:, :, None] + blocks[None, None, :]
    return _read_only(flat.astype(np.int32).ravel())


def index_batch(tables: Sequence[RankTables], block_pairs: object, *,
                layers: object = None) -> IndexedBatch:
    """The index arrays of a batch, per src rank, into tables from `prepare_tables`.

    Args:
        tables: one `RankTables` per src rank of the plan, all for the same plan and
            dst regions.
        block_pairs: shape `(N, 2)` integers `(src_block, dst_block)`, one row per
            request; dst blocks distinct, in any order.
        layers: layer ids to move (default: every layer all sides registered).

    Returns:
        An `IndexedBatch`; the same bytes move as with `expand_plan` on the same inputs.

    Raises:
        BlockRangeError, PlanError: as `expand_plan`; also `PlanError` for tables of
            different plans or dst regions, or a src rank of the plan without a table.
    """
    tables = tuple(tables)
    if not tables or not all(isinstance(t, RankTables) for t in tables):
        raise PlanError("tables must be a non-empty sequence of RankTables (prepare_tables).")
    plan, dst_regions = tables[0].plan, tables[0].dst_regions
    if any(t.plan != plan or t.dst_regions != dst_regions for t in tables):
        raise PlanError("All tables must be prepared for one plan and one dst RegionSet.")
    by_rank = {t.src_rank: t for t in tables}
    missing = [r for r in plan.src_ranks if r not in by_rank]
    if missing:
        raise PlanError(f"The plan reads from src rank {missing[0]}, but no tables were given "
                        f"for it (given: {sorted(by_rank)}). Prepare tables for every src rank.")
    src_map = {r: by_rank[r].src_regions for r in plan.src_ranks}
    pairs, layer_ids = check_batch(plan, src_map, dst_regions, block_pairs, layers)
    num_pages = layer_ids.size * pairs.shape[0]
    # consecutive on both sides: NIXL merges such neighbours inside a dense row
    follows = (pairs[1:, 0] == pairs[:-1, 0] + 1) & (pairs[1:, 1] == pairs[:-1, 1] + 1)
    ranks = []
    for src_rank in plan.src_ranks:
        t = by_rank[src_rank]
        k = t.dst_table.row_start.shape[1]
        dense = (t.dst_table.dense & t.src_table.dense)[layer_ids]
        merged = int(dense.sum()) * int(follows.sum())
        ranks.append(RankIndices(src_rank, _indices(t.dst_table, layer_ids, pairs[:, 1]),
                                 _indices(t.src_table, layer_ids, pairs[:, 0]),
                                 t.num_plan_reads * num_pages, k * num_pages - merged,
                                 t.page_nbytes * num_pages))
    return IndexedBatch(plan, pairs, layer_ids, tuple(ranks))
