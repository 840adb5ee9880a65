"""What a transfer strategy costs.

NIXL READs are priced per descriptor, not per byte, until descriptors are megabytes long
(docs/performance.md): one READ pays about 8-11 us per descriptor NIXL cannot merge
between H200s (3.3 us per descriptor on the GPU pair with UCX's four worker threads
splitting every READ), against well under 1 us per MB. A `CostModel` says this with a few numbers measured on
the machine (`fit_cost_model` fits the READ terms from timings). `choose_groups` uses it
to decide, per src rank of a plan, which reads to fetch directly and which to fetch as
one superset span into staging, fixed up by one gather; `estimate_s` and
`choose_strategy` (`_choose.py`) use it to pick a whole strategy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from ..errors import PlanError
from ..plan._plan import Read

__all__ = ["CostModel", "DEFAULT_COST_MODEL", "DRAM_COST_MODEL", "fit_cost_model", "choose_groups"]


@dataclass(frozen=True, slots=True)
class CostModel:
    """Seconds a strategy spends, as a sum of per-item costs.

    Attributes:
        desc_s: one NIXL descriptor that is not merged (posting, completion, and the
            per-copy overhead of the transport).
        byte_s: one byte read over NIXL (1 / bandwidth).
        gather_byte_s: one byte moved by the gather kernel out of staging.
        gather_launch_s: one gather launch (once per wave of staged pages).
        request_s: one request a src rank answers before the dst may READ (a pack
            order: side channel round trip and the src's copy launch).
        peer_byte_s: one byte copied by a kernel from a peer GPU's mapped memory.
        ce_copy_s: one copy of a batch handed to the copy engines in one driver call
            (the peer strategy's other engine).
        ce_byte_s: one byte copied by the copy engines from a peer GPU's mapped memory.
    """

    desc_s: float
    byte_s: float
    gather_byte_s: float
    gather_launch_s: float = 20e-6
    request_s: float = 300e-6
    peer_byte_s: float = 2.9e-12
    ce_copy_s: float = 0.2e-6
    ce_byte_s: float = 2.76e-12

    def __post_init__(self) -> None:
        for name in ("desc_s", "byte_s", "gather_byte_s", "gather_launch_s", "request_s", "peer_byte_s",
                     "ce_copy_s", "ce_byte_s"):
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


DEFAULT_COST_MODEL = CostModel(desc_s=3.3e-6, byte_s=2.66e-12, gather_byte_s=0.55e-12)
"""VRAM between two H200s joined by NVLink (NIXL 1.5.1 over cuda_ipc, UCX `num_threads=4`,
`split_batch_size=1`), fitted to the Reader's own runs on 30 Nov 2026
(`benchmarks/results/stacked-gpu.json`): `desc_s` and `byte_s` by `fit_cost_model` over the
direct strategy on Qwen3.5-27B's per-layer pages (24,576 descriptors, 108 ms) and stacked
pages (512 descriptors, 28 ms) of the same 9.85 GB; `peer_byte_s` from the peer strategy
end to end with one decode rank (28.4-28.8 ms, ~345 GB/s); `gather_byte_s` from a copy
kernel on one GPU (~1.8 TB/s); `ce_copy_s` and `ce_byte_s` from the copy engines against
the kernel on the same batches (`benchmarks/results/batch-copy-probe-h200x2.json`: 0.2 us
a copy, and 95% of the kernel's time per byte, scaled to the end-to-end `peer_byte_s`).
The descriptor cost is what the GPU pair spends per descriptor with every decode rank
reading at once (they share the copy engines). These are also `CostModel`'s defaults for
the terms a caller leaves out."""

DRAM_COST_MODEL = CostModel(desc_s=6e-6, byte_s=0.3e-9, gather_byte_s=0.25e-9, gather_launch_s=50e-6,
                            request_s=400e-6, peer_byte_s=0.25e-9, ce_copy_s=6e-6, ce_byte_s=0.3e-9)
"""Host memory on a small CPU machine (UCX cma READs ~3 GB/s and ~5-7 us per descriptor,
numpy copies ~4 GB/s; docs/performance.md). Host memory has no copy engines: their terms
are priced as host copies, and readers on DRAM never offer them."""


def fit_cost_model(descriptors: Sequence[int], nbytes: Sequence[int], seconds: Sequence[float],
                   **measured: float) -> CostModel:
    """Least-squares fit of `seconds ~ desc_s * descriptors + byte_s * nbytes`.

    Args:
        descriptors, nbytes, seconds: one entry per timed READ (at least two, not all
            with the same descriptor size).
        measured: the other terms, measured separately (`gather_byte_s`,
            `gather_launch_s`, `request_s`, `peer_byte_s`, `ce_copy_s`, `ce_byte_s`);
            each one left out is `DEFAULT_COST_MODEL`'s.

    Returns:
        A `CostModel`; a coefficient the data would make negative is clipped to 0.

    Raises:
        PlanError: fewer than two samples, lengths that differ, or an unknown term.
    """
    fitted = ("desc_s", "byte_s")
    unknown = sorted(set(measured) - (set(CostModel.__slots__) - set(fitted)))
    if unknown:
        raise PlanError(f"fit_cost_model: unknown or fitted terms {unknown}; pass only the measured "
                        f"ones of {sorted(set(CostModel.__slots__) - set(fitted))}.")
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
    return replace(DEFAULT_COST_MODEL, desc_s=desc_s, byte_s=byte_s, **measured)


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
