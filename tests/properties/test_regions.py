"""`RegionSet.strided` (per-layer bases, page sizes, strides, block counts) and the 64-bit
address bound every `Buffer` and `LayerRegion` keeps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ssm_split import Buffer, LayerRegion, PlanError, RegionSet, expand_plan, plan_reads
from ssm_split.layout._regions import ADDRESS_LIMIT
from ssm_split.reference import random_state, shard
from tests.strategies import strided_layouts, transfer_cases


@given(layout=strided_layouts(), base=st.integers(0, 1 << 48), shared=st.booleans(),
       kind=st.sampled_from(["list", "numpy"]))
@example(layout={"base_addrs": [0], "page_nbytes": [1], "page_stride_nbytes": [1],
                 "num_blocks": [1], "nbytes": 1}, base=ADDRESS_LIMIT - 1, shared=False, kind="list")
def test_strided_places_every_page_where_its_layer_says(layout, base, shared, kind):
    nbytes = layout.pop("nbytes")
    layout["base_addrs"] = [base + a for a in layout["base_addrs"]]
    args = {k: (np.array(v, dtype=np.uint64) if kind == "numpy" else v) for k, v in layout.items()}
    buffer = Buffer(base, nbytes, 3) if shared else None
    regions = RegionSet.strided(args.pop("base_addrs"), buffer=buffer, **args)
    assert regions.num_layers == len(layout["base_addrs"])
    for i, region in enumerate(regions.layers):
        assert (region.base_addr, region.page_nbytes, region.page_stride_nbytes, region.num_blocks) == (
            layout["base_addrs"][i], layout["page_nbytes"][i], layout["page_stride_nbytes"][i],
            layout["num_blocks"][i])
        assert type(region.base_addr) is int and type(region.num_blocks) is int
        for block in range(region.num_blocks):
            assert regions.page_addr(i, block) == layout["base_addrs"][i] + block * layout["page_stride_nbytes"][i]
        own = regions.buffers[region.buffer]
        if shared:
            assert own == buffer and regions.device_id(i) == 3
        else:  # one buffer per layer, exactly its pages
            assert (own.addr, own.end) == (region.base_addr, region.base_addr + region.extent_nbytes)
    assert len(regions.buffers) == (1 if shared else regions.num_layers)


@given(case=transfer_cases(max_tp=4), src=strided_layouts(max_layers=3, min_page_nbytes=200, max_page_nbytes=260),
       gap=st.integers(0, 40), data=st.data())
def test_pages_of_strided_regions_move_as_the_reference_says(case, src, gap, data):
    """Both sides described by `strided` (each layer its own stride and block count):
    the expanded descriptors, applied as copies, give every dst page its reference page."""
    spec, src_tp, dst_tp = case
    plan = plan_reads(spec, src_tp, dst_tp, 0)
    need = max(plan.src_content_nbytes, plan.dst_content_nbytes)
    num_layers = len(src["base_addrs"])
    page = need + gap
    dst = {"base_addrs": [i * 8 * page for i in range(num_layers)], "page_nbytes": page,
           "page_stride_nbytes": page, "num_blocks": 8}
    src_pages = [need + p for p in src["page_nbytes"]]
    src_strides = [p + (s - q) for p, s, q in zip(src_pages, src["page_stride_nbytes"], src["page_nbytes"])]
    src_bases, cursor = [], 0
    for p, s, n in zip(src_pages, src_strides, src["num_blocks"]):
        src_bases.append(cursor)
        cursor += (n - 1) * s + p
    src_regions = RegionSet.strided(src_bases, page_nbytes=src_pages, page_stride_nbytes=src_strides,
                                    num_blocks=src["num_blocks"], buffer=Buffer(0, cursor))
    dst_regions = RegionSet.strided(**dst)
    fewest = min(src["num_blocks"])
    src_blocks = data.draw(st.permutations(range(fewest)))
    dst_blocks = data.draw(st.lists(st.integers(0, 7), min_size=fewest, max_size=fewest, unique=True))
    pairs = list(zip(src_blocks, dst_blocks))
    states = {(l, b): random_state(spec, 31 * l + b) for l in range(num_layers) for b in range(fewest)}
    src_mem = [np.zeros(cursor, np.uint8) for _ in range(src_tp)]
    for (l, b), state in states.items():
        for rank, pg in enumerate(shard(spec, state, src_tp)):
            src_mem[rank][src_regions.page_addr(l, b): src_regions.page_addr(l, b) + len(pg)] = pg
    dst_mem = np.zeros(num_layers * 8 * page, np.uint8)
    expansion = expand_plan(plan, [src_regions] * src_tp, dst_regions, pairs)
    for part in expansion.ranks:
        for (d, n, _), (s, m, _) in zip(part.dst_descs.tolist(), part.src_descs.tolist()):
            assert n == m
            dst_mem[d: d + n] = src_mem[part.src_rank][s: s + m]
    want = np.zeros_like(dst_mem)
    for l in range(num_layers):
        for s_block, d_block in pairs:
            pg = shard(spec, states[l, s_block], dst_tp)[0]
            start = dst_regions.page_addr(l, d_block)
            want[start: start + len(pg)] = pg
    np.testing.assert_array_equal(dst_mem, want)


@pytest.mark.parametrize("kwargs, match", [
    ({"base_addrs": [-5]}, r"base_addr must be an int >= 0, got -5"),
    ({"base_addrs": [2**70]}, r"end past 2\*\*64"),
    ({"base_addrs": [ADDRESS_LIMIT - 4096], "num_blocks": 9}, r"end past 2\*\*64"),
    ({"base_addrs": [4096.0]}, r"base_addr must be an int >= 0, got 4096.0"),
    ({"base_addrs": np.array([4096.0])}, r"base_addr must be an int >= 0, got 4096.0"),
    ({"base_addrs": [True]}, r"base_addr must be an int >= 0, got True"),
    ({"base_addrs": []}, r"at least one layer"),
    ({"base_addrs": "0x1000"}, r"must be an int or a sequence of ints, got str"),
    ({"base_addrs": [0, 1 << 20], "num_blocks": [1, 2, 3]}, r"`num_blocks` has 3 entries for 2 layers"),
    ({"page_stride_nbytes": 100}, r"overlap"),
    ({"num_blocks": 0}, r"num_blocks must be an int >= 1, got 0"),
    ({"num_blocks": 2.0}, r"`num_blocks` must be an int or a sequence of ints, got float"),
    ({"num_blocks": [2.0]}, r"num_blocks must be an int >= 1, got 2.0"),
    ({"buffer": Buffer(0, 4096)}, r"leave buffer 0"),
    ({"buffer": (0, 1 << 20)}, r"`buffer` must be a Buffer or None, got tuple"),
])
def test_strided_refuses_what_is_not_memory(kwargs, match):
    args = {"base_addrs": [4096], "page_nbytes": 300, "page_stride_nbytes": 512, "num_blocks": 4} | kwargs
    with pytest.raises(PlanError, match=match):
        RegionSet.strided(args.pop("base_addrs"), **args)


def test_every_address_stays_below_2_to_the_64():
    last = LayerRegion(ADDRESS_LIMIT - 512, 256, 256, 2)  # ends exactly at 2**64: fine
    assert last.base_addr + last.extent_nbytes == ADDRESS_LIMIT
    with pytest.raises(PlanError, match=r"end past 2\*\*64"):
        LayerRegion(ADDRESS_LIMIT - 512, 256, 256, 3)
    with pytest.raises(PlanError, match=r"Buffer: 4097 bytes at .* end past 2\*\*64"):
        Buffer(ADDRESS_LIMIT - 4096, 4097)
    Buffer(ADDRESS_LIMIT - 4096, 4096)
