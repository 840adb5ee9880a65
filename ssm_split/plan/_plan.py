"""Plans: which byte ranges a dst rank reads from which src ranks.

A plan is a value: a tuple of `Read`s for one dst rank, grouped by src rank and sorted by
dst offset, with no two reads that could be merged. It is a function of its arguments
alone, so it can be cached, printed, compared and tested without any I/O.

How a plan is made, for each part (conv sub-projection or temporal state):

1. take the units `[a, b)` the dst rank holds (`rank_units`);
2. intersect them with the units of every src rank, as intervals: no TP ratio, so
   4 -> 6 works like 2 -> 4. A unit that the src replicates (fewer units than src
   ranks) is read once, from one replica: preferably a src rank the dst already
   reads sharded parts from, else the lowest;
3. turn each run of units into byte ranges with both pages' layouts (one range in DS,
   `rows` ranges in SD);
4. merge reads that are contiguous on both sides (e.g. `B | C | temporal`).

Example, Mamba2 with one B/C group (replicated), src TP1 -> dst TP2::

    src page (TP1)  | x0 | x1 | B | C | T0 | T1 |
    dst rank 0      | x0 | B | C | T0 |        2 reads: x0 ; B|C|T0
    dst rank 1      | x1 | B | C | T1 |        2 reads: x1|B|C ; T1

"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..errors import PlanError
from ..layout._layout import PageLayout, _check_tp_rank, page_layout
from ..specs._spec import Part, Spec
from ..specs._stacked import PageSpec, check_is_page_spec, check_transferable
from ._format import format_plan

__all__ = ["Read", "Plan", "plan_reads", "plan_all"]


@dataclass(frozen=True, slots=True)
class Read:
    """Copy `nbytes` from `src_offset` of `src_rank`'s page to `dst_offset` of the dst
    page. Offsets are in bytes from the start of each page."""

    src_rank: int
    src_offset: int
    dst_offset: int
    nbytes: int

    def __post_init__(self) -> None:
        for name in ("src_rank", "src_offset", "dst_offset", "nbytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PlanError(f"Read.{name} must be an int >= 0, got {value!r}.")
        if self.nbytes == 0:
            raise PlanError("Read.nbytes must be > 0: an empty read moves nothing.")

    @property
    def src_end(self) -> int:
        return self.src_offset + self.nbytes

    @property
    def dst_end(self) -> int:
        return self.dst_offset + self.nbytes


@dataclass(frozen=True, slots=True)
class Plan:
    """Every read one dst rank makes to rebuild its page from the src ranks' pages.

    Attributes:
        spec: the layer state both sides hold.
        src_tp, dst_tp, dst_rank: the transfer this plan is for.
        reads: the reads, grouped by `src_rank` (ascending), then by `dst_offset`.
        src_content_nbytes, dst_content_nbytes: bytes of state in each side's page
            (every src rank's page has the same size); reads stay inside them.
    """

    spec: Spec
    src_tp: int
    dst_tp: int
    dst_rank: int
    reads: tuple[Read, ...]
    src_content_nbytes: int
    dst_content_nbytes: int

    def __post_init__(self) -> None:
        for read in self.reads:
            if not isinstance(read, Read):
                raise PlanError(f"Plan.reads must hold Read values, got {read!r}.")
            if read.src_rank >= self.src_tp:
                raise PlanError(f"{read} names src rank {read.src_rank}, but src_tp={self.src_tp}.")
            if read.src_end > self.src_content_nbytes or read.dst_end > self.dst_content_nbytes:
                raise PlanError(
                    f"{read} leaves the content region (src {self.src_content_nbytes} bytes, "
                    f"dst {self.dst_content_nbytes} bytes)."
                )

    @property
    def src_ranks(self) -> tuple[int, ...]:
        """The src ranks this plan reads from, ascending."""
        return tuple(sorted({r.src_rank for r in self.reads}))

    @property
    def nbytes(self) -> int:
        """Bytes the plan moves (equal to `dst_content_nbytes` for a correct plan)."""
        return sum(r.nbytes for r in self.reads)

    def reads_from(self, src_rank: int) -> tuple[Read, ...]:
        """The reads served by `src_rank`, by dst offset."""
        return tuple(r for r in self.reads if r.src_rank == src_rank)

    def format_table(self) -> str:
        """The reads as a text table, with the dst segments each one fills."""
        return format_plan(self)


def _src_runs(part: Part, src_tp: int, start: int, stop: int, primary: frozenset[int]):
    """Yield `(src_rank, u0, u1)` runs covering the dst units `[start, stop)` of `part`."""
    if part.num_units % src_tp == 0:  # sharded on src: intersect intervals
        per_rank = part.num_units // src_tp
        for src_rank in range(start // per_rank, (stop - 1) // per_rank + 1):
            yield src_rank, max(start, src_rank * per_rank), min(stop, (src_rank + 1) * per_rank)
        return
    copies = src_tp // part.num_units  # replicated on src: one replica per unit
    for unit in range(start, stop):
        replicas = range(unit * copies, (unit + 1) * copies)
        preferred = [r for r in replicas if r in primary]
        yield (preferred[0] if preferred else replicas[0]), unit, unit + 1


def _byte_reads(part: Part, src: PageLayout, dst: PageLayout, src_rank: int, u0: int, u1: int):
    for src_seg, dst_seg in zip(src.part_segments(part.name), dst.part_segments(part.name)):
        unit_nbytes = dst_seg.unit_nbytes
        yield Read(
            src_rank,
            src_seg.offset + (u0 - src_seg.unit_start) * unit_nbytes,
            dst_seg.offset + (u0 - dst_seg.unit_start) * unit_nbytes,
            (u1 - u0) * unit_nbytes,
        )


def _merge(reads: list[Read]) -> tuple[Read, ...]:
    """Sort by (src rank, dst offset) and merge reads contiguous on both sides."""
    reads = sorted(reads, key=lambda r: (r.src_rank, r.dst_offset))
    merged: list[Read] = []
    for read in reads:
        last = merged[-1] if merged else None
        if (last is not None and last.src_rank == read.src_rank
                and last.src_end == read.src_offset and last.dst_end == read.dst_offset):
            merged[-1] = Read(last.src_rank, last.src_offset, last.dst_offset,
                              last.nbytes + read.nbytes)
        else:
            merged.append(read)
    return tuple(merged)


@lru_cache(maxsize=4096)
def _plan_reads(spec: Spec, src_tp: int, dst_tp: int, dst_rank: int) -> Plan:
    dst = page_layout(spec, dst_tp, dst_rank)
    src_layouts = [page_layout(spec, src_tp, r) for r in range(src_tp)]
    runs = []
    sharded = [p for p in spec.parts if p.num_units % src_tp == 0]
    primary: frozenset[int] = frozenset()
    for group in (sharded, [p for p in spec.parts if p not in sharded]):
        for part in group:
            units = dst.units[spec.parts.index(part)]
            runs += [(part, *run) for run in _src_runs(part, src_tp, units.start, units.stop, primary)]
        primary = frozenset(run[1] for run in runs)
    reads = [read for part, src_rank, u0, u1 in runs
             for read in _byte_reads(part, src_layouts[src_rank], dst, src_rank, u0, u1)]
    return Plan(spec, src_tp, dst_tp, dst_rank, _merge(reads),
                src_layouts[0].content_nbytes, dst.content_nbytes)


def plan_reads(spec: PageSpec, src_tp: int, dst_tp: int, dst_rank: int, *,
               dst_spec: PageSpec | None = None) -> Plan:
    """The reads dst rank `dst_rank` of `dst_tp` makes from src pages sharded on `src_tp`.

    Args:
        spec: the state spec of the src side (and of the dst side if `dst_spec` is None):
            one layer's, or a `StackedSpec` for pages that hold several layers.
        src_tp: tensor-parallel size of the engine whose pages are read (prefill).
        dst_tp: tensor-parallel size of the reading engine (decode).
        dst_rank: the reading rank, in `[0, dst_tp)`.
        dst_spec: the dst side's spec when it was obtained separately (e.g. from a
            handshake); it must describe the same state (`check_transferable`).

    Returns:
        A `Plan` whose reads rebuild exactly the dst page's content.

    Raises:
        SpecMismatchError: `dst_spec` differs from `spec` in anything but TP.
        ShardingError: `spec` cannot be sharded on `src_tp` or `dst_tp`.

    Example: Granite-4.0-H-Tiny (48 heads of 64, 1 group of 128, bf16 conv, fp32
    temporal), src TP1 -> dst TP2, dst rank 0 reads src `[0, 9216)` (its half of x) and
    `[18432, 806400)` (B, C and its half of the temporal heads): two reads.
    """
    check_is_page_spec(spec)
    if dst_spec is not None:
        check_transferable(spec, dst_spec)
    _check_tp_rank(src_tp, 0, "src_")
    _check_tp_rank(dst_tp, dst_rank, "dst_")
    page_layout(spec, src_tp, 0)  # raises ShardingError early, naming src_tp
    return _plan_reads(spec, src_tp, dst_tp, dst_rank)


def plan_all(spec: Spec, src_tp: int, dst_tp: int, *, dst_spec: Spec | None = None) -> tuple[Plan, ...]:
    """The plans of every dst rank, indexed by dst rank (see `plan_reads`)."""
    return tuple(plan_reads(spec, src_tp, dst_tp, rank, dst_spec=dst_spec) for rank in range(dst_tp))
