"""vLLM's reads beside ssm_split's, judged byte for byte by the reference model.

For every dst rank, both sets of reads are cut at the dst page's segment boundaries and
at each other's read boundaries, so each row is one dst byte range with the src bytes
each side copies into it. Rows where the two differ are marked `*`. Which side is right
is decided by the reference model (`ssm_split.reference`): a random full state is
sharded on the src TP size, both sets of reads are applied to those pages, and each row
is compared with the dst page that sharding the same state on the dst TP size gives.

`ssm-split vllm-check` (`ssm_split.cli`) prints this comparison for every dst rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import PlanError
from ..layout._layout import page_layout
from ..plan._plan import Read, plan_reads
from .._text import format_table
from ..specs._spec import Spec

__all__ = ["Row", "RankCheck", "apply_reads", "check_rank", "format_rank"]


@dataclass(frozen=True, slots=True)
class Row:
    """One dst byte range and where each side fills it from.

    Attributes:
        segment: the dst segment the range lies in (`conv.x`, ..., `temporal`).
        dst_offset, nbytes: the range in the dst page.
        vllm, ours: the piece of a read that fills it (src rank and src offset of its
            first byte), or None when that side leaves it unwritten.
        vllm_right, ours_right: whether that side's bytes equal the reference page's.
    """

    segment: str
    dst_offset: int
    nbytes: int
    vllm: Read | None
    ours: Read | None
    vllm_right: bool
    ours_right: bool

    @property
    def differs(self) -> bool:
        return self.vllm != self.ours


@dataclass(frozen=True, slots=True)
class RankCheck:
    """The comparison for one dst rank: the rows, both read lists, and the verdicts."""

    dst_rank: int
    rows: tuple[Row, ...]
    vllm_reads: tuple[Read, ...]
    our_reads: tuple[Read, ...]

    @property
    def vllm_right(self) -> bool:
        return all(r.vllm_right for r in self.rows)

    @property
    def ours_right(self) -> bool:
        return all(r.ours_right for r in self.rows)


def apply_reads(reads: Sequence[Read], src_pages: Sequence[np.ndarray], dst_nbytes: int) -> np.ndarray:
    """A zeroed dst page of `dst_nbytes` bytes with every read copied into it.

    Unlike `reference.apply` this takes bare reads, which may fall outside the src
    state (into the page's padding), as vLLM's may.

    Raises:
        PlanError: a read leaves a src page or the dst page.
    """
    out = np.zeros(dst_nbytes, dtype=np.uint8)
    for read in reads:
        src = src_pages[read.src_rank]
        if read.src_end > len(src) or read.dst_end > dst_nbytes:
            raise PlanError(f"{read} leaves a page (src {len(src)} bytes, dst {dst_nbytes}).")
        out[read.dst_offset: read.dst_end] = src[read.src_offset: read.src_end]
    return out


def _piece(reads: Sequence[Read], start: int, stop: int) -> Read | None:
    for read in reads:
        if read.dst_offset <= start < read.dst_end:
            return Read(read.src_rank, read.src_offset + start - read.dst_offset, start, stop - start)
    return None


def check_rank(spec: Spec, src_tp: int, dst_tp: int, dst_rank: int, vllm: Sequence[Read],
               src_pages: Sequence[np.ndarray], want: np.ndarray) -> RankCheck:
    """Compare vLLM's reads `vllm` with `plan_reads` for one dst rank, row by row, on the
    reference pages `src_pages` (src TP) and the expected dst page `want`."""
    ours = plan_reads(spec, src_tp, dst_tp, dst_rank).reads
    dst = page_layout(spec, dst_tp, dst_rank)
    content = dst.content_nbytes
    cuts = {0, content}
    for seg in dst.segments:
        cuts |= {seg.offset, seg.end}
    for read in (*vllm, *ours):
        cuts |= {min(read.dst_offset, content), min(read.dst_end, content)}
    got_vllm = apply_reads(vllm, src_pages, max(content, max((r.dst_end for r in vllm), default=0)))
    got_ours = apply_reads(ours, src_pages, content)
    rows = []
    bounds = sorted(cuts)
    for start, stop in zip(bounds, bounds[1:]):
        segment = "+".join(dict.fromkeys(s.label for s in dst.segments_overlapping(start, stop - start)))
        expected = want[start:stop]
        rows.append(Row(segment, start, stop - start, _piece(vllm, start, stop), _piece(ours, start, stop),
                        bool(np.array_equal(got_vllm[start:stop], expected)),
                        bool(np.array_equal(got_ours[start:stop], expected))))
    return RankCheck(dst_rank, tuple(rows), tuple(vllm), tuple(ours))


def _source(spec: Spec, src_tp: int, piece: Read | None) -> str:
    if piece is None:
        return "(not written)"
    layout = page_layout(spec, src_tp, piece.src_rank)
    names = list(dict.fromkeys(s.label for s in layout.segments_overlapping(piece.src_offset, piece.nbytes)))
    if piece.src_end > layout.content_nbytes:
        names.append("past the state")
    return f"rank {piece.src_rank} [{piece.src_offset}, {piece.src_end}) {'+'.join(names)}"


def _who(row: Row) -> str:
    if row.vllm_right and row.ours_right:
        return "both"
    return {(False, True): "ssm_split", (True, False): "vLLM"}.get((row.vllm_right, row.ours_right), "neither")


def format_rank(spec: Spec, src_tp: int, check: RankCheck) -> str:
    """The side-by-side table of one dst rank and its verdict line."""
    table = format_table(
        ("", "dst segment", "dst bytes", "vLLM reads (src rank, bytes, segment)",
         "ssm_split reads (src rank, bytes, segment)", "right"),
        [("*" if row.differs else "", row.segment, f"[{row.dst_offset}, {row.dst_offset + row.nbytes})",
          _source(spec, src_tp, row.vllm), _source(spec, src_tp, row.ours), _who(row))
         for row in check.rows])
    wrong = [r for r in check.rows if not r.vllm_right]
    if wrong:
        segments = ", ".join(dict.fromkeys(r.segment for r in wrong))
        vllm_text = (f"vLLM's page is WRONG: {sum(r.nbytes for r in wrong)} bytes differ from the "
                     f"reference ({segments})")
    else:
        vllm_text = "vLLM's page matches the reference"
    ours_text = "ssm_split's page matches the reference" if check.ours_right else "ssm_split's page is WRONG"
    return (f"dst rank {check.dst_rank}: vLLM {len(check.vllm_reads)} reads, ssm_split "
            f"{len(check.our_reads)} reads\n{table}\n{vllm_text}; {ours_text}.")
