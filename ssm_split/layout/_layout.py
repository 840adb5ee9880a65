"""Which units each rank holds, and where they sit in its page.

Two steps, kept apart:

1. `rank_units(spec, tp, rank)`: the logical index map. For every part, the range of
   units (heads, groups, channels) rank `rank` of `tp` holds.
2. `page_layout(spec, tp, rank)`: byte ranges derived from that map, the conv state's
   layout and the dtypes.

A rank's page, DS layout, Mamba2 at TP2, rank 1 (`rows` elements per channel)::

    offset 0                                                            content_nbytes
    | conv.x (heads H/2..H) | conv.B (groups) | conv.C (groups) | temporal (heads H/2..H) |
    '----------------- conv state (channels_r, rows) ----------'

In SD the conv state is `(rows, channels_r)`: every row repeats `[x_r | B_r | C_r]`, so
each conv part is `rows` separate ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from ..errors import ShardingError
from ..specs._spec import Part, Spec
from ..specs._stacked import PageSpec, check_is_page_spec

__all__ = ["UnitRange", "Segment", "PageLayout", "rank_units", "page_layout", "sharded_shapes",
           "valid_tp_sizes"]


@dataclass(frozen=True, slots=True)
class UnitRange:
    """The units `[start, stop)` of one part held by one rank.

    `replicated` is True when the rank holds a whole copy of a unit that other ranks hold
    too (fewer units than ranks).
    """

    part: str
    start: int
    stop: int
    replicated: bool = False

    @property
    def num_units(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True, slots=True)
class Segment:
    """A named byte range of a page.

    Attributes:
        name: part name (`"conv.x"`, `"conv.B"`, ..., `"temporal"`).
        offset: first byte, from the start of the page.
        nbytes: length in bytes.
        unit_start, unit_stop: the units of the part this range holds.
        row: for an SD conv part, the conv row this range belongs to; None otherwise.
    """

    name: str
    offset: int
    nbytes: int
    unit_start: int
    unit_stop: int
    row: int | None = None

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    @property
    def unit_nbytes(self) -> int:
        """Bytes one unit occupies inside this range."""
        return self.nbytes // (self.unit_stop - self.unit_start)

    @property
    def label(self) -> str:
        return self.name if self.row is None else f"{self.name}[row {self.row}]"


@dataclass(frozen=True, slots=True)
class PageLayout:
    """Where one rank's state sits in its page. Offsets and sizes in bytes.

    Attributes:
        spec, tp, rank: what the layout is of.
        segments: every segment, sorted by offset; they tile `[0, content_nbytes)`.
        conv_nbytes: bytes of the conv state (it starts at offset 0).
        temporal_nbytes: bytes of the temporal state (it starts at `conv_nbytes`).
        units: the rank's logical index map, one `UnitRange` per part.
    """

    spec: Spec
    tp: int
    rank: int
    segments: tuple[Segment, ...]
    conv_nbytes: int
    temporal_nbytes: int
    units: tuple[UnitRange, ...]

    @property
    def content_nbytes(self) -> int:
        """Bytes of state in the page; anything after it is padding."""
        return self.conv_nbytes + self.temporal_nbytes

    def part_segments(self, name: str) -> tuple[Segment, ...]:
        """The segments of part `name` (one, or `rows` in SD), in row order."""
        return tuple(s for s in self.segments if s.name == name)

    def segments_overlapping(self, offset: int, nbytes: int) -> tuple[Segment, ...]:
        """The segments that share at least one byte with `[offset, offset + nbytes)`."""
        end = offset + nbytes
        return tuple(s for s in self.segments if s.offset < end and offset < s.end)


def _part_fits(part: Part, tp: int) -> bool:
    return part.num_units % tp == 0 or (part.replicable and tp % part.num_units == 0)


def valid_tp_sizes(spec: PageSpec) -> tuple[int, ...]:
    """Every TP size `spec` can be sharded on, ascending.

    A non-replicable part (heads of x, V or the temporal state, channels) only splits on
    divisors of its unit count, so the list is finite. Only replicable parts (B/C groups,
    Q/K key heads; never the sole part of a family) would allow any multiple.

    Example: Qwen3.5-4B (16 key heads, 32 value heads) gives `(1, 2, 4, 8, 16, 32)`.
    """
    check_is_page_spec(spec)
    fixed = [p.num_units for p in spec.parts if not p.replicable]
    bound = math.gcd(*fixed) if fixed else max(p.num_units for p in spec.parts)
    small = [d for d in range(1, math.isqrt(bound) + 1) if bound % d == 0]
    divisors = sorted({*small, *(bound // d for d in small)})
    return tuple(tp for tp in divisors if all(_part_fits(p, tp) for p in spec.parts))


def _shard_error(spec: Spec, part: Part, tp: int) -> ShardingError:
    rule = (
        f"either {part.num_units} % tp == 0, or tp % {part.num_units} == 0 (each rank then "
        f"holds one replicated unit)"
        if part.replicable
        else f"{part.num_units} % tp == 0"
    )
    return ShardingError(
        f"Cannot shard `{part.name}` of {spec!r} on tp={tp}: it has {part.num_units} "
        f"{part.unit_name}, and sharding by whole {part.unit_name} needs {rule}. "
        f"Pick a TP size from {list(valid_tp_sizes(spec))}."
    )


def _part_units(spec: Spec, part: Part, tp: int, rank: int) -> UnitRange:
    if part.num_units % tp == 0:
        per_rank = part.num_units // tp
        return UnitRange(part.name, rank * per_rank, (rank + 1) * per_rank)
    if part.replicable and tp % part.num_units == 0:
        unit = rank // (tp // part.num_units)
        return UnitRange(part.name, unit, unit + 1, replicated=True)
    raise _shard_error(spec, part, tp)


def _check_tp_rank(tp: object, rank: object, what: str = "") -> None:
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ShardingError(f"`{what}tp` must be an int >= 1, got {tp!r}.")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < tp:
        raise ShardingError(
            f"`{what}rank` must be an int in [0, {tp}) for {what}tp={tp}, got {rank!r}."
        )


def rank_units(spec: PageSpec, tp: int, rank: int) -> tuple[UnitRange, ...]:
    """The units of every part that rank `rank` of `tp` holds, in page order.

    Raises:
        ShardingError: a part cannot be split into whole units on `tp` ranks, e.g.
            24 heads on 16 ranks.
    """
    check_is_page_spec(spec)
    _check_tp_rank(tp, rank)
    return tuple(_part_units(spec, part, tp, rank) for part in spec.parts)


def page_layout(spec: PageSpec, tp: int, rank: int) -> PageLayout:
    """The byte layout of rank `rank`'s page when `spec` is sharded on `tp` ranks
    (`spec` a per-layer spec, or a `StackedSpec` for a page of several layers).

    Returns:
        A `PageLayout` whose segments tile the content region `[0, content_nbytes)`.

    Raises:
        ShardingError: `spec` cannot be sharded on `tp` (see `rank_units`).

    Example: Mamba2 with 8 heads of 64, 1 group of state 128, kernel 4, bf16, at TP 2:
    each rank's conv state holds 4*64 + 128 + 128 = 512 channels of 3 rows, so
    `conv.x` is bytes [0, 1536), `conv.B` [1536, 2304), `conv.C` [2304, 3072), and the
    temporal state (4, 64, 128) follows at 3072.
    """
    check_is_page_spec(spec)
    _check_tp_rank(tp, rank)
    return _page_layout(spec, tp, rank)


@lru_cache(maxsize=4096)
def _page_layout(spec: Spec, tp: int, rank: int) -> PageLayout:
    units = tuple(_part_units(spec, part, tp, rank) for part in spec.parts)
    rows = spec.conv_rows
    conv_elem = spec.conv_nbytes_per_elem
    conv_units = units[: len(spec.conv_parts)]
    widths = [u.num_units * p.unit_size for u, p in zip(conv_units, spec.conv_parts)]
    channels = sum(widths)
    segments: list[Segment] = []
    first_channel = 0
    for unit_range, width in zip(conv_units, widths):
        if spec.conv_layout == "DS":  # (channels, rows): one range per part
            segments.append(
                Segment(unit_range.part, first_channel * rows * conv_elem, width * rows * conv_elem,
                        unit_range.start, unit_range.stop)
            )
        else:  # SD, (rows, channels): one range per part and row
            for row in range(rows):
                segments.append(
                    Segment(unit_range.part, (row * channels + first_channel) * conv_elem,
                            width * conv_elem, unit_range.start, unit_range.stop, row)
                )
        first_channel += width
    conv_nbytes = channels * rows * conv_elem
    temporal_nbytes = 0
    if spec.temporal_part is not None:
        t_units = units[-1]
        temporal_nbytes = t_units.num_units * spec.temporal_part.unit_size * spec.ssm_nbytes_per_elem
        segments.append(Segment("temporal", conv_nbytes, temporal_nbytes, t_units.start, t_units.stop))
    segments.sort(key=lambda s: s.offset)
    return PageLayout(spec, tp, rank, tuple(segments), conv_nbytes, temporal_nbytes, units)


def sharded_shapes(spec: Spec, tp: int) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """Per-rank `(conv_shape, temporal_shape)` of `spec` on `tp` ranks.

    The conv shape is `(channels, rows)` in DS and `(rows, channels)` in SD; the temporal
    shape is the full one with its first axis divided among the ranks. Either is None
    when the family has no such state. Every rank has the same shapes.

    Example: Nemotron-H-8B (128 heads of 64, 8 groups, state 128) at TP 1 gives
    `((10240, 3), (128, 64, 128))`.
    """
    layout = page_layout(spec, tp, 0)
    conv_shape = None
    if spec.conv_parts:
        channels = layout.conv_nbytes // (spec.conv_rows * spec.conv_nbytes_per_elem)
        rows = spec.conv_rows
        conv_shape = (channels, rows) if spec.conv_layout == "DS" else (rows, channels)
    temporal_shape = None
    if spec.temporal_part is not None:
        temporal_shape = (layout.units[-1].num_units, *spec.temporal_tail)
    return conv_shape, temporal_shape


def sub_projection_widths(spec: Spec, tp: int) -> tuple[int, ...]:
    """Per-rank channel widths of the conv sub-projections, e.g. `(x_r, B_r, C_r)`."""
    units = rank_units(spec, tp, 0)
    return tuple(u.num_units * p.unit_size for u, p in zip(units, spec.conv_parts))
