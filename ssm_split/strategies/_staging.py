"""Staged plans: fetch a superset span with one descriptor, then fix up with one gather.

A plan's reads from one src rank are often small and close together (Q, K and V slices a
few KiB apart). NIXL charges per descriptor, so reading the whole span that covers them
with one descriptor into a staging slot, and then copying the needed bytes out of the
slot on the GPU, is cheaper. `stage_plan` splits a plan, per page, into

- `direct`: reads fetched straight into the dst page (as in the plain plan);
- `spans`: `Span(src_rank, src_offset, nbytes, slot_offset)`, one descriptor each, fetched
  into the page's staging slot of `slot_nbytes` bytes;
- `moves`: `Move(slot_offset, dst_offset, nbytes)`, copies from the slot into the dst page
  once the spans have landed (one gather kernel for a whole wave of pages).

Which reads share a span is decided per src rank by `ssm_split.strategies.choose_groups` (or given).
Example, GDN 1 -> 2, dst rank 0, each Q/K/V slice 1/2 of the src's::

    src page   | Q0 Q1 | K0 K1 | V0 V1 | T0 T1 |
    span         [---------------------]          one descriptor into the slot
    direct                               [T0]     one descriptor into the dst page
    moves      slot Q0 -> dst Q, slot K0 -> dst K, slot V0 -> dst V

`spans_plan` and `moves_plan` restate spans and moves as `Plan`s over pseudo-pages (the
staging slots), so `expand_plan` turns them into descriptors and gather tables for a batch
with the same vectorized code as plain plans. Everything here is pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ._cost import DEFAULT_COST_MODEL, CostModel, choose_groups
from ..errors import PlanError
from ..plan._plan import Plan, Read

__all__ = ["Span", "Move", "StagedPlan", "stage_plan", "apply_staged", "SLOT_ALIGN_NBYTES", "align"]

SLOT_ALIGN_NBYTES = 256
"""Spans start at multiples of this inside a slot, and slots are a multiple of it long, so
that the gather kernel can use wide loads whatever the page offsets."""


@dataclass(frozen=True, slots=True)
class Span:
    """Read `nbytes` from `src_offset` of `src_rank`'s page into `slot_offset` of the
    page's staging slot."""

    src_rank: int
    src_offset: int
    nbytes: int
    slot_offset: int


@dataclass(frozen=True, slots=True)
class Move:
    """After the spans landed, copy `nbytes` from `slot_offset` of the staging slot to
    `dst_offset` of the dst page."""

    slot_offset: int
    dst_offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class StagedPlan:
    """A plan split into direct reads, staged spans and gather moves (see module doc).

    Attributes:
        plan: the plain plan this one executes.
        direct: reads fetched straight into the dst page.
        spans: reads into the staging slot, by src rank then slot offset.
        moves: slot -> dst page copies, by dst offset.
        slot_nbytes: staging bytes one page needs (0 when nothing is staged).
    """

    plan: Plan
    direct: tuple[Read, ...]
    spans: tuple[Span, ...]
    moves: tuple[Move, ...]
    slot_nbytes: int

    def __post_init__(self) -> None:
        for span in self.spans:
            if span.slot_offset + span.nbytes > self.slot_nbytes:
                raise PlanError(f"{span} runs past the {self.slot_nbytes}-byte staging slot.")
        for move in self.moves:
            if move.slot_offset + move.nbytes > self.slot_nbytes:
                raise PlanError(f"{move} reads past the {self.slot_nbytes}-byte staging slot.")
            if move.dst_offset + move.nbytes > self.plan.dst_content_nbytes:
                raise PlanError(f"{move} leaves the dst content ({self.plan.dst_content_nbytes} bytes).")

    @property
    def descriptors_per_page(self) -> int:
        """NIXL descriptors one page needs (before any merging across pages)."""
        return len(self.direct) + len(self.spans)

    @property
    def read_nbytes_per_page(self) -> int:
        """Bytes read over NIXL per page (spans include bytes that are not needed)."""
        return sum(r.nbytes for r in self.direct) + sum(s.nbytes for s in self.spans)

    @property
    def gathered_nbytes_per_page(self) -> int:
        """Bytes the gather copies per page."""
        return sum(m.nbytes for m in self.moves)

    @property
    def src_ranks(self) -> tuple[int, ...]:
        return self.plan.src_ranks

    def cost_s(self, model: CostModel = DEFAULT_COST_MODEL) -> float:
        """The model's seconds for one page (gather launch excluded)."""
        return (model.read_s(len(self.direct), sum(r.nbytes for r in self.direct))
                + sum(model.staged_s(s.nbytes, 0) for s in self.spans)
                + self.gathered_nbytes_per_page * model.gather_byte_s)

    def spans_plan(self) -> Plan:
        """The spans as a `Plan` whose dst "page" is the staging slot (offsets in the slot)."""
        reads = tuple(sorted((Read(s.src_rank, s.src_offset, s.slot_offset, s.nbytes) for s in self.spans),
                             key=lambda r: (r.src_rank, r.dst_offset)))
        return Plan(self.plan.spec, self.plan.src_tp, self.plan.dst_tp, self.plan.dst_rank, reads,
                    self.plan.src_content_nbytes, max(self.slot_nbytes, 1))

    def direct_plan(self) -> Plan:
        """The direct reads as a `Plan` (a sub-plan of `plan`)."""
        return Plan(self.plan.spec, self.plan.src_tp, self.plan.dst_tp, self.plan.dst_rank, self.direct,
                    self.plan.src_content_nbytes, self.plan.dst_content_nbytes)

    def moves_plan(self) -> Plan:
        """The moves as a one-src-rank `Plan` from the slot (as src rank 0's page) to the
        dst page, for expanding into gather tables."""
        reads = tuple(Read(0, m.slot_offset, m.dst_offset, m.nbytes) for m in self.moves)
        return Plan(self.plan.spec, 1, self.plan.dst_tp, self.plan.dst_rank, reads,
                    max(self.slot_nbytes, 1), self.plan.dst_content_nbytes)


def align(value: int) -> int:
    """`value` rounded up to a multiple of `SLOT_ALIGN_NBYTES`."""
    return -(-value // SLOT_ALIGN_NBYTES) * SLOT_ALIGN_NBYTES


def stage_plan(plan: Plan, *, model: CostModel = DEFAULT_COST_MODEL,
               groups: Sequence[Sequence[Read]] | None = None) -> StagedPlan:
    """Split `plan` into direct reads, staged spans and gather moves.

    Args:
        plan: a plan from `plan_reads` (or any `Plan`).
        model: costs used to choose the groups (`choose_groups`) when `groups` is None.
        groups: explicit grouping instead: every read of `plan` exactly once, each group
            from one src rank; a group of one read is direct, larger groups are staged.

    Returns:
        A `StagedPlan`; with no group larger than one read, `spans` and `moves` are empty
        and `direct` equals the plan's reads.

    Raises:
        PlanError: `groups` does not hold every read of `plan` exactly once, or mixes src ranks.
    """
    if not isinstance(plan, Plan):
        raise PlanError(f"stage_plan takes a Plan, got {type(plan).__name__}.")
    if groups is None:
        groups = [g for rank in plan.src_ranks for g in choose_groups(plan.reads_from(rank), model)]
    else:
        flat = sorted((r for g in groups for r in g), key=lambda r: (r.src_rank, r.dst_offset))
        if flat != sorted(plan.reads, key=lambda r: (r.src_rank, r.dst_offset)):
            raise PlanError("`groups` must hold every read of the plan exactly once.")
        for g in groups:
            if len({r.src_rank for r in g}) != 1:
                raise PlanError(f"A staged group must come from one src rank, got {g}.")
    direct: list[Read] = []
    spans: list[Span] = []
    moves: list[Move] = []
    slot = 0
    for group in groups:
        group = sorted(group, key=lambda r: r.src_offset)
        if len(group) == 1:
            direct.append(group[0])
            continue
        start = group[0].src_offset
        end = max(r.src_end for r in group)
        spans.append(Span(group[0].src_rank, start, end - start, slot))
        moves += [Move(slot + r.src_offset - start, r.dst_offset, r.nbytes) for r in group]
        slot = align(slot + end - start)
    direct.sort(key=lambda r: (r.src_rank, r.dst_offset))
    moves.sort(key=lambda m: m.dst_offset)
    return StagedPlan(plan, tuple(direct), tuple(spans), tuple(moves), slot)


def apply_staged(staged: StagedPlan, src_pages: Sequence[np.ndarray], dst_page: np.ndarray) -> np.ndarray:
    """Execute `staged` on numpy pages (the reference for the GPU executor).

    Args:
        staged: the staged plan.
        src_pages: the `src_tp` src pages (1-D uint8), indexed by src rank.
        dst_page: the dst page before the transfer (1-D uint8); not modified.

    Returns:
        A new dst page: direct reads applied, spans read into a fresh slot, moves applied.
    """
    plan = staged.plan
    if len(src_pages) != plan.src_tp:
        raise PlanError(f"apply_staged needs {plan.src_tp} src pages, got {len(src_pages)}.")
    out = np.array(dst_page, dtype=np.uint8, copy=True)
    slot = np.zeros(staged.slot_nbytes, dtype=np.uint8)
    for read in staged.direct:
        out[read.dst_offset:read.dst_end] = src_pages[read.src_rank][read.src_offset:read.src_end]
    for span in staged.spans:
        slot[span.slot_offset:span.slot_offset + span.nbytes] = \
            src_pages[span.src_rank][span.src_offset:span.src_offset + span.nbytes]
    for move in staged.moves:
        out[move.dst_offset:move.dst_offset + move.nbytes] = slot[move.slot_offset:move.slot_offset + move.nbytes]
    return out
