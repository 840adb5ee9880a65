"""Staged plans (`ssm_split.strategies`) against the reference model.

Whatever grouping is chosen (by the cost model, all reads staged, or random runs), the
staged execution must rebuild exactly the dst page that `reference.shard` gives, touch no
padding, stay inside the staging slot, and read every byte a plain plan reads.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ssm_split import plan_reads, reference
from ssm_split.strategies._cost import DEFAULT_COST_MODEL, CostModel, choose_groups
from ssm_split.errors import PlanError
from ssm_split.layout._regions import RegionSet
from ssm_split.expand._expand import expand_plan
from ssm_split.strategies._staging import SLOT_ALIGN_NBYTES, apply_staged, stage_plan
from tests.strategies import paddings, rank_cases, seeds

# a model where descriptors are so expensive that staging always wins, and one where
# bytes are so expensive that it never does
ALWAYS_STAGE = CostModel(desc_s=1.0, byte_s=1e-15, gather_byte_s=1e-15)
NEVER_STAGE = CostModel(desc_s=1e-15, byte_s=1.0, gather_byte_s=1.0)


def _pages(spec, src_tp, dst_tp, dst_rank, seed, pad):
    state = reference.random_state(spec, seed)
    src = reference.shard(spec, state, src_tp)
    want = reference.shard(spec, state, dst_tp)[dst_rank]
    dst = np.full(len(want) + pad, 0xA5, dtype=np.uint8)
    want = np.concatenate([want, np.full(pad, 0xA5, dtype=np.uint8)])
    return src, dst, want


@st.composite
def _groupings(draw, plan):
    """Random runs of consecutive (by src offset) reads, per src rank."""
    groups = []
    for rank in plan.src_ranks:
        reads = sorted(plan.reads_from(rank), key=lambda r: r.src_offset)
        i = 0
        while i < len(reads):
            size = draw(st.integers(1, len(reads) - i))
            groups.append(tuple(reads[i:i + size]))
            i += size
    return groups


@given(case=rank_cases(max_tp=6), seed=seeds(), pad=paddings(), model=st.sampled_from(
    [DEFAULT_COST_MODEL, ALWAYS_STAGE, NEVER_STAGE]))
def test_staged_execution_rebuilds_the_dst_page(case, seed, pad, model):
    spec, src_tp, dst_tp, dst_rank = case
    plan = plan_reads(spec, src_tp, dst_tp, dst_rank)
    staged = stage_plan(plan, model=model)
    src, dst, want = _pages(spec, src_tp, dst_tp, dst_rank, seed, pad)
    got = apply_staged(staged, src, dst)
    assert np.array_equal(got, want)


@given(case=rank_cases(max_tp=6), seed=seeds(), data=st.data())
def test_any_grouping_of_runs_is_correct(case, seed, data):
    spec, src_tp, dst_tp, dst_rank = case
    plan = plan_reads(spec, src_tp, dst_tp, dst_rank)
    groups = data.draw(_groupings(plan))
    staged = stage_plan(plan, groups=groups)
    src, dst, want = _pages(spec, src_tp, dst_tp, dst_rank, seed, 0)
    assert np.array_equal(apply_staged(staged, src, dst), want)
    # one descriptor per group; staged bytes all gathered, each once
    assert staged.descriptors_per_page == len(groups)
    staged_reads = [r for g in groups if len(g) > 1 for r in g]
    assert staged.gathered_nbytes_per_page == sum(r.nbytes for r in staged_reads)
    assert staged.read_nbytes_per_page >= plan.nbytes


@given(case=rank_cases(max_tp=6))
def test_slot_is_aligned_and_spans_do_not_overlap(case):
    plan = plan_reads(*case)
    staged = stage_plan(plan, model=ALWAYS_STAGE)
    assert staged.slot_nbytes % SLOT_ALIGN_NBYTES == 0
    spans = sorted(staged.spans, key=lambda s: s.slot_offset)
    for a, b in zip(spans, spans[1:]):
        assert a.slot_offset + a.nbytes <= b.slot_offset
    for s in spans:
        assert s.slot_offset % SLOT_ALIGN_NBYTES == 0
        assert s.src_offset + s.nbytes <= plan.src_content_nbytes


@given(case=rank_cases(max_tp=6))
def test_extreme_models_choose_all_or_nothing(case):
    plan = plan_reads(*case)
    never = stage_plan(plan, model=NEVER_STAGE)
    assert never.spans == () and never.moves == () and set(never.direct) == set(plan.reads)
    always = stage_plan(plan, model=ALWAYS_STAGE)
    # one descriptor per src rank: everything a src rank serves in one span
    assert always.descriptors_per_page == len(plan.src_ranks)


@given(case=rank_cases(max_tp=6))
def test_choose_groups_is_optimal_among_runs(case):
    """The dynamic program beats (or ties) every other split into runs we can list."""
    plan = plan_reads(*case)
    for rank in plan.src_ranks:
        reads = sorted(plan.reads_from(rank), key=lambda r: r.src_offset)
        if len(reads) > 8:
            continue

        def cost(groups):
            return sum(DEFAULT_COST_MODEL.read_s(1, g[0].nbytes) if len(g) == 1 else
                       DEFAULT_COST_MODEL.staged_s(max(r.src_end for r in g) - g[0].src_offset,
                                                   sum(r.nbytes for r in g)) for g in groups)

        chosen = cost(choose_groups(reads))
        k = len(reads)
        for mask in range(1 << (k - 1)):  # every split into consecutive runs
            groups, start = [], 0
            for i in range(1, k):
                if mask >> (i - 1) & 1:
                    groups.append(reads[start:i])
                    start = i
            groups.append(reads[start:])
            assert chosen <= cost(groups) * (1 + 1e-12)


def test_bad_groupings_are_rejected():
    import ssm_split

    spec = ssm_split.model("qwen3.5-0.8b")
    plan = plan_reads(spec, 1, 2, 0)
    with pytest.raises(PlanError, match="exactly once"):
        stage_plan(plan, groups=[plan.reads[:1]])
    two = plan_reads(spec, 2, 1, 0)
    with pytest.raises(PlanError, match="one src rank"):
        stage_plan(two, groups=[two.reads])


@given(case=rank_cases(max_tp=4), seed=seeds(), num_blocks=st.integers(1, 4), num_layers=st.integers(1, 3),
       data=st.data())
def test_staged_batch_through_expand_plan(case, seed, num_blocks, num_layers, data):
    """Spans and moves expanded with `expand_plan` over flat memory give the reference pages."""
    spec, src_tp, dst_tp, dst_rank = case
    plan = plan_reads(spec, src_tp, dst_tp, dst_rank)
    staged = stage_plan(plan, model=ALWAYS_STAGE)
    src_blocks = data.draw(st.permutations(range(num_blocks)))
    dst_blocks = data.draw(st.permutations(range(num_blocks)))
    pairs = np.array(list(zip(src_blocks, dst_blocks)), dtype=np.int64)
    sp = plan.src_content_nbytes
    dp = plan.dst_content_nbytes
    slot = max(staged.slot_nbytes, 1)
    # memory: one flat array per side; per-layer regions of num_blocks pages each
    src_mem = [np.zeros(num_layers * num_blocks * sp, np.uint8) for _ in range(src_tp)]
    for layer in range(num_layers):
        for b in range(num_blocks):
            for r in range(src_tp):
                # page of block b holds layer state of request b (rotated per block)
                page = reference.shard(spec, reference.random_state(spec, seed + 7 * layer + 1000 * b), src_tp)[r]
                src_mem[r][(layer * num_blocks + b) * sp:(layer * num_blocks + b + 1) * sp] = page
    dst_mem = np.full(num_layers * num_blocks * dp, 0x5A, np.uint8)
    stage_mem = np.zeros(num_layers * num_blocks * slot, np.uint8)
    bases = {"dst": 1 << 36, "stage": 1 << 32}
    src_regions = [RegionSet.packed(1 << 40, num_layers=num_layers, num_blocks=num_blocks, page_nbytes=sp,
                                    device_id=r) for r in range(src_tp)]
    dst_regions = RegionSet.packed(bases["dst"], num_layers=num_layers, num_blocks=num_blocks, page_nbytes=dp)
    stage_regions = RegionSet.packed(bases["stage"], num_layers=num_layers, num_blocks=num_blocks, page_nbytes=slot)

    def run(expansion, src_of, dst_arr, dst_base):
        for rank in expansion.ranks:
            mem = src_of(rank.src_rank)
            for (d_addr, n, _), (s_addr, _, _) in zip(rank.dst_descs, rank.src_descs):
                s0 = int(s_addr) - (1 << 40 if mem is not stage_mem else bases["stage"])
                d0 = int(d_addr) - dst_base
                dst_arr[d0:d0 + int(n)] = mem[s0:s0 + int(n)]

    slot_pairs = np.stack([pairs[:, 0], np.arange(num_blocks)], axis=1)
    if staged.spans:
        run(expand_plan(staged.spans_plan(), src_regions, stage_regions, slot_pairs),
            lambda r: src_mem[r], stage_mem, bases["stage"])
    if staged.direct:
        run(expand_plan(staged.direct_plan(), src_regions, dst_regions, pairs),
            lambda r: src_mem[r], dst_mem, bases["dst"])
    if staged.moves:
        move_pairs = np.stack([np.arange(num_blocks), pairs[:, 1]], axis=1)
        run(expand_plan(staged.moves_plan(), [stage_regions], dst_regions, move_pairs),
            lambda r: stage_mem, dst_mem, bases["dst"])
    for layer in range(num_layers):
        for src_b, dst_b in pairs:
            state = reference.random_state(spec, seed + 7 * layer + 1000 * int(src_b))
            want = reference.shard(spec, state, dst_tp)[dst_rank]
            at = (layer * num_blocks + int(dst_b)) * dp
            assert np.array_equal(dst_mem[at:at + dp], want)
