"""Plans checked against the reference model: the five plan properties of design.md,
plus order, `plan_all`, determinism, real-model worked examples and errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from ssm_split import (
    GDNSpec,
    LinearAttentionSpec,
    Mamba1Spec,
    Mamba2Spec,
    PlanError,
    Plan,
    Read,
    ShortConvSpec,
    SpecError,
    plan_all,
    plan_reads,
)
from ssm_split.errors import ShardingError, SpecMismatchError
from ssm_split.reference import apply, content_nbytes, iota_state, random_state, shard, units_held
from tests.strategies import layout_cases, paddings, seeds, transfer_cases, unshardable_cases

POISON = 0xA5  # every dst byte before the transfer, padding included
SRC_PAD = 0x5A  # src padding: reading it would show

# Granite-4.0-H-Tiny's Mamba2 layer (vllm.md §4.1): 48 heads of 64, one group of 128.
GRANITE_TINY = Mamba2Spec(num_heads=48, head_dim=64, num_groups=1, state_size=128,
                          conv_dtype="bfloat16", ssm_dtype="float32")
# Falcon-H1-7B: 24 heads of 128, one group of 256.
FALCON_H1_7B = Mamba2Spec(num_heads=24, head_dim=128, num_groups=1, state_size=256,
                          ssm_dtype="float32")

# Small cases worth running every time: non-divisible TP pairs, replication on either side.
PINNED = [
    (Mamba2Spec(num_heads=12, head_dim=1, num_groups=1, state_size=1), 4, 6),
    (Mamba2Spec(num_heads=24, head_dim=2, num_groups=2, state_size=2, conv_layout="SD"), 6, 4),
    (Mamba2Spec(num_heads=24, head_dim=1, num_groups=12, state_size=1), 4, 6),
    (Mamba2Spec(num_heads=4, head_dim=2, num_groups=1, state_size=2), 1, 2),
    (Mamba2Spec(num_heads=4, head_dim=2, num_groups=1, state_size=2), 2, 1),
    (Mamba2Spec(num_heads=8, head_dim=1, num_groups=2, state_size=3, conv_layout="SD"), 8, 2),
    (GDNSpec(num_k_heads=2, num_v_heads=12, head_k_dim=2, head_v_dim=3), 4, 6),
    (GDNSpec(num_k_heads=1, num_v_heads=4, head_k_dim=1, head_v_dim=2, spec_tokens=2), 4, 2),
    (Mamba1Spec(intermediate_size=12, state_size=2, conv_layout="SD"), 3, 4),
    (ShortConvSpec(conv_dim=6, conv_kernel=1, spec_tokens=1), 2, 3),
    (LinearAttentionSpec(num_heads=6, head_dim=2, ssm_dtype="float32"), 3, 2),
]


def pinned(**other_arguments):
    """Add every PINNED case as an @example of a test taking `case` (and `other_arguments`)."""
    def decorate(test):
        for case in reversed(PINNED):
            test = example(case=case, **other_arguments)(test)
        return test
    return decorate


def _label(spec, src_tp, dst_tp) -> None:
    """Record what kind of case this is, for `--hypothesis-show-statistics`."""
    event(f"family {type(spec).__name__}, conv layout {getattr(spec, 'conv_layout', '-')}")
    event("equal TP" if src_tp == dst_tp else "dst_tp > src_tp" if dst_tp > src_tp else "dst_tp < src_tp")
    if src_tp % dst_tp and dst_tp % src_tp:
        event("TP sizes do not divide each other")
    for side, tp in (("src", src_tp), ("dst", dst_tp)):
        if any(p.num_units % tp for p in spec.parts):
            event(f"replicated on {side}")


def _pages(spec, state, tp, pad_nbytes, pad_byte):
    return shard(spec, state, tp, page_nbytes=content_nbytes(spec, tp) + pad_nbytes, pad_byte=pad_byte)


# --- property 1: applying the plans rebuilds every dst page -----------------------------


@given(case=transfer_cases(), src_pad=paddings(), dst_pad=paddings(),
       seed=st.one_of(st.none(), seeds()))
@example(case=(Mamba2Spec(num_heads=12, head_dim=1, num_groups=1, state_size=1), 4, 6),
         src_pad=5, dst_pad=3, seed=None)
@pinned(src_pad=0, dst_pad=0, seed=None)
def test_plans_rebuild_every_dst_page(case, src_pad, dst_pad, seed):
    spec, src_tp, dst_tp = case
    _label(spec, src_tp, dst_tp)
    _check_rebuilt(spec, src_tp, dst_tp, src_pad, dst_pad, seed)


@given(case=transfer_cases(max_tp=16, max_multiple=1, max_dim=2), src_pad=paddings())
@example(case=(Mamba2Spec(num_heads=48, head_dim=1, num_groups=1, state_size=1), 12, 16), src_pad=0)
@example(case=(GDNSpec(num_k_heads=1, num_v_heads=240, head_k_dim=1, head_v_dim=1), 16, 15), src_pad=0)
def test_plans_rebuild_every_dst_page_up_to_tp_16(case, src_pad):
    spec, src_tp, dst_tp = case
    _label(spec, src_tp, dst_tp)
    _check_rebuilt(spec, src_tp, dst_tp, src_pad, 7, None)


def _check_rebuilt(spec, src_tp, dst_tp, src_pad, dst_pad, seed):
    state = iota_state(spec) if seed is None else random_state(spec, seed)
    src_pages = _pages(spec, state, src_tp, src_pad, SRC_PAD)
    want = _pages(spec, state, dst_tp, dst_pad, POISON)  # padding stays POISON
    for dst_rank, plan in enumerate(plan_all(spec, src_tp, dst_tp)):
        got = apply(plan, src_pages, np.full(len(want[dst_rank]), POISON, dtype=np.uint8))
        np.testing.assert_array_equal(got, want[dst_rank], err_msg=f"dst rank {dst_rank}")


# --- properties 1-4 on the reads themselves ----------------------------------------------


@given(case=transfer_cases())
@pinned()
def test_reads_stay_in_content_and_write_every_dst_byte_once(case):
    spec, src_tp, dst_tp = case
    src_nbytes, dst_nbytes = content_nbytes(spec, src_tp), content_nbytes(spec, dst_tp)
    for plan in plan_all(spec, src_tp, dst_tp):
        assert (plan.src_content_nbytes, plan.dst_content_nbytes) == (src_nbytes, dst_nbytes)
        dst_count = np.zeros(dst_nbytes, dtype=np.int64)
        src_count = np.zeros((src_tp, src_nbytes), dtype=np.int64)
        for read in plan.reads:
            assert 0 <= read.src_rank < src_tp and read.nbytes > 0
            assert read.src_end <= src_nbytes, f"{read} reads src padding"
            assert read.dst_end <= dst_nbytes, f"{read} writes dst padding"
            dst_count[read.dst_offset: read.dst_end] += 1
            src_count[read.src_rank, read.src_offset: read.src_end] += 1
        assert (dst_count == 1).all(), f"dst bytes written {sorted(set(dst_count.tolist()))} times"
        assert src_count.max() <= 1, "a src byte is read twice: a replica was read twice"
        assert plan.nbytes == dst_nbytes


@given(case=transfer_cases())
@pinned()
def test_reads_are_maximal_and_ordered(case):
    spec, src_tp, dst_tp = case
    for plan in plan_all(spec, src_tp, dst_tp):
        ends = {(r.src_rank, r.src_end, r.dst_end) for r in plan.reads}
        for read in plan.reads:
            assert (read.src_rank, read.src_offset, read.dst_offset) not in ends, (
                f"{read} continues another read on both sides: they should be one read")
        assert list(plan.reads) == sorted(plan.reads, key=lambda r: (r.src_rank, r.dst_offset))


@given(case=transfer_cases())
@pinned()
def test_replicated_units_add_no_src_rank(case):
    """Each dst rank reads only from the src ranks holding its sharded units: a replicated
    group or key head is read from one of those, once, never from an extra rank."""
    spec, src_tp, dst_tp = case
    for dst_rank, plan in enumerate(plan_all(spec, src_tp, dst_tp)):
        dst_units = units_held(spec, dst_tp, dst_rank)
        needed = set()
        for src_rank in range(src_tp):
            src_units = units_held(spec, src_tp, src_rank)
            for part in spec.parts:
                if part.num_units % src_tp == 0:  # sharded on src
                    a, b = src_units[part.name], dst_units[part.name]
                    if max(a.start, b.start) < min(a.stop, b.stop):
                        needed.add(src_rank)
        assert set(plan.src_ranks) == needed
        assert plan.src_ranks == tuple(sorted({r.src_rank for r in plan.reads}))


# --- property 5 and the Plan API --------------------------------------------------------


@given(case=layout_cases())
def test_equal_tp_is_one_whole_content_read_from_the_same_rank(case):
    spec, tp = case
    for rank in range(tp):
        plan = plan_reads(spec, tp, tp, rank)
        assert plan.reads == (Read(rank, 0, 0, content_nbytes(spec, tp)),)


@given(case=transfer_cases())
@pinned()
def test_plan_all_is_plan_reads_of_every_rank_and_deterministic(case):
    spec, src_tp, dst_tp = case
    plans = plan_all(spec, src_tp, dst_tp)
    assert len(plans) == dst_tp
    twin = dataclasses.replace(spec)  # equal, but another object
    for dst_rank, plan in enumerate(plans):
        assert (plan.spec, plan.src_tp, plan.dst_tp, plan.dst_rank) == (spec, src_tp, dst_tp, dst_rank)
        again = plan_reads(twin, src_tp, dst_tp, dst_rank, dst_spec=twin)
        assert again == plan and hash(again) == hash(plan)
        for src_rank in range(src_tp):
            assert plan.reads_from(src_rank) == tuple(r for r in plan.reads if r.src_rank == src_rank)


@given(case=transfer_cases())
def test_plan_tables_show_every_read(case):
    spec, src_tp, dst_tp = case
    plan = plan_reads(spec, src_tp, dst_tp, dst_tp - 1)
    table = plan.format_table()
    lines = table.splitlines()
    for read in plan.reads:
        assert any(f"[{read.src_offset}, {read.src_end})" in line and f"[{read.dst_offset}, {read.dst_end})" in line
                   and line.split()[0] == str(read.src_rank) for line in lines), read
    assert f"{len(plan.reads)} read" in lines[-1] and f"{plan.nbytes} B" in lines[-1]


def test_plan_tables_name_sd_rows_as_half_open_ranges():
    # one src rank's page on 1 -> 1 is a single read spanning every SD row of the page
    spec = Mamba2Spec(num_heads=4, head_dim=2, num_groups=1, state_size=2, conv_layout="SD")
    whole = plan_reads(spec, 1, 1, 0).format_table()
    assert f"(rows [0, {spec.conv_rows}))" in whole and ".." not in whole
    split = plan_reads(spec, 1, 2, 0).format_table()  # one read per sub-projection and row
    assert "(row 0)" in split and f"(row {spec.conv_rows - 1})" in split


_FRESH_CASES = (PINNED[1], PINNED[5], PINNED[6])  # SD, replicated on src, non-divisible


@pytest.mark.parametrize("hash_seed", ["0", "12345"])
def test_plans_are_the_same_in_a_fresh_process(hash_seed):
    script = ("from ssm_split import *\n"
              f"cases = {_FRESH_CASES!r}\n"
              "print(repr([p.reads for c in cases for p in plan_all(*c)]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": hash_seed, "PATH": ""})
    assert out.stdout.strip() == repr([p.reads for c in _FRESH_CASES for p in plan_all(*c)])


# --- real models --------------------------------------------------------------------------


def test_granite_tiny_1_to_2_is_two_reads_per_rank():
    """vllm.md §4.1: the maximal correct plan for Granite-4.0-H-Tiny, src TP1 -> dst TP2."""
    assert plan_reads(GRANITE_TINY, 1, 2, 0).reads == (
        Read(0, 0, 0, 9216),                     # x heads 0..23
        Read(0, 18432, 9216, 806400 - 18432),    # B | C | temporal heads 0..23
    )
    assert plan_reads(GRANITE_TINY, 1, 2, 1).reads == (
        Read(0, 9216, 0, 10752),                 # x heads 24..47 | B | C
        Read(0, 806400, 10752, 1592832 - 806400),  # temporal heads 24..47
    )


def test_granite_tiny_2_to_1_reads_b_and_c_once_from_rank_0():
    assert plan_reads(GRANITE_TINY, 2, 1, 0).reads == (
        Read(0, 0, 0, 9216),                     # x heads 0..23
        Read(0, 9216, 18432, 797184 - 9216),     # B | C | temporal heads 0..23
        Read(1, 0, 9216, 9216),                  # x heads 24..47
        Read(1, 10752, 806400, 797184 - 10752),  # temporal heads 24..47
    )


@pytest.mark.parametrize("spec", [GRANITE_TINY, FALCON_H1_7B], ids=["granite-tiny", "falcon-h1-7b"])
@pytest.mark.parametrize("src_tp, dst_tp", [(1, 2), (2, 1), (4, 6), (6, 4), (3, 8), (8, 3), (1, 24)])
def test_real_models_move_the_right_bytes(spec, src_tp, dst_tp):
    state = random_state(spec, seed=src_tp * 100 + dst_tp)
    src_pages = shard(spec, state, src_tp)
    want = shard(spec, state, dst_tp)
    for dst_rank, plan in enumerate(plan_all(spec, src_tp, dst_tp)):
        assert len(plan.reads) <= 4 * len(plan.src_ranks)  # never more than x, B, C, temporal
        got = apply(plan, src_pages, np.full_like(want[dst_rank], POISON))
        assert np.array_equal(got, want[dst_rank]), f"dst rank {dst_rank}"


# --- errors -------------------------------------------------------------------------------


def test_24_heads_on_16_ranks_is_a_sharding_error():
    with pytest.raises(ShardingError, match=r"`conv.x`.*tp=16: it has 24 heads.*24 % tp == 0"):
        plan_reads(FALCON_H1_7B, 16, 1, 0)
    with pytest.raises(ShardingError, match=r"`conv.x`.*tp=16: it has 24 heads"):
        plan_reads(FALCON_H1_7B, 1, 16, 0)
    with pytest.raises(ShardingError, match=r"`conv.B`.*tp=3: it has 2 groups.*tp % 2 == 0"):
        plan_reads(Mamba2Spec(num_heads=6, head_dim=1, num_groups=2, state_size=1), 3, 1, 0)


@given(case=unshardable_cases(), dst_rank=st.integers(0, 7))
def test_unshardable_tp_raises_on_either_side(case, dst_rank):
    spec, tp = case
    with pytest.raises(ShardingError, match=f"on tp={tp}"):
        plan_reads(spec, tp, 1, 0)
    with pytest.raises(ShardingError, match=f"on tp={tp}"):
        plan_reads(spec, 1, tp, dst_rank % tp)
    with pytest.raises(ShardingError):
        units_held(spec, tp, 0)  # the reference agrees


@pytest.mark.parametrize("src_tp, dst_tp, dst_rank, match", [
    (0, 1, 0, "`src_tp` must be an int >= 1, got 0"),
    (1, 0, 0, "`dst_tp` must be an int >= 1, got 0"),
    (True, 1, 0, "`src_tp` must be an int >= 1, got True"),
    (1, 2, 2, r"`dst_rank` must be an int in \[0, 2\) for dst_tp=2, got 2"),
    (1, 2, -1, r"`dst_rank` must be an int in \[0, 2\)"),
    (1, 2.0, 0, "`dst_tp` must be an int >= 1, got 2.0"),
])
def test_bad_tp_or_rank_is_a_sharding_error(src_tp, dst_tp, dst_rank, match):
    with pytest.raises(ShardingError, match=match):
        plan_reads(GRANITE_TINY, src_tp, dst_tp, dst_rank)


def test_not_a_spec_is_a_spec_error():
    with pytest.raises(SpecError, match="`spec` must be a state spec"):
        plan_reads({"num_heads": 8}, 1, 2, 0)
    with pytest.raises(SpecError, match="`dst_spec` must be a state spec"):
        plan_reads(GRANITE_TINY, 1, 2, 0, dst_spec="granite")


MISMATCHES = [
    ({"spec_tokens": 1}, r"spec_tokens: src=0, dst=1.*Conv rows differ \(src 3, dst 4\)"),
    ({"conv_kernel": 3}, r"conv_kernel: src=4, dst=3.*Conv rows differ"),
    ({"conv_dtype": "float32"}, r"conv_dtype: src='bfloat16', dst='float32'"),
    ({"ssm_dtype": "bfloat16"}, r"ssm_dtype: src='float32', dst='bfloat16'"),
    ({"num_heads": 96}, r"num_heads: src=48, dst=96"),
    ({"num_groups": 2}, r"num_groups: src=1, dst=2"),
    ({"state_size": 64}, r"state_size: src=128, dst=64"),
    ({"head_dim": 32}, r"head_dim: src=64, dst=32"),
    ({"conv_layout": "SD"}, r"conv_layout: src='DS', dst='SD'"),
]


@pytest.mark.parametrize("change, match", MISMATCHES, ids=[next(iter(c)) for c, _ in MISMATCHES])
def test_mismatched_dst_spec_names_both_values(change, match):
    dst_spec = dataclasses.replace(GRANITE_TINY, **change)
    with pytest.raises(SpecMismatchError, match=match):
        plan_reads(GRANITE_TINY, 1, 2, 0, dst_spec=dst_spec)
    with pytest.raises(SpecMismatchError):
        plan_all(GRANITE_TINY, 2, 1, dst_spec=dst_spec)


def test_mismatched_families_are_a_mismatch():
    gdn = GDNSpec(num_k_heads=16, num_v_heads=48, head_k_dim=128, head_v_dim=128)
    with pytest.raises(SpecMismatchError, match="src is a Mamba2Spec but dst is a GDNSpec"):
        plan_reads(GRANITE_TINY, 1, 2, 0, dst_spec=gdn)


@given(case=transfer_cases(), field_index=st.integers(0, 20))
def test_any_changed_field_is_a_mismatch(case, field_index):
    spec, src_tp, dst_tp = case
    fields = [f.name for f in dataclasses.fields(spec)]
    name = fields[field_index % len(fields)]
    value = getattr(spec, name)
    if isinstance(value, int):
        other = value + 1
    else:
        other = {"bfloat16": "float16", "float16": "float32", "float32": "bfloat16",
                 "DS": "SD", "SD": "DS"}[value]
    try:
        dst_spec = dataclasses.replace(spec, **{name: other})
    except SpecError:  # e.g. num_heads no longer a multiple of num_groups: nothing to plan
        return
    with pytest.raises(SpecMismatchError, match=f"{name}: src={value!r}, dst={other!r}"):
        plan_reads(spec, src_tp, dst_tp, 0, dst_spec=dst_spec)


def test_reads_and_plans_validate_their_fields():
    with pytest.raises(PlanError, match="Read.src_offset must be an int >= 0, got -1"):
        Read(0, -1, 0, 4)
    with pytest.raises(PlanError, match="Read.nbytes must be > 0"):
        Read(0, 0, 0, 0)
    plan = plan_reads(GRANITE_TINY, 1, 2, 0)
    with pytest.raises(PlanError, match="leaves the content region"):
        dataclasses.replace(plan, reads=plan.reads + (Read(0, 1592832, 0, 1),))
    with pytest.raises(PlanError, match="names src rank 1, but src_tp=1"):
        dataclasses.replace(plan, reads=(Read(1, 0, 0, 1),))
    assert isinstance(plan, Plan)
