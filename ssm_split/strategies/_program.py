"""Transfer programs: the steps each side runs to move one batch, as frozen data.

The dst builds a `Program` from its plan, both sides' regions and a batch of
`(src_block, dst_block)` pairs; `ssm_split.nixl_backend.Reader` executes it, and a src
`Endpoint` executes the packing half of a packed program. Every address in a program
comes from the functions here (and `expand_plan`): executors only copy.

    Program(strategy, plan, block_pairs, layers, waves)
      Wave   pairs    the wave's requests (a slice of the batch, by dst block)
             packs    packed: one `PackOrder` per src rank, what it packs for the wave
             reads    NIXL READs, one `RankDescriptors` per src rank (packed: built
                      from the src's answer with `fetch_reads`)
             scatter  a `CopyTable` the dst runs once the reads landed, or None

- `direct`: one wave; reads = the plan expanded over the batch (merged).
- `staged` (`stage_plan`): reads = direct reads into the pages and superset spans into
  the staging area; scatter = the moves from staging into the pages.
- `packed` (`pack_plan`): the src packs each wave into its pack area; the dst READs one
  range per src rank into staging, then scatters.
- `peer`: no READ; one copy table from the src's pages, mapped into the dst process
  (`mapped_src_regions`), straight into the dst pages (one kernel per batch).

Staged and packed waves alternate halves of the dst's staging area (wave `w` uses half
`w % 2`), so wave `w + 1` can land while wave `w` is scattered; a wave holds as many
requests as half the area (and, packed, the src's pack limit) allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..errors import PlanError
from ..expand._expand import Expansion, RankDescriptors, SrcRegions, check_batch, expand_plan
from ..layout._regions import Buffer, LayerRegion, RegionSet
from ..plan._plan import Plan
from ._cost import DEFAULT_COST_MODEL, CostModel
from ._packing import PackLayout, pack_fingerprint, pack_plan
from ._copies import CopyTable, _read_only
from ._paged import PagedCopies, paged_copies
from ._staging import align, stage_plan

__all__ = ["STRATEGIES", "CopyTable", "PackOrder", "Wave", "Program", "direct_program", "staged_program",
           "packed_program", "peer_program", "pack_copies", "fetch_reads", "select_layers", "mapped_regions"]

STRATEGIES = ("direct", "staged", "packed", "peer")

_U64 = np.uint64


@dataclass(frozen=True, slots=True)
class PackOrder:
    """What the dst asks src rank `src_rank` to pack for one wave.

    Attributes:
        src_rank: the src rank that packs.
        layout: where the packed bytes sit (the same on the src and in dst staging).
        src_blocks: the wave's src block per request, in the layout's request order.
        layers: the layer ids packed, in the layout's layer order.
        fingerprint: `pack_fingerprint` of the dst's plan for this src rank.
        dst_addr: where the packed range lands in the dst's staging area.
    """

    src_rank: int
    layout: PackLayout
    src_blocks: tuple[int, ...]
    layers: tuple[int, ...]
    fingerprint: str
    dst_addr: int


@dataclass(frozen=True, slots=True, eq=False)
class Wave:
    """One wave of a program (module doc); `pairs` has shape `(n, 2)`, read-only;
    `scatter` is a `CopyTable`, or `PagedCopies` (the peer strategy's factored table)."""

    pairs: np.ndarray
    packs: tuple[PackOrder, ...]
    reads: tuple[RankDescriptors, ...]
    scatter: "CopyTable | PagedCopies | None"


@dataclass(frozen=True, slots=True, eq=False)
class Program:
    """Every step of one batch (module doc).

    Attributes:
        strategy: one of `STRATEGIES`.
        plan: the dst rank's plan.
        block_pairs: shape `(N, 2)` `(src_block, dst_block)`, sorted by dst block.
        layers: shape `(m,)`, the layers moved.
        waves: in order.
        num_reads: plan reads x layers x requests (before merging).
        nbytes: bytes of state the batch moves into the dst pages.
    """

    strategy: str
    plan: Plan
    block_pairs: np.ndarray
    layers: np.ndarray
    waves: tuple[Wave, ...]
    num_reads: int
    nbytes: int

    @property
    def num_descriptors(self) -> int:
        """NIXL descriptors of every READ (packed: one per src rank and wave, as
        `fetch_reads` makes them with `parts=1`)."""
        return sum(sum(r.num_descriptors for r in w.reads) + len(w.packs) for w in self.waves)

    @property
    def num_copies(self) -> int:
        return sum(w.scatter.num_copies for w in self.waves if w.scatter is not None)

    @property
    def src_ranks(self) -> tuple[int, ...]:
        return self.plan.src_ranks


def select_layers(regions: RegionSet, layers: Sequence[int]) -> RegionSet:
    """`regions` restricted to `layers`, in that order: layer `i` of the result is layer
    `layers[i]` of `regions` (same buffers)."""
    return RegionSet(tuple(regions.layers[int(layer)] for layer in layers), regions.buffers)


def _batch(plan: Plan, src_regions: SrcRegions, dst_regions: RegionSet, block_pairs: object,
           layers: object) -> tuple[np.ndarray, np.ndarray]:
    return check_batch(plan, src_regions, dst_regions, block_pairs, layers)


def _stats(plan: Plan, pairs: np.ndarray, layers: np.ndarray) -> tuple[int, int]:
    pages = pairs.shape[0] * layers.shape[0]
    return len(plan.reads) * pages, plan.nbytes * pages


def _freeze(pairs: np.ndarray) -> np.ndarray:
    pairs = np.ascontiguousarray(pairs)
    pairs.flags.writeable = False
    return pairs


def direct_program(plan: Plan, src_regions: SrcRegions, dst_regions: RegionSet, block_pairs: object, *,
                   layers: object = None) -> Program:
    """The plan expanded over the batch: one wave, one merged READ per src rank."""
    pairs, layer_ids = _batch(plan, src_regions, dst_regions, block_pairs, layers)
    expansion = expand_plan(plan, src_regions, dst_regions, pairs, layers=layer_ids)
    ranks = tuple(r for r in expansion.ranks if r.num_descriptors)
    return Program("direct", plan, pairs, layer_ids, (Wave(pairs, (), ranks, None),), *_stats(plan, pairs, layer_ids))


def peer_program(plan: Plan, mapped_src_regions: SrcRegions, dst_regions: RegionSet, block_pairs: object, *,
                 layers: object = None, engine: str = "kernel") -> Program:
    """The copies from the src ranks' pages, as mapped into the dst process
    (`mapped_src_regions`: the src regions at the addresses the dst sees them), into the
    dst pages, in factored form (`PagedCopies`) for `engine` (one of `PEER_ENGINES`,
    `peer_engine` picks it); no READ."""
    pairs, layer_ids = _batch(plan, mapped_src_regions, dst_regions, block_pairs, layers)
    table = paged_copies(plan, mapped_src_regions, dst_regions, pairs, layers=layer_ids, engine=engine)
    return Program("peer", plan, pairs, layer_ids, (Wave(pairs, (), (), table),), *_stats(plan, pairs, layer_ids))


def _wave_size(per_request_nbytes: int, limit_nbytes: int, what: str) -> int:
    if per_request_nbytes > limit_nbytes:
        raise PlanError(f"One request needs {per_request_nbytes} bytes of {what}, but only "
                        f"{limit_nbytes} bytes are available per wave (half the area). Use a "
                        f"larger area, fewer layers per batch, or strategy=\"direct\".")
    return max(1, limit_nbytes // max(per_request_nbytes, 1))


def _check_staging(staging: object) -> Buffer:
    if not isinstance(staging, Buffer):
        raise PlanError(f"staging must be the dst's registered staging Buffer, got {type(staging).__name__}.")
    return staging


def _wave_base(staging: Buffer, wave: int) -> int:
    half = staging.nbytes // 2
    return staging.addr + (wave % 2) * half


def _slices(pairs: np.ndarray, per_wave: int):
    for w, start in enumerate(range(0, pairs.shape[0], per_wave)):
        yield w, pairs[start:start + per_wave]


def _merge_ranks(*expansions: Expansion) -> tuple[RankDescriptors, ...]:
    """One READ per src rank with the descriptors of every expansion (distinct dst
    ranges), in ascending src rank."""
    by_rank: dict[int, list[RankDescriptors]] = {}
    for expansion in expansions:
        for rank in expansion.ranks:
            if rank.num_descriptors:
                by_rank.setdefault(rank.src_rank, []).append(rank)
    merged = []
    for src_rank in sorted(by_rank):
        parts = by_rank[src_rank]
        dst = np.concatenate([p.dst_descs for p in parts])
        src = np.concatenate([p.src_descs for p in parts])
        _read_only(dst, src)
        merged.append(RankDescriptors(src_rank, dst, src, sum(p.num_reads for p in parts)))
    return tuple(merged)


def staged_program(plan: Plan, src_regions: SrcRegions, dst_regions: RegionSet, block_pairs: object, *,
                   staging: Buffer, layers: object = None, model: CostModel = DEFAULT_COST_MODEL) -> Program:
    """Superset spans into staging plus direct reads, then one scatter per wave.

    Args:
        staging: the dst's registered staging area; each wave uses half of it.
        model: chooses which reads share a span (`stage_plan`).

    Raises:
        PlanError: half the staging area cannot hold one request's spans.
    """
    staging = _check_staging(staging)
    pairs, layer_ids = _batch(plan, src_regions, dst_regions, block_pairs, layers)
    staged = stage_plan(plan, model=model)
    src_sel = {r: select_layers(_region_map(src_regions)[r], layer_ids) for r in plan.src_ranks}
    dst_sel = select_layers(dst_regions, layer_ids)
    num_layers = layer_ids.shape[0]
    slot = max(staged.slot_nbytes, 0)
    per_wave = _wave_size(slot * num_layers, staging.nbytes // 2, "staging") if slot else pairs.shape[0]
    waves = []
    for w, chunk in _slices(pairs, max(per_wave, 1)):
        index = np.arange(chunk.shape[0], dtype=np.int64)
        expansions, scatter = [], None
        if staged.direct:
            expansions.append(expand_plan(staged.direct_plan(), src_sel, dst_sel, chunk))
        if staged.spans:
            area = PackLayout(slot, num_layers, chunk.shape[0]).regions(_wave_base(staging, w), staging.device_id)
            expansions.append(expand_plan(staged.spans_plan(), src_sel, area, np.stack([chunk[:, 0], index], 1)))
            scatter = CopyTable.from_expansions(
                expand_plan(staged.moves_plan(), [area], dst_sel, np.stack([index, chunk[:, 1]], 1)))
        waves.append(Wave(_freeze(chunk), (), _merge_ranks(*expansions), scatter))
    return Program("staged", plan, pairs, layer_ids, tuple(waves), *_stats(plan, pairs, layer_ids))


def _region_map(src_regions: SrcRegions) -> dict[int, RegionSet]:
    return dict(src_regions) if isinstance(src_regions, Mapping) else dict(enumerate(src_regions))


def packed_program(plan: Plan, src_regions: SrcRegions, dst_regions: RegionSet, block_pairs: object, *,
                   staging: Buffer, src_pack_limits: Mapping[int, int], layers: object = None) -> Program:
    """Waves the src ranks pack, the dst fetches (one range per src rank) and scatters.

    Args:
        staging: the dst's registered staging area; each wave uses half of it.
        src_pack_limits: per src rank, the most bytes it packs for one wave (its
            handshake says it).

    Raises:
        PlanError: a src rank the plan reads from has no pack limit, or one request does
            not fit half the staging area or a src rank's limit.
    """
    staging = _check_staging(staging)
    pairs, layer_ids = _batch(plan, src_regions, dst_regions, block_pairs, layers)
    packed = pack_plan(plan)
    num_layers = layer_ids.shape[0]
    per_wave = _wave_size(sum(packed.slot_nbytes) * num_layers, staging.nbytes // 2, "dst staging")
    for rank in plan.src_ranks:
        if rank not in src_pack_limits:
            raise PlanError(f"src rank {rank} does not say how much it packs per wave: it cannot "
                            f"run the packed strategy. Use strategy=\"direct\" or \"staged\".")
        per_wave = min(per_wave, _wave_size(packed.slot_nbytes[rank] * num_layers,
                                            int(src_pack_limits[rank]), f"src rank {rank}'s pack area"))
    fingerprints = {r: pack_fingerprint(packed, r) for r in plan.src_ranks}
    dst_sel = select_layers(dst_regions, layer_ids)
    waves = []
    for w, chunk in _slices(pairs, per_wave):
        index = np.arange(chunk.shape[0], dtype=np.int64)
        at, orders, landed = _wave_base(staging, w), [], {}
        for rank in plan.src_ranks:
            layout = PackLayout(packed.slot_nbytes[rank], num_layers, chunk.shape[0])
            orders.append(PackOrder(rank, layout, tuple(int(b) for b in chunk[:, 0]),
                                    tuple(int(x) for x in layer_ids), fingerprints[rank], at))
            landed[rank] = layout.regions(at, staging.device_id)
            at += align(layout.nbytes)
        scatter_pairs = np.stack([index, chunk[:, 1]], 1)
        scatter = CopyTable.from_expansions(*(
            expand_plan(packed.unpack_plan_for(r), {r: landed[r]}, dst_sel, scatter_pairs) for r in plan.src_ranks))
        waves.append(Wave(_freeze(chunk), tuple(orders), (), scatter))
    return Program("packed", plan, pairs, layer_ids, tuple(waves), *_stats(plan, pairs, layer_ids))


def pack_copies(plan: Plan, src_rank: int, src_regions: RegionSet, order: PackOrder, area: Buffer,
                lease_offset: int) -> CopyTable:
    """The src's half of a packed wave: copies from its pages to its pack area.

    Args:
        plan: the dst rank's plan, as the src builds it (`plan_reads`).
        src_rank: this src rank.
        src_regions: its pages.
        order: the dst's `PackOrder` (its fingerprint must match this plan's).
        area: the src's registered pack area; the wave is packed at `lease_offset`.

    Raises:
        PlanError: the fingerprint differs (the two sides would lay the wave out
            differently), the wave does not fit the area, or blocks/layers are out of range.
    """
    packed = pack_plan(plan)
    if src_rank not in plan.src_ranks or pack_fingerprint(packed, src_rank) != order.fingerprint:
        raise PlanError(f"src rank {src_rank} would pack this wave differently than the reader "
                        f"expects (fingerprint {order.fingerprint!r}): the two sides run different "
                        f"plans or ssm_split versions.")
    if lease_offset < 0 or lease_offset + order.layout.nbytes > area.nbytes:
        raise PlanError(f"A wave of {order.layout.nbytes} bytes at offset {lease_offset} does not "
                        f"fit the {area.nbytes}-byte pack area.")
    if len(order.src_blocks) != order.layout.num_requests or len(order.layers) != order.layout.num_layers:
        raise PlanError("The pack order's blocks and layers do not match its layout.")
    target = order.layout.regions(area.addr + lease_offset, area.device_id)
    pairs = np.stack([np.asarray(order.src_blocks, np.int64),
                      np.arange(order.layout.num_requests, dtype=np.int64)], axis=1)
    source = select_layers(src_regions, _checked_layers(order.layers, src_regions))
    return CopyTable.from_expansions(expand_plan(packed.pack_plan_for(src_rank), {src_rank: source}, target, pairs))


def _checked_layers(layers: Sequence[int], regions: RegionSet) -> list[int]:
    bad = [layer for layer in layers if not 0 <= int(layer) < regions.num_layers]
    if bad:
        raise PlanError(f"Layer {bad[0]} is out of range: this side registered {regions.num_layers} layers.")
    return [int(layer) for layer in layers]


def fetch_reads(order: PackOrder, src_area: Buffer, lease_offset: int, dst_device_id: int, *,
                parts: int = 1) -> RankDescriptors:
    """The dst's READ of a packed wave from `src_area` at `lease_offset` (the src's answer)
    into `order.dst_addr`, as `parts` descriptors of (nearly) equal length (UCX spreads
    the descriptors of one READ over its worker threads).

    Raises:
        PlanError: the range leaves the src's pack area, or `parts` < 1.
    """
    nbytes = order.layout.nbytes
    if lease_offset < 0 or lease_offset + nbytes > src_area.nbytes:
        raise PlanError(f"src rank {order.src_rank} placed the wave at offset {lease_offset}, "
                        f"outside its {src_area.nbytes}-byte pack area.")
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise PlanError(f"parts must be an int >= 1, got {parts!r}.")
    parts = min(parts, max(1, nbytes // 4096))
    cuts = np.linspace(0, nbytes, parts + 1).astype(np.int64) // 256 * 256
    cuts[-1] = nbytes
    starts, lengths = cuts[:-1].astype(_U64), np.diff(cuts).astype(_U64)
    dst = np.stack([order.dst_addr + starts, lengths, np.full(parts, dst_device_id, _U64)], axis=1)
    src = np.stack([src_area.addr + lease_offset + starts, lengths, np.full(parts, src_area.device_id, _U64)], axis=1)
    _read_only(dst, src)
    return RankDescriptors(order.src_rank, dst, src, 0)


def mapped_regions(regions: RegionSet, buffer_addrs: Sequence[int], device_id: int) -> RegionSet:
    """`regions` as another process sees them once it mapped each buffer `i` at
    `buffer_addrs[i]` on its device `device_id` (the peer strategy's src side)."""
    if len(buffer_addrs) != len(regions.buffers):
        raise PlanError(f"{len(buffer_addrs)} mapped addresses for {len(regions.buffers)} buffers.")
    shift = [int(addr) - b.addr for addr, b in zip(buffer_addrs, regions.buffers)]
    layers = tuple(LayerRegion(r.base_addr + shift[r.buffer], r.page_nbytes, r.page_stride_nbytes, r.num_blocks,
                               r.buffer) for r in regions.layers)
    buffers = tuple(Buffer(int(addr), b.nbytes, device_id) for addr, b in zip(buffer_addrs, regions.buffers))
    return RegionSet(layers, buffers)
