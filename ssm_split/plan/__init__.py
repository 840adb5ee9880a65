"""Stage 3 — what to move: the reads one dst rank makes from the src ranks' pages.

A `Plan` is a frozen value (a tuple of `Read(src_rank, src_offset, dst_offset, nbytes)`),
grouped by src rank, maximal, each dst content byte written once. Transfer strategies
built on plans are in `ssm_split.strategies`; plans become NIXL descriptors in
`ssm_split.expand`.
"""

from ._plan import Read as Read
from ._plan import Plan as Plan
from ._plan import plan_reads as plan_reads
from ._plan import plan_all as plan_all
from ._format import format_plan as format_plan

__all__ = [
    "Read",
    "Plan",
    "plan_reads",
    "plan_all",
    "format_plan",
]
