"""A rank's page as text: a table of its segments and an ASCII picture (CLI, docs).

Ranges print the way the API states them, half-open: units `[0, 8)` are units 0 to 7,
exactly `UnitRange(start=0, stop=8)` / `Segment.unit_start, unit_stop`, and bytes
`[offset, end)`. A `*` after a unit range marks a replicated unit (other ranks hold
the same one: fewer units than ranks).
"""

from __future__ import annotations

from .._text import format_bytes, format_table
from ._layout import PageLayout, Segment

__all__ = ["format_layout", "format_units"]


def format_units(start: int, stop: int, replicated: bool = False) -> str:
    """Units `[start, stop)` as `"[start, stop)"`, with `*` when replicated."""
    return f"[{start}, {stop})" + ("*" if replicated else "")


def _picture(layout: PageLayout, width: int = 72) -> str:
    """One line per page: each part drawn proportionally to its bytes (at least 1 char)."""
    total = layout.content_nbytes
    pieces = []
    for seg in layout.segments:
        label = seg.name.split(".")[-1]
        chars = max(len(label) + 2, round(width * seg.nbytes / total))
        pieces.append(label.center(chars - 1, "-" if seg.name == "temporal" else " "))
    return "|" + "|".join(pieces) + "|"


def _units(layout: PageLayout, seg: Segment) -> str:
    replicated = any(u.replicated for u in layout.units if u.part == seg.name)
    return format_units(seg.unit_start, seg.unit_stop, replicated)


def format_layout(layout: PageLayout) -> str:
    """A rank's page as a table (segment, units, bytes, nbytes) and an ASCII picture.

    Units and bytes are half-open ranges, `[start, stop)`, as the API gives them.
    """
    spec = layout.spec
    rows = [
        (seg.label, _units(layout, seg), f"[{seg.offset}, {seg.end})", seg.nbytes,
         format_bytes(seg.nbytes))
        for seg in layout.segments
    ]
    table = format_table(("segment", "units", "bytes", "nbytes", "size"), rows)
    note = ("\n* replicated: other ranks hold the same unit (fewer units than ranks)"
            if any(u.replicated for u in layout.units) else "")
    return (
        f"{type(spec).__name__} page of rank {layout.rank} of tp={layout.tp}"
        f" (conv layout {getattr(spec, 'conv_layout', '-')})\n"
        f"{table}\n"
        f"units and bytes are half-open ranges [start, stop){note}\n"
        f"conv {layout.conv_nbytes} B + temporal {layout.temporal_nbytes} B"
        f" = content {layout.content_nbytes} B ({format_bytes(layout.content_nbytes)})\n"
        f"{_picture(layout)}"
    )
