"""`valid_tp_sizes`: exactly the TP sizes `page_layout` accepts, and the sizes a
`ShardingError` suggests (so a suggestion never fails in turn)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ssm_split import model, models, page_layout
from ssm_split.errors import ShardingError
from ssm_split.layout import valid_tp_sizes
from tests.strategies import layout_cases


def _fits(spec, tp: int) -> bool:
    try:
        page_layout(spec, tp, 0)
    except ShardingError:
        return False
    return True


@given(case=layout_cases(max_tp=8), limit=st.integers(1, 64))
def test_valid_sizes_are_exactly_those_page_layout_accepts(case, limit):
    spec, tp = case
    sizes = valid_tp_sizes(spec)
    assert list(sizes) == sorted(set(sizes)) and sizes[0] == 1 and tp in sizes
    for tp in range(1, limit + 1):
        assert (tp in sizes) == _fits(spec, tp), tp
    assert not _fits(spec, sizes[-1] * 2)  # the list is complete: nothing above its end


@pytest.mark.parametrize("name", models())
def test_every_suggested_size_of_a_preset_works(name):
    spec = model(name)
    sizes = valid_tp_sizes(spec)
    assert all(_fits(spec, tp) for tp in sizes)
    bad = next(tp for tp in range(2, 4 * sizes[-1]) if tp not in sizes)
    with pytest.raises(ShardingError, match=rf"Pick a TP size from \[{', '.join(map(str, sizes))}\]"):
        page_layout(spec, bad, 0)


def test_qwen35_4b_on_3_ranks_suggests_sizes_that_work():
    # issue 15: the message used to offer "a multiple of" 16, and 48 then failed on 32 V heads
    with pytest.raises(ShardingError, match=r"Pick a TP size from \[1, 2, 4, 8, 16, 32\]\."):
        page_layout(model("qwen3.5-4b"), 3, 0)
