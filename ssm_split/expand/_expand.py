"""Plans -> NIXL descriptor arrays for a batch of requests (vectorized numpy).

A `Plan` says which byte ranges of a page a dst rank reads from each src rank. To move a
batch of requests, every read is repeated for every (layer, request) and turned into
absolute addresses on both sides. Each side describes its memory as a `RegionSet`: per
layer, where the page of block `b` lives (`base_addr + b * page_stride_nbytes`), how long
a page is, and which registered buffer holds it. The two sides may pad and stride their
pages differently.

`expand_plan` builds, for every src rank the plan reads from, two `(M, 3)` uint64 arrays
`(addr, nbytes, device_id)`: the dst (local) and src (remote) descriptors, ready for
NIXL's `get_xfer_descs` / `prep_xfer_dlist`. Descriptors are emitted in ascending dst
address order, and runs that are contiguous on both sides inside one registered buffer
are merged into one: across adjacent segments, consecutive blocks and adjacent layers.
There is no Python loop per block or per layer.

Example, equal TP, pages without padding, one buffer per layer (vLLM's layout)::

    layer 0 pages   | b0 | b1 | b2 | b3 |        pairs (src 1 -> dst 2), (src 2 -> dst 3)
    src  b1 b2  ->  dst b2 b3 : contiguous on both sides -> one descriptor per layer

With the block-major layout (`RegionSet.packed(..., order="block")`, all layers of one
block next to each other) the same batch merges across layers too: one descriptor per
block pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import numpy as np

from ..errors import BlockRangeError, PlanError
from ..plan._plan import Plan
from ..layout._regions import Buffer, LayerRegion, RegionSet

__all__ = ["Buffer", "LayerRegion", "RegionSet", "RankDescriptors", "RankedBatch", "Expansion",
           "check_batch", "expand_plan"]

_U64 = np.uint64


@dataclass(frozen=True, slots=True, eq=False)
class RankDescriptors:
    """The descriptors of one src rank's READ.

    Attributes:
        src_rank: the src rank read from.
        dst_descs: shape `(M, 3)` uint64 `(addr, nbytes, device_id)`, local (dst) side,
            in ascending address order; read-only.
        src_descs: shape `(M, 3)` uint64, remote (src) side; row `i` pairs with
            `dst_descs[i]` and has the same `nbytes`; read-only.
        num_reads: plan reads x layers x requests, before merging.
    """

    src_rank: int
    dst_descs: np.ndarray
    src_descs: np.ndarray
    num_reads: int

    @property
    def num_descriptors(self) -> int:
        return int(self.dst_descs.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.dst_descs[:, 1].sum())


@dataclass(frozen=True, slots=True, eq=False)
class RankedBatch:
    """A batch's per-src-rank parts, however they are posted (`Expansion`: descriptors;
    `ssm_split.IndexedBatch`: indices into prepared tables).

    Attributes:
        plan: the dst rank's plan.
        block_pairs: shape `(N, 2)` int64 `(src_block, dst_block)`, sorted by dst block.
        layers: shape `(m,)` int64, the layers moved.
        ranks: by ascending src rank; each has `src_rank`, `num_reads` (plan reads x layers
            x requests, before merging), `num_descriptors` and `nbytes`.
    """

    plan: Plan
    block_pairs: np.ndarray
    layers: np.ndarray
    ranks: tuple

    @property
    def num_reads(self) -> int:
        return sum(r.num_reads for r in self.ranks)

    @property
    def num_descriptors(self) -> int:
        return sum(r.num_descriptors for r in self.ranks)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.ranks)

    def for_rank(self, src_rank: int):
        for r in self.ranks:
            if r.src_rank == src_rank:
                return r
        raise PlanError(f"The plan reads nothing from src rank {src_rank}; it reads from "
                        f"{[r.src_rank for r in self.ranks]}.")


@dataclass(frozen=True, slots=True, eq=False)
class Expansion(RankedBatch):
    """A plan expanded over a batch (`expand_plan`): `ranks` holds one `RankDescriptors`
    per src rank read from (a src rank the plan does not read from is absent)."""


SrcRegions = Union[Mapping[int, RegionSet], Sequence[RegionSet]]


def _src_region_map(plan: Plan, src_regions: SrcRegions) -> dict[int, RegionSet]:
    mapping = dict(src_regions) if isinstance(src_regions, Mapping) else dict(enumerate(src_regions))
    for rank in plan.src_ranks:
        if not isinstance(mapping.get(rank), RegionSet):
            raise PlanError(
                f"The plan reads from src rank {rank}, but no RegionSet was given for it "
                f"(given: {sorted(mapping)}). Pass one RegionSet per src rank."
            )
    return mapping


def _check_pairs(block_pairs: object) -> np.ndarray:
    pairs = np.asarray(block_pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or not np.issubdtype(pairs.dtype, np.integer):
        raise PlanError(
            f"block_pairs must be an integer array of shape (N, 2) of (src_block, dst_block), "
            f"got dtype {pairs.dtype} and shape {pairs.shape}."
        )
    return pairs.astype(np.int64, copy=False)


def _check_layers(layers: object, sides: list[tuple[str, RegionSet]]) -> np.ndarray:
    num_layers = min(regions.num_layers for _, regions in sides)
    if layers is None:
        return np.arange(num_layers, dtype=np.int64)
    ids = np.asarray(layers)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise PlanError(f"layers must be a 1-D sequence of ints, got {layers!r}.")
    ids = ids.astype(np.int64, copy=False)
    for side, regions in sides:
        bad = ids[(ids < 0) | (ids >= regions.num_layers)]
        if bad.size:
            raise BlockRangeError(
                f"Layer {int(bad[0])} is out of range: the {side} side registered "
                f"{regions.num_layers} layers (0..{regions.num_layers - 1})."
            )
    if np.unique(ids).size != ids.size:
        raise PlanError(f"layers must not repeat a layer, got {ids.tolist()}.")
    return ids


def _check_side(side: str, cols: dict[str, np.ndarray], layer_ids: np.ndarray,
                blocks: np.ndarray, content_nbytes: int) -> None:
    small = layer_ids[cols["page_nbytes"][layer_ids] < content_nbytes]
    if small.size:
        layer = int(small[0])
        raise PlanError(
            f"The {side} pages of layer {layer} are {int(cols['page_nbytes'][layer])} bytes, "
            f"smaller than the plan's {side} content of {content_nbytes} bytes. Register "
            f"pages of at least that size (a different spec or TP size?)."
        )
    if blocks.size == 0 or layer_ids.size == 0:
        return
    num_blocks = cols["num_blocks"][layer_ids].astype(np.int64)
    fewest = int(np.argmin(num_blocks))
    low, high = int(blocks.min()), int(blocks.max())
    if low < 0 or high >= int(num_blocks[fewest]):
        layer = int(layer_ids[fewest])
        count = int(num_blocks[fewest])
        raise BlockRangeError(
            f"{side} block id {low if low < 0 else high} is out of range for layer {layer}, "
            f"which has {count} blocks (ids 0..{count - 1}). Use block ids of pages that "
            f"the {side} side registered."
        )


def check_batch(plan: Plan, src_regions: SrcRegions, dst_regions: RegionSet, block_pairs: object,
                layers: object = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate a batch for `plan` between these regions (shared by `expand_plan` and the
    prepared-once path, `ssm_split.expand`).

    Returns:
        `(pairs, layer_ids)`: the pairs as a read-only `(N, 2)` int64 array sorted by dst
        block, and the layers to move as a read-only `(m,)` int64 array.

    Raises:
        BlockRangeError: a block id or layer lies outside a side's registered regions.
        PlanError: malformed arguments, a page smaller than the plan's content, a
            repeated dst block, or src regions missing for a rank the plan reads from.
    """
    if not isinstance(plan, Plan):
        raise PlanError(f"plan must be a Plan (from plan_reads), got {type(plan).__name__}.")
    if not isinstance(dst_regions, RegionSet):
        raise PlanError(f"dst_regions must be a RegionSet, got {type(dst_regions).__name__}.")
    src_map = _src_region_map(plan, src_regions)
    pairs = _check_pairs(block_pairs)
    sides = [("dst", dst_regions)] + [(f"src rank {r}", src_map[r]) for r in plan.src_ranks]
    layer_ids = _check_layers(layers, sides)
    _check_side("dst", dst_regions.columns(), layer_ids, pairs[:, 1], plan.dst_content_nbytes)
    for src_rank in plan.src_ranks:
        _check_side(f"src rank {src_rank}", src_map[src_rank].columns(), layer_ids, pairs[:, 0],
                    plan.src_content_nbytes)
    pairs = pairs[np.argsort(pairs[:, 1], kind="stable")]
    if pairs.shape[0] > 1 and bool(np.any(pairs[1:, 1] == pairs[:-1, 1])):
        dup = int(pairs[1:, 1][pairs[1:, 1] == pairs[:-1, 1]][0])
        raise PlanError(f"dst block {dup} appears twice in block_pairs: each request needs "
                        f"its own dst block.")
    pairs.flags.writeable = False
    layer_ids.flags.writeable = False
    return pairs, layer_ids


def _page_order(dst_grid: np.ndarray) -> tuple[str, np.ndarray | None]:
    """How to walk the `(m, N)` grid of dst page addresses in ascending order."""
    flat = dst_grid.ravel()
    if flat.size < 2 or bool(np.all(flat[1:] > flat[:-1])):
        return "layer", None
    flat_t = dst_grid.T.ravel()
    if bool(np.all(flat_t[1:] > flat_t[:-1])):
        return "block", None
    return "sorted", np.argsort(flat, kind="stable")


def _walk(grid: np.ndarray, order: str, perm: np.ndarray | None) -> np.ndarray:
    if order == "layer":
        return grid.ravel()
    if order == "block":
        return grid.T.ravel()
    return grid.ravel()[perm]


def _grid(cols: dict[str, np.ndarray], layer_ids: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    base = cols["base_addr"][layer_ids][:, None]
    stride = cols["page_stride_nbytes"][layer_ids][:, None]
    return base + stride * blocks.astype(_U64)[None, :]


def _check_dst_overlap(dst_pages: np.ndarray, dst_page_nbytes: np.ndarray) -> None:
    if dst_pages.size > 1:
        clash = np.flatnonzero(dst_pages[:-1] + dst_page_nbytes[:-1] > dst_pages[1:])
        if clash.size:
            i = int(clash[0])
            raise PlanError(
                f"dst pages at {int(dst_pages[i]):#x} ({int(dst_page_nbytes[i])} bytes) and "
                f"{int(dst_pages[i + 1]):#x} overlap: the dst RegionSet places two (layer, "
                f"block) pages on the same bytes. Give every layer its own memory."
            )


def check_pages(side: str, regions: RegionSet, layer_ids: np.ndarray, content_nbytes: int) -> None:
    """`PlanError` if a page of one of `layer_ids` is smaller than `content_nbytes`."""
    _check_side(side, regions.columns(), layer_ids, np.empty(0, np.int64), content_nbytes)


def check_dst_overlap(dst_regions: RegionSet, page_layers: np.ndarray, page_blocks: np.ndarray) -> None:
    """`PlanError` if two of the dst pages `(page_layers[i], page_blocks[i])` overlap."""
    cols = dst_regions.columns()
    pages = cols["base_addr"][page_layers] + cols["page_stride_nbytes"][page_layers] * page_blocks.astype(_U64)
    order = np.argsort(pages, kind="stable")
    _check_dst_overlap(pages[order], cols["page_nbytes"][page_layers][order])


def merged_reads(plan: Plan, src_rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The plan's reads from `src_rank` by dst offset, merged where contiguous on both
    sides: `(src_offset, dst_offset, nbytes)` as uint64 arrays of shape `(k,)`."""
    runs: list[list[int]] = []
    for read in sorted(plan.reads_from(src_rank), key=lambda r: r.dst_offset):
        last = runs[-1] if runs else None
        if last and last[0] + last[2] == read.src_offset and last[1] + last[2] == read.dst_offset:
            last[2] += read.nbytes
        else:
            runs.append([read.src_offset, read.dst_offset, read.nbytes])
    table = np.array(runs, dtype=_U64).reshape(len(runs), 3)
    return table[:, 0], table[:, 1], table[:, 2]


def _fill(pages: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, devices: np.ndarray) -> np.ndarray:
    """Rows `(page + offset, length, device)` for every page and read: shape `(P * k, 3)`."""
    template = np.zeros((len(offsets), 3), dtype=_U64)
    template[:, 0], template[:, 1] = offsets, lengths
    same_device = devices.size == 0 or bool(np.all(devices == devices[0]))
    if same_device and devices.size:
        template[:, 2] = devices[0]
    out = np.empty((pages.size, len(offsets), 3), dtype=_U64)
    out[...] = template
    out[:, :, 0] += pages[:, None]
    if not same_device:
        out[:, :, 2] = devices[:, None]
    return out.reshape(pages.size * len(offsets), 3)


def _descriptors(dst_pages, src_pages, dst_dev, src_dev, joinable, src_off, dst_off, lengths):
    """Per-page reads -> merged `(M, 3)` arrays for both sides.

    `dst_pages`, `src_pages`: shape `(P,)` page addresses in ascending dst order;
    `joinable`: shape `(P - 1,)`, True where page `p` and `p + 1` share a buffer on both
    sides. Reads inside one page are already maximal, so runs can only join across the
    boundary between the last read of page `p` and the first read of page `p + 1`.
    """
    num_pages, k = dst_pages.size, lengths.size
    dst = _fill(dst_pages, dst_off, lengths, dst_dev)
    src = _fill(src_pages, src_off, lengths, src_dev)
    if num_pages > 1:
        tail = lengths[k - 1]
        join = joinable & (dst_pages[:-1] + (dst_off[k - 1] + tail) == dst_pages[1:] + dst_off[0])
        join &= src_pages[:-1] + (src_off[k - 1] + tail) == src_pages[1:] + src_off[0]
        if join.any():
            is_start = np.ones(num_pages * k, dtype=bool)
            is_start[k::k] = ~join
            starts = np.flatnonzero(is_start)
            merged = np.add.reduceat(dst[:, 1], starts)
            dst, src = dst[starts], src[starts]
            dst[:, 1] = merged
            src[:, 1] = merged
    dst.flags.writeable = False
    src.flags.writeable = False
    return dst, src


def expand_plan(plan: Plan, src_regions: SrcRegions, dst_regions: RegionSet,
                block_pairs: object, *, layers: object = None) -> Expansion:
    """Expand `plan` over a batch of requests into NIXL descriptors, per src rank.

    Args:
        plan: the dst rank's plan (`plan_reads`); the same reads apply to every layer.
        src_regions: each src rank's memory, as a mapping `{src_rank: RegionSet}` or a
            sequence indexed by src rank; needed for every rank in `plan.src_ranks`.
        dst_regions: the dst rank's memory.
        block_pairs: shape `(N, 2)` integers `(src_block, dst_block)`, one row per
            request; dst blocks must be distinct, in any order.
        layers: layer ids to move (default: every layer both sides registered). Layer
            `l` is read from the src's layer `l` into the dst's layer `l`.

    Returns:
        An `Expansion` with, per src rank, `(M, 3)` uint64 `(addr, nbytes, device_id)`
        arrays for the dst (local) and src (remote) sides, merged where contiguous on
        both sides within one buffer, in ascending dst address order.

    Raises:
        BlockRangeError: a block id or layer lies outside a side's registered regions.
        PlanError: malformed arguments, a page smaller than the plan's content, a
            repeated dst block, or dst pages that overlap.

    Example: Granite-4.0-H-Tiny 1 -> 2, dst rank 0, 36 layers, 64 requests: the plan
    has 2 reads per page (`x0` and `B|C|T0`), so 4608 reads. Even block-major pages
    without padding keep 4608 descriptors: the dst page ends where the next layer's
    begins, but on the src side `T1` follows `T0`, so the runs are not contiguous there.
    With equal TP the single whole-content read per page merges across blocks and layers.
    """
    pairs, layer_ids = check_batch(plan, src_regions, dst_regions, block_pairs, layers)
    src_map = _src_region_map(plan, src_regions)
    dst_cols = dst_regions.columns()
    dst_grid = _grid(dst_cols, layer_ids, pairs[:, 1])
    order, perm = _page_order(dst_grid)
    dst_pages = _walk(dst_grid, order, perm)
    page_layer = _walk(np.broadcast_to(layer_ids[:, None], dst_grid.shape), order, perm)
    _check_dst_overlap(dst_pages, dst_cols["page_nbytes"][page_layer])
    dst_buffer = dst_cols["buffer"][page_layer]
    dst_joinable = dst_buffer[1:] == dst_buffer[:-1]
    dst_dev = dst_cols["device_id"][page_layer]

    ranks = []
    for src_rank in plan.src_ranks:
        src_cols = src_map[src_rank].columns()
        src_off, dst_off, lengths = merged_reads(plan, src_rank)
        src_pages = _walk(_grid(src_cols, layer_ids, pairs[:, 0]), order, perm)
        src_buffer = src_cols["buffer"][page_layer]
        joinable = dst_joinable & (src_buffer[1:] == src_buffer[:-1])
        dst_desc, src_desc = _descriptors(dst_pages, src_pages, dst_dev, src_cols["device_id"][page_layer],
                                          joinable, src_off, dst_off, lengths)
        num_reads = len(plan.reads_from(src_rank)) * dst_pages.size
        ranks.append(RankDescriptors(src_rank, dst_desc, src_desc, num_reads))
    return Expansion(plan, pairs, layer_ids, tuple(ranks))
