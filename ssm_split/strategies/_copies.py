"""`CopyTable`: copies inside one process, one row per copy (the scatter out of staging,
the src's pack, the expanded form of `PagedCopies`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..expand._expand import Expansion

__all__ = ["CopyTable"]

_U64 = np.uint64


def _read_only(*arrays: np.ndarray) -> None:
    for array in arrays:
        array.flags.writeable = False


@dataclass(frozen=True, slots=True, eq=False)
class CopyTable:
    """Copies inside one process: `nbytes[i]` bytes from `src_addrs[i]` to `dst_addrs[i]`.

    Attributes:
        src_addrs, dst_addrs, nbytes: shape `(K,)` uint64, read-only; destinations
            never overlap.
    """

    src_addrs: np.ndarray
    dst_addrs: np.ndarray
    nbytes: np.ndarray

    @property
    def num_copies(self) -> int:
        return int(self.nbytes.shape[0])

    @property
    def total_nbytes(self) -> int:
        return int(self.nbytes.sum())

    @classmethod
    def from_expansions(cls, *expansions: Expansion) -> "CopyTable":
        """Every rank's descriptor pairs of expansions whose both sides are local."""
        ranks = [r for e in expansions for r in e.ranks]
        columns = [np.concatenate([d[:, i] for d in descs]) if ranks else np.empty(0, _U64)
                   for descs, i in (([r.src_descs for r in ranks], 0), ([r.dst_descs for r in ranks], 0),
                                    ([r.dst_descs for r in ranks], 1))]
        _read_only(*columns)
        return cls(*columns)
