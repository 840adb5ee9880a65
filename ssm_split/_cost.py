"""What a transfer strategy costs, and the descriptor pattern of the baseline it must beat.

NIXL READs between GPUs are priced per descriptor, not per byte, until descriptors are
megabytes long (see `docs/performance.md`): on an H100, about 8-14 us per descriptor
that NIXL cannot merge, against about 1 us per MB. A `CostModel` says this with four
numbers measured on the machine (`fit_cost_model` fits them from timings), and
`choose_groups` uses it to decide, per src rank of a plan, which reads to fetch directly
and which to fetch as one superset span into a staging buffer, to be fixed up by one
on-GPU gather (`ssm_split._staging`).

`baseline_reads` restates the descriptor pattern of vLLM's NIXL connector (one descriptor
per conv sub-projection and one per temporal slice, per block and layer, against each of
`src_tp // dst_tp` src ranks when the src has more ranks), so the benchmark can time it on
the same buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ._errors import PlanError
from ._layout import page_layout, sub_projection_widths
from ._plan import Plan, Read
from ._spec import Spec, check_is_spec

__all__ = ["CostModel", "DEFAULT_COST_MODEL", "fit_cost_model", "choose_groups", "baseline_reads",
           "baseline_plan"]


@dataclass(frozen=True, slots=True)
class CostModel:
    """Seconds a strategy spends, as a sum of per-item costs.

    Attributes:
        desc_s: one NIXL descriptor that is not merged (posting, completion, and the
            per-copy overhead of the transport).
        byte_s: one byte read over NIXL (1 / bandwidth).
        gather_byte_s: one byte moved by the gather kernel out of staging.
        gather_launch_s: one gather launch (once per wave of staged pages).
    """

    desc_s: float
    byte_s: float
    gather_byte_s: float
    gather_launch_s: float = 20e-6

    def __post_init__(self) -> None:
        for name in ("desc_s", "byte_s", "gather_byte_s", "gather_launch_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise PlanError(f"CostModel.{name} must be a number of seconds >= 0, got {value!r}.")

    def read_s(self, descriptors: int, nbytes: int) -> float:
        """Seconds to READ `nbytes` spread over `descriptors` unmerged descriptors."""
        return descriptors * self.desc_s + nbytes * self.byte_s

    def staged_s(self, span_nbytes: int, gathered_nbytes: int) -> float:
        """Seconds to READ one span of `span_nbytes` and gather `gathered_nbytes` out of it
        (launch cost excluded: it is paid once per wave)."""
        return self.desc_s + span_nbytes * self.byte_s + gathered_nbytes * self.gather_byte_s


DEFAULT_COST_MODEL = CostModel(desc_s=8e-6, byte_s=1.0e-12, gather_byte_s=0.77e-12)
"""H100 80GB, NIXL 1.5.1 over cuda_ipc, UCX `num_threads=4`: 3-14 us per unmerged
descriptor (8 taken), ~1.0 TB/s per READ stream, ~1.3 TB/s for the gather kernel."""


def fit_cost_model(descriptors: Sequence[int], nbytes: Sequence[int], seconds: Sequence[float],
                   *, gather_byte_s: float = DEFAULT_COST_MODEL.gather_byte_s,
                   gather_launch_s: float = DEFAULT_COST_MODEL.gather_launch_s) -> CostModel:
    """Least-squares fit of `seconds ~ desc_s * descriptors + byte_s * nbytes`.

    Args:
        descriptors, nbytes, seconds: one entry per timed READ (at least two, not all
            with the same descriptor size).
        gather_byte_s, gather_launch_s: passed through (measured separately).

    Returns:
        A `CostModel`; a coefficient the data would make negative is clipped to 0.

    Raises:
        PlanError: fewer than two samples, or lengths that differ.
    """
    d = np.asarray(descriptors, dtype=float)
    b = np.asarray(nbytes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    if not (d.shape == b.shape == t.shape) or d.ndim != 1 or d.size < 2:
        raise PlanError(f"fit_cost_model needs >= 2 samples of equal-length descriptors, nbytes "
                        f"and seconds, got shapes {d.shape}, {b.shape}, {t.shape}.")
    # relative error matters: weight each sample by 1 / seconds
    w = 1.0 / np.maximum(t, 1e-9)
    a = np.stack([d * w, b * w], axis=1)
    coef, *_ = np.linalg.lstsq(a, t * w, rcond=None)
    desc_s, byte_s = (float(max(c, 0.0)) for c in coef)
    return CostModel(desc_s, byte_s, gather_byte_s, gather_launch_s)


def choose_groups(reads: Sequence[Read], model: CostModel = DEFAULT_COST_MODEL) -> tuple[tuple[Read, ...], ...]:
    """Partition one src rank's reads into groups, each fetched as one descriptor.

    A group of one read is fetched directly into the dst page; a group of several is
    fetched as the span from its lowest `src_offset` to its highest `src_end` into
    staging, then gathered. Reads are sorted by `src_offset`; only runs of consecutive
    reads are grouped, and an exact dynamic program over those runs minimises the
    model's cost (`O(k^2)` for `k` reads).

    Returns:
        The groups in ascending `src_offset` order; together they hold every read once.

    Raises:
        PlanError: the reads come from more than one src rank.
    """
    ranks = {r.src_rank for r in reads}
    if len(ranks) > 1:
        raise PlanError(f"choose_groups takes the reads of one src rank, got src ranks {sorted(ranks)}.")
    ordered = sorted(reads, key=lambda r: r.src_offset)
    k = len(ordered)
    best = [0.0] + [float("inf")] * k  # best[j]: cheapest cost of ordered[:j]
    cut = [0] * (k + 1)
    for j in range(1, k + 1):
        needed = 0
        for i in range(j - 1, -1, -1):  # group ordered[i:j]
            needed += ordered[i].nbytes
            if i == j - 1:
                cost = model.read_s(1, ordered[i].nbytes)
            else:
                span = max(r.src_end for r in ordered[i:j]) - ordered[i].src_offset
                cost = model.staged_s(span, needed)
            if best[i] + cost < best[j]:
                best[j], cut[j] = best[i] + cost, i
    groups, j = [], k
    while j > 0:
        groups.append(tuple(ordered[cut[j]:j]))
        j = cut[j]
    return tuple(reversed(groups))


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
        PlanError: neither TP size divides the other, or the conv layout is not DS.
    """
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
