"""A numpy model of sharded recurrent state, used to check plans byte for byte.

This module is deliberately simple and independent of the planner: it never calls
`page_layout`, `rank_units` or `plan_reads`. It re-derives, from the conventions of
`docs/conventions.md`, which units (heads, groups, channels) each rank holds, builds every rank's
page by numpy slicing and concatenation of the *full* state, and reads pages back the
same way. Plans are then checked against it: applying the reads of `plan_reads` to
`shard(state, src_tp)` must give `shard(state, dst_tp)`.

A full Mamba2 state, as this module holds it (`rows = conv_kernel - 1 + spec_tokens`)::

    state["conv.x"]    shape (num_heads * head_dim, rows)    one row per channel
    state["conv.B"]    shape (num_groups * state_size, rows)
    state["conv.C"]    shape (num_groups * state_size, rows)
    state["temporal"]  shape (num_heads, head_dim, state_size)

and rank r of tp=2 (8 heads, 1 group, so B and C are replicated)::

    conv = concatenate([x[4*hd : 8*hd], B[0 : N], C[0 : N]])      (channels_r, rows)
    page = conv.tobytes()  (DS)  or  conv.T.tobytes()  (SD)
         + temporal[4:8].tobytes()
         + padding up to page_nbytes

Elements are stored as unsigned integers of the dtype's size (uint16 for bfloat16 and
float16, uint32 for float32): the model moves bytes and never does arithmetic on them.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .errors import PlanError, ShardingError, StateError
from .plan._plan import Plan
from .specs._spec import (
    GDNSpec,
    LinearAttentionSpec,
    Mamba1Spec,
    Mamba2Spec,
    ShortConvSpec,
    Spec,
    check_is_spec,
)

__all__ = [
    "StateError",
    "element_dtype",
    "state_shapes",
    "units_held",
    "content_nbytes",
    "random_state",
    "iota_state",
    "shard",
    "unshard",
    "apply",
]

_ELEMENT_DTYPES = {"float32": np.dtype("<u4"), "bfloat16": np.dtype("<u2"), "float16": np.dtype("<u2")}



def element_dtype(dtype_name: str) -> np.dtype:
    """The unsigned numpy dtype that stands for `dtype_name` ("bfloat16" -> `<u2`)."""
    return _ELEMENT_DTYPES[dtype_name]


# --- the families, restated from docs/conventions.md ----------------------------------------
# A conv sub-projection: (name, number of units, channels per unit, replicable).


def _conv_pieces(spec: Spec) -> tuple[tuple[str, int, int, bool], ...]:
    if isinstance(spec, Mamba2Spec):
        groups = (spec.num_groups, spec.state_size, True)
        return (("conv.x", spec.num_heads, spec.head_dim, False),
                ("conv.B", *groups), ("conv.C", *groups))
    if isinstance(spec, GDNSpec):
        keys = (spec.num_k_heads, spec.head_k_dim, True)
        return (("conv.Q", *keys), ("conv.K", *keys),
                ("conv.V", spec.num_v_heads, spec.head_v_dim, False))
    if isinstance(spec, Mamba1Spec):
        return (("conv.x", spec.intermediate_size, 1, False),)
    if isinstance(spec, ShortConvSpec):
        return (("conv.x", spec.conv_dim, 1, False),)
    return ()


def _temporal_shape(spec: Spec) -> tuple[int, ...] | None:
    if isinstance(spec, Mamba2Spec):
        return (spec.num_heads, spec.head_dim, spec.state_size)
    if isinstance(spec, GDNSpec):
        return (spec.num_v_heads, spec.head_v_dim, spec.head_k_dim)
    if isinstance(spec, Mamba1Spec):
        return (spec.intermediate_size, spec.state_size)
    if isinstance(spec, LinearAttentionSpec):
        return (spec.num_heads, spec.head_dim, spec.head_dim)
    return None


def _rows(spec: Spec) -> int:
    if isinstance(spec, LinearAttentionSpec):
        return 0
    return spec.conv_kernel - 1 + spec.spec_tokens


def _held(name: str, num_units: int, replicable: bool, tp: int, rank: int) -> range:
    """The design's rule: a contiguous 1/tp of the units, or one replicated unit."""
    if num_units % tp == 0:
        per_rank = num_units // tp
        return range(rank * per_rank, (rank + 1) * per_rank)
    if replicable and tp % num_units == 0:
        unit = rank // (tp // num_units)
        return range(unit, unit + 1)
    raise ShardingError(f"reference: `{name}` has {num_units} units, which tp={tp} can neither "
                        f"shard evenly nor replicate.")


def state_shapes(spec: Spec) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Name -> (shape, element dtype) of every array of the full state, in page order.

    Conv parts have shape `(channels_of_part, rows)`; the temporal state has its full
    shape, e.g. `(num_heads, head_dim, state_size)` for Mamba2.
    """
    check_is_spec(spec)
    shapes = {}
    for name, num_units, width, _ in _conv_pieces(spec):
        shapes[name] = ((num_units * width, _rows(spec)), element_dtype(spec.conv_dtype))
    temporal = _temporal_shape(spec)
    if temporal is not None:
        shapes["temporal"] = (temporal, element_dtype(spec.ssm_dtype))
    return shapes


def units_held(spec: Spec, tp: int, rank: int) -> dict[str, range]:
    """Name -> the units (heads, groups, channels) of each part that `rank` of `tp` holds.

    Raises:
        ShardingError: some part can neither be split evenly on `tp` nor replicated.
    """
    check_is_spec(spec)
    held = {name: _held(name, n, rep, tp, rank) for name, n, _, rep in _conv_pieces(spec)}
    temporal = _temporal_shape(spec)
    if temporal is not None:
        held["temporal"] = _held("temporal", temporal[0], False, tp, rank)
    return held


def _rank_content(spec: Spec, state: Mapping[str, np.ndarray], tp: int, rank: int) -> bytes:
    held = units_held(spec, tp, rank)
    chunks = []
    pieces = _conv_pieces(spec)
    if pieces:
        blocks = [state[name][held[name].start * width: held[name].stop * width]
                  for name, _, width, _ in pieces]
        conv = np.concatenate(blocks, axis=0)  # (channels_r, rows)
        chunks.append(conv.tobytes() if spec.conv_layout == "DS" else conv.T.tobytes())
    if "temporal" in held:
        chunks.append(state["temporal"][held["temporal"].start: held["temporal"].stop].tobytes())
    return b"".join(chunks)


def content_nbytes(spec: Spec, tp: int) -> int:
    """Bytes of state in one rank's page on `tp` ranks (the same on every rank)."""
    zeros = {name: np.zeros(shape, dtype) for name, (shape, dtype) in state_shapes(spec).items()}
    return len(_rank_content(spec, zeros, tp, 0))


# --- full states --------------------------------------------------------------------------


def random_state(spec: Spec, seed: int) -> dict[str, np.ndarray]:
    """A full state of random elements, reproducible from `seed` (see `state_shapes`)."""
    rng = np.random.default_rng(seed)
    return {name: rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype, endpoint=True)
            for name, (shape, dtype) in state_shapes(spec).items()}


def iota_state(spec: Spec) -> dict[str, np.ndarray]:
    """A full state whose elements are 1, 2, 3, ... across all parts, in page order.

    Every element is distinct as long as the state has fewer elements than its narrowest
    dtype can count (65535 for 2-byte dtypes); beyond that the ids wrap around. No
    element is 0, so a byte never written by a plan cannot pass for a zero element.
    """
    state, next_id = {}, 1
    for name, (shape, dtype) in state_shapes(spec).items():
        count = int(np.prod(shape))
        ids = np.arange(next_id, next_id + count, dtype=np.uint64)
        state[name] = (ids % (int(np.iinfo(dtype).max) + 1)).astype(dtype).reshape(shape)
        next_id += count
    return state


def _check_state(spec: Spec, state: Mapping[str, np.ndarray]) -> None:
    shapes = state_shapes(spec)
    if set(state) != set(shapes):
        raise StateError(f"state has parts {sorted(state)}, but {type(spec).__name__} needs "
                         f"{sorted(shapes)}. Build it with `random_state` or `iota_state`.")
    for name, (shape, dtype) in shapes.items():
        array = state[name]
        if not isinstance(array, np.ndarray) or array.shape != shape or array.dtype != dtype:
            got = (getattr(array, "shape", None), getattr(array, "dtype", type(array).__name__))
            raise StateError(f"state[{name!r}] must be an array of shape {shape} and dtype "
                             f"{dtype}, got shape {got[0]} and dtype {got[1]}.")


# --- pages --------------------------------------------------------------------------------


def shard(spec: Spec, state: Mapping[str, np.ndarray], tp: int, *,
          page_nbytes: int | None = None, pad_byte: int = 0) -> list[np.ndarray]:
    """Every rank's page of `state` sharded on `tp` ranks.

    Args:
        spec: the state's spec.
        state: the full state (`random_state`, `iota_state`).
        tp: number of ranks.
        page_nbytes: length of each page in bytes; content is followed by `pad_byte`
            up to it. None: pages hold the content only.
        pad_byte: value (0..255) of every padding byte.

    Returns:
        `tp` pages, each a 1-D uint8 array `[conv state][temporal state][padding]`.

    Raises:
        ShardingError: `spec` cannot be sharded on `tp`.
        StateError: `state` does not fit `spec`, or `page_nbytes` is below the content.
    """
    check_is_spec(spec)
    _check_state(spec, state)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ShardingError(f"reference: `tp` must be an int >= 1, got {tp!r}.")
    if isinstance(pad_byte, bool) or not isinstance(pad_byte, int) or not 0 <= pad_byte <= 255:
        raise StateError(f"`pad_byte` must be an int in [0, 255], got {pad_byte!r}.")
    pages = []
    for rank in range(tp):
        content = np.frombuffer(_rank_content(spec, state, tp, rank), dtype=np.uint8)
        size = len(content) if page_nbytes is None else page_nbytes
        if size < len(content):
            raise StateError(f"`page_nbytes`={page_nbytes} is smaller than the {len(content)} "
                             f"bytes of state each rank holds at tp={tp}.")
        page = np.full(size, pad_byte, dtype=np.uint8)
        page[: len(content)] = content
        pages.append(page)
    return pages


def _check_page(page: object, what: str, min_nbytes: int, exc: type[Exception]) -> np.ndarray:
    array = np.asarray(page)
    if array.dtype != np.uint8 or array.ndim != 1:
        raise exc(f"{what} must be a 1-D uint8 array, got dtype {array.dtype} and shape "
                  f"{array.shape}.")
    if len(array) < min_nbytes:
        raise exc(f"{what} has {len(array)} bytes, fewer than the {min_nbytes} it must hold.")
    return array


def unshard(spec: Spec, pages: Sequence[np.ndarray], tp: int) -> dict[str, np.ndarray]:
    """The full state held by `tp` ranks' pages (the inverse of `shard`).

    Padding after each page's content is ignored. Units held by several ranks
    (replicated B/C groups, GDN key heads) must be equal on every rank.

    Raises:
        ShardingError: `spec` cannot be sharded on `tp`.
        StateError: not `tp` pages, a page shorter than its content, or replicas that
            disagree.
    """
    check_is_spec(spec)
    if len(pages) != tp:
        raise StateError(f"unshard needs one page per rank: got {len(pages)} pages for tp={tp}.")
    shapes = state_shapes(spec)
    state = {name: np.zeros(shape, dtype) for name, (shape, dtype) in shapes.items()}
    owner = {name: np.full(shape[0], -1) for name, (shape, _) in shapes.items()}  # first rank
    rows, nbytes = _rows(spec), content_nbytes(spec, tp)
    for rank, page in enumerate(pages):
        page = _check_page(page, f"page of rank {rank}", nbytes, StateError)
        held = units_held(spec, tp, rank)
        offset = 0
        pieces = _conv_pieces(spec)
        if pieces:
            dtype = element_dtype(spec.conv_dtype)
            channels = sum(len(held[name]) * width for name, _, width, _ in pieces)
            count = channels * rows
            flat = np.frombuffer(page[offset: offset + count * dtype.itemsize].tobytes(), dtype)
            conv = flat.reshape(channels, rows) if spec.conv_layout == "DS" else flat.reshape(rows, channels).T
            offset += count * dtype.itemsize
            first = 0
            for name, _, width, _ in pieces:
                block = conv[first: first + len(held[name]) * width]
                first += len(held[name]) * width
                for i, unit in enumerate(held[name]):
                    _place(state, owner, name, unit, block[i * width: (i + 1) * width], rank)
        if "temporal" in held:
            shape, dtype = shapes["temporal"]
            count = len(held["temporal"]) * int(np.prod(shape[1:]))
            flat = np.frombuffer(page[offset: offset + count * dtype.itemsize].tobytes(), dtype)
            block = flat.reshape(len(held["temporal"]), *shape[1:])
            for i, unit in enumerate(held["temporal"]):
                _place(state, owner, "temporal", unit, block[i: i + 1], rank)
    return state


def _place(state, owner, name: str, unit: int, values: np.ndarray, rank: int) -> None:
    """Put one unit's elements into the full state, checking replicas agree."""
    width = len(values)
    target = state[name][unit * width: (unit + 1) * width]
    first = owner[name][unit * width]
    if first >= 0:
        if not np.array_equal(target, values):
            raise StateError(f"replicas disagree: unit {unit} of `{name}` differs between "
                             f"rank {first} and rank {rank}.")
        return
    target[...] = values
    owner[name][unit * width: (unit + 1) * width] = rank


def apply(plan: Plan, src_pages: Sequence[np.ndarray], dst_page: np.ndarray) -> np.ndarray:
    """A copy of `dst_page` with every read of `plan` applied to it.

    Args:
        plan: the dst rank's plan.
        src_pages: the `plan.src_tp` src pages, indexed by src rank (1-D uint8 arrays).
        dst_page: the dst rank's page before the transfer (1-D uint8); not modified.

    Returns:
        A new 1-D uint8 array: `dst_page` with, for each read,
        `out[dst_offset : dst_offset + nbytes] = src_pages[src_rank][src_offset : ... + nbytes]`.

    Raises:
        PlanError: `plan` is not a Plan, the number of src pages differs from
            `plan.src_tp`, or a read leaves a page.
    """
    if not isinstance(plan, Plan):
        raise PlanError(f"`plan` must be a Plan from `plan_reads`, got {type(plan).__name__}.")
    if len(src_pages) != plan.src_tp:
        raise PlanError(f"the plan reads from src_tp={plan.src_tp} ranks, but "
                        f"{len(src_pages)} src pages were given.")
    srcs = [_check_page(p, f"src page {i}", 0, PlanError) for i, p in enumerate(src_pages)]
    out = _check_page(dst_page, "dst page", 0, PlanError).copy()
    for read in plan.reads:
        src = srcs[read.src_rank]
        if read.src_end > len(src) or read.dst_end > len(out):
            raise PlanError(f"{read} leaves a page: src page {read.src_rank} has {len(src)} "
                            f"bytes, the dst page {len(out)}.")
        out[read.dst_offset: read.dst_end] = src[read.src_offset: read.src_end]
    return out
