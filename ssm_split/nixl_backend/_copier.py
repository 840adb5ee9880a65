"""Run a `CopyTable` (copies inside one process) on host memory or on a GPU.

The pure core decides every copy (`ssm_split.strategies`: a packed wave's pack on the
src, the scatter out of staging on the dst, the peer strategy's copies out of mapped
memory); this module only moves bytes:

- `HostCopier`: numpy, over the arrays whose addresses the table names. Copies of one
  length between the same two arrays are done together with fancy indexing (short ones)
  or one slice assignment each (long ones).
- `DeviceCopier`: one Triton launch per table on the GPU the copier belongs to
  (`_gather.GatherTable`, `_gather.run_gather`), on its own CUDA stream; a `PagedCopies`
  for the copy engines goes to them in one driver call instead (`_batchcopy`). `launch`
  returns a `Launched` whose `done()` polls a CUDA event, so a reader never blocks on it.

Addresses a table names must lie inside memory the copier was given (host) or be
readable by the GPU (its own allocations, or peer memory mapped into this process).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import TransferError
from ..strategies._paged import PagedCopies
from ..strategies._program import CopyTable
from ._batchcopy import batch_copy
from ._ipc import IpcError

__all__ = ["HostCopier", "DeviceCopier", "Launched", "make_copier"]

_SHORT_NBYTES = 4096  # copies up to this long go through fancy indexing
_INDEX_BUDGET = 1 << 22  # bytes indexed per fancy-indexing step
_CHUNK_NBYTES = 256 << 10  # bytes per kernel program (as fast as 64 KiB on an H200, 4x fewer rows)


class Launched:
    """A table's copies in progress (host copies are done at launch)."""

    def __init__(self, event: Any = None, keep: Any = None):
        self._event, self._keep = event, keep  # keep: what must live until the copies end

    def done(self) -> bool:
        return self._event is None or bool(self._event.query())

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()


class HostCopier:
    """Copies between host arrays (numpy uint8 views of registered memory).

    Args:
        arrays: every array a table may name, as 1-D uint8 numpy arrays (any order).
    """

    def __init__(self, arrays: Sequence[np.ndarray]):
        spans = sorted((int(a.ctypes.data), a) for a in arrays)
        self._starts = np.array([s for s, _ in spans], dtype=np.uint64)
        self._ends = np.array([s + a.size for s, a in spans], dtype=np.uint64)
        self._arrays = [a for _, a in spans]

    def _locate(self, addrs: np.ndarray, nbytes: np.ndarray, side: str) -> np.ndarray:
        which = np.searchsorted(self._starts, addrs, side="right").astype(np.int64) - 1
        inside = (which >= 0) & (addrs + nbytes <= self._ends[np.maximum(which, 0)])
        if not bool(inside.all()):
            bad = int(np.flatnonzero(~inside)[0])
            raise TransferError(f"A {side} copy range [{int(addrs[bad]):#x}, +{int(nbytes[bad])}) lies "
                                f"outside the memory of this process the copier knows.")
        return which

    def launch(self, table: CopyTable | PagedCopies) -> Launched:
        if isinstance(table, PagedCopies):  # host copies need every row
            table = table.expand()
        if table.num_copies:
            src_at = self._locate(table.src_addrs, table.nbytes, "source")
            dst_at = self._locate(table.dst_addrs, table.nbytes, "destination")
            groups = np.stack([src_at, dst_at, table.nbytes.astype(np.int64)], axis=1)
            keys, inverse = np.unique(groups, axis=0, return_inverse=True)
            for k, (s, d, n) in enumerate(keys.tolist()):
                rows = np.flatnonzero(inverse.ravel() == k)
                src_off = (table.src_addrs[rows] - self._starts[s]).astype(np.int64)
                dst_off = (table.dst_addrs[rows] - self._starts[d]).astype(np.int64)
                self._copy(self._arrays[s], self._arrays[d], src_off, dst_off, n)
        return Launched()

    @staticmethod
    def _copy(src: np.ndarray, dst: np.ndarray, src_off: np.ndarray, dst_off: np.ndarray, n: int) -> None:
        if n > _SHORT_NBYTES:
            for s, d in zip(src_off.tolist(), dst_off.tolist()):
                dst[d:d + n] = src[s:s + n]
            return
        step = max(1, _INDEX_BUDGET // max(n, 1))
        span = np.arange(n, dtype=np.int64)
        for i in range(0, src_off.size, step):
            dst[dst_off[i:i + step, None] + span] = src[src_off[i:i + step, None] + span]


class DeviceCopier:
    """Copies on one GPU with one kernel launch per table.

    Args:
        device_id: the CUDA device whose memory (own or mapped) the tables name.
    """

    def __init__(self, device_id: int):
        import torch

        self._torch = torch
        self.device = torch.device("cuda", device_id)
        self._anchor = torch.empty(16, dtype=torch.uint8, device=self.device)
        self._stream = torch.cuda.Stream(device=self.device)

    def launch(self, table: CopyTable | PagedCopies) -> Launched:
        from ._gather import GatherTable, PagedTable, run_gather, run_paged

        torch = self._torch
        if not table.num_copies:
            return Launched()
        keep = None
        with torch.cuda.device(self.device):
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # writes made before us
            with torch.cuda.stream(self._stream):  # the table's upload is ordered before the kernel
                if isinstance(table, PagedCopies) and table.engine == "copy-engines":
                    rows = table.expand()
                    try:
                        keep = batch_copy(rows.src_addrs, rows.dst_addrs, rows.nbytes,
                                          stream_handle=self._stream.cuda_stream, device_id=self.device.index)
                    except IpcError as error:
                        raise TransferError(f"The copy engines refused the batch: {error}") from error
                elif isinstance(table, PagedCopies):  # one program per (layer, request, piece)
                    run_paged(PagedTable.build(table, anchor=self._anchor), self._stream)
                else:
                    gather = GatherTable.build(table.src_addrs.astype(np.int64), table.dst_addrs.astype(np.int64),
                                               table.nbytes.astype(np.int64), anchor=self._anchor,
                                               chunk_nbytes=_CHUNK_NBYTES)
                    run_gather(gather, self._stream)
            event = torch.cuda.Event()
            event.record(self._stream)
        return Launched(event, keep)

    def synchronize(self) -> None:
        """Wait until every launched copy finished."""
        self._stream.synchronize()


def make_copier(mem_type: str, device_id: int, arrays: Sequence[Any]) -> HostCopier | DeviceCopier:
    """The copier for an endpoint's memory: host arrays (DRAM) or its GPU (VRAM)."""
    if mem_type == "VRAM":
        return DeviceCopier(device_id)
    views = [(a.numpy() if not isinstance(a, np.ndarray) else a).reshape(-1).view(np.uint8) for a in arrays]
    return HostCopier(views)
