"""Where a vLLM engine keeps its Mamba pages, as a `RegionSet` (either side of a transfer).

How vLLM 0.33 allocates hybrid-model state (`allocate_kv_cache`, layer-compact layouts
such as the `LBHNC` that its NIXL connector asks for): one int8 buffer for every layer
of every KV-cache group. Layer *slot* `j` of a group starts at `j * layer_stride` and
the page of block `b` at `+ b * page_size_padded`; the groups alias each other (slot `j`
of every group is the same bytes, and a block id belongs to one group at a time). Each
Mamba layer sees its slot as a `[num_blocks, 1, 1, content_nbytes]` int8 view, or, once
bound, as `(conv, temporal)` views of the same pages::

    backing buffer  | slot 0: b0 b1 b2 ... | slot 1: b0 b1 b2 ... | ...
    page of block b | conv state | temporal state | padding |      (page_size_padded bytes)

So a `RegionSet` of an engine has one layer per distinct slot (vLLM registers one NIXL
region per distinct base address too), and a request's block of KV-cache group `g` is
moved by reading those slots at that block: `(src_block_g, dst_block_g)` rows of
`block_pairs`, with `layers=` the slots group `g` uses when it uses fewer than all.

- `region_set_from_vllm(kv_caches)`: from the engine's own tensors (in-engine);
- `region_set_from_vllm_handshake(...)`: from the numbers a vLLM NIXL handshake carries
  (`kv_caches_base_addr`, `block_strides`, `num_blocks` and
  `physical_blocks_per_logical_kv_block`, kernel-block granularity);
- `vllm_layer_slots(kv_caches)`: which `RegionSet` layer each model layer's state is in;
- `allocate_vllm_state(...)`: CPU (or CUDA) memory laid out as vLLM allocates it, for
  tests and examples of a connector without an engine.

No torch import here: tensors are read through their own methods.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..errors import PlanError
from ..layout._regions import Buffer, LayerRegion, RegionSet
from ..specs._spec import DTYPE_NBYTES
from ._vllm_mamba_spec import read_mamba_spec

__all__ = ["page_stride_nbytes", "region_set_from_vllm", "region_set_from_vllm_handshake",
           "vllm_layer_slots", "allocate_vllm_state"]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"`{name}` must be an int >= 1, got {value!r}.")
    return value


def page_stride_nbytes(block_stride_nbytes: int, physical_blocks_per_logical: int) -> int:
    """Bytes between the pages of consecutive logical blocks of one vLLM region.

    vLLM's NIXL handshake gives per region a *kernel-block* stride (`block_strides[i]`)
    and the engine's `physical_blocks_per_logical_kv_block` (attention kernel blocks per
    logical block, `block_size // kernel_block_size`); a Mamba page spans that many
    kernel blocks, so its stride is their product. The ratio must be the engine's own:
    `ceil(state bytes / block stride)` (vLLM's old `compute_physical_blocks_per_logical`)
    is wrong once the padding exceeds one kernel block (Qwen3.5-4B TP2, `--block-size
    64`, kernel block 16: the engine's ratio is 36, the ceil gives 33).

    Raises:
        PlanError: an argument that is not an int >= 1.
    """
    return (_positive_int("block_stride_nbytes", block_stride_nbytes)
            * _positive_int("physical_blocks_per_logical", physical_blocks_per_logical))


def region_set_from_vllm_handshake(base_addrs: object, *, block_stride_nbytes: object,
                                   num_blocks: int, physical_blocks_per_logical: int,
                                   page_nbytes: object = None, device_id: int = 0) -> RegionSet:
    """The `RegionSet` of an engine's Mamba regions as its vLLM NIXL handshake gives them.

    Args:
        base_addrs: per Mamba region (one per slot), its address (`kv_caches_base_addr`
            entries of the SSM regions); a sequence, numpy array or CPU tensor of ints.
        block_stride_nbytes: the kernel-block stride (`block_strides[i]`), one int or one
            per region.
        num_blocks: the handshake's `num_blocks`, in kernel blocks.
        physical_blocks_per_logical: the handshake's `physical_blocks_per_logical_kv_block`.
        page_nbytes: bytes of each page (default: the whole page stride, padding
            included); one int or one per region.
        device_id: the engine's device (the handshake's `device_id`).

    Returns:
        One layer per region; page `b` of region `i` at `base_addrs[i] + b * block_stride
        * physical_blocks_per_logical`, `num_blocks // physical_blocks_per_logical`
        logical blocks; one buffer per region (nothing merges across regions).

    Raises:
        PlanError: `num_blocks` not a multiple of the ratio, or anything `RegionSet.strided`
            refuses (addresses outside `[0, 2**64)`, floats, overlapping pages).
    """
    ratio = _positive_int("physical_blocks_per_logical", physical_blocks_per_logical)
    _positive_int("num_blocks", num_blocks)
    if num_blocks % ratio:
        raise PlanError(f"`num_blocks`={num_blocks} kernel blocks is not a whole number of "
                        f"logical blocks of {ratio} kernel blocks; pass the handshake's own "
                        f"`num_blocks` and `physical_blocks_per_logical_kv_block`.")
    strides = block_stride_nbytes
    if isinstance(strides, int) and not isinstance(strides, bool):
        strides = page_stride_nbytes(strides, ratio)
    else:
        strides = [page_stride_nbytes(s, ratio) if isinstance(s, int) else s
                   for s in _as_list(strides, "block_stride_nbytes")]
    return RegionSet.strided(base_addrs, page_nbytes=strides if page_nbytes is None else page_nbytes,
                             page_stride_nbytes=strides, num_blocks=num_blocks // ratio,
                             device_id=device_id)


def _as_list(value: object, name: str) -> list:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise PlanError(f"`{name}` must be an int or a sequence of ints, got {type(value).__name__}.")
    return list(value)


def _state_tensor(name: object, entry: object) -> object:
    """The tensor whose dim 0 is the block index: a page view, or a bound layer's conv
    state (its temporal state must follow the conv state in every page)."""
    if isinstance(entry, (tuple, list)):
        if not entry:
            raise PlanError(f"kv_caches[{name!r}] is an empty tuple; give the layer's page view "
                            f"or its (conv, temporal) state views.")
        first = entry[0]
        for later in entry[1:]:
            for tensor in (first, later):
                _check_tensor(name, tensor)
            want = first.data_ptr() + math.prod(first.shape[1:]) * first.element_size()
            if (later.data_ptr() != want or later.shape[0] != first.shape[0]
                    or later.stride(0) * later.element_size() != first.stride(0) * first.element_size()):
                raise PlanError(
                    f"kv_caches[{name!r}]: the second state view does not follow the first in "
                    f"each page (at {later.data_ptr():#x}, expected {want:#x}, same block count "
                    f"and stride); pass the views `MambaBase.bind_kv_cache` makes, in order.")
            first = later
        entry = entry[0]
    _check_tensor(name, entry)
    return entry


def _check_tensor(name: object, tensor: object) -> None:
    needed = ("data_ptr", "stride", "element_size", "shape", "untyped_storage")
    if not all(hasattr(tensor, attr) for attr in needed):
        raise PlanError(f"kv_caches[{name!r}] must be a torch tensor (a layer's page view) or "
                        f"a tuple of them, got {type(tensor).__name__}.")
    if len(tensor.shape) < 1 or tensor.shape[0] < 1:
        raise PlanError(f"kv_caches[{name!r}] has shape {tuple(tensor.shape)}; its first "
                        f"dimension must be the blocks (at least one).")


def _entries(kv_caches: object) -> list[tuple[object, object]]:
    if isinstance(kv_caches, Mapping):
        items = list(kv_caches.items())
    elif isinstance(kv_caches, Sequence) and not isinstance(kv_caches, (str, bytes)):
        items = list(enumerate(kv_caches))
    else:
        raise PlanError(f"`kv_caches` must map layer names to tensors (vLLM's kv_caches) or "
                        f"be a sequence of tensors, got {type(kv_caches).__name__}.")
    if not items:
        raise PlanError("`kv_caches` is empty: give the Mamba layers' state tensors.")
    return items


def _slots(kv_caches: object) -> tuple[list[tuple[int, int, int, object]], dict]:
    """Distinct `(base, stride, num_blocks, tensor)` in first-seen order, and each
    entry's index among them."""
    slots: list[tuple[int, int, int, object]] = []
    index: dict[object, int] = {}
    by_base: dict[int, int] = {}
    for name, entry in _entries(kv_caches):
        tensor = _state_tensor(name, entry)
        base = int(tensor.data_ptr())
        stride = int(tensor.stride(0)) * int(tensor.element_size())
        blocks = int(tensor.shape[0])
        if base in by_base:
            seen = slots[by_base[base]]
            if (seen[1], seen[2]) != (stride, blocks):
                raise PlanError(
                    f"kv_caches[{name!r}] starts where another layer's state does ({base:#x}) "
                    f"but has {blocks} blocks {stride} bytes apart, not {seen[2]} blocks "
                    f"{seen[1]} bytes apart; aliased layers must share their geometry.")
        else:
            by_base[base] = len(slots)
            slots.append((base, stride, blocks, tensor))
        index[name] = by_base[base]
    return slots, index


def vllm_layer_slots(kv_caches: object) -> dict:
    """Per entry of `kv_caches` (layer name, or position in a sequence), the layer of
    `region_set_from_vllm(kv_caches)` holding its pages (layers of different KV-cache
    groups in the same slot share one)."""
    return _slots(kv_caches)[1]


def _check_page_size(mamba_spec: object, content_nbytes: int, stride: int) -> int:
    padded = getattr(mamba_spec, "page_size_padded", None)
    if padded is not None and (isinstance(padded, bool) or not isinstance(padded, int)
                               or padded < content_nbytes):
        raise PlanError(f"MambaSpec.page_size_padded={padded!r} must be None or an int >= the "
                        f"{content_nbytes} bytes of state in a page.")
    page = content_nbytes if padded is None else padded
    if page != stride:
        raise PlanError(f"The state tensors' pages are {stride} bytes apart, but the MambaSpec's "
                        f"page is {page} bytes (page_size_padded={padded}); these tensors were "
                        f"not allocated for this MambaSpec.")
    return page


def _content_nbytes(mamba_spec: object) -> int:
    """Bytes of state in one page of `mamba_spec` (its fields checked as `spec_from_vllm`
    checks them)."""
    state = read_mamba_spec(mamba_spec)
    kinds = [(state.conv_shape, state.conv_dtype), (state.temporal_shape, state.ssm_dtype)]
    return sum(math.prod(shape) * DTYPE_NBYTES[dtype] for shape, dtype in kinds if shape is not None)


def region_set_from_vllm(kv_caches: object, mamba_spec: object = None) -> RegionSet:
    """The `RegionSet` of one engine rank, from its Mamba layers' state tensors.

    Args:
        kv_caches: layer name -> tensor (the `kv_caches` dict vLLM hands a connector's
            `register_kv_caches`, Mamba layers only), or a sequence of tensors. Each
            tensor is a layer's `[num_blocks, 1, 1, content_nbytes]` page view, or any
            view whose first dimension is the block (block `b` at `data_ptr() + b *
            stride(0) * element_size()`); a tuple `(conv, temporal)` (a bound layer's
            `kv_cache`) is taken by its first view after checking the second follows it.
            Tensors of different KV-cache groups in one slot alias: they become one layer.
        mamba_spec: the layers' `MambaSpec`, to check the tensors against: the page
            stride must be its `page_size_bytes` (`page_size_padded` when set).

    Returns:
        One layer per distinct base address, in first-seen order
        (`vllm_layer_slots` maps each entry to its layer); page size = page stride
        (padding included; never read or written); one `Buffer` per distinct backing
        storage (normally one: the engine's whole cache), on the tensors' device.

    Raises:
        PlanError: entries that are not tensors, aliased entries of different geometry,
            a `MambaSpec` whose page does not match, or pages outside their storage.
        SpecError: a malformed `mamba_spec` (see `read_mamba_spec`).
    """
    slots, _ = _slots(kv_caches)
    buffers: dict[int, Buffer] = {}
    owner = []
    for _, _, _, tensor in slots:
        storage = tensor.untyped_storage()
        device = getattr(tensor, "device", None)
        device_id = int(device.index or 0) if getattr(device, "type", "cpu") == "cuda" else 0
        addr = int(storage.data_ptr())
        if addr not in buffers:
            buffers[addr] = Buffer(addr, int(storage.nbytes()), device_id)
        owner.append(list(buffers).index(addr))
    if mamba_spec is not None:
        content = _content_nbytes(mamba_spec)
        for stride in {s for _, s, _, _ in slots}:
            _check_page_size(mamba_spec, content, stride)
    layers = tuple(LayerRegion(base, stride, stride, blocks, buffer=i)
                   for (base, stride, blocks, _), i in zip(slots, owner))
    return RegionSet(layers, tuple(buffers.values()))


def allocate_vllm_state(*, page_nbytes: int, content_nbytes: int, num_slots: int,
                        num_blocks: int, device: str = "cpu") -> tuple[object, tuple[object, ...]]:
    """Memory laid out as vLLM 0.33 allocates a hybrid model's Mamba state (imports torch).

    One zeroed int8 buffer of `num_slots * num_blocks * page_nbytes` bytes; slot `j`
    viewed as `[num_blocks, 1, 1, content_nbytes]` with byte strides `(page_nbytes,
    content_nbytes, content_nbytes, 1)` from byte `j * num_blocks * page_nbytes`: what
    `allocate_kv_cache` gives each Mamba layer with a layer-compact layout (`LBHNC`, as
    vLLM's NIXL connector requests), `page_nbytes` being `MambaSpec.page_size_bytes`.

    Returns:
        `(buffer, views)`: the backing 1-D int8 tensor (register it as the endpoint's
        memory) and one page view per slot.

    Raises:
        PlanError: sizes that are not ints >= 1, or a page smaller than its content.
    """
    for name, value in (("page_nbytes", page_nbytes), ("content_nbytes", content_nbytes),
                        ("num_slots", num_slots), ("num_blocks", num_blocks)):
        _positive_int(name, value)
    if content_nbytes > page_nbytes:
        raise PlanError(f"A page of {page_nbytes} bytes cannot hold {content_nbytes} bytes of state.")
    import torch

    buffer = torch.zeros(num_slots * num_blocks * page_nbytes, dtype=torch.int8, device=device)
    views = tuple(torch.as_strided(buffer, (num_blocks, 1, 1, content_nbytes),
                                   (page_nbytes, content_nbytes, content_nbytes, 1),
                                   slot * num_blocks * page_nbytes)
                  for slot in range(num_slots))
    return buffer, views
