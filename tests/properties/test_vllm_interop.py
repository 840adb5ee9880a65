"""ssm_split against the REAL vLLM (installed CPU-only by scripts/install-vllm.sh).

- `sharded_shapes` equals vLLM's `MambaStateShapeCalculator` (DS and SD);
- `spec_from_vllm` round-trips our specs through real `MambaSpec`s, and
  `spec_from_vllm_config` agrees with vLLM's dtype rule;
- where vLLM's preconditions hold (groups / key heads sharded on both sides, one TP size
  dividing the other, DS), plans move exactly the bytes vLLM's `derive_mamba_conv_split`
  + `remote_conv_offsets` + temporal offsets move, for every dst rank, both directions;
- with one B/C group (Granite-4.0-H-Tiny 1 -> 2, and drawn n_groups=1 hetero-TP cases)
  vLLM's reads rebuild wrong pages on the reference model, ours the right ones;
- the connector helpers and `ssm-split vllm-check`.

Skipped only when vLLM cannot be imported; under CI (the `CI` variable set) a missing
vLLM is an error, since the Makefile installs it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
import warnings
from importlib import resources

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import ssm_split
from ssm_split import (
    GDNSpec,
    Mamba1Spec,
    Mamba2Spec,
    PlanError,
    ShortConvSpec,
    SpecError,
    page_layout,
    plan_all,
    plan_reads,
)
from ssm_split.layout import sharded_shapes
from ssm_split.reference import content_nbytes, iota_state, random_state, shard
from tests.strategies import paddings, specs, transfer_cases

try:
    # Importing vLLM runs torch.compile set-up, which warns about torch's own deprecated
    # APIs; those are not ours to fix, so they are ignored during the import only.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import vllm  # noqa: F401
        from vllm.distributed.kv_transfer.kv_connector.v1 import ssm_conv_transfer_utils as vllm_ssm
        from vllm.model_executor.layers.mamba import mamba_utils as vllm_mamba
except ImportError as error:  # pragma: no cover - depends on the machine
    if os.environ.get("CI"):
        raise RuntimeError("CI must import vLLM: run `make install-test`") from error
    pytest.skip(f"vLLM cannot be imported ({error})", allow_module_level=True)

import torch  # noqa: E402  (vLLM's dependency, present whenever vLLM is)

from ssm_split.cli._main import main  # noqa: E402
from ssm_split.integrations import vllm as sv  # noqa: E402
from ssm_split.integrations._vllm_check import apply_reads, check_rank  # noqa: E402

pytestmark = pytest.mark.vllm

GRANITE_TINY = Mamba2Spec(num_heads=48, head_dim=64, num_groups=1, state_size=128,
                          conv_dtype="bfloat16", ssm_dtype="float32")
SHARDED_FAMILIES = ("mamba2", "gdn", "mamba1")


def vllm_fits(spec) -> object:
    """`spec` changed only where vLLM cannot hold it: Mamba1 keeps no speculative rows
    (same conv rows, as conv_kernel)."""
    if isinstance(spec, Mamba1Spec) and spec.spec_tokens:
        return dataclasses.replace(spec, conv_kernel=spec.conv_rows + 1, spec_tokens=0)
    return spec


@st.composite
def vllm_layout_cases(draw, *, max_tp: int = 16, layouts=("DS", "SD")):
    """`(spec, tp)` of a layout vLLM builds: Mamba2 groups sharded or replicated, GDN
    key heads sharded, Mamba1 without speculative rows."""
    tp = draw(st.integers(1, max_tp))
    family = draw(st.sampled_from(SHARDED_FAMILIES))
    spec = draw(specs(tps=(tp,), families=(family,), layouts=layouts,
                      replication=family == "mamba2"))
    return vllm_fits(spec), tp


@st.composite
def vllm_transfer_cases(draw):
    """`(spec, src_tp, dst_tp)` where vLLM's preconditions hold."""
    spec, src_tp, dst_tp = draw(transfer_cases(max_tp=16, divisible=True, replication=False,
                                               layouts=("DS",), families=SHARDED_FAMILIES))
    return vllm_fits(spec), src_tp, dst_tp


@st.composite
def single_group_cases(draw):
    """`(Mamba2 spec with n_groups=1, src_tp, dst_tp)`, TP sizes different and divisible."""
    src_tp = draw(st.integers(1, 8))
    dst_tp = draw(st.sampled_from([d for d in range(1, 9)
                                   if d != src_tp and (d % src_tp == 0 or src_tp % d == 0)]))
    spec = draw(specs(tps=(src_tp, dst_tp), families=("mamba2",), layouts=("DS",),
                      replication=True, max_groups=1))
    return spec, src_tp, dst_tp


def byte_sources(reads, dst_nbytes: int) -> np.ndarray:
    """Per dst byte, `src_rank * 2**40 + src byte` copied there (-1: none); a dst byte
    written twice fails."""
    sources = np.full(dst_nbytes, -1, dtype=np.int64)
    for read in reads:
        target = sources[read.dst_offset: read.dst_end]
        assert len(target) == read.nbytes and (target == -1).all(), f"{read} overlaps or overflows"
        target[:] = read.src_rank * 2**40 + np.arange(read.src_offset, read.src_end)
    return sources


# -- lazy imports ------------------------------------------------------------------------------

def test_core_and_integration_modules_import_no_vllm_or_torch():
    code = ("import sys, ssm_split, ssm_split.integrations.vllm, ssm_split.integrations._vllm_check\n"
            "from ssm_split.cli._main import build_parser; build_parser()\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'torch'))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# -- shapes ------------------------------------------------------------------------------------

def vllm_shapes(spec, tp: int):
    calc = vllm_mamba.MambaStateShapeCalculator
    extra = (spec.spec_tokens,) if getattr(spec, "spec_tokens", 0) else ()
    with sv.vllm_conv_layout_set(spec.conv_layout):
        if isinstance(spec, Mamba2Spec):
            return calc.mamba2_state_shape(tp, spec.num_heads * spec.head_dim, spec.num_groups,
                                           spec.num_heads, spec.head_dim, spec.state_size,
                                           spec.conv_kernel, *extra)
        if isinstance(spec, GDNSpec):
            return calc.gated_delta_net_state_shape(tp, spec.num_k_heads, spec.num_v_heads,
                                                    spec.head_k_dim, spec.head_v_dim,
                                                    spec.conv_kernel, *extra)
        return calc.mamba1_state_shape(tp, spec.intermediate_size, spec.state_size, spec.conv_kernel)


@given(case=vllm_layout_cases())
@example(case=(ssm_split.model("nemotron-h-8b"), 8))  # vllm.md §8: ((1280, 3), (16, 64, 128))
@example(case=(dataclasses.replace(GRANITE_TINY, conv_layout="SD"), 4))
@example(case=(Mamba2Spec(num_heads=4, head_dim=1, num_groups=2, state_size=3, spec_tokens=2), 4))
def test_sharded_shapes_equal_vllms_shape_calculator(case):
    spec, tp = case
    assert tuple(sharded_shapes(spec, tp)) == tuple(tuple(s) for s in vllm_shapes(spec, tp))


def test_nemotron_h_8b_tp8_shapes_are_the_published_ones():
    assert vllm_shapes(ssm_split.model("nemotron-h-8b"), 8) == ((1280, 3), (16, 64, 128))


# -- specs from vLLM ---------------------------------------------------------------------------

def hints(spec) -> dict:
    """The hf_config fields that settle every ambiguity."""
    if isinstance(spec, Mamba2Spec):
        return {"n_groups": spec.num_groups, "conv_kernel": spec.conv_kernel}
    if isinstance(spec, GDNSpec):
        return {"linear_num_key_heads": spec.num_k_heads, "linear_conv_kernel_dim": spec.conv_kernel}
    return {"mamba_d_conv": spec.conv_kernel}


def one_unit_per_rank(spec, tp: int) -> bool:
    units = {Mamba2Spec: "num_groups", GDNSpec: "num_k_heads"}.get(type(spec))
    return units is not None and tp > 1 and sharded_units(spec, tp) == 1


def sharded_units(spec, tp: int) -> int:
    total = spec.num_groups if isinstance(spec, Mamba2Spec) else spec.num_k_heads
    return total // tp if total % tp == 0 else 1


@given(case=vllm_layout_cases())
@example(case=(GRANITE_TINY, 2))
@example(case=(GDNSpec(num_k_heads=2, num_v_heads=4, head_k_dim=3, head_v_dim=1, spec_tokens=1), 2))
def test_spec_from_vllm_round_trips_through_a_real_mamba_spec(case):
    spec, tp = case
    mamba_spec = sv.to_vllm_mamba_spec(spec, tp)
    assert isinstance(mamba_spec, vllm.v1.kv_cache_interface.MambaSpec)
    assert sv.spec_from_vllm(mamba_spec, tp, hints(spec), conv_layout=spec.conv_layout) == spec
    legacy = dataclasses.replace(mamba_spec, mamba_type={"mamba2": "mamba2", "gdn": "gdn_attention",
                                                          "mamba1": "mamba1"}[spec.family])
    assert sv.spec_from_vllm(legacy, tp, hints(spec), conv_layout=spec.conv_layout) == spec
    if one_unit_per_rank(spec, tp):  # sharded or replicated: only the config can tell
        with pytest.raises(SpecError, match="ambiguous.*hf_config"):
            sv.spec_from_vllm(mamba_spec, tp, conv_layout=spec.conv_layout)
    else:  # kernel and speculative rows from num_speculative_blocks
        assert sv.spec_from_vllm(mamba_spec, tp, conv_layout=spec.conv_layout) == spec


def test_spec_from_vllm_takes_a_transformers_config_and_vllms_own_layout():
    from transformers import PretrainedConfig

    mamba_spec = sv.to_vllm_mamba_spec(GRANITE_TINY, 4)
    config = PretrainedConfig(mamba_n_groups=1, mamba_d_state=128, mamba_d_conv=4)
    with sv.vllm_conv_layout_set("DS"):
        assert sv.vllm_conv_layout() == "DS"
        assert sv.spec_from_vllm(mamba_spec, 4, config) == GRANITE_TINY
    with sv.vllm_conv_layout_set("SD"):  # read as SD, the DS shapes fit no Mamba2 spec
        with pytest.raises(SpecError, match="conv_layout"):
            sv.spec_from_vllm(mamba_spec, 4, config)


def test_spec_from_vllm_rejects_what_it_cannot_read():
    mamba_spec = sv.to_vllm_mamba_spec(GRANITE_TINY, 2)
    with pytest.raises(SpecError, match="n_groups.*=3 does not fit"):
        sv.spec_from_vllm(mamba_spec, 2, {"n_groups": 3}, conv_layout="DS")
    with pytest.raises(SpecError, match="state size"):
        sv.spec_from_vllm(mamba_spec, 2, {"n_groups": 1, "ssm_state_size": 64}, conv_layout="DS")
    with pytest.raises(SpecError, match="mamba_type"):
        sv.spec_from_vllm(dataclasses.replace(mamba_spec, mamba_type="kda"), 2, conv_layout="DS")
    with pytest.raises(SpecError, match="tp_replicated"):
        sv.spec_from_vllm(dataclasses.replace(mamba_spec, tp_replicated=True), 2, conv_layout="DS")
    ring = dataclasses.replace(mamba_spec, shapes=(*mamba_spec.shapes, (24, 8)),
                               dtypes=(*mamba_spec.dtypes, torch.float32))
    with pytest.raises(SpecError, match="ReplaySSM"):
        sv.spec_from_vllm(ring, 2, conv_layout="DS")
    fp8 = dataclasses.replace(mamba_spec, dtypes=(torch.float8_e4m3fn, torch.float32))
    with pytest.raises(SpecError, match="dtype"):
        sv.spec_from_vllm(fp8, 2, {"n_groups": 1}, conv_layout="DS")
    with pytest.raises(SpecError, match="key heads"):
        sv.to_vllm_mamba_spec(GDNSpec(num_k_heads=1, num_v_heads=4, head_k_dim=2, head_v_dim=2), 2)


def preset_config(name: str) -> dict:
    text = resources.files("ssm_split.specs").joinpath("data", f"{name}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


CONFIG_CASES = [(name, tp, dtype, ssm) for name in ("granite-4.0-h-tiny", "nemotron-h-8b",
                                                    "qwen3.5-0.8b", "jamba-v0.1", "falcon-h1-7b")
                for tp, dtype, ssm in ((1, "bfloat16", "auto"), (2, "float16", "float32"),
                                       (4, "bfloat16", "float32"))]


@pytest.mark.parametrize("name, tp, model_dtype, ssm_cache_dtype", CONFIG_CASES)
def test_spec_from_vllm_config_follows_vllms_shapes_and_dtypes(name, tp, model_dtype, ssm_cache_dtype):
    vllm_config = types.SimpleNamespace(
        model_config=types.SimpleNamespace(hf_config=preset_config(name), dtype=getattr(torch, model_dtype)),
        parallel_config=types.SimpleNamespace(tensor_parallel_size=tp),
        cache_config=types.SimpleNamespace(mamba_cache_dtype="auto", mamba_ssm_cache_dtype=ssm_cache_dtype),
        num_speculative_tokens=0)
    spec = sv.spec_from_vllm_config(vllm_config, conv_layout="DS")
    preset = ssm_split.model(name)
    assert dataclasses.replace(spec, conv_dtype=preset.conv_dtype, ssm_dtype=preset.ssm_dtype) == preset
    want_dtypes = vllm_mamba.MambaStateDtypeCalculator._mamba_state_dtype(
        getattr(torch, model_dtype), "auto", ssm_cache_dtype)
    assert (getattr(torch, spec.conv_dtype), getattr(torch, spec.ssm_dtype)) == want_dtypes
    # and the per-rank MambaSpec a vLLM engine builds reads back to the same spec
    assert sv.spec_from_vllm(sv.to_vllm_mamba_spec(spec, tp), tp, preset_config(name),
                             conv_layout="DS") == spec


def test_spec_from_vllm_config_without_cache_config_keeps_the_config_dtypes():
    vllm_config = types.SimpleNamespace(
        model_config=types.SimpleNamespace(hf_config=preset_config("granite-4.0-h-tiny")),
        parallel_config=types.SimpleNamespace(tensor_parallel_size=2))
    assert sv.spec_from_vllm_config(vllm_config, conv_layout="DS") == GRANITE_TINY
    vllm_config.parallel_config.tensor_parallel_size = 5
    with pytest.raises(SpecError, match="tp=5"):
        sv.spec_from_vllm_config(vllm_config, conv_layout="DS")


# -- vLLM's own reads where its preconditions hold -------------------------------------------

def test_vllm_reads_are_vllms_published_offsets():
    # vllm-install.md, confirmed by running vLLM 0.33.0: Granite-4.0-H-Tiny, P TP1 -> D TP2
    conv = [[(r.src_offset, r.nbytes) for r in sv.vllm_reads(GRANITE_TINY, 1, 2, rank)[:3]]
            for rank in range(2)]
    assert conv == [[(0, 9216), (18432, 768), (19968, 768)], [(9216, 9216), (19200, 768), (20736, 768)]]
    # vllm.md §6: remote_conv_offsets(0, -2) for dims (20, 10, 10), 3 rows of 2 bytes
    info = vllm_ssm.MambaConvSplitInfo(3, (20, 10, 10), 2, (240, 0))
    assert info.remote_conv_offsets(0, -2) == [(0, 60), (60, 30), (90, 30)]


@given(case=vllm_transfer_cases())
@example(case=(ssm_split.model("nemotron-h-8b"), 1, 8))
@example(case=(ssm_split.model("qwen3.5-27b"), 8, 2))
@example(case=(Mamba2Spec(num_heads=8, head_dim=2, num_groups=4, state_size=2), 4, 2))
@example(case=(GDNSpec(num_k_heads=4, num_v_heads=8, head_k_dim=2, head_v_dim=3, spec_tokens=1), 2, 4))
@example(case=(Mamba1Spec(intermediate_size=8, state_size=3, ssm_dtype="float32"), 8, 1))
def test_plans_move_exactly_the_bytes_vllm_moves_where_it_is_right(case):
    spec, src_tp, dst_tp = case
    nbytes = content_nbytes(spec, dst_tp)
    for dst_rank, plan in enumerate(plan_all(spec, src_tp, dst_tp)):
        theirs = sv.vllm_reads(spec, src_tp, dst_tp, dst_rank)
        ours = byte_sources(plan.reads, nbytes)
        np.testing.assert_array_equal(byte_sources(theirs, nbytes), ours, err_msg=f"dst rank {dst_rank}")
        assert (ours >= 0).all()
        assert len(plan.reads) <= len(theirs)
        if src_tp > dst_tp:  # vLLM: each src rank fills 1/n of each of D's 4 (or 2) regions
            assert len(theirs) == (src_tp // dst_tp) * len(spec.parts)


@pytest.mark.parametrize("spec, src_tp, dst_tp, match", [
    (Mamba2Spec(num_heads=12, head_dim=2, num_groups=12, state_size=2), 4, 6, "divide"),
    (dataclasses.replace(GRANITE_TINY, conv_layout="SD"), 1, 2, "DS"),
    (ShortConvSpec(conv_dim=8), 1, 2, "Mamba1, Mamba2 and GDN"),
])
def test_vllm_reads_refuses_what_vllm_refuses(spec, src_tp, dst_tp, match):
    with pytest.raises(PlanError, match=match):
        sv.vllm_reads(spec, src_tp, dst_tp, 0)


# -- one B/C group under heterogeneous TP: vLLM wrong, ssm_split right --------------------------

def vllm_and_our_pages(spec, src_tp, dst_tp, state):
    """Per dst rank: (vLLM's page, our page, the reference page), src pages padded so
    that reads past the state land in padding (as they would land in other memory)."""
    theirs = [sv.vllm_reads(spec, src_tp, dst_tp, rank) for rank in range(dst_tp)]
    src_nbytes = max([content_nbytes(spec, src_tp)] + [r.src_end for reads in theirs for r in reads])
    src_pages = shard(spec, state, src_tp, page_nbytes=src_nbytes)
    want = shard(spec, state, dst_tp)
    return [(apply_reads(theirs[rank], src_pages, len(want[rank])),
             apply_reads(plan.reads, src_pages, len(want[rank])), want[rank])
            for rank, plan in enumerate(plan_all(spec, src_tp, dst_tp))]


def segment_bytes(page, spec, tp, rank, name):
    seg, = page_layout(spec, tp, rank).part_segments(name)
    return page[seg.offset: seg.end]


def test_granite_tiny_1_to_2_vllm_rebuilds_wrong_pages_ssm_split_right_ones():
    src_page, = shard(GRANITE_TINY, random_state(GRANITE_TINY, 11), 1)
    pages = vllm_and_our_pages(GRANITE_TINY, 1, 2, random_state(GRANITE_TINY, 11))
    for rank, (theirs, ours, want) in enumerate(pages):
        np.testing.assert_array_equal(ours, want)
        assert not np.array_equal(theirs, want)
        for name in ("conv.x", "temporal"):  # vLLM gets these right
            np.testing.assert_array_equal(*(segment_bytes(p, GRANITE_TINY, 2, rank, name) for p in (theirs, want)))
        for name in ("conv.C",) if rank == 0 else ("conv.B", "conv.C"):
            assert not np.array_equal(*(segment_bytes(p, GRANITE_TINY, 2, rank, name) for p in (theirs, want)))
    # dst rank 0's C is the first bytes of the src temporal state; dst rank 1's B is the src C
    temporal = segment_bytes(src_page, GRANITE_TINY, 1, 0, "temporal")
    np.testing.assert_array_equal(segment_bytes(pages[0][0], GRANITE_TINY, 2, 0, "conv.C"), temporal[:768])
    np.testing.assert_array_equal(segment_bytes(pages[1][0], GRANITE_TINY, 2, 1, "conv.B"),
                                  segment_bytes(src_page, GRANITE_TINY, 1, 0, "conv.C"))


@given(case=single_group_cases())
@example(case=(GRANITE_TINY, 2, 1))
@example(case=(Mamba2Spec(num_heads=2, head_dim=1, num_groups=1, state_size=1, conv_kernel=2), 1, 2))
@example(case=(Mamba2Spec(num_heads=8, head_dim=1, num_groups=1, state_size=2), 8, 2))
def test_single_group_hetero_tp_breaks_vllm_but_not_ssm_split(case):
    spec, src_tp, dst_tp = case
    wrong = []
    for state in (iota_state(spec), random_state(spec, 5)):
        pages = vllm_and_our_pages(spec, src_tp, dst_tp, state)
        for theirs, ours, want in pages:
            np.testing.assert_array_equal(ours, want)
        wrong.append(any(not np.array_equal(theirs, want) for theirs, _, want in pages))
    assert any(wrong)


# -- connector helpers -------------------------------------------------------------------------

@given(case=vllm_transfer_cases())
def test_connector_read_offsets_are_the_plans_reads_by_src_rank(case):
    spec, src_tp, dst_tp = case
    for plan in plan_all(spec, src_tp, dst_tp):
        pairs = sv.connector_read_offsets(plan)
        assert tuple(p.src_rank for p in pairs) == plan.src_ranks
        for p in pairs:
            reads = plan.reads_from(p.src_rank)
            assert p.local_offsets == tuple((r.dst_offset, r.nbytes) for r in reads)
            assert p.remote_offsets == tuple((r.src_offset, r.nbytes) for r in reads)


@st.composite
def memory_cases(draw):
    spec, src_tp, dst_tp = draw(transfer_cases(max_tp=4))
    num_blocks = draw(st.integers(1, 4))
    dst_blocks = draw(st.permutations(range(num_blocks)))
    src_blocks = draw(st.permutations(range(num_blocks)))
    return (spec, src_tp, dst_tp, draw(st.integers(0, dst_tp - 1)), dst_blocks, src_blocks,
            draw(paddings()), draw(st.integers(1, 64)))


@given(case=memory_cases())
def test_block_descriptors_copy_whole_pages_between_padded_strided_memories(case):
    """Two layers per side in one buffer each; the dst pages are padded as a vLLM
    MambaSpec's `page_size_padded`, the src ones split into kernel blocks of `block_len`;
    applying the descriptors gives every dst block its reference page, padding untouched."""
    spec, src_tp, dst_tp, dst_rank, dst_blocks, src_blocks, pad, block_len = case
    plan = plan_reads(spec, src_tp, dst_tp, dst_rank)
    dst_stride = plan.dst_content_nbytes + pad  # = MambaSpec(page_size_padded=...).page_size_bytes
    src_stride = sv.page_stride_nbytes(block_len, plan.src_content_nbytes)
    num_blocks, base, layers = len(dst_blocks), 4096, 2
    states = {(layer, b): random_state(spec, 100 * layer + b) for layer in range(layers) for b in range(num_blocks)}
    src_memory = [np.full(base + layers * num_blocks * src_stride, 0x5A, dtype=np.uint8) for _ in range(src_tp)]
    for (layer, b), state in states.items():
        for rank, page in enumerate(shard(spec, state, src_tp)):
            start = base + layer * num_blocks * src_stride + b * src_stride
            src_memory[rank][start: start + len(page)] = page
    dst_memory = np.full(base + layers * num_blocks * dst_stride, 0xA5, dtype=np.uint8)
    found = sv.block_descriptors(
        plan, dst_blocks, src_blocks,
        dst_base_addrs=[base + layer * num_blocks * dst_stride for layer in range(layers)],
        dst_page_stride_nbytes=dst_stride,
        src_base_addrs={rank: [base + layer * num_blocks * src_stride for layer in range(layers)]
                        for rank in range(src_tp)},
        src_page_stride_nbytes=src_stride)
    assert tuple(d.src_rank for d in found) == plan.src_ranks
    for desc in found:
        assert len(desc.local) == len(desc.remote) == layers * len(plan.reads_from(desc.src_rank)) * num_blocks
        for (dst_addr, n), (src_addr, m) in zip(desc.local, desc.remote):
            assert n == m
            dst_memory[dst_addr: dst_addr + n] = src_memory[desc.src_rank][src_addr: src_addr + m]
    expected = np.full_like(dst_memory, 0xA5)
    for layer in range(layers):
        for dst_block, src_block in zip(dst_blocks, src_blocks):
            page = shard(spec, states[layer, src_block], dst_tp)[dst_rank]
            start = base + layer * num_blocks * dst_stride + dst_block * dst_stride
            expected[start: start + len(page)] = page
    np.testing.assert_array_equal(dst_memory, expected)


def test_strided_descriptors_expand_to_the_block_descriptors():
    plan = plan_reads(GRANITE_TINY, 2, 4, 3)
    stride = sv.to_vllm_mamba_spec(GRANITE_TINY, 4, page_size_padded=plan.dst_content_nbytes + 512).page_size_bytes
    src_stride = sv.page_stride_nbytes(8192, plan.src_content_nbytes)
    kwargs = dict(dst_base_addrs=[1 << 20, 1 << 30], dst_page_stride_nbytes=stride,
                  src_base_addrs=[[0, 0], [1 << 21, 1 << 31]], src_page_stride_nbytes=src_stride)
    rows = sv.strided_descriptors(plan, dst_num_blocks=5, src_num_blocks=5, dst_device_id=3,
                                  src_device_ids=[0, 7], **kwargs)
    by_block = {b: sv.block_descriptors(plan, [b], [b], **kwargs) for b in range(5)}
    assert set(rows) == set(plan.src_ranks) == {1}
    local, remote = rows[1]
    assert local.shape == remote.shape == (2 * len(plan.reads), 5)
    assert (local[:, 2] == 3).all() and (remote[:, 2] == 7).all() and (local[:, 4] == 5).all()
    for b in range(5):
        desc, = by_block[b]
        assert [(int(a + b * s), int(n)) for a, n, _, s, _ in local] == list(desc.local)
        assert [(int(a + b * s), int(n)) for a, n, _, s, _ in remote] == list(desc.remote)


@given(conv=st.integers(1, 1 << 20), temporal=st.integers(1, 1 << 24), block_len=st.integers(1, 1 << 16))
@example(conv=36864, temporal=2097152, block_len=8192)  # Nemotron-Nano-30B TP1: 261 blocks
def test_page_stride_uses_vllms_physical_blocks_per_logical(conv, temporal, block_len):
    ratio = vllm_ssm.compute_physical_blocks_per_logical((conv, temporal), block_len)
    assert sv.page_stride_nbytes(block_len, conv + temporal) == ratio * block_len
    assert sv.page_stride_nbytes(block_len, conv + temporal, ratio + 1) == (ratio + 1) * block_len
    if ratio > 1:
        with pytest.raises(PlanError, match="cannot hold"):
            sv.page_stride_nbytes(block_len, conv + temporal, ratio - 1)


def test_descriptor_helpers_reject_bad_geometry():
    plan = plan_reads(GRANITE_TINY, 1, 2, 0)
    good = dict(dst_base_addrs=[0], dst_page_stride_nbytes=plan.dst_content_nbytes,
                src_base_addrs=[[0]], src_page_stride_nbytes=plan.src_content_nbytes)
    with pytest.raises(PlanError, match="smaller than"):
        sv.block_descriptors(plan, [0], [0], **{**good, "src_page_stride_nbytes": 100})
    with pytest.raises(PlanError, match="no entry for src rank 0"):
        sv.block_descriptors(plan, [0], [0], **{**good, "src_base_addrs": {}})
    with pytest.raises(ssm_split.errors.BlockRangeError):
        sv.block_descriptors(plan, [0, 1], [0], **good)
    with pytest.raises(PlanError, match="Plan"):
        sv.connector_read_offsets(plan.reads)


# -- ssm-split vllm-check ----------------------------------------------------------------------

def marked_rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.startswith("* ")]


def test_vllm_check_granite_1_to_2_marks_vllms_wrong_reads(capsys):
    rc = main(["vllm-check", "granite-4.0-h-tiny", "--src-tp", "1", "--dst-tp", "2"])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    marked = marked_rows(out)
    # rank 0: C read from the src temporal state; rank 1: B from the src C, C from temporal
    assert [(row[1], row[-1]) for row in marked] == [("conv.C", "ssm_split"), ("conv.B", "ssm_split"),
                                                    ("conv.C", "ssm_split")]
    assert "[19968, 20736) temporal" in " ".join(marked[0])
    assert "[19200, 19968) conv.C" in " ".join(marked[1])
    assert "vLLM's reads give wrong pages on dst ranks [0, 1]." in out
    assert "ssm_split's reads give the reference pages on every dst rank checked." in out


def test_vllm_check_agrees_where_vllm_is_right(capsys):
    rc = main(["vllm-check", "nemotron-h-8b", "--src-tp", "4", "--dst-tp", "2", "--rank", "1"])
    out, _ = capsys.readouterr()
    assert rc == 0 and marked_rows(out) == []
    assert "vLLM's reads give the reference pages on every dst rank checked." in out


def test_vllm_check_reports_what_vllm_refuses(capsys):
    rc = main(["vllm-check", "lfm2-1.2b", "--src-tp", "1", "--dst-tp", "2"])
    out, _ = capsys.readouterr()
    assert rc == 0 and "vLLM refuses this transfer" in out and "dst rank 1 of tp=2" in out


@given(case=single_group_cases())
def test_check_rank_rows_tile_the_page_and_judge_by_the_reference(case):
    spec, src_tp, dst_tp = case
    state = random_state(spec, 3)
    theirs = [sv.vllm_reads(spec, src_tp, dst_tp, r) for r in range(dst_tp)]
    src_nbytes = max([content_nbytes(spec, src_tp)] + [r.src_end for reads in theirs for r in reads])
    src_pages, want = shard(spec, state, src_tp, page_nbytes=src_nbytes), shard(spec, state, dst_tp)
    for rank in range(dst_tp):
        check = check_rank(spec, src_tp, dst_tp, rank, theirs[rank], src_pages, want[rank])
        assert check.rows[0].dst_offset == 0
        assert all(a.dst_offset + a.nbytes == b.dst_offset for a, b in zip(check.rows, check.rows[1:]))
        assert sum(r.nbytes for r in check.rows) == len(want[rank])
        assert check.ours_right and all(r.ours is not None for r in check.rows)
        got = apply_reads(theirs[rank], src_pages, len(want[rank]))
        assert check.vllm_right == np.array_equal(got, want[rank])
        assert all(row.differs for row in check.rows if not row.vllm_right)
