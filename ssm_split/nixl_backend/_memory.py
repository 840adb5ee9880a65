"""Arrays and tensors as NIXL sees them: address, size, memory type and device.

The backend's only contact with the memory it registers; numpy arrays and CPU tensors are
host memory (DRAM), CUDA tensors device memory (VRAM). torch is used only when a tensor
is given, so DRAM endpoints never import it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import PlanError

__all__ = ["MemoryInfo", "describe_memory", "zeros_like_memory", "write_bytes", "read_bytes", "check_memory"]


@dataclass(frozen=True, slots=True)
class MemoryInfo:
    """Address, size in bytes, NIXL memory type ("DRAM" or "VRAM") and device of an
    array or tensor."""

    addr: int
    nbytes: int
    mem_type: str
    device_id: int


def describe_memory(obj: Any) -> MemoryInfo:
    """Where a C-contiguous numpy array or torch tensor lives.

    Raises:
        PlanError: not an array or tensor, or not contiguous.
    """
    if isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous or obj.nbytes == 0:
            raise PlanError("Memory arrays must be non-empty and C-contiguous (np.ascontiguousarray).")
        return MemoryInfo(int(obj.ctypes.data), int(obj.nbytes), "DRAM", 0)
    torch = sys.modules.get("torch")  # a tensor can only exist if torch was imported
    if torch is not None and isinstance(obj, torch.Tensor):
        if not obj.is_contiguous() or obj.numel() == 0:
            raise PlanError("Memory tensors must be non-empty and contiguous (tensor.contiguous()).")
        nbytes = obj.numel() * obj.element_size()
        if obj.is_cuda:
            return MemoryInfo(int(obj.data_ptr()), nbytes, "VRAM", int(obj.device.index or 0))
        return MemoryInfo(int(obj.data_ptr()), nbytes, "DRAM", 0)
    raise PlanError(f"Memory must be a numpy array or a torch tensor, got {type(obj).__name__}.")


def zeros_like_memory(mem_type: str, device_id: int, nbytes: int) -> Any:
    """`nbytes` zero bytes of the given memory type: a numpy array (DRAM) or a CUDA
    uint8 tensor on `device_id` (VRAM).

    On a GPU the zeros are written by a kernel on torch's current stream; this waits for
    it, so that no later write from another stream (a NIXL READ landing, a copy kernel)
    can be overwritten by the late zero fill."""
    if mem_type == "DRAM":
        return np.zeros(nbytes, dtype=np.uint8)
    import torch

    memory = torch.zeros(nbytes, dtype=torch.uint8, device=f"cuda:{device_id}")
    torch.cuda.synchronize(device_id)
    return memory


def write_bytes(target: Any, offset: int, data: bytes) -> None:
    """Write `data` at byte `offset` of a uint8 numpy array or (CUDA) tensor."""
    if isinstance(target, np.ndarray):
        target[offset: offset + len(data)] = np.frombuffer(data, dtype=np.uint8)
    else:
        import torch

        target[offset: offset + len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def read_bytes(source: Any, offset: int, nbytes: int) -> bytes:
    """Bytes `[offset, offset + nbytes)` of a uint8 numpy array or (CUDA) tensor."""
    if isinstance(source, np.ndarray):
        return source[offset: offset + nbytes].tobytes()
    return source[offset: offset + nbytes].cpu().numpy().tobytes()


def check_memory(regions: Any, infos: "list[MemoryInfo] | tuple[MemoryInfo, ...]") -> str:
    """The one memory type of an endpoint's memory, checked against its `RegionSet`.

    Raises:
        PlanError: a count, address, size or device that differs from `regions.buffers`,
            or mixed memory types.
    """
    if len(infos) != len(regions.buffers):
        raise PlanError(f"Got {len(infos)} memory objects for {len(regions.buffers)} buffers: "
                        f"pass one array or tensor per RegionSet buffer, in order.")
    for i, (info, buffer) in enumerate(zip(infos, regions.buffers)):
        if (info.addr, info.nbytes, info.device_id) != (buffer.addr, buffer.nbytes, buffer.device_id):
            raise PlanError(
                f"memory[{i}] is {info.nbytes} bytes at {info.addr:#x} on device "
                f"{info.device_id}, but regions.buffers[{i}] describes {buffer.nbytes} bytes at "
                f"{buffer.addr:#x} on device {buffer.device_id}. Build the RegionSet from the "
                f"memory you pass (e.g. RegionSet.packed(array.ctypes.data, ...))."
            )
    types = {info.mem_type for info in infos}
    if len(types) != 1:
        raise PlanError(f"All memory of one endpoint must be of one type, got {sorted(types)}.")
    return types.pop()
