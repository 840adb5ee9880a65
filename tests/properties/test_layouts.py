"""Page layouts: segments tile the content, sizes add up, the per-rank shards of every part
tile it (or replicate whole units), every segment holds the bytes the reference model puts
there, and the shapes match vLLM's published cases."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ssm_split import GDNSpec, Mamba1Spec, Mamba2Spec, page_layout, rank_units
from ssm_split.errors import ShardingError
from ssm_split.layout import sharded_shapes, sub_projection_widths
from ssm_split.reference import content_nbytes, iota_state, shard, units_held
from tests.strategies import layout_cases, specs, unshardable_cases

NEMOTRON_H_8B = Mamba2Spec(num_heads=128, head_dim=64, num_groups=8, state_size=128)
NEMOTRON_NANO_30B = Mamba2Spec(num_heads=64, head_dim=64, num_groups=8, state_size=128, ssm_dtype="float32")
FALCON_H1_7B = Mamba2Spec(num_heads=24, head_dim=128, num_groups=1, state_size=256, ssm_dtype="float32")
QWEN35_08B = GDNSpec(num_k_heads=16, num_v_heads=16, head_k_dim=128, head_v_dim=128)
QWEN35_4B = GDNSpec(num_k_heads=16, num_v_heads=32, head_k_dim=128, head_v_dim=128)
QWEN35_27B = GDNSpec(num_k_heads=16, num_v_heads=48, head_k_dim=128, head_v_dim=128)
JAMBA = Mamba1Spec(intermediate_size=8192, state_size=16)


# --- tiling and sizes ---------------------------------------------------------------------


@given(case=layout_cases())
@example(case=(Mamba2Spec(num_heads=4, head_dim=1, num_groups=1, state_size=2, conv_layout="SD"), 4))
def test_segments_tile_the_content_region(case):
    spec, tp = case
    for rank in range(tp):
        layout = page_layout(spec, tp, rank)
        assert (layout.spec, layout.tp, layout.rank) == (spec, tp, rank)
        end = 0
        for seg in layout.segments:
            assert seg.offset == end and seg.nbytes > 0, f"{seg} does not follow byte {end}"
            end = seg.end
        assert end == layout.content_nbytes == layout.conv_nbytes + layout.temporal_nbytes
        assert layout.content_nbytes == content_nbytes(spec, tp)  # the reference's own count


@given(case=layout_cases())
def test_segment_sizes_add_up(case):
    spec, tp = case
    layout = page_layout(spec, tp, tp - 1)
    conv = [s for s in layout.segments if s.name != "temporal"]
    temporal = layout.part_segments("temporal")
    assert sum(s.nbytes for s in conv) == layout.conv_nbytes
    assert sum(s.nbytes for s in temporal) == layout.temporal_nbytes
    assert len(temporal) == (spec.temporal_part is not None)
    layout_name = getattr(spec, "conv_layout", "DS")  # specs without conv state have none
    per_part = 1 if layout_name == "DS" else spec.conv_rows
    for part, width in zip(spec.conv_parts, sub_projection_widths(spec, tp)):
        segs = layout.part_segments(part.name)
        assert len(segs) == per_part
        assert [s.row for s in segs] == ([None] if layout_name == "DS" else list(range(spec.conv_rows)))
        assert sum(s.nbytes for s in segs) == width * spec.conv_rows * spec.conv_nbytes_per_elem
        for seg in segs:
            assert seg.unit_nbytes * (seg.unit_stop - seg.unit_start) == seg.nbytes
    for seg in layout.segments:
        assert layout.segments_overlapping(seg.offset, seg.nbytes) == (seg,)


@given(case=layout_cases())
@example(case=(GDNSpec(num_k_heads=2, num_v_heads=8, head_k_dim=1, head_v_dim=1), 8))
def test_rank_shards_tile_each_part_or_replicate_whole_units(case):
    spec, tp = case
    held = [rank_units(spec, tp, rank) for rank in range(tp)]
    for index, part in enumerate(spec.parts):
        ranges = [units[index] for units in held]
        assert all(r.part == part.name for r in ranges)
        if part.num_units % tp == 0:  # sharded: in rank order, the ranges tile [0, num_units)
            assert [(r.start, r.stop) for r in ranges] == [
                (rank * part.num_units // tp, (rank + 1) * part.num_units // tp) for rank in range(tp)]
            assert not any(r.replicated for r in ranges)
        else:  # replicated: one whole unit per rank, each unit on tp // num_units neighbours
            assert part.replicable and tp % part.num_units == 0
            assert all(r.num_units == 1 and r.replicated for r in ranges)
            owners = [r.start for r in ranges]
            assert owners == sorted(owners) and set(owners) == set(range(part.num_units))
            assert all(owners.count(u) == tp // part.num_units for u in range(part.num_units))


@given(case=layout_cases())
def test_rank_units_match_the_reference(case):
    spec, tp = case
    for rank in range(tp):
        ours = {u.part: range(u.start, u.stop) for u in rank_units(spec, tp, rank)}
        assert ours == units_held(spec, tp, rank)
        assert page_layout(spec, tp, rank).units == rank_units(spec, tp, rank)


@given(case=layout_cases())
@example(case=(Mamba2Spec(num_heads=2, head_dim=2, num_groups=1, state_size=1, conv_kernel=3,
                          conv_layout="SD", ssm_dtype="float32"), 2))
def test_segments_hold_the_bytes_the_reference_puts_there(case):
    """Each segment, read out of the reference model's page, is exactly the slice of the
    full state its name, units and row say (unique-id fill: any shift shows)."""
    spec, tp = case
    state = iota_state(spec)
    pages = shard(spec, state, tp)
    for rank in range(tp):
        for seg in page_layout(spec, tp, rank).segments:
            full = state[seg.name]
            per_unit = full.shape[0] // next(p.num_units for p in spec.parts if p.name == seg.name)
            rows = full[seg.unit_start * per_unit: seg.unit_stop * per_unit]
            want = rows[:, seg.row] if seg.row is not None else rows
            assert pages[rank][seg.offset: seg.end].tobytes() == want.tobytes(), seg.label


@given(case=layout_cases())
def test_sharded_shapes_describe_the_rank_page(case):
    spec, tp = case
    conv_shape, temporal_shape = sharded_shapes(spec, tp)
    layout = page_layout(spec, tp, 0)
    if spec.conv_parts:
        channels = sum(sub_projection_widths(spec, tp))
        assert conv_shape == ((channels, spec.conv_rows) if spec.conv_layout == "DS"
                              else (spec.conv_rows, channels))
        assert math.prod(conv_shape) * spec.conv_nbytes_per_elem == layout.conv_nbytes
    else:
        assert conv_shape is None and layout.conv_nbytes == 0
    if spec.temporal_part is not None:
        assert temporal_shape == (len(units_held(spec, tp, 0)["temporal"]), *spec.temporal_tail)
        assert math.prod(temporal_shape) * spec.ssm_nbytes_per_elem == layout.temporal_nbytes
    else:
        assert temporal_shape is None and layout.temporal_nbytes == 0


# --- vLLM's published cases (vllm.md §6, §8, §2, §5) ------------------------------------------

VLLM_CASES = [  # spec, tp, conv shape (DS), temporal shape, sub-projection widths
    pytest.param(NEMOTRON_H_8B, 1, (10240, 3), (128, 64, 128), (8192, 1024, 1024), id="nemotron_h_8b_tp1"),
    pytest.param(NEMOTRON_H_8B, 4, (2560, 3), (32, 64, 128), (2048, 256, 256), id="nemotron_h_8b_tp4"),
    pytest.param(NEMOTRON_H_8B, 8, (1280, 3), (16, 64, 128), (1024, 128, 128), id="nemotron_h_8b_tp8"),
    pytest.param(NEMOTRON_NANO_30B, 1, (6144, 3), (64, 64, 128), (4096, 1024, 1024), id="nemotron_nano_30b_tp1"),
    pytest.param(QWEN35_08B, 1, (6144, 3), (16, 128, 128), (2048, 2048, 2048), id="qwen35_08b_tp1"),
    pytest.param(QWEN35_08B, 4, (1536, 3), (4, 128, 128), (512, 512, 512), id="qwen35_08b_tp4"),
    pytest.param(QWEN35_4B, 1, (8192, 3), (32, 128, 128), (2048, 2048, 4096), id="qwen35_4b_tp1"),
    pytest.param(QWEN35_27B, 1, (10240, 3), (48, 128, 128), (2048, 2048, 6144), id="qwen35_27b_tp1"),
    pytest.param(QWEN35_27B, 8, (1280, 3), (6, 128, 128), (256, 256, 768), id="qwen35_27b_tp8"),
    # G = 1: B and C stay one whole group (N channels) at every TP
    pytest.param(FALCON_H1_7B, 1, (3584, 3), (24, 128, 256), (3072, 256, 256), id="falcon_h1_7b_tp1"),
    pytest.param(FALCON_H1_7B, 2, (2048, 3), (12, 128, 256), (1536, 256, 256), id="falcon_h1_7b_tp2"),
    pytest.param(FALCON_H1_7B, 8, (896, 3), (3, 128, 256), (384, 256, 256), id="falcon_h1_7b_tp8"),
    pytest.param(JAMBA, 2, (4096, 3), (4096, 16), (4096,), id="jamba_tp2"),
]


@pytest.mark.parametrize("spec, tp, conv_shape, temporal_shape, widths", VLLM_CASES)
def test_vllm_published_shapes(spec, tp, conv_shape, temporal_shape, widths):
    assert sharded_shapes(spec, tp) == (conv_shape, temporal_shape)
    assert sub_projection_widths(spec, tp) == widths
    sd_spec = dataclasses.replace(spec, conv_layout="SD")
    assert sharded_shapes(sd_spec, tp) == (conv_shape[::-1], temporal_shape)


@pytest.mark.parametrize("spec, tp, conv_nbytes, temporal_nbytes", [
    # vLLM's `compute_physical_blocks_per_logical` inputs for Nemotron-Nano-30B (vllm.md §2)
    (NEMOTRON_NANO_30B, 1, 36864, 2097152),
    (NEMOTRON_NANO_30B, 2, 18432, 1048576),
    (NEMOTRON_NANO_30B, 4, 9216, 524288),
    # vllm.md §5, Falcon-H1-7B with an fp32 temporal state
    (FALCON_H1_7B, 1, 21504, 3145728),
    (FALCON_H1_7B, 2, 12288, 1572864),
    (FALCON_H1_7B, 4, 7680, 786432),
    (FALCON_H1_7B, 8, 5376, 393216),
])
def test_vllm_published_page_sizes(spec, tp, conv_nbytes, temporal_nbytes):
    layout = page_layout(spec, tp, tp - 1)
    assert (layout.conv_nbytes, layout.temporal_nbytes) == (conv_nbytes, temporal_nbytes)


def test_granite_tiny_pages_of_the_worked_example():
    """vllm.md §4.1: x [0, 18432), B [18432, 19200), C [19200, 19968), temporal after, at TP1;
    x 9216, B 768, C 768 bytes at TP2."""
    spec = Mamba2Spec(num_heads=48, head_dim=64, num_groups=1, state_size=128, ssm_dtype="float32")
    tp1 = [(s.name, s.offset, s.end) for s in page_layout(spec, 1, 0).segments]
    assert tp1 == [("conv.x", 0, 18432), ("conv.B", 18432, 19200), ("conv.C", 19200, 19968),
                   ("temporal", 19968, 1592832)]
    tp2 = [(s.name, s.offset, s.end) for s in page_layout(spec, 2, 1).segments]
    assert tp2 == [("conv.x", 0, 9216), ("conv.B", 9216, 9984), ("conv.C", 9984, 10752),
                   ("temporal", 10752, 797184)]


# --- errors -------------------------------------------------------------------------------


def test_24_heads_on_16_ranks_is_rejected_with_the_choices():
    with pytest.raises(ShardingError, match=r"`conv.x`.*on tp=16: it has 24 heads.*"
                                            r"Pick a TP size from \[1, 2, 3, 4, 6, 8, 12, 24\]\."):
        page_layout(FALCON_H1_7B, 16, 0)
    with pytest.raises(ShardingError, match="tp=16"):
        sharded_shapes(FALCON_H1_7B, 16)
    with pytest.raises(ShardingError, match=r"`conv.B`.*tp=3: it has 8 groups.*"
                                            r"Pick a TP size from \[1, 2, 4, 8, 24\]\."):
        page_layout(Mamba2Spec(num_heads=24, head_dim=1, num_groups=8, state_size=1), 3, 0)


@given(case=unshardable_cases())
def test_unshardable_cases_are_rejected(case):
    spec, tp = case
    for call in (lambda: page_layout(spec, tp, 0), lambda: rank_units(spec, tp, tp - 1),
                 lambda: sharded_shapes(spec, tp), lambda: sub_projection_widths(spec, tp)):
        with pytest.raises(ShardingError, match=f"on tp={tp}"):
            call()


@given(spec=specs(), tp=st.integers(1, 24))
def test_layout_rejects_exactly_what_the_reference_rejects(spec, tp):
    try:
        units_held(spec, tp, 0)
    except ShardingError:
        with pytest.raises(ShardingError):
            page_layout(spec, tp, 0)
    else:
        assert page_layout(spec, tp, tp - 1).content_nbytes == content_nbytes(spec, tp)


@pytest.mark.parametrize("tp, rank, match", [
    (0, 0, "`tp` must be an int >= 1, got 0"),
    (2, 2, r"`rank` must be an int in \[0, 2\) for tp=2, got 2"),
    (2, -1, r"`rank` must be an int in \[0, 2\)"),
    (2, True, r"`rank` must be an int in \[0, 2\)"),
])
def test_bad_tp_or_rank(tp, rank, match):
    with pytest.raises(ShardingError, match=match):
        page_layout(NEMOTRON_H_8B, tp, rank)


def test_layouts_are_frozen_values():
    layout = page_layout(NEMOTRON_H_8B, 4, 1)
    assert layout == page_layout(Mamba2Spec(num_heads=128, head_dim=64, num_groups=8, state_size=128), 4, 1)
    assert hash(layout) == hash(page_layout(NEMOTRON_H_8B, 4, 1))
    with pytest.raises(AttributeError):
        layout.rank = 2  # type: ignore[misc]
    assert np.array([s.offset for s in layout.segments]).tolist() == sorted(s.offset for s in layout.segments)
