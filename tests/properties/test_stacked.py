"""The stacked (unit-major across layers) layout against an independent construction.

Stacked pages are built here straight from full states with numpy (per part, per held
unit, per layer), without the layout code; the stacked plan applied to such src pages
must give the stacked dst pages, and `stack_pages`, `unstack_page` and `layer_view` must
agree with them.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ssm_split
from ssm_split import page_layout, plan_reads, reference
from ssm_split.errors import PlanError, SpecError, SpecMismatchError
from ssm_split.strategies._stacked import (
    layer_view,
    stack_layers,
    stack_pages,
    stacked_layout,
    stacked_plan,
    unstack_page,
)
from ssm_split.strategies import baseline_plan
from tests.strategies import rank_cases, seeds


def _conv_pieces(spec):
    """(name, channels per unit) of each conv part, from the reference's state shapes."""
    shapes = reference.state_shapes(spec)
    held = reference.units_held(spec, 1, 0)
    return [(name, shapes[name][0][0] // len(held[name])) for name in shapes if name != "temporal"]


def _stacked_page(spec, states, tp, rank) -> np.ndarray:
    """Rank `rank`'s stacked page of `len(states)` layers, by definition."""
    held = reference.units_held(spec, tp, rank)
    chunks = []
    pieces = _conv_pieces(spec)
    if pieces:
        rows = spec.conv_rows
        row_order = [None] if spec.conv_layout == "DS" else list(range(rows))
        for row in row_order:
            for name, width in pieces:
                for unit in held[name]:
                    for state in states:
                        block = state[name][unit * width:(unit + 1) * width]  # (width, rows)
                        chunks.append(block.tobytes() if row is None else block[:, row].tobytes())
    if "temporal" in held:
        for unit in held["temporal"]:
            for state in states:
                chunks.append(state["temporal"][unit].tobytes())
    return np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()


@given(case=rank_cases(max_tp=6), num_layers=st.integers(1, 4), seed=seeds())
def test_stacked_plan_moves_stacked_pages(case, num_layers, seed):
    spec, src_tp, dst_tp, dst_rank = case
    states = [reference.random_state(spec, seed + layer) for layer in range(num_layers)]
    stacked = stack_layers(spec, num_layers)
    src = [_stacked_page(spec, states, src_tp, r) for r in range(src_tp)]
    want = _stacked_page(spec, states, dst_tp, dst_rank)
    plan = stacked_plan(stacked, src_tp, dst_tp, dst_rank)
    got = reference.apply(plan, src, np.zeros_like(want))
    assert np.array_equal(got, want)
    assert plan.dst_content_nbytes == len(want)
    assert plan.src_content_nbytes == len(src[0])
    # same number of reads as one layer's plan, each num_layers times longer
    base = plan_reads(spec, src_tp, dst_tp, dst_rank)
    assert len(plan.reads) == len(base.reads)
    assert plan.nbytes == num_layers * base.nbytes


@given(case=rank_cases(max_tp=6), num_layers=st.integers(1, 4), seed=seeds())
def test_a_stacked_spec_is_a_page_spec_like_any_other(case, num_layers, seed):
    """`page_layout` and `plan_reads` take a StackedSpec directly and equal the per-layer
    layout and plan with every offset and length scaled by the layer count; the plan
    rebuilds the stacked page defined from the states."""
    spec, src_tp, dst_tp, dst_rank = case
    stacked = stack_layers(spec, num_layers)
    layout, base_layout = page_layout(stacked, dst_tp, dst_rank), page_layout(spec, dst_tp, dst_rank)
    assert [(s.name, s.row, s.offset, s.nbytes) for s in layout.segments] == [
        (s.name, s.row, s.offset * num_layers, s.nbytes * num_layers) for s in base_layout.segments]
    assert layout == stacked_layout(stacked, dst_tp, dst_rank)
    plan = plan_reads(stacked, src_tp, dst_tp, dst_rank, dst_spec=stack_layers(spec, num_layers))
    assert [(r.src_rank, r.src_offset, r.dst_offset, r.nbytes) for r in plan.reads] == [
        (r.src_rank, r.src_offset * num_layers, r.dst_offset * num_layers, r.nbytes * num_layers)
        for r in plan_reads(spec, src_tp, dst_tp, dst_rank).reads]
    assert plan == stacked_plan(stacked, src_tp, dst_tp, dst_rank)
    states = [reference.random_state(spec, seed + layer) for layer in range(num_layers)]
    src = [_stacked_page(spec, states, src_tp, r) for r in range(src_tp)]
    want = _stacked_page(spec, states, dst_tp, dst_rank)
    assert np.array_equal(reference.apply(plan, src, np.zeros_like(want)), want)


def test_stacked_and_per_layer_pages_do_not_mix():
    spec = ssm_split.model("qwen3.5-0.8b")
    with pytest.raises(SpecMismatchError, match="stacked on both"):
        plan_reads(stack_layers(spec, 2), 1, 2, 0, dst_spec=spec)
    with pytest.raises(SpecMismatchError, match="num_layers: src=2, dst=3"):
        plan_reads(stack_layers(spec, 2), 1, 2, 0, dst_spec=stack_layers(spec, 3))
    with pytest.raises(SpecError, match="must be a state spec"):
        stack_layers(stack_layers(spec, 2), 2)  # stacks do not nest


@given(case=rank_cases(max_tp=6), num_layers=st.integers(1, 4), seed=seeds())
def test_stack_and_unstack_pages(case, num_layers, seed):
    spec, _, tp, rank = case
    states = [reference.random_state(spec, seed + layer) for layer in range(num_layers)]
    stacked = stack_layers(spec, num_layers)
    per_layer = [reference.shard(spec, s, tp)[rank] for s in states]
    page = stack_pages(stacked, per_layer, tp, rank)
    assert np.array_equal(page, _stacked_page(spec, states, tp, rank))
    assert all(np.array_equal(a, b) for a, b in zip(unstack_page(stacked, page, tp, rank), per_layer))
    assert stacked_layout(stacked, tp, rank).content_nbytes == len(page)


@given(case=rank_cases(max_tp=6), num_layers=st.integers(1, 4), seed=seeds(), data=st.data())
def test_layer_view_reads_one_layer(case, num_layers, seed, data):
    """Viewing layer l through `layer_view` strides gives that layer's per-layer page parts."""
    spec, _, tp, rank = case
    layer = data.draw(st.integers(0, num_layers - 1))
    states = [reference.random_state(spec, seed + i) for i in range(num_layers)]
    stacked = stack_layers(spec, num_layers)
    page = _stacked_page(spec, states, tp, rank)
    flat = reference.shard(spec, states[layer], tp)[rank]
    layout = ssm_split.page_layout(spec, tp, rank)
    for view, seg in zip(layer_view(stacked, tp, rank, layer), layout.segments):
        assert (view.name, view.row) == (seg.name, seg.row)
        arr = np.lib.stride_tricks.as_strided(page[view.offset:].view(np.uint8),
                                              shape=(*view.shape, view.elem_nbytes),
                                              strides=(*view.strides_nbytes, 1))
        assert arr.tobytes() == flat[seg.offset:seg.end].tobytes()


def test_stacked_gdn_counts():
    """Qwen3.5-27B, 48 layers, 1 -> 2: 4 reads per block for all layers."""
    spec = ssm_split.model("qwen3.5-27b")
    stacked = stack_layers(spec, 48)
    plan = stacked_plan(stacked, 1, 2, 1)
    assert len(plan.reads) == 4
    assert plan.nbytes == 48 * plan_reads(spec, 1, 2, 1).nbytes


def test_bad_stacked_inputs():
    spec = ssm_split.model("qwen3.5-0.8b")
    with pytest.raises(SpecError, match="num_layers"):
        stack_layers(spec, 0)
    with pytest.raises(PlanError, match="StackedSpec"):
        stacked_plan(spec, 1, 2, 0)
    with pytest.raises(PlanError, match="layer"):
        layer_view(stack_layers(spec, 2), 1, 0, 2)
    with pytest.raises(PlanError, match="no stacked form"):  # vLLM's pattern is per layer only
        baseline_plan(stack_layers(spec, 2), 1, 2, 0)
