"""Descriptor expansion against the reference model.

Pages of several layers and blocks are laid into flat numpy "memories" (one per src
rank, one per dst rank) at scattered block ids; the expanded descriptors are applied as
byte copies; every dst byte must then equal what `reference.shard(state, dst_tp)` puts
there, and every byte outside the moved content must be untouched.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ssm_split.errors import BlockRangeError
from ssm_split import (
    Buffer,
    LayerRegion,
    Mamba2Spec,
    PlanError,
    RegionSet,
    expand_plan,
    page_layout,
    plan_reads,
)
from ssm_split.reference import random_state, shard
from tests.strategies import paddings, seeds, transfer_cases

ORDERS = ("layer", "block", "per_layer", "strided")
"""How a side lays out its pages: layer-major in one buffer, block-major in one buffer,
one buffer per layer (buffers back to back, so nothing may merge across them), or
layer-major with a gap after every page."""


def make_regions(order: str, base_addr: int, *, num_layers: int, num_blocks: int,
                 page_nbytes: int, gap_nbytes: int, device_id: int = 0) -> RegionSet:
    if order in ("layer", "block"):
        return RegionSet.packed(base_addr, num_layers=num_layers, num_blocks=num_blocks,
                                page_nbytes=page_nbytes, order=order, device_id=device_id)
    if order == "per_layer":
        bases = [base_addr + layer * num_blocks * page_nbytes for layer in range(num_layers)]
        return RegionSet.per_layer(bases, num_blocks=num_blocks, page_nbytes=page_nbytes,
                                   device_id=device_id)
    stride = page_nbytes + gap_nbytes
    layers = tuple(LayerRegion(base_addr + layer * num_blocks * stride, page_nbytes, stride,
                               num_blocks) for layer in range(num_layers))
    return RegionSet(layers, (Buffer(base_addr, num_layers * num_blocks * stride, device_id),))


def extent(regions: RegionSet) -> tuple[int, int]:
    return min(b.addr for b in regions.buffers), max(b.end for b in regions.buffers)


class Memory:
    """A flat byte array standing for the address range `[base, base + nbytes)`."""

    def __init__(self, regions: RegionSet, rng: np.random.Generator):
        self.regions = regions
        self.base, end = extent(regions)
        self.data = rng.integers(0, 256, end - self.base, dtype=np.uint8)  # junk everywhere

    def page(self, layer: int, block: int) -> slice:
        start = self.regions.page_addr(layer, block) - self.base
        return slice(start, start + self.regions.layers[layer].page_nbytes)

    def at(self, addr: int, nbytes: int) -> slice:
        assert self.base <= addr and addr + nbytes <= self.base + len(self.data)
        return slice(addr - self.base, addr - self.base + nbytes)


def buffer_of(regions: RegionSet, addr: int, nbytes: int) -> int:
    hits = [i for i, b in enumerate(regions.buffers) if b.addr <= addr and addr + nbytes <= b.end]
    assert len(hits) == 1, f"descriptor {addr:#x}+{nbytes} is not inside exactly one buffer"
    return hits[0]


@st.composite
def batches(draw, *, num_blocks: int, max_requests: int = 5) -> np.ndarray:
    """`(N, 2)` scattered `(src_block, dst_block)` pairs, distinct on each side (each
    request has its own state)."""
    n = draw(st.integers(0, min(max_requests, num_blocks)))
    src = draw(st.lists(st.integers(0, num_blocks - 1), min_size=n, max_size=n, unique=True))
    dst = draw(st.lists(st.integers(0, num_blocks - 1), min_size=n, max_size=n, unique=True))
    return np.array([src, dst], dtype=np.int64).T.reshape(n, 2)


@st.composite
def expansion_cases(draw):
    spec, src_tp, dst_tp = draw(transfer_cases(max_tp=4))
    num_layers = draw(st.integers(1, 3))
    num_blocks = draw(st.integers(1, 6))
    return {
        "spec": spec, "src_tp": src_tp, "dst_tp": dst_tp,
        "num_layers": num_layers, "num_blocks": num_blocks,
        "pairs": draw(batches(num_blocks=num_blocks)),
        "src_order": draw(st.sampled_from(ORDERS)), "dst_order": draw(st.sampled_from(ORDERS)),
        "src_pad": draw(paddings(max_nbytes=8)), "dst_pad": draw(paddings(max_nbytes=8)),
        "gap": draw(st.integers(1, 16)),
        "layers": draw(st.none() | st.lists(st.integers(0, num_layers - 1), unique=True)),
        "seed": draw(seeds()),
    }


@given(expansion_cases())
def test_expanded_descriptors_rebuild_the_reference_dst_pages(case):
    spec, src_tp, dst_tp, num_layers = case["spec"], case["src_tp"], case["dst_tp"], case["num_layers"]
    pairs = case["pairs"]
    rng = np.random.default_rng(case["seed"])
    states = {(layer, i): random_state(spec, case["seed"] + 7919 * layer + i)
              for layer in range(num_layers) for i in range(len(pairs))}
    src_page = page_layout(spec, src_tp, 0).content_nbytes + case["src_pad"]
    dst_page = page_layout(spec, dst_tp, 0).content_nbytes + case["dst_pad"]
    common = {"num_layers": num_layers, "num_blocks": case["num_blocks"], "gap_nbytes": case["gap"]}
    src_regions = [make_regions(case["src_order"], (rank + 1) << 32, page_nbytes=src_page,
                                device_id=rank, **common) for rank in range(src_tp)]
    src_mem = [Memory(r, rng) for r in src_regions]
    for (layer, i), state in states.items():
        for rank, page in enumerate(shard(spec, state, src_tp, page_nbytes=src_page)):
            src_mem[rank].data[src_mem[rank].page(layer, int(pairs[i, 0]))] = page
    moved = range(num_layers) if case["layers"] is None else case["layers"]

    for dst_rank in range(dst_tp):
        plan = plan_reads(spec, src_tp, dst_tp, dst_rank)
        dst_regions = make_regions(case["dst_order"], 1 << 40, page_nbytes=dst_page, device_id=7,
                                   **common)
        dst_mem = Memory(dst_regions, rng)
        expected = dst_mem.data.copy()
        for layer in moved:
            for i in range(len(pairs)):
                page = shard(spec, states[layer, i], dst_tp)[dst_rank]
                where = dst_mem.page(layer, int(pairs[i, 1]))
                expected[where.start: where.start + len(page)] = page

        expansion = expand_plan(plan, src_regions, dst_regions, pairs, layers=case["layers"])
        assert [r.src_rank for r in expansion.ranks] == list(plan.src_ranks)
        for ranked in expansion.ranks:
            dst, src = ranked.dst_descs, ranked.src_descs
            assert dst.dtype == src.dtype == np.uint64 and dst.shape == src.shape == (len(dst), 3)
            assert np.array_equal(dst[:, 1], src[:, 1]) and np.all(dst[:, 1] > 0)
            assert np.all(dst[:, 2] == 7) and np.all(src[:, 2] == ranked.src_rank)
            assert np.all(dst[1:, 0] >= dst[:-1, 0] + dst[:-1, 1])  # ascending, disjoint
            for (d, n, _), (s, _, _) in zip(dst.tolist(), src.tolist()):
                buffer_of(dst_regions, d, n), buffer_of(src_regions[ranked.src_rank], s, n)
                dst_mem.data[dst_mem.at(d, n)] = src_mem[ranked.src_rank].data[
                    src_mem[ranked.src_rank].at(s, n)]
            # maximal: no neighbours contiguous on both sides inside the same buffers
            for i in range(len(dst) - 1):
                (d0, n0, _), (d1, _, _) = dst[i].tolist(), dst[i + 1].tolist()
                (s0, _, _), (s1, _, _) = src[i].tolist(), src[i + 1].tolist()
                if d0 + n0 == d1 and s0 + n0 == s1:
                    assert (buffer_of(dst_regions, d0, n0) != buffer_of(dst_regions, d1, 1)
                            or buffer_of(src_regions[ranked.src_rank], s0, n0)
                            != buffer_of(src_regions[ranked.src_rank], s1, 1))
        np.testing.assert_array_equal(dst_mem.data, expected)
        assert expansion.nbytes == len(moved) * len(pairs) * plan.dst_content_nbytes
        assert expansion.num_descriptors <= expansion.num_reads


# --- merging where the geometry allows it ---------------------------------------------

SPEC = Mamba2Spec(num_heads=4, head_dim=2, num_groups=2, state_size=2, conv_kernel=3)


def _content(tp: int) -> int:
    return page_layout(SPEC, tp, 0).content_nbytes


@pytest.mark.parametrize("tp", [1, 2])
def test_equal_tp_block_major_batch_of_consecutive_blocks_is_one_descriptor(tp):
    # block-major, no padding: blocks 3..6 (src) and 10..13 (dst) of all 5 layers are each
    # one contiguous range, so each src rank needs exactly one read
    src = [RegionSet.packed((r + 1) << 32, num_layers=5, num_blocks=20, page_nbytes=_content(tp),
                            order="block") for r in range(tp)]
    dst = RegionSet.packed(1 << 40, num_layers=5, num_blocks=20, page_nbytes=_content(tp), order="block")
    pairs = np.array([[3 + i, 10 + i] for i in range(4)])
    expansion = expand_plan(plan_reads(SPEC, tp, tp, 0), src, dst, pairs)
    (ranked,) = expansion.ranks
    assert ranked.num_descriptors == 1 and ranked.num_reads == 5 * 4
    assert ranked.dst_descs.tolist() == [[dst.page_addr(0, 10), 5 * 4 * _content(tp), 0]]
    assert ranked.src_descs.tolist() == [[src[0].page_addr(0, 3), 5 * 4 * _content(tp), 0]]


def test_equal_tp_layer_major_merges_blocks_but_not_across_buffers():
    page = _content(1)
    bases = [1 << 40, (1 << 40) + 8 * page]  # two layer buffers back to back
    dst = RegionSet.per_layer(bases, num_blocks=8, page_nbytes=page)
    src = RegionSet.packed(1 << 32, num_layers=2, num_blocks=8, page_nbytes=page)
    # blocks 6 and 7 are contiguous on both sides; so are block 7 of layer 0 and block 0
    # of layer 1, but on the dst side they lie in two buffers, which no read may cross
    pairs = np.array([[6, 6], [7, 7], [0, 0]])
    expansion = expand_plan(plan_reads(SPEC, 1, 1, 0), [src], dst, pairs)
    spans = [(a, n) for a, n, _ in expansion.ranks[0].dst_descs.tolist()]
    assert spans == [(bases[0], page), (bases[0] + 6 * page, 2 * page),
                     (bases[1], page), (bases[1] + 6 * page, 2 * page)]


def test_padding_prevents_merging_consecutive_blocks():
    src = RegionSet.packed(1 << 32, num_layers=1, num_blocks=8, page_nbytes=_content(1))
    dst = RegionSet.packed(1 << 40, num_layers=1, num_blocks=8, page_nbytes=_content(1) + 1)
    expansion = expand_plan(plan_reads(SPEC, 1, 1, 0), [src], dst, np.array([[0, 0], [1, 1]]))
    assert expansion.num_descriptors == 2


def test_empty_batch_gives_empty_arrays():
    src = RegionSet.packed(1 << 32, num_layers=2, num_blocks=4, page_nbytes=_content(1))
    dst = RegionSet.packed(1 << 40, num_layers=2, num_blocks=4, page_nbytes=_content(2))
    expansion = expand_plan(plan_reads(SPEC, 1, 2, 0), [src], dst, np.zeros((0, 2), np.int64))
    assert expansion.num_descriptors == 0 and expansion.ranks[0].dst_descs.shape == (0, 3)


# --- errors -------------------------------------------------------------------------------


def _sides(num_blocks: int = 4, dst_page: int | None = None):
    src = [RegionSet.packed(1 << 32, num_layers=2, num_blocks=num_blocks, page_nbytes=_content(1))]
    dst = RegionSet.packed(1 << 40, num_layers=2, num_blocks=num_blocks,
                           page_nbytes=dst_page or _content(2))
    return plan_reads(SPEC, 1, 2, 0), src, dst


@pytest.mark.parametrize("pairs, match", [
    ([[4, 0]], "src rank 0 block id 4 is out of range"),
    ([[0, 4]], "dst block id 4 is out of range"),
    ([[-1, 0]], "src rank 0 block id -1"),
    ([[0, -2]], "dst block id -2"),
])
def test_out_of_range_block_ids(pairs, match):
    plan, src, dst = _sides()
    with pytest.raises(BlockRangeError, match=match):
        expand_plan(plan, src, dst, np.array(pairs))


@pytest.mark.parametrize("layers", [[2], [-1], [0, 5]])
def test_out_of_range_layers(layers):
    plan, src, dst = _sides()
    with pytest.raises(BlockRangeError, match="Layer .* is out of range"):
        expand_plan(plan, src, dst, np.array([[0, 0]]), layers=layers)


def test_pages_smaller_than_the_content():
    plan, src, dst = _sides(dst_page=_content(2) - 1)
    with pytest.raises(PlanError, match="smaller than the plan's dst content"):
        expand_plan(plan, src, dst, np.array([[0, 0]]))


@pytest.mark.parametrize("pairs, match", [
    ([[0, 1], [2, 1]], "dst block 1 appears twice"),
    ([0, 1], "shape \\(N, 2\\)"),
    ([[0.0, 1.0]], "integer array"),
])
def test_bad_block_pairs(pairs, match):
    plan, src, dst = _sides()
    with pytest.raises(PlanError, match=match):
        expand_plan(plan, src, dst, np.array(pairs))


def test_missing_src_rank_regions():
    plan = plan_reads(SPEC, 2, 1, 0)
    _, src, dst = _sides()
    with pytest.raises(PlanError, match="no RegionSet was given for it"):
        expand_plan(plan, src, dst, np.array([[0, 0]]))


def test_overlapping_dst_pages():
    page = _content(2)
    layer = LayerRegion(1 << 40, page, page, 4)
    dst = RegionSet((layer, layer), (Buffer(1 << 40, 4 * page),))
    plan, src, _ = _sides()
    with pytest.raises(PlanError, match="overlap"):
        expand_plan(plan, src, dst, np.array([[0, 0]]))


def test_region_validation():
    with pytest.raises(PlanError, match="overlap"):
        LayerRegion(0, 100, 50, 2)
    with pytest.raises(PlanError, match="leave buffer 0"):
        RegionSet((LayerRegion(0, 100, 100, 3),), (Buffer(0, 299),))
    with pytest.raises(PlanError, match="names buffer 1"):
        RegionSet((LayerRegion(0, 100, 100, 1, buffer=1),), (Buffer(0, 100),))
    with pytest.raises(PlanError, match="must be an int >= 1"):
        Buffer(0, 0)
    with pytest.raises(PlanError, match="order must be"):
        RegionSet.packed(0, num_layers=1, num_blocks=1, page_nbytes=1, order="diagonal")


def test_layers_adjacent_only_where_a_block_s_layers_are_back_to_back():
    block = RegionSet.packed(4096, num_layers=3, num_blocks=5, page_nbytes=64, order="block")
    layer = RegionSet.packed(4096, num_layers=3, num_blocks=5, page_nbytes=64, order="layer")
    one_block = RegionSet.packed(4096, num_layers=3, num_blocks=1, page_nbytes=64, order="layer")
    separate = RegionSet.per_layer([4096, 4096 + 64], num_blocks=1, page_nbytes=64)
    single = RegionSet.packed(4096, num_layers=1, num_blocks=5, page_nbytes=64, order="block")
    assert block.layers_adjacent and one_block.layers_adjacent
    assert not layer.layers_adjacent
    assert not separate.layers_adjacent  # adjacent addresses, but two buffers
    assert not single.layers_adjacent
