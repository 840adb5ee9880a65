"""What a transfer strategy costs.

NIXL READs between GPUs are priced per descriptor, not per byte, until descriptors are
megabytes long (see `docs/performance.md`): on an H100, about 8-14 us per descriptor
that NIXL cannot merge, against about 1 us per MB. A `CostModel` says this with four
numbers measured on the machine (`fit_cost_model` fits them from timings), and
`choose_groups` uses it to decide, per src rank of a plan, which reads to fetch directly
and which to fetch as one superset span into a staging buffer, to be fixed up by one
on-GPU gather (`ssm_split.strategies`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import PlanError
from ..plan._plan import Read

__all__ = ["CostModel", "DEFAULT_COST_MODEL", "fit_cost_model", "choose_groups"]


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
