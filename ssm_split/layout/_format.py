"""A rank's page as text: a table of its segments and an ASCII picture (CLI, docs)."""

from __future__ import annotations

from .._text import format_bytes, format_table
from ._layout import PageLayout, Segment

__all__ = ["format_layout"]


def _units(seg: Segment) -> str:
    return f"{seg.unit_start}..{seg.unit_stop - 1}" if seg.unit_stop - seg.unit_start > 1 else str(seg.unit_start)


def _picture(layout: PageLayout, width: int = 72) -> str:
    """One line per page: each part drawn proportionally to its bytes (at least 1 char)."""
    total = layout.content_nbytes
    pieces = []
    for seg in layout.segments:
        label = seg.name.split(".")[-1]
        chars = max(len(label) + 2, round(width * seg.nbytes / total))
        pieces.append(label.center(chars - 1, "-" if seg.name == "temporal" else " "))
    return "|" + "|".join(pieces) + "|"


def format_layout(layout: PageLayout) -> str:
    """A rank's page as a table (segment, units, offset, nbytes) and an ASCII picture."""
    spec = layout.spec
    rows = [
        (seg.label, _units(seg), seg.offset, seg.end, seg.nbytes, format_bytes(seg.nbytes))
        for seg in layout.segments
    ]
    table = format_table(("segment", "units", "offset", "end", "nbytes", "size"), rows)
    return (
        f"{type(spec).__name__} page of rank {layout.rank} of tp={layout.tp}"
        f" (conv layout {getattr(spec, 'conv_layout', '-')})\n"
        f"{table}\n"
        f"conv {layout.conv_nbytes} B + temporal {layout.temporal_nbytes} B"
        f" = content {layout.content_nbytes} B ({format_bytes(layout.content_nbytes)})\n"
        f"{_picture(layout)}"
    )
