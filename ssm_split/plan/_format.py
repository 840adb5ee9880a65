"""A plan as text: its reads with the dst segments each one fills (CLI, docs, errors).

This module does not import `_plan`: `Plan.format_table` imports it, and a plan is read
here only through its attributes (`spec`, `src_tp`, `dst_tp`, `dst_rank`, `reads`,
`nbytes`, `src_ranks`).
"""

from __future__ import annotations

from .._text import format_bytes, format_table
from ..layout._layout import PageLayout, page_layout

__all__ = ["format_plan"]


def _segment_names(layout: PageLayout, offset: int, nbytes: int) -> str:
    segs = layout.segments_overlapping(offset, nbytes)
    names = list(dict.fromkeys(s.name for s in segs))
    text = "+".join(names)
    rows = sorted({s.row for s in segs if s.row is not None})
    if len(rows) == 1:
        text += f" (row {rows[0]})"
    elif rows and rows == list(range(rows[0], rows[-1] + 1)):
        text += f" (rows [{rows[0]}, {rows[-1] + 1}))"  # half-open, like every range we print
    elif rows:
        text += f" (rows {', '.join(map(str, rows))})"
    return text


def format_plan(plan) -> str:
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
