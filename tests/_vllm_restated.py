"""OUR OWN RE-STATEMENT of the offsets vLLM 0.33's NIXL connector computes for a decode
(dst) rank reading from prefill (src) ranks, as documented in
`/work/shared/reference/vllm.md` §3.2 (sub-projection widths recovered from an engine's
own state shapes), §3.5 (`remote_conv_offsets` and the temporal slice) and §3.6 (src TP >
dst TP: every dst range split evenly among the src ranks). It is not vLLM's code and
needs no vLLM; `tests/properties/test_vllm_interop.py` checks it against the real package.
Used by `tests/properties/test_vllm_arithmetic.py` and `tests/integrations/`.
"""

from __future__ import annotations

import math

import numpy as np

from ssm_split import GDNSpec, Mamba2Spec, Read, plan_reads
from ssm_split.layout import sharded_shapes


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


def as_plan(spec, src_tp, dst_tp, dst_rank):
    """vLLM's reads wrapped in a Plan, so the reference model can apply them."""
    plan = plan_reads(spec, src_tp, dst_tp, dst_rank)
    reads = tuple(sorted(vllm_reads(spec, src_tp, dst_tp, dst_rank), key=lambda r: (r.src_rank, r.dst_offset)))
    return type(plan)(spec, src_tp, dst_tp, dst_rank, reads, plan.src_content_nbytes, plan.dst_content_nbytes)


