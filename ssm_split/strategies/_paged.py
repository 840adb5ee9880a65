"""A batch's copies in factored form: the peer strategy's index table for one kernel.

Where both sides' pages sit in one address space (the dst process, with the src's pages
mapped into it), every copy of a batch has the form

    src: src_base[r, l] + src_block[n] * src_stride[r, l] + src_offset[j]
    dst: dst_base[l]    + dst_block[n] * dst_stride[l]    + dst_offset[j]     nbytes[j]

for layer index `l`, request `n` and piece `j` (a piece belongs to src rank index `r`).
`PagedCopies` holds these small tables instead of one row per copy: for 48 layers x 64
requests the tables are a few KiB, built without a loop over pages, and a kernel derives
each copy's addresses itself (one program per (layer, request, piece)). The pieces are
the plan's reads from each src rank, merged inside a page and cut into pieces of at most
`piece_nbytes`, so programs carry similar loads.

Two engines run them (`engine`): `"kernel"`, one program per (layer, request, piece),
pieces cut to `piece_nbytes` so programs carry similar loads; or `"copy-engines"`, the
pieces uncut (the plan's merged reads) and the expanded rows handed to the GPU's copy
engines in one driver call, which wins where the copies are few and long (stacked
pages) and loses where they are many and short (`strategies.peer_engine`).

`expand()` turns the tables into the equivalent `CopyTable` (the host executor, the
copy engines and the tests use it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import numpy as np

from ..errors import PlanError
from ..expand._expand import check_batch, merged_reads
from ..layout._regions import RegionSet
from ..plan._plan import Plan
from ._copies import CopyTable

__all__ = ["PagedCopies", "paged_copies", "DEFAULT_PIECE_NBYTES", "PEER_ENGINES"]

DEFAULT_PIECE_NBYTES = 256 << 10
PEER_ENGINES = ("kernel", "copy-engines")
_U64 = np.uint64


@dataclass(frozen=True, slots=True, eq=False)
class PagedCopies:
    """Copies in factored form (module doc); every array int64 and read-only.

    Attributes:
        src_layers: shape `(R, m, 2)`: `(base, stride)` in bytes of src rank index `r`'s
            layer `l` (in the dst's address space).
        dst_layers: shape `(m, 2)`: `(base, stride)` of the dst's layer `l`.
        pairs: shape `(N, 2)`: `(src_block, dst_block)` per request.
        pieces: shape `(k, 4)`: `(src rank index, src_offset, dst_offset, nbytes)`.
        engine: what runs them, one of `PEER_ENGINES`.
    """

    src_layers: np.ndarray
    dst_layers: np.ndarray
    pairs: np.ndarray
    pieces: np.ndarray
    engine: str = "kernel"

    def __post_init__(self) -> None:
        if self.engine not in PEER_ENGINES:
            raise PlanError(f"PagedCopies.engine must be one of {PEER_ENGINES}, got {self.engine!r}.")

    @property
    def num_copies(self) -> int:
        return int(self.dst_layers.shape[0] * self.pairs.shape[0] * self.pieces.shape[0])

    @property
    def total_nbytes(self) -> int:
        return int(self.dst_layers.shape[0] * self.pairs.shape[0] * self.pieces[:, 3].sum())

    def expand(self):
        """The same copies as a `CopyTable`, ordered by (layer, request, piece)."""
        m, n, k = self.dst_layers.shape[0], self.pairs.shape[0], self.pieces.shape[0]
        rank, src_off, dst_off, nbytes = (self.pieces[:, i] for i in range(4))
        src_base = self.src_layers[rank][:, :, 0].T  # (m, k)
        src_stride = self.src_layers[rank][:, :, 1].T
        src = (src_base[:, None, :] + self.pairs[None, :, 0, None] * src_stride[:, None, :]
               + src_off[None, None, :])
        dst = (self.dst_layers[:, None, None, 0] + self.pairs[None, :, 1, None] * self.dst_layers[:, None, None, 1]
               + dst_off[None, None, :])
        columns = [a.reshape(-1).astype(_U64) for a in (src, dst, np.broadcast_to(nbytes, (m, n, k)))]
        for column in columns:
            column.flags.writeable = False
        return CopyTable(*columns)


def _pieces(plan: Plan, piece_nbytes: int) -> np.ndarray:
    rows = []
    for index, rank in enumerate(plan.src_ranks):
        src_off, dst_off, lengths = merged_reads(plan, rank)
        for s, d, n in zip(src_off.tolist(), dst_off.tolist(), lengths.tolist()):
            for start in range(0, n, piece_nbytes):
                rows.append((index, s + start, d + start, min(piece_nbytes, n - start)))
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def _layer_table(regions: RegionSet, layer_ids: np.ndarray) -> np.ndarray:
    cols = regions.columns()
    table = np.stack([cols["base_addr"][layer_ids], cols["page_stride_nbytes"][layer_ids]], axis=1)
    return table.astype(np.int64)


def paged_copies(plan: Plan, src_regions: Union[Mapping[int, RegionSet], Sequence[RegionSet]],
                 dst_regions: RegionSet, block_pairs: object, *, layers: object = None,
                 piece_nbytes: int = DEFAULT_PIECE_NBYTES, engine: str = "kernel") -> PagedCopies:
    """The batch's copies in factored form, both sides' regions in one address space.

    Args:
        plan: the dst rank's plan.
        src_regions: per src rank the plan reads from, its regions as seen by the dst
            (`mapped_regions`).
        dst_regions: the dst's regions.
        block_pairs: shape `(N, 2)` `(src_block, dst_block)`.
        layers: the layers to move (default all).
        piece_nbytes: the longest piece (> 0) for the kernel.
        engine: one of `PEER_ENGINES`; `"copy-engines"` keeps every merged read whole.

    Raises:
        BlockRangeError, PlanError: as `expand_plan`; an unknown engine.
    """
    if isinstance(piece_nbytes, bool) or not isinstance(piece_nbytes, int) or piece_nbytes < 1:
        raise PlanError(f"piece_nbytes must be an int >= 1, got {piece_nbytes!r}.")
    if engine not in PEER_ENGINES:
        raise PlanError(f"engine must be one of {PEER_ENGINES}, got {engine!r}.")
    if engine == "copy-engines":
        piece_nbytes = max(plan.dst_content_nbytes, 1)
    pairs, layer_ids = check_batch(plan, src_regions, dst_regions, block_pairs, layers)
    regions = dict(src_regions) if isinstance(src_regions, Mapping) else dict(enumerate(src_regions))
    src_layers = np.stack([_layer_table(regions[r], layer_ids) for r in plan.src_ranks]) if plan.src_ranks \
        else np.zeros((0, layer_ids.size, 2), np.int64)
    arrays = (src_layers, _layer_table(dst_regions, layer_ids), pairs.astype(np.int64), _pieces(plan, piece_nbytes))
    for array in arrays:
        array.flags.writeable = False
    return PagedCopies(*arrays, engine=engine)
