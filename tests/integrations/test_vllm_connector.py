"""The vLLM connector helpers on examples and bad input (no vLLM needed; torch only where
a test says so): the same errors as `expand_plan`, `(src, dst)` order, vLLM's kernel-block
geometry, and `RegionSet`s from state tensors laid out as vLLM lays them out."""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest

import ssm_split
from ssm_split import Mamba2Spec, PlanError, RegionSet, SpecError, expand_plan, plan_reads
from ssm_split.errors import BlockRangeError
from ssm_split.integrations import vllm as sv

GRANITE = Mamba2Spec(num_heads=48, head_dim=64, num_groups=1, state_size=128)  # bf16 state
PLAN = plan_reads(GRANITE, 1, 2, 1)
DST_PAGE, SRC_PAGE = 409600, 819200  # page_size_padded at TP2 and TP1 (CUDA, FLASH_ATTN)
GOOD = dict(src_base_addrs={0: [0x7E0000000000]}, src_page_stride_nbytes=SRC_PAGE, src_num_blocks=8,
            dst_base_addrs=[0x7F0000000000], dst_page_stride_nbytes=DST_PAGE, dst_num_blocks=8)


def test_pairs_are_src_then_dst_and_land_on_those_pages():
    expansion = sv.block_descriptors(PLAN, [(3, 7)], **GOOD)
    part, = expansion.ranks
    assert part.src_rank == 0
    # two reads: x | B | C, then the temporal heads 24..47 (bf16: 393216 bytes)
    assert part.dst_descs[:, :2].tolist() == [[0x7F0000000000 + 7 * DST_PAGE, 10752],
                                              [0x7F0000000000 + 7 * DST_PAGE + 10752, 393216]]
    assert part.src_descs[:, :2].tolist() == [[0x7E0000000000 + 3 * SRC_PAGE + 9216, 10752],
                                              [0x7E0000000000 + 3 * SRC_PAGE + 413184, 393216]]
    assert sv.pair_blocks([3, 4], [7, 1]).tolist() == [[3, 7], [4, 1]]


def test_lists_arrays_and_tensors_of_block_ids_give_the_same_descriptors():
    torch = pytest.importorskip("torch")
    forms = [[(3, 7), (0, 2)], np.array([[3, 7], [0, 2]], dtype=np.uint32),
             torch.tensor([[3, 7], [0, 2]]), sv.pair_blocks(torch.tensor([3, 0]), np.array([7, 2]))]
    results = [sv.block_descriptors(PLAN, pairs, **GOOD).ranks[0] for pairs in forms]
    for other in results[1:]:
        np.testing.assert_array_equal(other.dst_descs, results[0].dst_descs)
        np.testing.assert_array_equal(other.src_descs, results[0].src_descs)
    with_layers = sv.block_descriptors(PLAN, [(3, 7)], layers=torch.tensor([0]), **GOOD)
    assert with_layers.num_descriptors == 2


BAD = [  # (pairs, changes to GOOD, error class, phrase): each also checked against expand_plan
    ([(0, 1), (2, 1)], {}, PlanError, r"dst block 1 appears twice"),
    ([(8, 1)], {}, BlockRangeError, r"src rank 0 block id 8 is out of range .* 8 blocks"),
    ([(0, 9)], {}, BlockRangeError, r"dst block id 9 is out of range"),
    ([(-1, 0)], {}, BlockRangeError, r"block id -1 is out of range"),
    ([(2**70, 0)], {}, PlanError, r"block_pairs must be an integer array"),
    ([(0.0, 1.0)], {}, PlanError, r"block_pairs must be an integer array .* float64"),
    ([0, 1], {}, PlanError, r"shape \(N, 2\)"),
    ([(0, 1)], {"dst_base_addrs": [-5]}, PlanError, r"base_addr must be an int >= 0, got -5"),
    ([(0, 1)], {"dst_base_addrs": [2**70]}, PlanError, r"end past 2\*\*64"),
    ([(0, 1)], {"src_base_addrs": {0: [2**64 - 4096]}}, PlanError, r"end past 2\*\*64"),
    ([(0, 1)], {"src_base_addrs": {0: [4096.0]}}, PlanError, r"base_addr must be an int >= 0, got 4096.0"),
    ([(0, 1)], {"src_page_stride_nbytes": 10000}, PlanError, r"smaller than the plan's src rank 0 content of 806400 bytes"),
    ([(0, 1)], {"dst_page_stride_nbytes": 8192}, PlanError, r"smaller than the plan's dst content"),
]


def as_region_sets(kw):
    src = {r: RegionSet.strided(b, page_nbytes=kw["src_page_stride_nbytes"],
                                page_stride_nbytes=kw["src_page_stride_nbytes"], num_blocks=kw["src_num_blocks"])
           for r, b in kw["src_base_addrs"].items()}
    dst = RegionSet.strided(kw["dst_base_addrs"], page_nbytes=kw["dst_page_stride_nbytes"],
                            page_stride_nbytes=kw["dst_page_stride_nbytes"], num_blocks=kw["dst_num_blocks"])
    return src, dst


@pytest.mark.parametrize("pairs, changes, error, match", BAD)
def test_bad_input_is_refused_as_expand_plan_refuses_it(pairs, changes, error, match):
    kw = GOOD | changes
    with pytest.raises(error, match=match) as ours:
        sv.block_descriptors(PLAN, pairs, **kw)
    with pytest.raises(error, match=match):
        sv.strided_descriptors(PLAN, **kw) if changes else sv.block_descriptors(PLAN, pairs, **kw)
    try:  # the core, on the same memory: the same class and message
        expand_plan(PLAN, *as_region_sets(kw), pairs)
    except PlanError as core:
        assert (type(core), str(core)) == (type(ours.value), str(ours.value))
    else:
        pytest.fail("expand_plan accepted what block_descriptors refused")


@pytest.mark.parametrize("changes, match", [
    ({"src_base_addrs": [0x7E0000000000]}, r"`src_base_addrs\[0\]` is 138538465099776, not a list of region addresses"),
    ({"src_base_addrs": {1: [0]}}, r"`src_base_addrs` has no entry for src rank 0"),
    ({"src_device_ids": {1: 0}}, r"`src_device_ids` has no entry for src rank 0"),
    ({"dst_num_blocks": [8, 8]}, r"`num_blocks` has 2 entries for 1 layers"),
])
def test_per_rank_arguments_name_what_is_missing(changes, match):
    with pytest.raises(PlanError, match=match):
        sv.block_descriptors(PLAN, [(0, 1)], **(GOOD | changes))


def test_pair_blocks_needs_two_lists_of_one_length():
    with pytest.raises(BlockRangeError, match=r"\(2,\) src block ids but \(1,\) dst block ids"):
        sv.pair_blocks([1, 2], [3])
    with pytest.raises(BlockRangeError, match=r"1-D lists of equal length"):
        sv.pair_blocks([[1, 2]], [[3, 4]])


def test_the_page_stride_is_the_engines_ratio_not_a_ceil():
    # Qwen3.5-4B TP2, --block-size 64, kernel block 16: 576 tokens per block, 36 kernel
    # blocks of 32768 bytes; the state (1073152 bytes) would round up to 33 of them
    assert sv.page_stride_nbytes(32768, 36) == 1179648
    regions = sv.region_set_from_vllm_handshake([1 << 30, (1 << 30) + 5 * 1179648], block_stride_nbytes=32768,
                                                num_blocks=5 * 36, physical_blocks_per_logical=36)
    assert [(r.page_stride_nbytes, r.num_blocks) for r in regions.layers] == [(1179648, 5)] * 2
    with pytest.raises(PlanError, match=r"`num_blocks`=170 kernel blocks is not a whole number of logical blocks of 36"):
        sv.region_set_from_vllm_handshake([1 << 30], block_stride_nbytes=32768, num_blocks=170,
                                          physical_blocks_per_logical=36)
    for bad in (0, True, 36.0):
        with pytest.raises(PlanError, match=r"`physical_blocks_per_logical` must be an int >= 1"):
            sv.page_stride_nbytes(32768, bad)


def test_regions_from_state_tensors_laid_out_as_vllm_lays_them_out():
    pytest.importorskip("torch")
    page, content = 409600, 403968  # Granite TP2: bf16 conv 10752 + temporal 393216, padded
    buffer, views = sv.allocate_vllm_state(page_nbytes=page, content_nbytes=content, num_slots=4, num_blocks=3)
    # groups alias the slots: layers 0..3 (group 0) and 4..7 (group 1) share them
    kv_caches = {f"model.layers.{i}.mixer": views[i % 4] for i in range(8)}
    regions = sv.region_set_from_vllm(kv_caches)
    slots = sv.vllm_layer_slots(kv_caches)
    assert regions.num_layers == 4 and slots["model.layers.5.mixer"] == 1
    assert regions.buffers == (ssm_split.Buffer(buffer.data_ptr(), 4 * 3 * page),)
    for slot, region in enumerate(regions.layers):
        assert (region.base_addr, region.page_nbytes, region.page_stride_nbytes, region.num_blocks) == (
            buffer.data_ptr() + slot * 3 * page, page, page, 3)
        assert views[slot][2].data_ptr() == regions.page_addr(slot, 2)
    # a bound layer's (conv, temporal) views give the same region
    import torch

    conv_view = torch.as_strided(buffer.view(torch.bfloat16), (3, 1792, 3), (page // 2, 3, 1), 3 * page // 2)
    temporal = torch.as_strided(buffer.view(torch.bfloat16), (3, 24, 64, 128), (page // 2, 8192, 128, 1),
                                (3 * page + 10752) // 2)
    assert sv.region_set_from_vllm([(conv_view, temporal)]).layers[0] == regions.layers[1]
    shifted = torch.as_strided(buffer, (3, 10), (page, 1), 3 * page + 12)
    with pytest.raises(PlanError, match=r"second state view does not follow the first"):
        sv.region_set_from_vllm([(conv_view, shifted)])


def test_regions_from_tensors_refuse_what_is_not_vllms_memory():
    torch = pytest.importorskip("torch")
    _, views = sv.allocate_vllm_state(page_nbytes=512, content_nbytes=300, num_slots=2, num_blocks=4)
    def mamba_spec(page_size_padded):  # a Mamba1 MambaSpec's fields: 60 + 144 state bytes
        return types.SimpleNamespace(shapes=((10, 3), (4, 9)), dtypes=(torch.bfloat16, torch.float32),
                                     mamba_type="mamba1", page_size_padded=page_size_padded)

    assert sv.region_set_from_vllm(views, mamba_spec(512)).num_layers == 2
    with pytest.raises(PlanError, match=r"page_size_padded=200 must be None or an int >= the 204 bytes"):
        sv.region_set_from_vllm(views, mamba_spec(200))
    with pytest.raises(PlanError, match=r"pages are 512 bytes apart, but the MambaSpec's page is 1024"):
        sv.region_set_from_vllm(views, mamba_spec(1024))
    with pytest.raises(SpecError, match=r"mamba_type None is not a state"):
        sv.region_set_from_vllm(views, types.SimpleNamespace(shapes=((10, 3), (4, 9)), dtypes=("bfloat16",) * 2))
    with pytest.raises(PlanError, match=r"must map layer names to tensors"):
        sv.region_set_from_vllm(views[0].data_ptr())
    with pytest.raises(PlanError, match=r"kv_caches\['a'\] must be a torch tensor"):
        sv.region_set_from_vllm({"a": np.zeros(4)})
    with pytest.raises(PlanError, match=r"`kv_caches` is empty"):
        sv.region_set_from_vllm({})
    alias = torch.as_strided(views[0], (2, 1, 1, 300), (512, 300, 300, 1), views[0].storage_offset())
    with pytest.raises(PlanError, match=r"aliased layers must share their geometry"):
        sv.region_set_from_vllm([views[0], alias])
    with pytest.raises(PlanError, match=r"cannot hold"):
        sv.allocate_vllm_state(page_nbytes=100, content_nbytes=300, num_slots=1, num_blocks=1)


def test_the_integration_imports_neither_vllm_nor_torch():
    code = ("import sys, ssm_split, ssm_split.integrations.vllm, ssm_split.integrations._vllm_check\n"
            "from ssm_split.cli._main import build_parser; build_parser()\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'torch'))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
