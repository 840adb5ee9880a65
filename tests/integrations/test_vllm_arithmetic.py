"""vLLM's three-read arithmetic on the published Granite-4.0-H-Tiny case (examples; no
vLLM needed: `tests/_vllm_restated.py` restates vLLM 0.33's offsets). For n_groups=1
under heterogeneous TP (1 -> 2) vLLM's reads land in the wrong segments (dst rank 0's C
read lands in the src temporal state, dst rank 1 reads the src C as its B) and rebuild
wrong pages, while `plan_reads` is right; 2 -> 1 duplicates B halves and never reads C.
"""

from __future__ import annotations

import numpy as np

from ssm_split import Mamba2Spec, page_layout, plan_reads
from ssm_split.reference import apply, random_state, shard
from tests._vllm_restated import as_plan, vllm_reads, vllm_src_conv_ranges


# --- the published case ---------------------------------------------------------------------


def test_restatement_matches_vllms_published_remote_conv_offsets():
    # vllm.md §6: remote_conv_offsets(0, -2) for dims (20, 10, 10), 3 rows, 2-byte elements
    assert vllm_src_conv_ranges([120, 60, 60], 0, src_tp=2, dst_tp=1) == [(0, 60), (60, 30), (90, 30)]


# --- n_groups = 1 under heterogeneous TP: vLLM is wrong, plan_reads is right ---------------

GRANITE_TINY = Mamba2Spec(num_heads=48, head_dim=64, num_groups=1, state_size=128, ssm_dtype="float32")


def _src_segments(spec, src_tp, read):
    return tuple(s.name for s in page_layout(spec, src_tp, read.src_rank)
                 .segments_overlapping(read.src_offset, read.nbytes))


def _bytes_of(page, spec, tp, rank, name):
    seg, = page_layout(spec, tp, rank).part_segments(name)
    return page[seg.offset: seg.end]


def test_granite_tiny_1_to_2_vllm_reads_land_in_the_wrong_segments():
    rank0 = vllm_reads(GRANITE_TINY, 1, 2, 0)
    rank1 = vllm_reads(GRANITE_TINY, 1, 2, 1)
    # the offsets of vllm.md §4.1's table: x, B, C, temporal
    assert [(r.src_offset, r.src_end) for r in rank0[:3]] == [(0, 9216), (18432, 19200), (19968, 20736)]
    assert [(r.src_offset, r.src_end) for r in rank1[:3]] == [(9216, 18432), (19200, 19968), (20736, 21504)]
    assert _src_segments(GRANITE_TINY, 1, rank0[2]) == ("temporal",)  # dst 0's C: src temporal
    assert _src_segments(GRANITE_TINY, 1, rank1[1]) == ("conv.C",)    # dst 1's B: src C
    assert _src_segments(GRANITE_TINY, 1, rank1[2]) == ("temporal",)  # dst 1's C: src temporal
    assert [_src_segments(GRANITE_TINY, 1, r) for r in (rank0[3], rank1[3])] == [("temporal",)] * 2


def test_granite_tiny_1_to_2_vllm_gives_wrong_bytes_plan_reads_the_right_ones():
    state = random_state(GRANITE_TINY, seed=7)
    src_pages, want = shard(GRANITE_TINY, state, 1), shard(GRANITE_TINY, state, 2)
    for dst_rank in range(2):
        blank = np.zeros_like(want[dst_rank])
        ours = apply(plan_reads(GRANITE_TINY, 1, 2, dst_rank), src_pages, blank)
        np.testing.assert_array_equal(ours, want[dst_rank])
        theirs = apply(as_plan(GRANITE_TINY, 1, 2, dst_rank), src_pages, blank)
        for name in ("conv.x", "temporal"):  # vLLM gets these right
            assert np.array_equal(*(_bytes_of(p, GRANITE_TINY, 2, dst_rank, name) for p in (theirs, want[dst_rank])))
        wrong = ("conv.C",) if dst_rank == 0 else ("conv.B", "conv.C")
        for name in wrong:
            assert not np.array_equal(*(_bytes_of(p, GRANITE_TINY, 2, dst_rank, name)
                                        for p in (theirs, want[dst_rank]))), name
    # dst rank 1's B is the src's C
    theirs = apply(as_plan(GRANITE_TINY, 1, 2, 1), src_pages, np.zeros_like(want[1]))
    np.testing.assert_array_equal(_bytes_of(theirs, GRANITE_TINY, 2, 1, "conv.B"),
                                  _bytes_of(src_pages[0], GRANITE_TINY, 1, 0, "conv.C"))


def test_granite_tiny_2_to_1_vllm_duplicates_b_halves_and_never_reads_c():
    state = random_state(GRANITE_TINY, seed=8)
    src_pages, want = shard(GRANITE_TINY, state, 2), shard(GRANITE_TINY, state, 1)[0]
    theirs = apply(as_plan(GRANITE_TINY, 2, 1, 0), src_pages, np.zeros_like(want))
    src_b = _bytes_of(src_pages[0], GRANITE_TINY, 2, 0, "conv.B")
    half = len(src_b) // 2  # 64 channels of 3 bf16 rows
    b, c = (_bytes_of(theirs, GRANITE_TINY, 1, 0, n) for n in ("conv.B", "conv.C"))
    np.testing.assert_array_equal(b, np.concatenate([src_b[:half], src_b[:half]]))
    np.testing.assert_array_equal(c, np.concatenate([src_b[half:], src_b[half:]]))
    assert not np.array_equal(theirs, want)
    np.testing.assert_array_equal(apply(plan_reads(GRANITE_TINY, 2, 1, 0), src_pages, np.zeros_like(want)), want)


