"""Plans -> what a vLLM NIXL connector registers: (offset, size) pairs and descriptors.

vLLM's NIXL connector pulls: the decode engine (dst, vLLM's "local" side) reads from the
prefill engine (src, "remote"). For each SSM layer it registers local and remote
descriptors pairwise; pair i copies `remote[i]` into `local[i]`. Today it derives them
from its own arithmetic (one descriptor per conv sub-projection plus one for the
temporal state); with ssm_split they come from a `Plan`, one pair per read:

    for each src rank r the plan reads from:
        local  = [(dst_offset, nbytes) of each read from r]     # in the dst page
        remote = [(src_offset, nbytes) of each read from r]     # in r's page

A page of logical block b of layer i starts at `base_addr[i] + b * page_stride`, where
vLLM's stride is `block_stride[i] * physical_blocks_per_logical` (`page_stride_nbytes`):
the padded page (`MambaSpec.page_size_padded`) when the state is not split into kernel
blocks. The two sides may have different strides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import BlockRangeError, PlanError
from ..plan._plan import Plan

__all__ = ["ConnectorReads", "BlockDescriptors", "connector_read_offsets", "page_stride_nbytes",
           "block_descriptors", "strided_descriptors"]


@dataclass(frozen=True, slots=True)
class ConnectorReads:
    """The descriptor pairs of one dst rank for one src rank, within one page.

    Attributes:
        src_rank: the src rank read from.
        local_offsets: `(dst_offset, nbytes)` per read, from the start of the dst page.
        remote_offsets: `(src_offset, nbytes)` per read, from the start of `src_rank`'s
            page; `remote_offsets[i]` is copied to `local_offsets[i]`.
    """

    src_rank: int
    local_offsets: tuple[tuple[int, int], ...]
    remote_offsets: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class BlockDescriptors:
    """Descriptor pairs for a batch of blocks, for one src rank.

    Attributes:
        src_rank: the src rank read from.
        local: `(addr, nbytes)` in the dst engine's memory, ordered by layer, then read,
            then block (vLLM's order of SSM descriptors).
        remote: `(addr, nbytes)` in `src_rank`'s memory, pairwise with `local`.
    """

    src_rank: int
    local: tuple[tuple[int, int], ...]
    remote: tuple[tuple[int, int], ...]


def _check_plan(plan: object) -> Plan:
    if not isinstance(plan, Plan):
        raise PlanError(f"`plan` must be a Plan from `ssm_split.plan_reads`, got "
                        f"{type(plan).__name__}.")
    return plan


def connector_read_offsets(plan: Plan) -> tuple[ConnectorReads, ...]:
    """The per-page (offset, size) pairs of `plan`, grouped by src rank (ascending).

    Example: Granite-4.0-H-Tiny, src TP1 -> dst TP2, dst rank 0 gives one entry for src
    rank 0 with local `[(0, 9216), (9216, 787968)]` and remote `[(0, 9216), (18432,
    787968)]`: x, then B, C and the rank's temporal heads in one read.
    """
    _check_plan(plan)
    return tuple(
        ConnectorReads(rank,
                       tuple((r.dst_offset, r.nbytes) for r in plan.reads_from(rank)),
                       tuple((r.src_offset, r.nbytes) for r in plan.reads_from(rank)))
        for rank in plan.src_ranks)


def page_stride_nbytes(block_stride_nbytes: int, content_nbytes: int,
                       physical_blocks_per_logical: int | None = None) -> int:
    """vLLM's distance between the pages of consecutive logical blocks of one layer.

    Args:
        block_stride_nbytes: the layer's kernel-block stride (vLLM's `block_strides[i]`
            or `block_len_per_layer[i]`; the padded page size when blocks are not split).
        content_nbytes: bytes of state in the page (the plan's `src_content_nbytes` or
            `dst_content_nbytes`; vLLM's `sum(ssm_sizes)`).
        physical_blocks_per_logical: kernel blocks per logical block, as the engine
            reports it; default `ceil(content / block_stride)`, vLLM's own rule.

    Raises:
        PlanError: non-positive sizes, or a stride too small to hold the content.
    """
    for name, value in (("block_stride_nbytes", block_stride_nbytes),
                        ("content_nbytes", content_nbytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"`{name}` must be an int >= 1, got {value!r}.")
    ratio = physical_blocks_per_logical
    if ratio is None:
        ratio = math.ceil(content_nbytes / block_stride_nbytes)
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise PlanError(f"`physical_blocks_per_logical` must be an int >= 1, got {ratio!r}.")
    stride = block_stride_nbytes * ratio
    if stride < content_nbytes:
        raise PlanError(f"{ratio} kernel block(s) of {block_stride_nbytes} bytes cannot hold "
                        f"a page of {content_nbytes} bytes of state; pass the engine's real "
                        f"`physical_blocks_per_logical`.")
    return stride


def _per_layer(value: int | Sequence[int], num_layers: int, name: str) -> tuple[int, ...]:
    values = (value,) * num_layers if isinstance(value, (int, np.integer)) else tuple(value)
    if len(values) != num_layers or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                                      or v < 1 for v in values):
        raise PlanError(f"`{name}` must be an int >= 1 or one per layer ({num_layers}), got {value!r}.")
    return tuple(int(v) for v in values)


def _src_bases(src_base_addrs: Mapping[int, Sequence[int]] | Sequence[Sequence[int]],
               plan: Plan, num_layers: int) -> dict[int, tuple[int, ...]]:
    bases = {}
    for rank in plan.src_ranks:
        try:
            rank_bases = tuple(int(a) for a in src_base_addrs[rank])
        except (KeyError, IndexError):
            raise PlanError(f"`src_base_addrs` has no entry for src rank {rank}, which the "
                            f"plan reads from.") from None
        if len(rank_bases) != num_layers:
            raise PlanError(f"`src_base_addrs[{rank}]` has {len(rank_bases)} layers, "
                            f"`dst_base_addrs` {num_layers}; both sides list the same layers.")
        bases[rank] = rank_bases
    return bases


def _check_strides(strides: tuple[int, ...], content: int, side: str) -> None:
    if min(strides) < content:
        raise PlanError(f"A {side} page stride of {min(strides)} bytes is smaller than the "
                        f"{content} bytes of state in a {side} page; pages would overlap. "
                        f"Compute it with `page_stride_nbytes`.")


def _block_ids(values: Sequence[int], name: str) -> tuple[int, ...]:
    ids = tuple(values)
    if any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 0 for b in ids):
        raise BlockRangeError(f"`{name}` must hold block ids >= 0, got {list(values)!r}.")
    return tuple(int(b) for b in ids)



def _layer_memory(plan: Plan, dst_base_addrs, dst_page_stride_nbytes, src_base_addrs,
                  src_page_stride_nbytes):
    """Checked per-layer `(dst_bases, dst_strides, src_bases, src_strides)`: bases and
    strides in bytes, one per layer; `src_bases[src_rank][layer]`."""
    dst_bases = tuple(int(a) for a in dst_base_addrs)
    num_layers = len(dst_bases)
    dst_strides = _per_layer(dst_page_stride_nbytes, num_layers, "dst_page_stride_nbytes")
    src_strides = _per_layer(src_page_stride_nbytes, num_layers, "src_page_stride_nbytes")
    _check_strides(dst_strides, plan.dst_content_nbytes, "dst")
    _check_strides(src_strides, plan.src_content_nbytes, "src")
    return dst_bases, dst_strides, _src_bases(src_base_addrs, plan, num_layers), src_strides

def block_descriptors(plan: Plan, dst_block_ids: Sequence[int], src_block_ids: Sequence[int], *,
                      dst_base_addrs: Sequence[int],
                      dst_page_stride_nbytes: int | Sequence[int],
                      src_base_addrs: Mapping[int, Sequence[int]] | Sequence[Sequence[int]],
                      src_page_stride_nbytes: int | Sequence[int]) -> tuple[BlockDescriptors, ...]:
    """Absolute descriptor pairs for copying src blocks into dst blocks, per src rank.

    Args:
        plan: the dst rank's plan.
        dst_block_ids, src_block_ids: logical block ids of the request on each side;
            `src_block_ids[j]` is copied into `dst_block_ids[j]`.
        dst_base_addrs: per SSM layer, the address of block 0's page in dst memory.
        dst_page_stride_nbytes: the dst page stride, one for all layers or one per layer
            (`page_stride_nbytes`).
        src_base_addrs: per src rank (mapping or sequence indexed by rank), its per-layer
            base addresses, as its handshake reports them.
        src_page_stride_nbytes: the src page stride (every src rank has the same).

    Returns:
        One `BlockDescriptors` per src rank the plan reads from (ascending), with
        `layers x reads x blocks` pairs each.

    Raises:
        PlanError: inconsistent layer counts, missing src ranks, strides smaller than
            a page's state.
        BlockRangeError: negative block ids, or lists of different lengths.
    """
    _check_plan(plan)
    dst_blocks, src_blocks = _block_ids(dst_block_ids, "dst_block_ids"), _block_ids(src_block_ids, "src_block_ids")
    if len(dst_blocks) != len(src_blocks):
        raise BlockRangeError(f"{len(dst_blocks)} dst blocks but {len(src_blocks)} src blocks; "
                              f"each dst block is filled from one src block.")
    dst_bases, dst_strides, src_bases, src_strides = _layer_memory(
        plan, dst_base_addrs, dst_page_stride_nbytes, src_base_addrs, src_page_stride_nbytes)
    num_layers = len(dst_bases)
    result = []
    for pairs in connector_read_offsets(plan):
        local, remote = [], []
        for layer in range(num_layers):
            for (dst_offset, nbytes), (src_offset, _) in zip(pairs.local_offsets, pairs.remote_offsets):
                for dst_block, src_block in zip(dst_blocks, src_blocks):
                    local.append((dst_bases[layer] + dst_block * dst_strides[layer] + dst_offset, nbytes))
                    remote.append((src_bases[pairs.src_rank][layer] + src_block * src_strides[layer]
                                   + src_offset, nbytes))
        result.append(BlockDescriptors(pairs.src_rank, tuple(local), tuple(remote)))
    return tuple(result)


def strided_descriptors(plan: Plan, *, dst_base_addrs: Sequence[int],
                        dst_page_stride_nbytes: int | Sequence[int], dst_num_blocks: int,
                        src_base_addrs: Mapping[int, Sequence[int]] | Sequence[Sequence[int]],
                        src_page_stride_nbytes: int | Sequence[int], src_num_blocks: int,
                        dst_device_id: int = 0,
                        src_device_ids: Mapping[int, int] | Sequence[int] | int = 0,
                        ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Every block of every layer as strided rows, the form vLLM 0.33 registers.

    Each row is `(addr, nbytes, device_id, stride, count)`: `count` ranges of `nbytes`
    bytes whose starts are `stride` apart (NIXL >= 1.5 prepares such rows directly).
    One row per layer and read, layer-major, as `_build_mamba_local` / `_remote` order
    theirs; a read of block b then has descriptor index `row * count + b`.

    Returns:
        src rank -> `(local_rows, remote_rows)`, two `(layers * reads, 5)` uint64 arrays.

    Raises:
        PlanError: as for `block_descriptors`; block counts < 1.
    """
    _check_plan(plan)
    for name, value in (("dst_num_blocks", dst_num_blocks), ("src_num_blocks", src_num_blocks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"`{name}` must be an int >= 1, got {value!r}.")
    dst_bases, dst_strides, src_bases, src_strides = _layer_memory(
        plan, dst_base_addrs, dst_page_stride_nbytes, src_base_addrs, src_page_stride_nbytes)
    num_layers = len(dst_bases)
    result = {}
    for pairs in connector_read_offsets(plan):
        rank = pairs.src_rank
        device = src_device_ids if isinstance(src_device_ids, int) else src_device_ids[rank]
        local = [(dst_bases[i] + off, n, dst_device_id, dst_strides[i], dst_num_blocks)
                 for i in range(num_layers) for off, n in pairs.local_offsets]
        remote = [(src_bases[rank][i] + off, n, device, src_strides[i], src_num_blocks)
                  for i in range(num_layers) for off, n in pairs.remote_offsets]
        result[rank] = (np.array(local, dtype=np.uint64).reshape(-1, 5),
                        np.array(remote, dtype=np.uint64).reshape(-1, 5))
    return result
