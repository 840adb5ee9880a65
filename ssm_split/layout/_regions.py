"""Where a rank's pages live: `Buffer`, `LayerRegion` and `RegionSet` (pure, frozen).

Each side of a transfer describes its memory as a `RegionSet`: per layer, where the page of
block `b` lives (`base_addr + b * page_stride_nbytes`), how long a page is, and which
registered buffer holds it. The two sides may pad and stride their pages differently.
A NIXL descriptor never crosses a buffer's bounds, so reads never merge across buffers.

    RegionSet.packed(base, num_layers=2, num_blocks=3, page_nbytes=P)          # order="layer"
        [l0 b0][l0 b1][l0 b2][l1 b0][l1 b1][l1 b2]      one buffer
    RegionSet.packed(base, num_layers=2, num_blocks=3, page_nbytes=P, order="block")
        [b0 l0][b0 l1][b1 l0][b1 l1][b2 l0][b2 l1]      one buffer
    RegionSet.per_layer([base0, base1], num_blocks=3, page_nbytes=P)
        [l0 b0][l0 b1][l0 b2]   [l1 b0][l1 b1][l1 b2]   one buffer per layer
    RegionSet.strided([base0, base1], page_nbytes=P, page_stride_nbytes=S, num_blocks=3,
                      buffer=Buffer(addr, nbytes))
        any per-layer bases, strides and block counts; one buffer for all, or one each

Every address lies in `[0, 2**64)`: a page or buffer that would end past `2**64` is
refused when it is built, so descriptors never wrap around.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import PlanError

__all__ = ["ADDRESS_LIMIT", "Buffer", "LayerRegion", "RegionSet"]

_U64 = np.uint64
ADDRESS_LIMIT = 1 << 64
"""Addresses are 64-bit: every byte of a page or buffer lies below this."""


def _check_int(owner: str, name: str, value: object, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise PlanError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}.")


def _check_fields(value: object, **minimums: int) -> None:
    """`_check_int` on each named field of a dataclass instance."""
    for name, minimum in minimums.items():
        _check_int(type(value).__name__, name, getattr(value, name), minimum)


@dataclass(frozen=True, slots=True)
class Buffer:
    """One registered memory buffer: `nbytes` bytes at `addr` on device `device_id`
    (0 for host memory). NIXL descriptors never cross a buffer's bounds."""

    addr: int
    nbytes: int
    device_id: int = 0

    def __post_init__(self) -> None:
        _check_fields(self, addr=0, nbytes=1, device_id=0)
        if self.addr + self.nbytes > ADDRESS_LIMIT:
            raise PlanError(
                f"Buffer: {self.nbytes} bytes at {self.addr:#x} end past 2**64; an address "
                f"is 64 bits. Pass the buffer's real address and size.")

    @property
    def end(self) -> int:
        return self.addr + self.nbytes


@dataclass(frozen=True, slots=True)
class LayerRegion:
    """Where one layer's pages live on one rank.

    The page of block `b` is the `page_nbytes` bytes at
    `base_addr + b * page_stride_nbytes`, for `b` in `[0, num_blocks)`; it lies inside
    buffer number `buffer` of the enclosing `RegionSet`. `page_nbytes` is the whole page
    (content and padding); `page_stride_nbytes >= page_nbytes` unless there is one block.
    """

    base_addr: int
    page_nbytes: int
    page_stride_nbytes: int
    num_blocks: int
    buffer: int = 0

    def __post_init__(self) -> None:
        _check_fields(self, base_addr=0, page_nbytes=1, page_stride_nbytes=1, num_blocks=1, buffer=0)
        if self.num_blocks > 1 and self.page_stride_nbytes < self.page_nbytes:
            raise PlanError(
                f"LayerRegion: pages of {self.page_nbytes} bytes spaced "
                f"{self.page_stride_nbytes} bytes apart overlap. The page stride must be "
                f">= the page size."
            )
        if self.base_addr + self.extent_nbytes > ADDRESS_LIMIT:
            raise PlanError(
                f"LayerRegion: {self.num_blocks} pages of {self.page_nbytes} bytes spaced "
                f"{self.page_stride_nbytes} bytes apart from {self.base_addr:#x} end past "
                f"2**64; an address is 64 bits. Check the base address and the block count.")

    @property
    def extent_nbytes(self) -> int:
        """Bytes from the first page's start to the last page's end."""
        return (self.num_blocks - 1) * self.page_stride_nbytes + self.page_nbytes


@dataclass(frozen=True, slots=True)
class RegionSet:
    """One rank's state memory: one `LayerRegion` per layer, and the buffers holding them.

    Attributes:
        layers: per layer (index = layer id), where its pages are.
        buffers: the registered buffers; every layer's pages lie inside
            `buffers[layer.buffer]`. A layer's device is its buffer's device.
    """

    layers: tuple[LayerRegion, ...]
    buffers: tuple[Buffer, ...]

    def __post_init__(self) -> None:
        for name, kind in (("layers", LayerRegion), ("buffers", Buffer)):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not value or not all(isinstance(v, kind) for v in value):
                raise PlanError(
                    f"RegionSet.{name} must be a non-empty tuple of {kind.__name__}, got {value!r}."
                )
        for index, layer in enumerate(self.layers):
            if layer.buffer >= len(self.buffers):
                raise PlanError(
                    f"RegionSet: layer {index} names buffer {layer.buffer}, but there are "
                    f"only {len(self.buffers)} buffers."
                )
            buffer = self.buffers[layer.buffer]
            if layer.base_addr < buffer.addr or layer.base_addr + layer.extent_nbytes > buffer.end:
                raise PlanError(
                    f"RegionSet: layer {index}'s pages [{layer.base_addr:#x}, "
                    f"{layer.base_addr + layer.extent_nbytes:#x}) leave buffer {layer.buffer} "
                    f"[{buffer.addr:#x}, {buffer.end:#x}). Describe memory that was registered."
                )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layers_adjacent(self) -> bool:
        """True when, for every block, each layer's page ends where the next layer's page
        starts in the same buffer (block-major memory such as `packed(order="block")`):
        then one descriptor can cover several layers of a block."""
        pairs = zip(self.layers, self.layers[1:])
        return self.num_layers > 1 and all(
            a.buffer == b.buffer and b.base_addr == a.base_addr + a.page_nbytes
            and a.page_stride_nbytes == b.page_stride_nbytes for a, b in pairs)

    def device_id(self, layer: int) -> int:
        """The device holding `layer`'s pages."""
        return self.buffers[self.layers[layer].buffer].device_id

    def page_addr(self, layer: int, block: int) -> int:
        """Address of the page of `block` in `layer` (no range check)."""
        region = self.layers[layer]
        return region.base_addr + block * region.page_stride_nbytes

    def columns(self) -> dict[str, np.ndarray]:
        """Per-layer fields as uint64 arrays of shape `(num_layers,)`: `base_addr`,
        `page_nbytes`, `page_stride_nbytes`, `num_blocks`, `buffer`, `device_id`."""
        rows = [(r.base_addr, r.page_nbytes, r.page_stride_nbytes, r.num_blocks, r.buffer,
                 self.buffers[r.buffer].device_id) for r in self.layers]
        table = np.array(rows, dtype=_U64).reshape(len(rows), 6)
        names = ("base_addr", "page_nbytes", "page_stride_nbytes", "num_blocks", "buffer", "device_id")
        return {name: table[:, i] for i, name in enumerate(names)}

    @classmethod
    def packed(cls, base_addr: int, *, num_layers: int, num_blocks: int, page_nbytes: int,
               order: str = "layer", device_id: int = 0) -> "RegionSet":
        """Every layer's pages in one buffer of `num_layers * num_blocks * page_nbytes`
        bytes at `base_addr`.

        `order="layer"`: layer-major, `[layer 0: b0 b1 ...][layer 1: b0 b1 ...]...`, as
        vLLM lays out one tensor per layer. `order="block"`: block-major, `[b0: layer 0,
        layer 1, ...][b1: ...]`, so one read can cover the pages of many layers.
        """
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks),
                            ("page_nbytes", page_nbytes)):
            _check_int("RegionSet.packed", name, value, 1)
        if order == "layer":
            layer_step, stride = num_blocks * page_nbytes, page_nbytes
        elif order == "block":
            layer_step, stride = page_nbytes, num_layers * page_nbytes
        else:
            raise PlanError(f"RegionSet.packed: order must be \"layer\" or \"block\", got {order!r}.")
        layers = tuple(LayerRegion(base_addr + layer * layer_step, page_nbytes, stride, num_blocks)
                       for layer in range(num_layers))
        return cls(layers, (Buffer(base_addr, num_layers * num_blocks * page_nbytes, device_id),))

    @classmethod
    def per_layer(cls, base_addrs: Sequence[int], *, num_blocks: int, page_nbytes: int,
                  device_id: int = 0) -> "RegionSet":
        """One buffer per layer (`num_blocks` back-to-back pages at `base_addrs[layer]`),
        as when every layer's state is its own tensor. Nothing merges across layers."""
        layers = tuple(LayerRegion(addr, page_nbytes, page_nbytes, num_blocks, buffer=i)
                       for i, addr in enumerate(base_addrs))
        buffers = tuple(Buffer(addr, num_blocks * page_nbytes, device_id) for addr in base_addrs)
        return cls(layers, buffers)

    @classmethod
    def strided(cls, base_addrs: object, *, page_nbytes: object, page_stride_nbytes: object,
                num_blocks: object, buffer: Buffer | None = None, device_id: int = 0) -> "RegionSet":
        """One layer per base address, each with its own page size, stride and block count.

        Args:
            base_addrs: per layer, the address of block 0's page; a sequence, a 1-D
                numpy array or anything with `tolist()` (a CPU torch tensor) of ints.
            page_nbytes, page_stride_nbytes, num_blocks: one int for every layer, or one
                per layer (same kinds as `base_addrs`). The page of block `b` of layer
                `l` is `page_nbytes[l]` bytes at `base_addrs[l] + b * page_stride_nbytes[l]`.
            buffer: the one registered allocation holding every layer's pages (e.g. an
                engine's whole cache); default: one buffer per layer covering exactly its
                pages, so nothing merges across layers.
            device_id: the device of the default buffers (ignored with `buffer`).

        Raises:
            PlanError: a value that is not an int of the right range (floats and bools
                included), lists of different lengths, pages that overlap, leave
                `buffer` or end past 2**64.

        Example: two layers 1 MiB apart, pages of 300 bytes every 512 bytes, 4 blocks::

            RegionSet.strided([0x1000, 0x101000], page_nbytes=300, page_stride_nbytes=512,
                              num_blocks=4)
        """
        bases = _int_list("RegionSet.strided", "base_addrs", base_addrs, None)
        if not bases:
            raise PlanError("RegionSet.strided: `base_addrs` must name at least one layer.")
        count = len(bases)
        pages = _int_list("RegionSet.strided", "page_nbytes", page_nbytes, count)
        strides = _int_list("RegionSet.strided", "page_stride_nbytes", page_stride_nbytes, count)
        blocks = _int_list("RegionSet.strided", "num_blocks", num_blocks, count)
        if buffer is not None and not isinstance(buffer, Buffer):
            raise PlanError(f"RegionSet.strided: `buffer` must be a Buffer or None, got "
                            f"{type(buffer).__name__}.")
        layers = tuple(LayerRegion(base, page, stride, n, buffer=0 if buffer is not None else i)
                       for i, (base, page, stride, n) in enumerate(zip(bases, pages, strides, blocks)))
        if buffer is not None:
            return cls(layers, (buffer,))
        return cls(layers, tuple(Buffer(r.base_addr, r.extent_nbytes, device_id) for r in layers))


def _int_list(owner: str, name: str, value: object, count: int | None) -> list:
    """`value` as a list of `count` entries (an int is repeated; `count=None`: a
    sequence is required). Entries keep their type, so the dataclass checks reject
    floats and bools; numpy and torch scalars become Python numbers first."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and count is not None:
        return [int(value)] * count
    if isinstance(value, np.ndarray) or hasattr(value, "tolist"):
        items = value.tolist()  # numpy arrays, torch tensors: Python ints or floats
        items = items if isinstance(items, list) else [items]
    elif isinstance(value, (list, tuple)):
        items = [v.item() if isinstance(v, np.generic) else v for v in value]
    else:
        raise PlanError(f"{owner}: `{name}` must be an int or a sequence of ints, got "
                        f"{type(value).__name__}.")
    if count is not None and len(items) != count:
        raise PlanError(f"{owner}: `{name}` has {len(items)} entries for {count} layers; give "
                        f"one int for all layers or one per layer.")
    return items
