"""Plans -> what a vLLM NIXL connector registers and posts, through the core's expansion.

vLLM's NIXL connector pulls: the decode engine (dst, vLLM's "local" side) reads from the
prefill engine (src, "remote"). For each Mamba region (one per layer slot, see
`_vllm_regions`) it registers descriptors on both sides and posts READs between them.
These helpers give it ssm_split's reads in those forms. They compute no address
themselves: each builds the two sides' `RegionSet`s (`RegionSet.strided`) from the
numbers a connector has (base addresses, page strides, block counts) and calls
`ssm_split.expand.expand_plan` or `prepare_tables`, so block ranges, repeated dst
blocks, addresses outside `[0, 2**64)` and pages too small for the plan are refused by
the same code as everywhere else.

    connector_read_offsets(plan)   per src rank: (offset, nbytes) in a page, both sides
    pair_blocks(src_ids, dst_ids)  vLLM's per-request block lists -> (N, 2) block_pairs
    block_descriptors(plan, block_pairs, ...)   -> Expansion: (addr, nbytes, device) rows
    strided_descriptors(plan, ...)              -> RankTables: (addr, nbytes, device,
                                                   stride, count) rows, prepared once

Block ids: vLLM gives every KV-cache group its own block table, and all groups alias
the same slots. A request's Mamba state is its block of each group, so its
`block_pairs` has one row `(src_block, dst_block)` per group, and `layers=` (slots) is
needed only for a group that uses fewer slots than the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import BlockRangeError, PlanError
from ..expand._expand import Expansion, expand_plan
from ..expand._prepared import RankTables, prepare_tables
from ..layout._regions import RegionSet
from ..plan._plan import Plan

__all__ = ["ConnectorReads", "connector_read_offsets", "pair_blocks", "block_descriptors",
           "strided_descriptors"]


@dataclass(frozen=True, slots=True)
class ConnectorReads:
    """The reads of one dst rank from one src rank, within one page.

    Attributes:
        src_rank: the src rank read from.
        src_ranges: `(src_offset, nbytes)` per read, from the start of `src_rank`'s page.
        dst_ranges: `(dst_offset, nbytes)` per read, from the start of the dst page;
            `src_ranges[i]` is copied to `dst_ranges[i]`.
    """

    src_rank: int
    src_ranges: tuple[tuple[int, int], ...]
    dst_ranges: tuple[tuple[int, int], ...]


def _check_plan(plan: object) -> Plan:
    if not isinstance(plan, Plan):
        raise PlanError(f"`plan` must be a Plan from `ssm_split.plan_reads`, got "
                        f"{type(plan).__name__}.")
    return plan


def connector_read_offsets(plan: Plan) -> tuple[ConnectorReads, ...]:
    """The per-page `(offset, nbytes)` pairs of `plan`, grouped by src rank (ascending):
    what replaces the sub-projection loop of vLLM's `_build_mamba_local` / `_remote`.

    Example: Granite-4.0-H-Tiny (bf16 state), src TP1 -> dst TP2, dst rank 0: one entry
    for src rank 0 with `src_ranges ((0, 9216), (18432, 394752))` and `dst_ranges ((0,
    9216), (9216, 394752))`: x, then B, C and the rank's temporal heads in one read.
    """
    _check_plan(plan)
    return tuple(
        ConnectorReads(rank,
                       tuple((r.src_offset, r.nbytes) for r in plan.reads_from(rank)),
                       tuple((r.dst_offset, r.nbytes) for r in plan.reads_from(rank)))
        for rank in plan.src_ranks)


def _host_array(values: object) -> np.ndarray:
    """numpy view of a list, array or (CPU or CUDA) torch tensor; values unchecked."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # a torch tensor
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def pair_blocks(src_block_ids: object, dst_block_ids: object) -> np.ndarray:
    """`block_pairs` of shape `(N, 2)`, rows `(src_block_ids[i], dst_block_ids[i])`, from
    the two block lists of a request (vLLM's remote and local block ids); lists, numpy
    arrays or torch tensors. The ids are checked where they are used (`expand_plan`).

    Raises:
        BlockRangeError: the lists have different lengths or are not 1-D.
    """
    src, dst = _host_array(src_block_ids), _host_array(dst_block_ids)
    if src.ndim != 1 or dst.ndim != 1 or src.shape != dst.shape:
        raise BlockRangeError(f"{src.shape} src block ids but {dst.shape} dst block ids: give two "
                              f"1-D lists of equal length; src_block_ids[i] is copied into "
                              f"dst_block_ids[i].")
    return np.stack([src, dst], axis=1)


def _side_regions(base_addrs: object, page_stride_nbytes: object, num_blocks: object,
                  page_nbytes: object, device_id: object) -> RegionSet:
    return RegionSet.strided(
        base_addrs, page_nbytes=page_stride_nbytes if page_nbytes is None else page_nbytes,
        page_stride_nbytes=page_stride_nbytes, num_blocks=num_blocks, device_id=device_id)


def _rank_entry(value: object, rank: int, name: str, *, scalar_ok: bool) -> object:
    """`value[rank]` of a per-src-rank mapping or sequence (an int stands for every rank
    when `scalar_ok`)."""
    if scalar_ok and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return value
    if isinstance(value, Mapping):
        if rank not in value:
            raise PlanError(f"`{name}` has no entry for src rank {rank}, which the plan reads "
                            f"from (given: {sorted(value)}).")
        return value[rank]
    if hasattr(value, "__getitem__") and hasattr(value, "__len__") and not isinstance(value, (str, bytes)):
        if rank >= len(value):
            raise PlanError(f"`{name}` lists {len(value)} src ranks, but the plan reads from src "
                            f"rank {rank}; give one entry per src rank.")
        entry = value[rank]
        if not scalar_ok and isinstance(entry, (int, np.integer)):
            raise PlanError(f"`{name}[{rank}]` is {entry}, not a list of region addresses: give "
                            f"per src rank the addresses of its regions, e.g. {{{rank}: [addr, ...]}}.")
        return entry
    raise PlanError(f"`{name}` must be a mapping {{src_rank: ...}} or a sequence indexed by src "
                    f"rank, got {type(value).__name__}.")


def _regions(plan: Plan, src: dict, dst: dict) -> tuple[dict[int, RegionSet], RegionSet]:
    """Both sides' `RegionSet`s from the helpers' keyword arguments."""
    dst_regions = _side_regions(dst["base_addrs"], dst["page_stride_nbytes"], dst["num_blocks"],
                                dst["page_nbytes"], dst["device_id"])
    src_regions = {}
    for rank in plan.src_ranks:
        src_regions[rank] = _side_regions(
            _rank_entry(src["base_addrs"], rank, "src_base_addrs", scalar_ok=False),
            src["page_stride_nbytes"], src["num_blocks"], src["page_nbytes"],
            _rank_entry(src["device_ids"], rank, "src_device_ids", scalar_ok=True))
    return src_regions, dst_regions


_MEMORY_DOC = """
        src_base_addrs: per src rank (a mapping `{src_rank: addrs}` or a sequence
            indexed by rank), the address of block 0's page in each Mamba region (vLLM's
            `kv_caches_base_addr` of the SSM regions). Lists, numpy arrays or tensors.
        src_page_stride_nbytes: bytes between consecutive pages of a src region, one int
            or one per region (`page_stride_nbytes(block_strides[i], ratio)`; the padded
            page when blocks are not split).
        src_num_blocks: logical blocks per src region (one int or one per region).
        dst_base_addrs, dst_page_stride_nbytes, dst_num_blocks: the same for the dst rank.
        src_page_nbytes, dst_page_nbytes: bytes of each page (default: the stride).
        src_device_ids: the src ranks' device ids (an int for all, or per rank);
            dst_device_id: the dst rank's."""


def block_descriptors(plan: Plan, block_pairs: object, *, src_base_addrs: object,
                      src_page_stride_nbytes: object, src_num_blocks: object,
                      dst_base_addrs: object, dst_page_stride_nbytes: object,
                      dst_num_blocks: object, src_page_nbytes: object = None,
                      dst_page_nbytes: object = None, src_device_ids: object = 0,
                      dst_device_id: int = 0, layers: object = None) -> Expansion:
    """The descriptors of one batch, per src rank: `expand_plan` over vLLM's regions.

    Args:
        plan: the dst rank's plan (`ssm_split.plan_reads`).
        block_pairs: shape `(N, 2)` `(src_block, dst_block)` rows (a list, numpy array
            or torch tensor; `pair_blocks` builds it from two lists), one per request and
            KV-cache group; dst blocks distinct.
        layers: the regions (slots) to move, default all.{memory}

    Returns:
        The `Expansion`: per src rank (`.ranks`), `dst_descs` and `src_descs`, `(M, 3)`
        uint64 `(addr, nbytes, device_id)`, pairwise, merged where contiguous.

    Raises:
        BlockRangeError: a block id or layer outside a side's regions.
        PlanError: a repeated dst block, malformed ids, addresses outside
            `[0, 2**64)`, pages smaller than the plan's content, a missing src rank.
    """
    _check_plan(plan)
    src_regions, dst_regions = _regions(
        plan, {"base_addrs": src_base_addrs, "page_stride_nbytes": src_page_stride_nbytes,
               "num_blocks": src_num_blocks, "page_nbytes": src_page_nbytes, "device_ids": src_device_ids},
        {"base_addrs": dst_base_addrs, "page_stride_nbytes": dst_page_stride_nbytes,
         "num_blocks": dst_num_blocks, "page_nbytes": dst_page_nbytes, "device_id": dst_device_id})
    return expand_plan(plan, src_regions, dst_regions, _host_array(block_pairs),
                       layers=None if layers is None else _host_array(layers))


def strided_descriptors(plan: Plan, *, src_base_addrs: object, src_page_stride_nbytes: object,
                        src_num_blocks: object, dst_base_addrs: object,
                        dst_page_stride_nbytes: object, dst_num_blocks: object,
                        src_page_nbytes: object = None, dst_page_nbytes: object = None,
                        src_device_ids: object = 0, dst_device_id: int = 0) -> tuple[RankTables, ...]:
    """Every descriptor the plan can need, as NIXL's strided rows: `prepare_tables` over
    vLLM's regions, one `RankTables` per src rank the plan reads from (ascending).

    Each side's table has one row `(addr, nbytes, device_id, stride, count)` per
    (region, read): `count` pages `stride` bytes apart, the form vLLM 0.33's
    `_build_mamba_local` registers. Descriptor `(region l, read j, block b)` has index
    `row_start[l, j] + b`; `ssm_split.expand.index_batch(tables, block_pairs)` gives a
    batch's index arrays.

    Args:{memory}

    Raises:
        PlanError: as `block_descriptors` (addresses, page sizes, missing src ranks,
            overlapping dst pages).
    """
    _check_plan(plan)
    src_regions, dst_regions = _regions(
        plan, {"base_addrs": src_base_addrs, "page_stride_nbytes": src_page_stride_nbytes,
               "num_blocks": src_num_blocks, "page_nbytes": src_page_nbytes, "device_ids": src_device_ids},
        {"base_addrs": dst_base_addrs, "page_stride_nbytes": dst_page_stride_nbytes,
         "num_blocks": dst_num_blocks, "page_nbytes": dst_page_nbytes, "device_id": dst_device_id})
    return tuple(prepare_tables(plan, rank, src_regions[rank], dst_regions) for rank in plan.src_ranks)


for _helper in (block_descriptors, strided_descriptors):
    if _helper.__doc__:  # None under python -OO
        _helper.__doc__ = _helper.__doc__.replace("{memory}", _MEMORY_DOC)
