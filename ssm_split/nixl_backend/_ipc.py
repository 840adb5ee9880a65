"""CUDA IPC: a src endpoint exports its GPU buffers; a dst on the same host maps them.

The peer strategy needs the dst process to read the src's pages directly. CUDA IPC does
it with 64-byte handles: the src asks the driver for the handle of the allocation that
holds each registered buffer (`cuIpcGetMemHandle` on the allocation's base, found with
`cuMemGetAddressRange`) and publishes it with the buffer's offset in that allocation;
the dst opens each distinct handle once per connection with
`cuIpcOpenMemHandle(CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)` in its own device's context,
and closes it at disconnect. Measured on two H200s (benchmarks/results/peer-probe-h200x2.json):
the lazy flag alone is enough (no peer context is created on the src's GPU), a kernel
on the dst GPU then reads the mapping at 94% of torch's GPU0 -> GPU1 copy.

Export fails for memory that is not a plain `cudaMalloc` allocation (torch's
`expandable_segments`, virtual-memory pools): the endpoint then publishes no export and
readers use NIXL. Only the driver API is used (`libcuda.so.1`); torch must already
have created the device's context.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Sequence

__all__ = ["PeerExport", "host_id", "export_buffers", "PeerMapping", "IpcError", "ipc_exports"]

_LAZY_ENABLE_PEER_ACCESS = 1
_HANDLE_NBYTES = 64


class IpcError(RuntimeError):
    """A CUDA IPC call failed (the message names the call and the driver's error)."""


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * _HANDLE_NBYTES)]


_DRIVER: ctypes.CDLL | None = None


def _driver() -> ctypes.CDLL:
    global _DRIVER
    if _DRIVER is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as error:
            raise IpcError(f"the CUDA driver library is not loadable: {error}") from None
        c = ctypes
        lib.cuGetErrorName.argtypes = [c.c_int, c.POINTER(c.c_char_p)]
        lib.cuMemGetAddressRange_v2.argtypes = [c.POINTER(c.c_uint64), c.POINTER(c.c_size_t), c.c_uint64]
        lib.cuIpcGetMemHandle.argtypes = [c.POINTER(_Handle), c.c_uint64]
        lib.cuIpcOpenMemHandle_v2.argtypes = [c.POINTER(c.c_uint64), _Handle, c.c_uint]
        lib.cuIpcCloseMemHandle.argtypes = [c.c_uint64]
        _DRIVER = lib
    return _DRIVER


def _check(rc: int, what: str) -> None:
    if rc != 0:
        name = ctypes.c_char_p()
        _driver().cuGetErrorName(rc, ctypes.byref(name))
        raise IpcError(f"{what} failed: {name.value.decode() if name.value else rc}")


def host_id() -> str:
    """This machine's identity for "same host" decisions: the kernel's boot id (unique per
    boot of one machine) and the host name. Two processes with equal ids may try IPC;
    whether it works is only known once a handle opens."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{boot}@{os.uname().nodename}"


@dataclass(frozen=True, slots=True)
class PeerExport:
    """What a dst needs to map one registered buffer: the allocation's IPC `handle`
    (64 bytes), the buffer's `offset` in that allocation and its `nbytes`."""

    handle: bytes
    offset: int
    nbytes: int


def _device_context(device_id: int):
    """Makes `device_id`'s primary context current for driver calls (restored on exit)."""
    import torch

    torch.cuda.init()
    return torch.cuda.device(device_id)


def export_buffers(addrs_and_nbytes: Sequence[tuple[int, int]], device_id: int) -> tuple[PeerExport, ...]:
    """Handles for buffers `(addr, nbytes)` on `device_id`, one per buffer.

    Raises:
        IpcError: a buffer is not inside a plain CUDA allocation of this process (e.g.
            torch's expandable segments), or the driver refused.
    """
    lib = _driver()
    exports = []
    with _device_context(device_id):
        for addr, nbytes in addrs_and_nbytes:
            base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
            _check(lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), addr),
                   f"cuMemGetAddressRange({addr:#x})")
            if addr + nbytes > base.value + size.value:
                raise IpcError(f"buffer [{addr:#x}, +{nbytes}) spans more than one CUDA allocation")
            handle = _Handle()
            _check(lib.cuIpcGetMemHandle(ctypes.byref(handle), base.value), "cuIpcGetMemHandle")
            exports.append(PeerExport(bytes(handle), addr - base.value, nbytes))
    return tuple(exports)


class PeerMapping:
    """A peer's exported buffers mapped into this process, on `device_id`'s context.

    Each distinct handle is opened once; `addrs[i]` is where buffer `i` is visible here.
    `close()` unmaps everything (idempotent); keep the mapping open while any kernel
    reading it may run.

    Raises:
        IpcError: a handle does not open (another host, a dead or foreign process, IPC
            not permitted between these processes).
    """

    def __init__(self, exports: Sequence[PeerExport], device_id: int):
        lib = _driver()
        self.device_id = device_id
        self._opened: dict[bytes, int] = {}
        try:
            with _device_context(device_id):
                for export in exports:
                    if export.handle not in self._opened:
                        if len(export.handle) != _HANDLE_NBYTES:
                            raise IpcError(f"an IPC handle has {len(export.handle)} bytes, not {_HANDLE_NBYTES}")
                        ptr = ctypes.c_uint64(0)
                        _check(lib.cuIpcOpenMemHandle_v2(ctypes.byref(ptr), _Handle.from_buffer_copy(export.handle),
                                                         _LAZY_ENABLE_PEER_ACCESS), "cuIpcOpenMemHandle")
                        self._opened[export.handle] = int(ptr.value)
        except IpcError:
            self.close()
            raise
        self.addrs = tuple(self._opened[e.handle] + e.offset for e in exports)

    def close(self) -> None:
        if not self._opened:
            return
        lib = _driver()
        with _device_context(self.device_id):
            for ptr in self._opened.values():
                lib.cuIpcCloseMemHandle(ptr)
        self._opened = {}


def ipc_exports(mem_type: str, buffers: Sequence, wanted: bool) -> tuple[tuple, str | None]:
    """The CUDA IPC exports `(handle, offset, nbytes)` of an endpoint's buffers (what its
    handshake publishes for the peer strategy), or `((), why not)`."""
    if not wanted:
        return (), "peer_access=False"
    if mem_type != "VRAM":
        return (), "the pages are host memory (peer mapping is for GPU memory)"
    devices = {b.device_id for b in buffers}
    if len(devices) != 1:
        return (), f"the pages span devices {sorted(devices)}"
    try:
        exports = export_buffers([(b.addr, b.nbytes) for b in buffers], devices.pop())
    except IpcError as error:
        return (), f"CUDA IPC export failed ({error}); plain cudaMalloc memory is needed"
    return tuple((e.handle, e.offset, e.nbytes) for e in exports), None
