"""The descriptor pattern of vLLM's NIXL connector, restated so benchmarks can time it.

vLLM's connector reads, per page, one descriptor per conv sub-projection and one for the
temporal slice, against each of `src_tp // dst_tp` src ranks when the src has more
ranks. Its offsets assume every part is sharded evenly on both sides, so they are wrong
for replicated B/C groups or GDN key heads (docs/vllm.md): this module reproduces that
pattern, wrong bytes included, and the benchmark's verification reports it. It is a
yardstick, never a strategy a connector should use.
"""

from __future__ import annotations

import numpy as np

from ..errors import PlanError
from ..layout._layout import page_layout, sub_projection_widths
from ..plan._plan import Plan, Read
from ..specs._spec import Spec, check_is_spec
from ..specs._stacked import StackedSpec

__all__ = ["baseline_reads", "baseline_plan"]


def _tp_ratio(src_tp: int, dst_tp: int) -> tuple[int, bool]:
    if dst_tp >= src_tp and dst_tp % src_tp == 0:
        return dst_tp // src_tp, False
    if src_tp > dst_tp and src_tp % dst_tp == 0:
        return src_tp // dst_tp, True
    raise PlanError(f"The baseline (vLLM's scheme) needs one TP size to divide the other, got "
                    f"src_tp={src_tp}, dst_tp={dst_tp}.")


def baseline_reads(spec: Spec, src_tp: int, dst_tp: int, dst_rank: int) -> tuple[Read, ...]:
    """The reads vLLM's NIXL connector makes for one page of `dst_rank`, unmerged.

    Per src rank read from: one read per conv sub-projection (its slice, or the src's
    whole shard when `src_tp > dst_tp`) and one for the temporal state, each a separate
    descriptor. With `dst_tp >= src_tp` dst rank `d` reads src rank `d // ratio` at the
    `d % ratio`-th slice of each sub-projection; with `src_tp > dst_tp` it reads src ranks
    `d * ratio + p` and places each shard at the `p`-th slice of its own ranges. The
    offsets assume every part is sharded evenly on both sides, as vLLM does: for replicated
    B/C groups or key heads they are wrong (vLLM's known bug), which the benchmark's
    verification reports.

    Raises:
        PlanError: neither TP size divides the other, the conv layout is not DS, or `spec`
            is a stacked page (vLLM keeps one tensor per layer).
    """
    if isinstance(spec, StackedSpec):
        raise PlanError("vLLM keeps one tensor per layer: its descriptor pattern has no stacked form "
                        "(time it on per-layer pages).")
    check_is_spec(spec)
    ratio, src_larger = _tp_ratio(src_tp, dst_tp)
    if spec.conv_parts and spec.conv_layout != "DS":
        raise PlanError("vLLM's connector moves only the DS conv layout; the baseline has no SD scheme.")
    rows, elem = spec.conv_rows, spec.conv_nbytes_per_elem
    proj_dst = [w * rows * elem for w in sub_projection_widths(spec, dst_tp)] if spec.conv_parts else []
    dst_layout = page_layout(spec, dst_tp, dst_rank)
    conv_dst, temporal_dst = dst_layout.conv_nbytes, dst_layout.temporal_nbytes
    dst_offsets = list(np.cumsum([0] + proj_dst[:-1])) if proj_dst else []
    reads: list[Read] = []
    if not src_larger:
        src_rank, local = dst_rank // ratio, dst_rank % ratio
        conv_src = sum(proj_dst) * ratio
        for i, size in enumerate(proj_dst):
            src_offset = sum(proj_dst[:i]) * ratio + local * size
            reads.append(Read(src_rank, int(src_offset), int(dst_offsets[i]), int(size)))
        if temporal_dst:
            reads.append(Read(src_rank, conv_src + local * temporal_dst, conv_dst, temporal_dst))
        return tuple(reads)
    n = ratio
    conv_src = sum(proj_dst) // n
    for p in range(n):
        src_rank = dst_rank * n + p
        for i, size in enumerate(proj_dst):
            part = size // n
            reads.append(Read(src_rank, int(sum(proj_dst[:i]) // n), int(dst_offsets[i] + p * part), int(part)))
        if temporal_dst:
            part = temporal_dst // n
            reads.append(Read(src_rank, conv_src, conv_dst + p * part, part))
    return tuple(reads)


def baseline_plan(spec: Spec, src_tp: int, dst_tp: int, dst_rank: int) -> Plan:
    """`baseline_reads` as a `Plan` (reads unmerged, grouped by src rank), so the same
    expansion code turns it into descriptors."""
    reads = tuple(sorted(baseline_reads(spec, src_tp, dst_tp, dst_rank), key=lambda r: (r.src_rank, r.dst_offset)))
    return Plan(spec, src_tp, dst_tp, dst_rank, reads,
                page_layout(spec, src_tp, 0).content_nbytes, page_layout(spec, dst_tp, dst_rank).content_nbytes)
