"""The numpy reference model: pages worked out by hand, round trips, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ssm_split import (
    GDNSpec,
    LinearAttentionSpec,
    Mamba1Spec,
    Mamba2Spec,
    PlanError,
    ShortConvSpec,
    plan_reads,
)
from ssm_split.errors import ShardingError
from ssm_split.reference import (StateError, apply, content_nbytes, iota_state, random_state,
                                 shard, state_shapes, unshard)
from tests.strategies import layout_cases, paddings, seeds


def _ids(*values: int, dtype: str = "<u2") -> np.ndarray:
    """Little-endian bytes of the given element ids, as a page would hold them."""
    return np.frombuffer(np.array(values, dtype=dtype).tobytes(), dtype=np.uint8)


def assert_states_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# --- pages worked out by hand -----------------------------------------------------------

# Mamba2, 2 heads of 1 channel, 1 group of state size 1, kernel 3 (2 rows). Ids:
#   x = [[1, 2], [3, 4]]  (head 0, head 1)   B = [[5, 6]]   C = [[7, 8]]   temporal = [9, 10]
TINY_MAMBA2 = Mamba2Spec(num_heads=2, head_dim=1, num_groups=1, state_size=1, conv_kernel=3)


def test_hand_worked_mamba2_ds_pages():
    pages = shard(TINY_MAMBA2, iota_state(TINY_MAMBA2), 2)
    # rank r: x head r (2 rows) | the one replicated group of B and C | temporal head r
    np.testing.assert_array_equal(pages[0], _ids(1, 2, 5, 6, 7, 8, 9))
    np.testing.assert_array_equal(pages[1], _ids(3, 4, 5, 6, 7, 8, 10))


def test_hand_worked_mamba2_sd_pages():
    spec = Mamba2Spec(num_heads=2, head_dim=1, num_groups=1, state_size=1, conv_kernel=3,
                      conv_layout="SD")
    pages = shard(spec, iota_state(spec), 1)
    # rows first: row 0 = [x0 x1 B C] (first elements), row 1 = the second elements
    np.testing.assert_array_equal(pages[0], _ids(1, 3, 5, 7, 2, 4, 6, 8, 9, 10))
    pages = shard(spec, iota_state(spec), 2)
    np.testing.assert_array_equal(pages[1], _ids(3, 5, 7, 4, 6, 8, 10))


def test_hand_worked_gdn_pages_with_float32_temporal_and_padding():
    # 1 key head (replicated at TP2), 2 value heads; Q = [[1]], K = [[2]], V = [[3], [4]],
    # temporal (2, 1, 1) = [5, 6] stored as 4-byte elements
    spec = GDNSpec(num_k_heads=1, num_v_heads=2, head_k_dim=1, head_v_dim=1, conv_kernel=2,
                   ssm_dtype="float32")
    pages = shard(spec, iota_state(spec), 2, page_nbytes=14, pad_byte=0xEE)
    pad = np.array([0xEE] * 4, dtype=np.uint8)
    np.testing.assert_array_equal(pages[0], np.concatenate([_ids(1, 2, 3), _ids(5, dtype="<u4"), pad]))
    np.testing.assert_array_equal(pages[1], np.concatenate([_ids(1, 2, 4), _ids(6, dtype="<u4"), pad]))


def test_hand_worked_conv_only_and_temporal_only_families():
    conv = ShortConvSpec(conv_dim=4, conv_kernel=2, conv_dtype="float32")
    np.testing.assert_array_equal(shard(conv, iota_state(conv), 2)[1], _ids(3, 4, dtype="<u4"))
    lin = LinearAttentionSpec(num_heads=2, head_dim=2)
    np.testing.assert_array_equal(shard(lin, iota_state(lin), 2)[1], _ids(5, 6, 7, 8))
    mamba1 = Mamba1Spec(intermediate_size=2, state_size=2, conv_kernel=2)
    # x = [[1], [2]], temporal (2, 2) = [[3, 4], [5, 6]]
    np.testing.assert_array_equal(shard(mamba1, iota_state(mamba1), 2)[1], _ids(2, 5, 6))


def test_state_shapes_follow_the_design_table():
    spec = Mamba2Spec(num_heads=4, head_dim=3, num_groups=2, state_size=5, conv_kernel=4,
                      spec_tokens=1, ssm_dtype="float32")
    shapes = {name: shape for name, (shape, _) in state_shapes(spec).items()}
    assert shapes == {"conv.x": (12, 4), "conv.B": (10, 4), "conv.C": (10, 4), "temporal": (4, 3, 5)}
    assert state_shapes(spec)["temporal"][1] == np.dtype("<u4")
    gdn = GDNSpec(num_k_heads=2, num_v_heads=4, head_k_dim=3, head_v_dim=5)
    shapes = {name: shape for name, (shape, _) in state_shapes(gdn).items()}
    assert shapes == {"conv.Q": (6, 3), "conv.K": (6, 3), "conv.V": (20, 3), "temporal": (4, 5, 3)}


# --- properties -------------------------------------------------------------------------


@given(layout_cases(max_tp=1))
def test_iota_ids_are_distinct(case):
    spec, _ = case
    state = iota_state(spec)
    ids = np.concatenate([a.ravel().astype(np.uint64) for a in state.values()])
    assert len(np.unique(ids)) == len(ids), "strategies must keep states small enough"
    assert ids.min() >= 1


@given(layout_cases(), paddings(), st.integers(0, 255), st.one_of(st.none(), seeds()))
@example((TINY_MAMBA2, 2), 3, 0xA5, None)
def test_unshard_inverts_shard(case, pad_nbytes, pad_byte, seed):
    spec, tp = case
    state = iota_state(spec) if seed is None else random_state(spec, seed)
    nbytes = content_nbytes(spec, tp)
    pages = shard(spec, state, tp, page_nbytes=nbytes + pad_nbytes, pad_byte=pad_byte)
    assert len(pages) == tp
    for page in pages:
        assert page.dtype == np.uint8 and page.shape == (nbytes + pad_nbytes,)
        assert (page[nbytes:] == pad_byte).all()
    assert_states_equal(unshard(spec, pages, tp), state)


@given(layout_cases(), seeds())
def test_random_state_is_reproducible(case, seed):
    spec, _ = case
    assert_states_equal(random_state(spec, seed), random_state(spec, seed))


def test_random_states_differ_between_seeds():
    spec = Mamba2Spec(num_heads=4, head_dim=4, num_groups=1, state_size=4)
    a, b = random_state(spec, 1), random_state(spec, 2)
    assert any(not np.array_equal(a[k], b[k]) for k in a)


# --- errors -----------------------------------------------------------------------------


def test_unshard_rejects_replicas_that_disagree():
    state = iota_state(TINY_MAMBA2)
    other = {k: v.copy() for k, v in state.items()}
    other["conv.C"][0, 1] += 1  # rank 1's copy of the replicated group differs
    pages = [shard(TINY_MAMBA2, state, 2)[0], shard(TINY_MAMBA2, other, 2)[1]]
    with pytest.raises(StateError, match=r"replicas disagree: unit 0 of `conv.C`.*rank 0 and rank 1"):
        unshard(TINY_MAMBA2, pages, 2)


def test_unshard_rejects_short_pages_wrong_counts_and_dtypes():
    pages = shard(TINY_MAMBA2, iota_state(TINY_MAMBA2), 2)
    with pytest.raises(StateError, match="page of rank 1 has 13 bytes, fewer than the 14"):
        unshard(TINY_MAMBA2, [pages[0], pages[1][:-1]], 2)
    with pytest.raises(StateError, match="one page per rank: got 2 pages for tp=4"):
        unshard(TINY_MAMBA2, pages, 4)
    with pytest.raises(StateError, match="1-D uint8 array"):
        unshard(TINY_MAMBA2, [p.astype(np.int16) for p in pages], 2)
    with pytest.raises(ShardingError, match="tp=3"):
        unshard(TINY_MAMBA2, pages + [pages[0]], 3)


def test_shard_rejects_bad_states_and_sizes():
    state = iota_state(TINY_MAMBA2)
    with pytest.raises(StateError, match=r"needs \['conv.B', 'conv.C', 'conv.x', 'temporal'\]"):
        shard(TINY_MAMBA2, {k: v for k, v in state.items() if k != "conv.B"}, 1)
    with pytest.raises(StateError, match=r"state\['temporal'\] must be an array of shape \(2, 1, 1\)"):
        shard(TINY_MAMBA2, {**state, "temporal": state["temporal"].astype(np.uint32)}, 1)
    with pytest.raises(StateError, match="`page_nbytes`=13 is smaller than the 14 bytes"):
        shard(TINY_MAMBA2, state, 2, page_nbytes=13)
    with pytest.raises(StateError, match="`pad_byte` must be an int in"):
        shard(TINY_MAMBA2, state, 2, pad_byte=256)
    with pytest.raises(ShardingError, match="`tp` must be an int >= 1, got 0"):
        shard(TINY_MAMBA2, state, 0)
    with pytest.raises(ShardingError, match="`conv.x` has 2 units, which tp=4"):
        shard(TINY_MAMBA2, state, 4)


def test_apply_is_pure_and_bounds_checked():
    state = iota_state(TINY_MAMBA2)
    plan = plan_reads(TINY_MAMBA2, 1, 2, 1)
    src = shard(TINY_MAMBA2, state, 1)
    dst = np.zeros(content_nbytes(TINY_MAMBA2, 2), dtype=np.uint8)
    out = apply(plan, src, dst)
    assert (dst == 0).all(), "apply must not modify its dst page"
    np.testing.assert_array_equal(out, shard(TINY_MAMBA2, state, 2)[1])
    with pytest.raises(PlanError, match="leaves a page: src page 0 has 5 bytes"):
        apply(plan, [src[0][:5]], dst)
    with pytest.raises(PlanError, match="leaves a page.*the dst page 3"):
        apply(plan, src, dst[:3])
    with pytest.raises(PlanError, match="src_tp=1 ranks, but 2 src pages"):
        apply(plan, src + src, dst)
    with pytest.raises(PlanError, match="must be a Plan"):
        apply(plan.reads, src, dst)
    with pytest.raises(PlanError, match="dst page must be a 1-D uint8 array"):
        apply(plan, src, dst.astype(np.float32))
