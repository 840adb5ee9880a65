"""A transfer-friendly layout: one region per block holding every layer, unit-major.

vLLM keeps one tensor per layer, so a request's state is `layers x reads` small ranges
and NIXL pays per range. An engine that can choose its layout can instead keep, per rank
and per block, one *stacked page* for all `L` state layers, with each part stored
unit-major across layers::

    stacked page of rank r (DS conv), every part as an array (units_r, L, unit ...):
    | conv.x (units_r, L, head_dim, rows) | conv.B (...) | conv.C (...) | temporal (units_r, L, *tail) |

A run of units then covers every layer in one contiguous range on both sides, so a dst
rank needs the same few reads per block as per layer page (e.g. 4 for GDN 1 -> 2), each
`L` times longer. This is exactly the page of a spec whose every part has `unit_size * L`
(temporal tail `(L, *tail)`): `stack_layers(spec, L)` returns such a spec-like value, and
since every offset of a page layout is linear in the unit sizes, its layout and plans are
the per-layer ones with every offset and length multiplied by `L`.

`StackedSpec` itself is a page spec (`ssm_split.specs._stacked`): `page_layout`,
`plan_reads`, `Endpoint` and the Reader take it directly (`stacked_layout` and
`stacked_plan` here are those two, insisting on a stacked spec). The property tests hold
them equal to the per-layer results scaled by `L`.

Kernels that view one layer use `layer_view` (offset, shape and strides per part): the
view of layer `l` of a part is `(units_r, *unit)` with the unit stride multiplied by `L`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import PlanError
from ..layout._layout import PageLayout, page_layout
from ..plan._plan import Plan, plan_reads
from ..specs._stacked import StackedSpec, stack_layers

__all__ = ["StackedSpec", "stack_layers", "stacked_layout", "stacked_plan", "stack_pages",
           "unstack_page", "PartView", "layer_view"]


def stacked_layout(stacked: StackedSpec, tp: int, rank: int) -> PageLayout:
    """The byte layout of `rank`'s stacked page: `page_layout` of the stacked spec, which
    is the per-layer layout with every offset and length multiplied by `num_layers`.

    Raises:
        PlanError: `stacked` is not a `StackedSpec`.
    """
    _check_stacked(stacked)
    return page_layout(stacked, tp, rank)


def stacked_plan(stacked: StackedSpec, src_tp: int, dst_tp: int, dst_rank: int) -> Plan:
    """The reads of `dst_rank` between stacked pages: `plan_reads` of the stacked spec, the
    per-layer plan scaled by `num_layers` (still maximal: scaling keeps contiguity).

    Raises:
        PlanError: `stacked` is not a `StackedSpec`.
    """
    _check_stacked(stacked)
    return plan_reads(stacked, src_tp, dst_tp, dst_rank)


def _check_stacked(stacked: object) -> None:
    if not isinstance(stacked, StackedSpec):
        raise PlanError(f"Expected a StackedSpec (from `stack_layers(spec, num_layers)`), got "
                        f"{type(stacked).__name__}.")


def _unit_blocks(stacked: StackedSpec, tp: int, rank: int):
    """Yield `(segment of the per-layer page, unit_nbytes)` in page order."""
    base = page_layout(stacked.base, tp, rank)
    for seg in base.segments:
        yield seg, seg.unit_nbytes


def stack_pages(stacked: StackedSpec, pages: Sequence[np.ndarray], tp: int, rank: int) -> np.ndarray:
    """Build `rank`'s stacked page from its `num_layers` per-layer pages (1-D uint8 each,
    content first; padding ignored). Returns a new 1-D uint8 array of the stacked content."""
    _check_stacked(stacked)
    n = stacked.num_layers
    if len(pages) != n:
        raise PlanError(f"stack_pages needs {n} per-layer pages, got {len(pages)}.")
    out = np.empty(stacked_layout(stacked, tp, rank).content_nbytes, dtype=np.uint8)
    for seg, unit in _unit_blocks(stacked, tp, rank):
        units = seg.nbytes // unit
        block = np.stack([np.asarray(p, dtype=np.uint8)[seg.offset:seg.end].reshape(units, unit) for p in pages],
                         axis=1)  # (units, L, unit)
        out[seg.offset * n:seg.end * n] = block.reshape(-1)
    return out


def unstack_page(stacked: StackedSpec, page: np.ndarray, tp: int, rank: int) -> list[np.ndarray]:
    """The `num_layers` per-layer page contents held by a stacked page (inverse of `stack_pages`)."""
    _check_stacked(stacked)
    n = stacked.num_layers
    content = page_layout(stacked.base, tp, rank).content_nbytes
    layers = [np.empty(content, dtype=np.uint8) for _ in range(n)]
    page = np.asarray(page, dtype=np.uint8)
    for seg, unit in _unit_blocks(stacked, tp, rank):
        block = page[seg.offset * n:seg.end * n].reshape(seg.nbytes // unit, n, unit)
        for layer in range(n):
            layers[layer][seg.offset:seg.end] = block[:, layer].reshape(-1)
    return layers


@dataclass(frozen=True, slots=True)
class PartView:
    """Where one layer's piece of a part sits in a stacked page.

    The piece is an array of `shape` elements of `elem_nbytes` bytes, starting
    `offset` bytes from the page start, with `strides_nbytes` per axis (the first axis,
    units, jumps over the other layers).
    """

    name: str
    row: int | None
    offset: int
    shape: tuple[int, ...]
    strides_nbytes: tuple[int, ...]
    elem_nbytes: int


def layer_view(stacked: StackedSpec, tp: int, rank: int, layer: int) -> tuple[PartView, ...]:
    """How a kernel views layer `layer` of `rank`'s stacked page, part by part.

    Conv parts (DS): shape `(units_r, unit_channels, rows)`; SD: one view per row of shape
    `(units_r, unit_channels)`; temporal: `(units_r, *tail)`. Strides are in bytes.
    """
    _check_stacked(stacked)
    n = stacked.num_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise PlanError(f"layer must be an int in [0, {n}), got {layer!r}.")
    base, spec = page_layout(stacked.base, tp, rank), stacked.base
    views = []
    for seg in base.segments:
        unit = seg.unit_nbytes
        units = seg.unit_stop - seg.unit_start
        offset = seg.offset * n + layer * unit
        if seg.name == "temporal":
            elem = spec.ssm_nbytes_per_elem
            tail = spec.temporal_tail
            inner = tuple(int(np.prod(tail[i + 1:], dtype=np.int64)) * elem for i in range(len(tail)))
            views.append(PartView(seg.name, None, offset, (units, *tail), (unit * n, *inner), elem))
        elif seg.row is None:  # DS conv: (units, channels_per_unit, rows)
            elem, rows = spec.conv_nbytes_per_elem, spec.conv_rows
            channels = unit // (rows * elem)
            views.append(PartView(seg.name, None, offset, (units, channels, rows),
                                  (unit * n, rows * elem, elem), elem))
        else:  # SD conv, one row: (units, channels_per_unit)
            elem = spec.conv_nbytes_per_elem
            views.append(PartView(seg.name, seg.row, offset, (units, unit // elem), (unit * n, elem), elem))
    return tuple(views)
