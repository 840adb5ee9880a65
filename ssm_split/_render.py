"""Text renderings of layouts and plans, for people (the CLI, docs, error reports)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._layout import PageLayout, Segment, page_layout

if TYPE_CHECKING:
    from ._plan import Plan

__all__ = ["format_table", "format_layout", "format_plan", "format_bytes"]


def format_bytes(nbytes: int) -> str:
    """`1536` -> `"1.5 KiB"`; exact below 1 KiB."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{nbytes} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table with right-aligned numbers and a rule under the header."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if c[:1].isdigit() else c.ljust(w) for c, w in zip(row, widths)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


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


def _segment_names(layout: PageLayout, offset: int, nbytes: int) -> str:
    segs = layout.segments_overlapping(offset, nbytes)
    names = list(dict.fromkeys(s.name for s in segs))
    text = "+".join(names)
    rows = sorted({s.row for s in segs if s.row is not None})
    if rows:
        text += f" (rows {rows[0]}..{rows[-1]})" if len(rows) > 1 else f" (row {rows[0]})"
    return text


def format_plan(plan: "Plan") -> str:
    """The reads of a plan as a table, with the dst segments each read fills."""
    dst = page_layout(plan.spec, plan.dst_tp, plan.dst_rank)
    rows = [
        (r.src_rank, f"[{r.src_offset}, {r.src_end})", f"[{r.dst_offset}, {r.dst_end})", r.nbytes,
         _segment_names(dst, r.dst_offset, r.nbytes))
        for r in plan.reads
    ]
    table = format_table(("src rank", "src bytes", "dst bytes", "nbytes", "dst segments"), rows)
    return (
        f"dst rank {plan.dst_rank} of tp={plan.dst_tp} <- src tp={plan.src_tp}\n{table}\n"
        f"{len(plan.reads)} reads, {plan.nbytes} B ({format_bytes(plan.nbytes)}), "
        f"src ranks {list(plan.src_ranks)}"
    )
