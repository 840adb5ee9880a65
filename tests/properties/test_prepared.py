"""Prepared-once tables and batch indices (`ssm_split.expand`) against the per-batch
expansion and the reference model.

The same flat numpy "memories" as `test_expand.py`, filled with random bytes:
descriptors picked from the tables by a batch's indices are applied as byte copies, and
must leave exactly the bytes that `expand_plan`'s descriptors leave (which
`test_expand.py` checks against `reference.shard`). The descriptor count after NIXL's merging is checked against a
direct simulation of NIXL's rule here, and against NIXL itself in `tests/nixl/`.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

from ssm_split.errors import BlockRangeError
from ssm_split import (
    Buffer,
    LayerRegion,
    Mamba2Spec,
    PlanError,
    RegionSet,
    expand_plan,
    page_layout,
    plan_reads,
)
from ssm_split.expand import index_batch, prepare_tables
from tests.properties.test_expand import Memory, buffer_of, expansion_cases, make_regions


def nixl_merged_count(tables, indices) -> int:
    """Descriptors after NIXL's merging, simulated: index `i + 1` joins index `i` when both
    sides' indices go up by one inside one Nx5 row whose descriptors are back to back."""
    rows = []
    for table, idx in ((tables.dst_table, indices.dst_indices), (tables.src_table, indices.src_indices)):
        ends = table.row_start.ravel() + table.rows[:, 4].astype(np.int64)
        row = np.searchsorted(ends, idx, side="right")
        rows.append((idx, row, table.dense.ravel()[row]))
    (d, d_row, d_dense), (s, s_row, s_dense) = rows
    joins = ((d[1:] == d[:-1] + 1) & (s[1:] == s[:-1] + 1) & (d_row[1:] == d_row[:-1])
             & (s_row[1:] == s_row[:-1]) & d_dense[1:] & s_dense[1:])
    return int(d.size - joins.sum())


@given(expansion_cases())
def test_indexed_batches_move_the_same_bytes_as_the_expansion(case):
    # random bytes everywhere: whatever the src holds, both paths must copy the same
    # bytes to the same places (test_expand.py checks the expansion against the reference)
    spec, src_tp, dst_tp = case["spec"], case["src_tp"], case["dst_tp"]
    pairs, rng = case["pairs"], np.random.default_rng(case["seed"])
    common = {"num_layers": case["num_layers"], "num_blocks": case["num_blocks"], "gap_nbytes": case["gap"]}
    src_regions = [make_regions(case["src_order"], (rank + 1) << 32, device_id=rank, **common,
                                page_nbytes=page_layout(spec, src_tp, 0).content_nbytes + case["src_pad"])
                   for rank in range(src_tp)]
    src_mem = [Memory(r, rng) for r in src_regions]
    dst_page = page_layout(spec, dst_tp, 0).content_nbytes + case["dst_pad"]
    for dst_rank in range(dst_tp):
        plan = plan_reads(spec, src_tp, dst_tp, dst_rank)
        dst_regions = make_regions(case["dst_order"], 1 << 40, page_nbytes=dst_page, device_id=7, **common)
        tables = [prepare_tables(plan, r, src_regions[r], dst_regions) for r in plan.src_ranks]
        indexed = index_batch(tables, pairs, layers=case["layers"])
        expansion = expand_plan(plan, src_regions, dst_regions, pairs, layers=case["layers"])
        by_prepared = Memory(dst_regions, rng)
        by_expansion = by_prepared.data.copy()
        for t, ranked, expanded in zip(tables, indexed.ranks, expansion.ranks):
            assert ranked.src_rank == t.src_rank == expanded.src_rank
            assert ranked.dst_indices.dtype == ranked.src_indices.dtype == np.int32
            dst = t.dst_table.descriptors()[ranked.dst_indices]
            src = t.src_table.descriptors()[ranked.src_indices]
            assert np.array_equal(dst[:, 1], src[:, 1])
            assert np.all(dst[:, 2] == 7) and np.all(src[:, 2] == t.src_rank)
            memory = src_mem[t.src_rank]
            for (d, n, _), (s, _, _) in zip(dst.tolist(), src.tolist()):
                buffer_of(dst_regions, d, n), buffer_of(src_regions[t.src_rank], s, n)
                by_prepared.data[by_prepared.at(d, n)] = memory.data[memory.at(s, n)]
            for (d, n, _), (s, _, _) in zip(expanded.dst_descs.tolist(), expanded.src_descs.tolist()):
                by_expansion[by_prepared.at(d, n)] = memory.data[memory.at(s, n)]
            assert (ranked.num_reads, ranked.nbytes) == (expanded.num_reads, expanded.nbytes)
            assert ranked.num_descriptors == nixl_merged_count(t, ranked)
            assert expanded.num_descriptors <= ranked.num_descriptors <= ranked.dst_indices.size
        np.testing.assert_array_equal(by_prepared.data, by_expansion)
        assert np.array_equal(indexed.block_pairs, expansion.block_pairs)
        assert np.array_equal(indexed.layers, expansion.layers)


# --- examples -----------------------------------------------------------------------------

SPEC = Mamba2Spec(num_heads=4, head_dim=2, num_groups=2, state_size=2, conv_kernel=3)


def _content(tp: int) -> int:
    return page_layout(SPEC, tp, 0).content_nbytes


def test_tables_are_nx5_rows_per_layer_and_read():
    plan = plan_reads(SPEC, 1, 2, 0)
    src = RegionSet.packed(1 << 32, num_layers=3, num_blocks=5, page_nbytes=_content(1) + 8)
    dst = RegionSet.packed(1 << 40, num_layers=3, num_blocks=5, page_nbytes=_content(2))
    tables = prepare_tables(plan, 0, src, dst)
    reads = sorted(plan.reads_from(0), key=lambda r: r.dst_offset)  # maximal: none merge
    k = len(reads)
    assert tables.src_table.rows.shape == tables.dst_table.rows.shape == (3 * k, 5)
    assert tables.src_table.row_start.tolist() == [[5 * (layer * k + j) for j in range(k)] for layer in range(3)]
    for layer in range(3):
        for j, read in enumerate(reads):
            assert tables.src_table.rows[layer * k + j].tolist() == [
                src.page_addr(layer, 0) + read.src_offset, read.nbytes, 0, _content(1) + 8, 5]
            assert tables.dst_table.rows[layer * k + j].tolist() == [
                dst.page_addr(layer, 0) + read.dst_offset, read.nbytes, 0, _content(2), 5]
    assert tables.page_nbytes == plan.dst_content_nbytes


def test_equal_tp_consecutive_blocks_without_padding_merge_per_layer_only():
    # one whole-page read per page; blocks 3, 4, 5 -> 10, 11, 12 are back to back on both
    # sides, so NIXL merges each layer's three into one; layers are separate rows
    for order in ("layer", "block"):
        src = RegionSet.packed(1 << 32, num_layers=4, num_blocks=20, page_nbytes=_content(1), order=order)
        dst = RegionSet.packed(1 << 40, num_layers=4, num_blocks=20, page_nbytes=_content(1), order=order)
        plan = plan_reads(SPEC, 1, 1, 0)
        tables = prepare_tables(plan, 0, src, dst)
        indexed = index_batch([tables], np.array([[5, 12], [3, 10], [4, 11]]))
        (ranked,) = indexed.ranks
        assert ranked.dst_indices.tolist() == [layer * 20 + b for layer in range(4) for b in (10, 11, 12)]
        assert ranked.src_indices.tolist() == [layer * 20 + b for layer in range(4) for b in (3, 4, 5)]
        # block-major rows stride over every layer: nothing is back to back
        assert ranked.num_descriptors == (4 if order == "layer" else 12)
        assert expand_plan(plan, [src], dst, np.array([[5, 12], [3, 10], [4, 11]])).num_descriptors == (
            4 if order == "layer" else 1)


def test_single_block_layers_and_empty_batches():
    src = RegionSet.per_layer([1 << 32, 1 << 33], num_blocks=1, page_nbytes=_content(1))
    dst = RegionSet.per_layer([1 << 40, 1 << 41], num_blocks=1, page_nbytes=_content(2) + 3)
    tables = prepare_tables(plan_reads(SPEC, 1, 2, 1), 0, src, dst)
    assert (tables.src_table.rows[:, 4] == 1).all()
    indexed = index_batch([tables], np.array([[0, 0]]), layers=[1])
    assert indexed.ranks[0].dst_indices.tolist() == list(tables.dst_table.row_start[1])
    empty = index_batch([tables], np.zeros((0, 2), np.int64))
    assert (empty.num_descriptors, empty.nbytes, empty.ranks[0].dst_indices.size) == (0, 0, 0)


# --- errors -------------------------------------------------------------------------------


def _tables(num_blocks: int = 4):
    src = RegionSet.packed(1 << 32, num_layers=2, num_blocks=num_blocks, page_nbytes=_content(1))
    dst = RegionSet.packed(1 << 40, num_layers=2, num_blocks=num_blocks, page_nbytes=_content(2))
    return prepare_tables(plan_reads(SPEC, 1, 2, 0), 0, src, dst)


@pytest.mark.parametrize("pairs, layers, error, match", [
    ([[4, 0]], None, BlockRangeError, "src rank 0 block id 4 is out of range"),
    ([[0, -1]], None, BlockRangeError, "dst block id -1"),
    ([[0, 0]], [2], BlockRangeError, "Layer 2 is out of range"),
    ([[0, 1], [2, 1]], None, PlanError, "dst block 1 appears twice"),
    ([0, 1], None, PlanError, "shape \\(N, 2\\)"),
])
def test_bad_batches(pairs, layers, error, match):
    with pytest.raises(error, match=match):
        index_batch([_tables()], np.array(pairs), layers=layers)


def test_bad_tables():
    tables = _tables()
    with pytest.raises(PlanError, match="non-empty sequence of RankTables"):
        index_batch([], np.array([[0, 0]]))
    with pytest.raises(PlanError, match="one plan and one dst RegionSet"):
        index_batch([tables, _tables(num_blocks=5)], np.array([[0, 0]]))
    two = plan_reads(SPEC, 2, 1, 0)
    half = RegionSet.packed(1 << 32, num_layers=2, num_blocks=4, page_nbytes=_content(2))
    whole = RegionSet.packed(1 << 40, num_layers=2, num_blocks=4, page_nbytes=_content(1))
    with pytest.raises(PlanError, match="reads from src rank 1, but no tables"):
        index_batch([prepare_tables(two, 0, half, whole)], np.array([[0, 0]]))
    with pytest.raises(PlanError, match="reads nothing from src rank 3"):
        prepare_tables(two, 3, half, whole)
    small = RegionSet.packed(1 << 40, num_layers=2, num_blocks=4, page_nbytes=_content(2) - 1)
    with pytest.raises(PlanError, match="smaller than the plan's dst content"):
        prepare_tables(plan_reads(SPEC, 1, 2, 0), 0, tables.src_regions, small)
    layer = LayerRegion(1 << 40, _content(2), _content(2), 4)
    overlapping = RegionSet((layer, layer), (Buffer(1 << 40, 4 * _content(2)),))
    with pytest.raises(PlanError, match="overlap"):
        prepare_tables(plan_reads(SPEC, 1, 2, 0), 0, tables.src_regions, overlapping)
    huge = RegionSet((LayerRegion(0, _content(2), _content(2), 1 << 31),), (Buffer(0, _content(2) << 31),))
    with pytest.raises(PlanError, match="int32 indices"):
        prepare_tables(plan_reads(SPEC, 1, 2, 0), 0, tables.src_regions, huge)
