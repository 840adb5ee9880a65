"""The vLLM connector helpers are the core's expansion (properties; no vLLM needed).

`block_descriptors` and `strided_descriptors` take vLLM's numbers (per-region base
addresses, page strides, block counts) and must give exactly what `expand_plan` and
`prepare_tables` give on the equivalent `RegionSet`s, and the descriptors, applied as
copies, must rebuild the reference model's dst pages.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from ssm_split import RegionSet, expand_plan, plan_all, plan_reads
from ssm_split.expand import index_batch, prepare_tables
from ssm_split.integrations import vllm as sv
from ssm_split.reference import random_state, shard
from tests.strategies import paddings, transfer_cases


@st.composite
def connector_cases(draw):
    """A transfer, one dst rank, per-side padding and kernel-block ratios, a few regions
    (slots) and a batch of distinct dst blocks."""
    spec, src_tp, dst_tp = draw(transfer_cases(max_tp=4))
    dst_rank = draw(st.integers(0, dst_tp - 1))
    num_regions = draw(st.integers(1, 3))
    num_blocks = draw(st.integers(1, 5))
    size = draw(st.integers(1, num_blocks))
    src_blocks = draw(st.lists(st.integers(0, num_blocks - 1), min_size=size, max_size=size))
    dst_blocks = draw(st.permutations(range(num_blocks)))[:size]
    return (spec, src_tp, dst_tp, dst_rank, num_regions, num_blocks,
            list(zip(src_blocks, dst_blocks)), draw(paddings()), draw(paddings()),
            draw(st.integers(1, 4)))


def geometry(plan, num_regions, num_blocks, src_pad, dst_pad, ratio):
    """vLLM-like numbers for both sides: slots back to back from a base address, the src
    page stride a whole number (`ratio`) of kernel blocks."""
    kernel = -(-(plan.src_content_nbytes + src_pad) // ratio)
    src_stride = sv.page_stride_nbytes(kernel, ratio)
    dst_stride = plan.dst_content_nbytes + dst_pad
    src_bases = {r: [(1 << 32) * (r + 1) + i * num_blocks * src_stride for i in range(num_regions)]
                 for r in plan.src_ranks}
    dst_bases = [(1 << 40) + i * num_blocks * dst_stride for i in range(num_regions)]
    return dict(src_base_addrs=src_bases, src_page_stride_nbytes=src_stride, src_num_blocks=num_blocks,
                dst_base_addrs=dst_bases, dst_page_stride_nbytes=dst_stride, dst_num_blocks=num_blocks)


def region_sets(kw):
    src = {r: RegionSet.strided(b, page_nbytes=kw["src_page_stride_nbytes"],
                                page_stride_nbytes=kw["src_page_stride_nbytes"],
                                num_blocks=kw["src_num_blocks"])
           for r, b in kw["src_base_addrs"].items()}
    dst = RegionSet.strided(kw["dst_base_addrs"], page_nbytes=kw["dst_page_stride_nbytes"],
                            page_stride_nbytes=kw["dst_page_stride_nbytes"], num_blocks=kw["dst_num_blocks"])
    return src, dst


@given(case=connector_cases())
def test_block_descriptors_are_expand_plan_and_rebuild_the_reference_pages(case):
    spec, src_tp, dst_tp, dst_rank, num_regions, num_blocks, pairs, src_pad, dst_pad, ratio = case
    plan = plan_reads(spec, src_tp, dst_tp, dst_rank)
    kw = geometry(plan, num_regions, num_blocks, src_pad, dst_pad, ratio)
    got = sv.block_descriptors(plan, pairs, **kw)
    want = expand_plan(plan, *region_sets(kw), pairs)
    assert [r.src_rank for r in got.ranks] == [r.src_rank for r in want.ranks] == list(plan.src_ranks)
    for a, b in zip(got.ranks, want.ranks):
        np.testing.assert_array_equal(a.dst_descs, b.dst_descs)
        np.testing.assert_array_equal(a.src_descs, b.src_descs)
    # applied as copies between memories at those addresses: the reference pages land
    src_stride, dst_stride = kw["src_page_stride_nbytes"], kw["dst_page_stride_nbytes"]
    states = {(i, b): random_state(spec, 7 * i + b) for i in range(num_regions) for b in range(num_blocks)}
    src_mem = {}
    for rank in plan.src_ranks:
        base = kw["src_base_addrs"][rank][0]
        mem = np.full(num_regions * num_blocks * src_stride, 0x5A, np.uint8)
        for (i, b), state in states.items():
            page = shard(spec, state, src_tp)[rank]
            start = kw["src_base_addrs"][rank][i] + b * src_stride - base
            mem[start: start + len(page)] = page
        src_mem[rank] = (base, mem)
    dst_base = kw["dst_base_addrs"][0]
    dst_mem = np.full(num_regions * num_blocks * dst_stride, 0xA5, np.uint8)
    for part in got.ranks:
        base, mem = src_mem[part.src_rank]
        for (d, n, _), (s, m, _) in zip(part.dst_descs.tolist(), part.src_descs.tolist()):
            dst_mem[d - dst_base: d - dst_base + n] = mem[s - base: s - base + m]
    expected = np.full_like(dst_mem, 0xA5)
    for i in range(num_regions):
        for src_block, dst_block in pairs:
            page = shard(spec, states[i, src_block], dst_tp)[dst_rank]
            start = kw["dst_base_addrs"][i] + dst_block * dst_stride - dst_base
            expected[start: start + len(page)] = page
    np.testing.assert_array_equal(dst_mem, expected)


@given(case=connector_cases())
def test_strided_descriptors_are_prepare_tables_and_index_like_expand_plan(case):
    spec, src_tp, dst_tp, dst_rank, num_regions, num_blocks, pairs, src_pad, dst_pad, ratio = case
    plan = plan_reads(spec, src_tp, dst_tp, dst_rank)
    kw = geometry(plan, num_regions, num_blocks, src_pad, dst_pad, ratio)
    tables = sv.strided_descriptors(plan, src_device_ids={r: r for r in plan.src_ranks}, dst_device_id=5, **kw)
    src_sets, dst_set = region_sets(kw)
    assert [t.src_rank for t in tables] == list(plan.src_ranks)
    for table in tables:
        want = prepare_tables(plan, table.src_rank, src_sets[table.src_rank], dst_set)
        np.testing.assert_array_equal(table.dst_table.rows[:, [0, 1, 3, 4]], want.dst_table.rows[:, [0, 1, 3, 4]])
        np.testing.assert_array_equal(table.src_table.rows[:, [0, 1, 3, 4]], want.src_table.rows[:, [0, 1, 3, 4]])
        assert (table.dst_table.rows[:, 2] == 5).all() and (table.src_table.rows[:, 2] == table.src_rank).all()
        # vLLM's strided form: one row per (region, read), `count` = the region's blocks
        assert (table.dst_table.rows[:, 4] == num_blocks).all()
    # the same byte moves as the per-batch expansion
    batch = index_batch(tables, pairs)
    expansion = sv.block_descriptors(plan, pairs, **kw)
    for indices, table, part in zip(batch.ranks, tables, expansion.ranks):
        dst = table.dst_table.descriptors()[indices.dst_indices]
        src = table.src_table.descriptors()[indices.src_indices]
        assert moves(dst, src) == moves(part.dst_descs, part.src_descs)


def moves(dst, src) -> list[tuple[int, int, int]]:
    """`(dst_addr, src_addr, nbytes)` runs, sorted and merged wherever contiguous on
    both sides: the same list for any split of the same copies."""
    runs: list[list[int]] = []
    for (d, n, _), (s, _, _) in sorted(zip(dst.tolist(), src.tolist())):
        if runs and runs[-1][0] + runs[-1][2] == d and runs[-1][1] + runs[-1][2] == s:
            runs[-1][2] += n
        else:
            runs.append([d, s, n])
    return [tuple(r) for r in runs]


@given(num_regions=st.integers(1, 4), logical=st.integers(1, 6), ratio=st.integers(1, 40),
       kernel=st.integers(1, 1 << 16), gap=st.integers(0, 3))
def test_handshake_regions_use_the_engines_ratio(num_regions, logical, ratio, kernel, gap):
    page = kernel * ratio
    bases = [4096 + i * (logical * page + gap) for i in range(num_regions)]
    regions = sv.region_set_from_vllm_handshake(bases, block_stride_nbytes=kernel,
                                                num_blocks=logical * ratio,
                                                physical_blocks_per_logical=ratio)
    assert regions.num_layers == num_regions
    for i, region in enumerate(regions.layers):
        assert (region.base_addr, region.page_stride_nbytes, region.num_blocks) == (bases[i], page, logical)
        assert regions.page_addr(i, logical - 1) == bases[i] + (logical - 1) * kernel * ratio


@given(case=transfer_cases(max_tp=6))
def test_connector_read_offsets_are_the_plans_reads_by_src_rank(case):
    spec, src_tp, dst_tp = case
    for plan in plan_all(spec, src_tp, dst_tp):
        pairs = sv.connector_read_offsets(plan)
        assert tuple(p.src_rank for p in pairs) == plan.src_ranks
        for p in pairs:
            reads = plan.reads_from(p.src_rank)
            assert p.dst_ranges == tuple((r.dst_offset, r.nbytes) for r in reads)
            assert p.src_ranges == tuple((r.src_offset, r.nbytes) for r in reads)
