"""Integrity digests against the reference model.

Src ranks' memories hold `reference.shard(state, src_tp)` pages at scattered blocks; a
dst rank's memory holds `reference.shard(state, dst_tp)` pages, i.e. what a correct
transfer leaves there. The src ranks' digests (over their own pages, at src offsets)
must equal the dst's digests (over the reference pages, at dst offsets); a byte flipped
anywhere in the content of a received page must be found, with its request, layer,
segment and offset, and nothing else; padding and other pages are never digested.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ssm_split.errors import BlockRangeError
from ssm_split import Mamba2Spec, PlanError, RegionSet, page_layout, plan_reads
from ssm_split.integrity._digests import (
    Corruption,
    PageMemory,
    digest_pages,
    dst_digests,
    locate,
    merge_src_digests,
    mismatches,
    pieces_from,
    plan_pieces,
    src_digests,
)
from ssm_split.reference import random_state, shard
from tests.strategies import paddings, rank_cases, seeds, transfer_cases

ORDERS = ("layer", "block", "per_layer")


def memory(order: str, *, num_layers: int, num_blocks: int, page_nbytes: int, fill: int,
           base_addr: int = 1 << 32) -> PageMemory:
    if order == "per_layer":
        bases = [base_addr + layer * (num_blocks * page_nbytes + 64) for layer in range(num_layers)]
        regions = RegionSet.per_layer(bases, num_blocks=num_blocks, page_nbytes=page_nbytes)
    else:
        regions = RegionSet.packed(base_addr, num_layers=num_layers, num_blocks=num_blocks,
                                   page_nbytes=page_nbytes, order=order)
    return PageMemory(regions, tuple(np.full(b.nbytes, fill, np.uint8) for b in regions.buffers))


@st.composite
def batch_cases(draw, *, max_tp: int = 4):
    spec, src_tp, dst_tp = draw(transfer_cases(max_tp=max_tp))
    num_layers = draw(st.integers(1, 3))
    num_blocks = draw(st.integers(1, 5))
    n = draw(st.integers(1, num_blocks))
    src = draw(st.lists(st.integers(0, num_blocks - 1), min_size=n, max_size=n, unique=True))
    dst = draw(st.lists(st.integers(0, num_blocks - 1), min_size=n, max_size=n, unique=True))
    layers = draw(st.lists(st.integers(0, num_layers - 1), min_size=1, unique=True))
    return {
        "spec": spec, "src_tp": src_tp, "dst_tp": dst_tp, "num_layers": num_layers,
        "num_blocks": num_blocks, "src_blocks": src, "dst_blocks": dst, "layers": layers,
        "src_order": draw(st.sampled_from(ORDERS)), "dst_order": draw(st.sampled_from(ORDERS)),
        "src_pad": draw(paddings(max_nbytes=8)), "dst_pad": draw(paddings(max_nbytes=8)),
        "seed": draw(seeds()),
    }


def build(case, dst_rank: int):
    """Src memories with the reference src pages, and a dst memory holding the reference
    dst pages of `dst_rank` (a correct transfer's result); junk (0xA5 / 0x3C) elsewhere."""
    spec, src_tp, dst_tp = case["spec"], case["src_tp"], case["dst_tp"]
    src_page = page_layout(spec, src_tp, 0).content_nbytes + case["src_pad"]
    dst_page = page_layout(spec, dst_tp, 0).content_nbytes + case["dst_pad"]
    shape = {"num_layers": case["num_layers"], "num_blocks": case["num_blocks"]}
    srcs = [memory(case["src_order"], page_nbytes=src_page, fill=0xA5, **shape) for _ in range(src_tp)]
    dst = memory(case["dst_order"], page_nbytes=dst_page, fill=0x3C, **shape)
    for layer in range(case["num_layers"]):
        for i, (src_block, dst_block) in enumerate(zip(case["src_blocks"], case["dst_blocks"])):
            state = random_state(spec, case["seed"] + 7919 * layer + i)
            for rank, page in enumerate(shard(spec, state, src_tp, page_nbytes=src_page, pad_byte=0xA5)):
                srcs[rank].page(layer, src_block)[:] = page
            dst.page(layer, dst_block)[:] = shard(spec, state, dst_tp, page_nbytes=dst_page,
                                                  pad_byte=0x3C)[dst_rank]
    return srcs, dst


def expected_digests(case, plan, srcs):
    return merge_src_digests(plan, {r: src_digests(plan, r, srcs[r], case["src_blocks"], case["layers"])
                                    for r in plan.src_ranks})


@given(rank_cases(max_tp=6))
def test_pieces_tile_the_dst_content_and_follow_the_plan(case):
    spec, src_tp, dst_tp, dst_rank = case
    plan = plan_reads(spec, src_tp, dst_tp, dst_rank)
    pieces = plan_pieces(plan)
    dst_layout = page_layout(spec, dst_tp, dst_rank)
    position = 0
    for piece in pieces:
        assert piece.dst_offset == position and piece.nbytes > 0
        position += piece.nbytes
        inside = dst_layout.segments_overlapping(piece.dst_offset, piece.nbytes)
        assert len(inside) == 1 and inside[0].label == piece.segment
        assert piece.segment_offset == piece.dst_offset - inside[0].offset
        assert piece.dst_offset + piece.nbytes <= inside[0].end
        # the piece is part of one plan read, with the same shift on both sides
        owner = [r for r in plan.reads if r.src_rank == piece.src_rank
                 and r.dst_offset <= piece.dst_offset and piece.dst_offset + piece.nbytes <= r.dst_end]
        assert len(owner) == 1
        assert piece.src_offset - owner[0].src_offset == piece.dst_offset - owner[0].dst_offset
        # and it lies in the src segment of the same part
        src_segments = page_layout(spec, src_tp, piece.src_rank).segments_overlapping(
            piece.src_offset, piece.nbytes)
        assert [s.name for s in src_segments] == [inside[0].name]
    assert position == plan.dst_content_nbytes
    assert sorted(i for r in plan.src_ranks for i in pieces_from(plan, r)) == list(range(len(pieces)))


@given(batch_cases())
def test_src_digests_equal_the_digests_of_the_reference_dst_pages(case):
    for dst_rank in range(case["dst_tp"]):
        plan = plan_reads(case["spec"], case["src_tp"], case["dst_tp"], dst_rank)
        srcs, dst = build(case, dst_rank)
        want = expected_digests(case, plan, srcs)
        got = dst_digests(plan, dst, case["dst_blocks"], case["layers"])
        assert got.shape == (len(case["layers"]), len(case["dst_blocks"]), len(plan_pieces(plan)))
        assert np.array_equal(want, got)
        assert mismatches(want, got).shape == (0, 3)


@st.composite
def flips(draw, *, case, content_nbytes: int):
    """Distinct `(layer index, request index, content offset)` positions and xor masks."""
    positions = st.tuples(st.integers(0, len(case["layers"]) - 1),
                          st.integers(0, len(case["dst_blocks"]) - 1),
                          st.integers(0, content_nbytes - 1))
    chosen = draw(st.lists(positions, min_size=1, max_size=4, unique=True))
    return [(*p, draw(st.integers(1, 255))) for p in chosen]


@given(st.data())
def test_every_flipped_byte_is_found_with_its_layer_segment_and_offset(data):
    case = data.draw(batch_cases())
    dst_rank = data.draw(st.integers(0, case["dst_tp"] - 1))
    plan = plan_reads(case["spec"], case["src_tp"], case["dst_tp"], dst_rank)
    layout = page_layout(case["spec"], case["dst_tp"], dst_rank)
    srcs, dst = build(case, dst_rank)
    flipped = data.draw(flips(case=case, content_nbytes=layout.content_nbytes))
    for i, n, offset, mask in flipped:
        dst.page(case["layers"][i], case["dst_blocks"][n])[offset] ^= mask

    want = expected_digests(case, plan, srcs)
    bad = mismatches(want, dst_digests(plan, dst, case["dst_blocks"], case["layers"]))
    pieces = plan_pieces(plan)
    holders = {(i, n, next(j for j, p in enumerate(pieces) if p.dst_offset <= off < p.dst_offset + p.nbytes))
               for i, n, off, _ in flipped}
    assert {tuple(row) for row in bad.tolist()} == holders

    found = []
    for i, n, j in bad.tolist():
        piece, layer = pieces[j], case["layers"][i]
        src_block, dst_block = case["src_blocks"][n], case["dst_blocks"][n]
        expected = srcs[piece.src_rank].page(layer, src_block)[piece.src_offset: piece.src_offset + piece.nbytes]
        received = dst.page(layer, dst_block)[piece.dst_offset: piece.dst_offset + piece.nbytes]
        found += locate(plan, j, request=f"r{n}", layer=layer, src_block=src_block,
                        dst_block=dst_block, expected=expected, received=received)
    assert sorted((c.layer, c.request, c.page_offset) for c in found) == sorted(
        (case["layers"][i], f"r{n}", off) for i, n, off, _ in flipped)
    masks = {(case["layers"][i], f"r{n}", off): mask for i, n, off, mask in flipped}
    for c in found:
        segment = layout.segments_overlapping(c.page_offset, 1)[0]
        assert (c.segment, c.segment_offset, c.nbytes) == (segment.label, c.page_offset - segment.offset, 1)
        assert c.expected ^ c.received == masks[(c.layer, c.request, c.page_offset)]
        assert c.located and str(c.page_offset) in str(c)


@given(batch_cases(), st.data())
def test_padding_and_pages_outside_the_batch_are_not_digested(case, data):
    plan = plan_reads(case["spec"], case["src_tp"], case["dst_tp"], 0)
    srcs, dst = build(case, 0)
    want = expected_digests(case, plan, srcs)
    content = plan.dst_content_nbytes
    for layer in range(case["num_layers"]):
        for block in range(case["num_blocks"]):
            page = dst.page(layer, block)
            if layer in case["layers"] and block in case["dst_blocks"]:
                page[content:] ^= 0xFF  # padding only
            else:
                page[:] ^= 0xFF  # a page the batch does not move
    assert np.array_equal(want, dst_digests(plan, dst, case["dst_blocks"], case["layers"]))


def test_large_batches_digest_the_same_on_several_threads():
    # 10 pages of 512 KiB: above the size where pages hash on several threads
    page_nbytes = 512 << 10
    regions = RegionSet.packed(1 << 32, num_layers=2, num_blocks=8, page_nbytes=page_nbytes, order="block")
    data = np.random.default_rng(5).integers(0, 256, regions.buffers[0].nbytes, dtype=np.uint8)
    mem = PageMemory(regions, (data,))
    offsets, lengths = [0, 100_000, 300_000], [100_000, 200_000, 212_000]
    got = digest_pages(mem, [1, 0], [5, 2, 3, 0, 7], offsets, lengths)
    for i, layer in enumerate([1, 0]):
        for n, block in enumerate([5, 2, 3, 0, 7]):
            start = regions.page_addr(layer, block) - (1 << 32)
            for j, (o, k) in enumerate(zip(offsets, lengths)):
                want = hashlib.sha256(data[start + o: start + o + k]).digest()[:8]
                assert int(got[i, n, j]) == int.from_bytes(want, "little")


def test_a_piece_whose_src_bytes_are_unknown_is_reported_whole():
    spec = Mamba2Spec(num_heads=4, head_dim=2, num_groups=1, state_size=4)
    plan = plan_reads(spec, 1, 2, 1)
    piece = plan_pieces(plan)[2]
    (c,) = locate(plan, 2, request="r", layer=3, src_block=1, dst_block=2, expected=None,
                  received=np.zeros(piece.nbytes, np.uint8))
    assert isinstance(c, Corruption) and not c.located
    assert (c.segment, c.page_offset, c.nbytes) == (piece.segment, piece.dst_offset, piece.nbytes)
    assert "not located" in str(c)
    same = np.arange(piece.nbytes, dtype=np.uint8)
    assert locate(plan, 2, request="r", layer=0, src_block=0, dst_block=0, expected=same,
                  received=same) == ()


def test_bad_arguments_are_typed_errors():
    spec = Mamba2Spec(num_heads=4, head_dim=2, num_groups=1, state_size=4)
    plan = plan_reads(spec, 1, 2, 0)
    mem = memory("layer", num_layers=2, num_blocks=3, page_nbytes=plan.dst_content_nbytes, fill=0)
    with pytest.raises(BlockRangeError, match="Layer 2 is out of range"):
        dst_digests(plan, mem, [0], [2])
    with pytest.raises(BlockRangeError, match="dst block id 3 is out of range for layer 0"):
        dst_digests(plan, mem, [3], [0])
    with pytest.raises(PlanError, match="reach byte"):
        digest_pages(mem, [0], [0], [0], [plan.dst_content_nbytes + 1])
    with pytest.raises(PlanError, match="1-D uint8 array of"):
        PageMemory(mem.regions, (np.zeros(3, np.uint8),))
    with pytest.raises(PlanError, match="must have shape"):
        merge_src_digests(plan, {0: np.zeros((1, 1, 99), np.uint64)})
    with pytest.raises(PlanError, match="differ in shape"):
        mismatches(np.zeros((1, 1, 2), np.uint64), np.zeros((1, 1, 3), np.uint64))
