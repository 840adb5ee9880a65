"""vLLM's three-read arithmetic against `plan_reads`, on the reference model's pages.

The first section is OUR OWN RE-STATEMENT of the offsets vLLM's NIXL connector computes
for a decode (dst) rank reading from prefill (src) ranks, as documented in
`/work/shared/reference/vllm.md` §3.2 (sub-projection widths recovered from an engine's
own state shapes), §3.5 (`remote_conv_offsets` and the temporal slice) and §3.6 (src TP >
dst TP: every dst range split evenly among the src ranks). It is not vLLM's code and
needs no vLLM; a separate suite checks the real package.

The tests then show that:

- for n_groups=1 models under heterogeneous TP (Granite-4.0-H-Tiny 1 -> 2), vLLM's reads
  land in the wrong segments (dst rank 0's C read lands in the src temporal state, dst
  rank 1 reads the src C as its B) and rebuild wrong pages, while `plan_reads` is right;
- on fully sharded cases (n_groups % tp == 0 on both sides, divisible TP, DS) both move
  exactly the same bytes.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import example, given

from ssm_split import GDNSpec, Mamba1Spec, Mamba2Spec, Read, page_layout, plan_all, plan_reads
from ssm_split.layout import sharded_shapes
from ssm_split.reference import apply, content_nbytes, iota_state, random_state, shard
from tests.strategies import replicated_transfer_cases, transfer_cases

# --- vLLM's arithmetic, restated (DS only; one TP size must divide the other) --------------


def vllm_recovered_widths(spec, tp: int) -> tuple[int, ...]:
    """Per-rank sub-projection widths as vLLM recovers them from one engine's own state
    shapes, `(channels, rows)` and the temporal shape (vllm.md §3.2)."""
    (channels, _), temporal = sharded_shapes(spec, tp)
    if isinstance(spec, Mamba2Spec):  # temporal (heads_r, head_dim, N)
        x_full = temporal[0] * tp * temporal[1]
        groups_full = (channels * tp - x_full) // 2
        return (x_full // tp, groups_full // tp, groups_full // tp)
    if isinstance(spec, GDNSpec):  # temporal (v_heads_r, dv, dk)
        v = temporal[0] * temporal[1]
        return ((channels - v) // 2, (channels - v) // 2, v)
    return (channels,)  # Mamba1


def vllm_ssm_sizes(spec, tp: int) -> tuple[int, int]:
    """`(conv_nbytes, temporal_nbytes)` of one rank, as sent in vLLM's handshake."""
    conv_shape, temporal_shape = sharded_shapes(spec, tp)
    return (math.prod(conv_shape) * spec.conv_nbytes_per_elem,
            math.prod(temporal_shape) * spec.ssm_nbytes_per_elem)


def vllm_src_conv_ranges(proj_nbytes, local_offset: int, src_tp: int, dst_tp: int):
    """`(src_offset, nbytes)` of each conv sub-projection read (`remote_conv_offsets`).

    `proj_nbytes` are the dst rank's sub-projection sizes. Reading from a smaller or
    equal src TP (vLLM's ratio r = dst_tp / src_tp >= 1), the dst assumes each src
    sub-projection is r times its own and reads slice `local_offset` of it. Reading from
    a larger src TP (vLLM's negative ratio, n = src_tp / dst_tp), it reads 1/n of each
    of its own sizes from the start of each src sub-projection, assumed 1/n of its own.
    """
    if dst_tp >= src_tp:
        ratio = dst_tp // src_tp
        return [(sum(proj_nbytes[:i]) * ratio + local_offset * size, size)
                for i, size in enumerate(proj_nbytes)]
    n = src_tp // dst_tp
    return [(sum(s // n for s in proj_nbytes[:i]), size // n) for i, size in enumerate(proj_nbytes)]


def vllm_reads(spec, src_tp: int, dst_tp: int, dst_rank: int) -> list[Read]:
    """The reads vLLM's connector makes for dst rank `dst_rank`: per src rank, one read
    per conv sub-projection and one for the temporal state (vllm.md §3.5, §3.6)."""
    assert dst_tp % src_tp == 0 or src_tp % dst_tp == 0, "vLLM rejects this TP pair"
    rows, elem = spec.conv_rows, spec.conv_nbytes_per_elem
    proj = [w * rows * elem for w in vllm_recovered_widths(spec, dst_tp)]
    dst_starts = [sum(proj[:i]) for i in range(len(proj))]
    dst_conv, dst_temporal = vllm_ssm_sizes(spec, dst_tp)
    src_conv, _ = vllm_ssm_sizes(spec, src_tp)
    reads = []
    if dst_tp >= src_tp:
        ratio = dst_tp // src_tp
        src_rank, local_offset = dst_rank * src_tp // dst_tp, dst_rank % ratio
        for (src_offset, size), dst_offset in zip(
                vllm_src_conv_ranges(proj, local_offset, src_tp, dst_tp), dst_starts):
            reads.append((src_rank, src_offset, dst_offset, size))
        reads.append((src_rank, src_conv + local_offset * dst_temporal, dst_conv, dst_temporal))
    else:
        n = src_tp // dst_tp
        for part in range(n):  # src rank dst_rank*n + part fills the part-th 1/n of each range
            src_rank = dst_rank * n + part
            for (src_offset, size), dst_offset in zip(
                    vllm_src_conv_ranges(proj, 0, src_tp, dst_tp), dst_starts):
                reads.append((src_rank, src_offset, dst_offset + part * size, size))
            size = dst_temporal // n
            reads.append((src_rank, src_conv, dst_conv + part * size, size))
    return [Read(*r) for r in reads if r[3] > 0]  # vLLM would post empty descriptors


def byte_sources(reads, dst_nbytes: int) -> np.ndarray:
    """For each dst byte, `src_rank * 2**32 + src_byte` of the byte written there (-1: none).
    Fails if a dst byte is written twice."""
    sources = np.full(dst_nbytes, -1, dtype=np.int64)
    for read in reads:
        target = sources[read.dst_offset: read.dst_end]
        assert len(target) == read.nbytes and (target == -1).all(), f"{read} overlaps"
        target[:] = read.src_rank * 2**32 + np.arange(read.src_offset, read.src_end)
    return sources


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
        theirs = apply(_as_plan(GRANITE_TINY, 1, 2, dst_rank), src_pages, blank)
        for name in ("conv.x", "temporal"):  # vLLM gets these right
            assert np.array_equal(*(_bytes_of(p, GRANITE_TINY, 2, dst_rank, name) for p in (theirs, want[dst_rank])))
        wrong = ("conv.C",) if dst_rank == 0 else ("conv.B", "conv.C")
        for name in wrong:
            assert not np.array_equal(*(_bytes_of(p, GRANITE_TINY, 2, dst_rank, name)
                                        for p in (theirs, want[dst_rank]))), name
    # dst rank 1's B is the src's C
    theirs = apply(_as_plan(GRANITE_TINY, 1, 2, 1), src_pages, np.zeros_like(want[1]))
    np.testing.assert_array_equal(_bytes_of(theirs, GRANITE_TINY, 2, 1, "conv.B"),
                                  _bytes_of(src_pages[0], GRANITE_TINY, 1, 0, "conv.C"))


def test_granite_tiny_2_to_1_vllm_duplicates_b_halves_and_never_reads_c():
    state = random_state(GRANITE_TINY, seed=8)
    src_pages, want = shard(GRANITE_TINY, state, 2), shard(GRANITE_TINY, state, 1)[0]
    theirs = apply(_as_plan(GRANITE_TINY, 2, 1, 0), src_pages, np.zeros_like(want))
    src_b = _bytes_of(src_pages[0], GRANITE_TINY, 2, 0, "conv.B")
    half = len(src_b) // 2  # 64 channels of 3 bf16 rows
    b, c = (_bytes_of(theirs, GRANITE_TINY, 1, 0, n) for n in ("conv.B", "conv.C"))
    np.testing.assert_array_equal(b, np.concatenate([src_b[:half], src_b[:half]]))
    np.testing.assert_array_equal(c, np.concatenate([src_b[half:], src_b[half:]]))
    assert not np.array_equal(theirs, want)
    np.testing.assert_array_equal(apply(plan_reads(GRANITE_TINY, 2, 1, 0), src_pages, np.zeros_like(want)), want)


def _as_plan(spec, src_tp, dst_tp, dst_rank):
    """vLLM's reads wrapped in a Plan, so the reference model can apply them."""
    plan = plan_reads(spec, src_tp, dst_tp, dst_rank)
    reads = tuple(sorted(vllm_reads(spec, src_tp, dst_tp, dst_rank), key=lambda r: (r.src_rank, r.dst_offset)))
    return type(plan)(spec, src_tp, dst_tp, dst_rank, reads, plan.src_content_nbytes, plan.dst_content_nbytes)


@given(case=replicated_transfer_cases(divisible=True, layouts=("DS",)))
@example(case=(Mamba2Spec(num_heads=2, head_dim=1, num_groups=1, state_size=1, conv_kernel=2), 1, 2))
@example(case=(GDNSpec(num_k_heads=1, num_v_heads=4, head_k_dim=2, head_v_dim=1), 4, 2))
def test_replicated_groups_break_vllm_but_not_plan_reads(case):
    """Whenever the larger TP side replicates B/C groups or GDN key heads, some dst rank
    gets wrong bytes from vLLM's arithmetic; plan_reads rebuilds every page."""
    spec, src_tp, dst_tp = case
    state = iota_state(spec)
    src_pages, want = shard(spec, state, src_tp), shard(spec, state, dst_tp)
    vllm_right = []
    for dst_rank, plan in enumerate(plan_all(spec, src_tp, dst_tp)):
        blank = np.zeros(content_nbytes(spec, dst_tp), dtype=np.uint8)
        np.testing.assert_array_equal(apply(plan, src_pages, blank), want[dst_rank])
        reads = vllm_reads(spec, src_tp, dst_tp, dst_rank)
        if any(r.src_end > len(src_pages[0]) or r.dst_end > len(blank) for r in reads):
            vllm_right.append(False)  # vLLM would read another block's memory
            continue
        theirs = apply(_as_plan(spec, src_tp, dst_tp, dst_rank), src_pages, blank)
        vllm_right.append(np.array_equal(theirs, want[dst_rank]))
    assert not all(vllm_right)


# --- fully sharded, divisible TP, DS: both move the same bytes -----------------------------


@given(case=transfer_cases(divisible=True, replication=False, layouts=("DS",),
                           families=("mamba2", "gdn", "mamba1")))
@example(case=(Mamba2Spec(num_heads=8, head_dim=2, num_groups=4, state_size=2), 4, 2))
@example(case=(GDNSpec(num_k_heads=4, num_v_heads=8, head_k_dim=2, head_v_dim=3, spec_tokens=1), 2, 4))
@example(case=(Mamba1Spec(intermediate_size=8, state_size=3, ssm_dtype="float32"), 8, 1))
def test_fully_sharded_cases_move_identical_bytes(case):
    spec, src_tp, dst_tp = case
    nbytes = content_nbytes(spec, dst_tp)
    for dst_rank, plan in enumerate(plan_all(spec, src_tp, dst_tp)):
        theirs = byte_sources(vllm_reads(spec, src_tp, dst_tp, dst_rank), nbytes)
        ours = byte_sources(plan.reads, nbytes)
        np.testing.assert_array_equal(theirs, ours, err_msg=f"dst rank {dst_rank}")
        assert (ours >= 0).all()
        assert len(plan.reads) <= len(vllm_reads(spec, src_tp, dst_tp, dst_rank))
