"""Hand a list of copies to the GPU's copy engines in one driver call (`cuMemcpyBatchAsync`).

The peer strategy's second engine (`strategies.peer_engine` decides when it runs). CUDA
12.8 added the call; CUDA 13 drivers export it as `cuMemcpyBatchAsync_v2` (without the
failed-copy index of the first version). Both are driver API only (`libcuda.so.1`,
through `_ipc`'s loader); the calling thread's current context must be the dst device's
(the copier enters it).

Measured on two H200s (`benchmarks/results/batch-copy-probe-h200x2.json`): 512 copies of
about 19 MB (stacked pages) GPU 0 -> GPU 1 run at 99.5% of torch's copy (the kernel:
95%), with 0.3 ms spent in the call; 24,576 copies of about 400 KB run at 83% and spend
13 ms in the call, and on one GPU the call costs about 3.5 us a copy. Hence copy engines
for few long copies between two GPUs only.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from ._ipc import IpcError, _check, _driver

__all__ = ["batch_copy_available", "batch_copy"]

_SRC_ACCESS_ORDER_STREAM = 1
_LOCATION_TYPE_DEVICE = 1


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _Attributes(ctypes.Structure):
    _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocHint", _Location), ("dstLocHint", _Location),
                ("flags", ctypes.c_uint)]


_CALL: Any = None  # (function, takes a failed-copy index), or False where the driver has neither


def _batch_function() -> Any:
    global _CALL
    if _CALL is None:
        try:
            lib = _driver()
        except IpcError:
            _CALL = False
            return _CALL
        p = ctypes.c_void_p
        head = [p, p, p, ctypes.c_size_t, ctypes.POINTER(_Attributes), p, ctypes.c_size_t]
        if hasattr(lib, "cuMemcpyBatchAsync_v2"):
            fn = lib.cuMemcpyBatchAsync_v2
            fn.argtypes = head + [p]
            _CALL = (fn, False)
        elif hasattr(lib, "cuMemcpyBatchAsync"):
            fn = lib.cuMemcpyBatchAsync
            fn.argtypes = head + [ctypes.POINTER(ctypes.c_size_t), p]
            _CALL = (fn, True)
        else:
            _CALL = False
    return _CALL


def batch_copy_available() -> bool:
    """True when this process's CUDA driver has batched copies."""
    return bool(_batch_function())


def batch_copy(src_addrs: np.ndarray, dst_addrs: np.ndarray, nbytes: np.ndarray, *, stream_handle: int,
               device_id: int) -> tuple[np.ndarray, ...]:
    """Enqueue `nbytes[i]` bytes from `src_addrs[i]` to `dst_addrs[i]` (device addresses in
    this process, shape `(n,)` each) on the CUDA stream `stream_handle` of device
    `device_id`, in stream order. (`device_id` also fills the call's location hints, which
    the driver ignores for memory from `cudaMalloc` and CUDA IPC.)

    Returns:
        The three arrays as passed to the driver. The driver reads them during the call;
        the copier keeps them with the launch anyway, until its event has passed.

    Raises:
        IpcError: the driver has no batched copies, or refused the batch.
    """
    call = _batch_function()
    if not call:
        raise IpcError("this CUDA driver has no cuMemcpyBatchAsync (CUDA 12.8 or newer is needed)")
    arrays = tuple(np.ascontiguousarray(a, dtype=np.uint64).reshape(-1) for a in (dst_addrs, src_addrs, nbytes))
    count = arrays[0].size
    if any(a.size != count for a in arrays):
        raise IpcError(f"a batch of copies needs as many sources and lengths as destinations, got "
                       f"{[a.size for a in arrays]} (dst, src, nbytes)")
    if not count:
        return arrays
    hint = _Location(_LOCATION_TYPE_DEVICE, device_id)
    attrs = _Attributes(_SRC_ACCESS_ORDER_STREAM, hint, hint, 0)
    first = np.zeros(1, dtype=np.uint64)  # the one attribute applies from copy 0 on
    fn, with_fail_index = call
    args = [a.ctypes.data for a in arrays] + [count, ctypes.byref(attrs), first.ctypes.data, 1]
    failed = ctypes.c_size_t(count)
    if with_fail_index:
        args.append(ctypes.byref(failed))
    rc = fn(*args, stream_handle)
    if rc:
        where = f" (copy {failed.value}: {int(arrays[2][failed.value])} bytes)" if failed.value < count else ""
        _check(rc, f"cuMemcpyBatchAsync of {count} copies{where}")
    return arrays
