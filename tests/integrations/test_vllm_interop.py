"""ssm_split against the REAL vLLM: examples (properties are in tests/properties/).

- real `MambaSpec`s: malformed ones get the same typed errors as the stand-ins;
- `conv_layout=None` follows vLLM's cached `get_conv_state_layout()` and never fills it;
- `spec_from_vllm_config` follows vLLM's dtype rule;
- vLLM's published reads, what it refuses, and the Granite 1 -> 2 pages it gets wrong;
- `region_set_from_vllm` on memory allocated by vLLM's own KV-cache planning and views
  (`get_kv_cache_config_from_groups`, `create_kv_cache_views`, `MambaBase.bind_kv_cache`),
  and `allocate_vllm_state` laying memory out exactly as they do.
"""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

import ssm_split
from ssm_split import GDNSpec, Mamba2Spec, PlanError, ShortConvSpec, SpecError
from ssm_split.reference import random_state, shard

from tests._vllm import importing_vllm

with importing_vllm():
    import torch
    import vllm  # noqa: F401
    from vllm.distributed.kv_transfer.kv_connector.v1 import ssm_conv_transfer_utils as vllm_ssm
    from vllm.model_executor.layers.mamba import mamba_utils as vllm_mamba
    from vllm.model_executor.layers.mamba.abstract import MambaBase
    from vllm.v1.core.kv_cache_planning import (
        _get_kv_cache_groups_uniform_page_size, get_kv_cache_config_from_groups)
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, create_kv_cache_views
    from vllm.v1.kv_cache_layout import KVCacheLayout

from ssm_split.integrations import vllm as sv  # noqa: E402
from ssm_split.integrations._vllm_check import apply_reads  # noqa: E402

pytestmark = pytest.mark.vllm

GRANITE_FP32 = Mamba2Spec(num_heads=48, head_dim=64, num_groups=1, state_size=128, ssm_dtype="float32")
GRANITE_CFG = {"mamba_n_heads": 48, "mamba_d_head": 64, "mamba_n_groups": 1, "mamba_d_state": 128,
               "mamba_d_conv": 4}


def test_nemotron_h_8b_tp8_shapes_are_the_published_ones():
    with sv.vllm_conv_layout_set("DS"):
        shapes = vllm_mamba.MambaStateShapeCalculator.mamba2_state_shape(8, 8192, 8, 128, 64, 128, 4)
    assert shapes == ((1280, 3), (16, 64, 128))
    assert ssm_split.layout.sharded_shapes(ssm_split.model("nemotron-h-8b"), 8) == shapes


@pytest.mark.parametrize("changes, match", [
    ({"shapes": ((1792.0, 3), (24, 64, 128))}, r"shapes\[0\]\[0\] is 1792.0 \(float\)"),
    ({"shapes": None}, r"MambaSpec.shapes must be a sequence"),
    ({"num_speculative_blocks": 5}, r"rows - num_speculative_blocks"),
    ({"dtypes": (torch.float8_e4m3fn, torch.float32)}, r"conv dtype torch.float8_e4m3fn is not one"),
    ({"tp_replicated": True}, r"tp_replicated"),
    ({"mamba_type": vllm_mamba.MambaAttentionBackendEnum.CUSTOM}, r"is not a state ssm_split knows"),
])
def test_malformed_real_mamba_specs_get_typed_errors(changes, match):
    mamba_spec = dataclasses.replace(sv.to_vllm_mamba_spec(GRANITE_FP32, 2), **changes)
    with pytest.raises(SpecError, match=match):
        sv.spec_from_vllm(mamba_spec, 2, GRANITE_CFG, conv_layout="DS")
    ring = sv.to_vllm_mamba_spec(GRANITE_FP32, 2)
    ring = dataclasses.replace(ring, shapes=(*ring.shapes, (24, 8), (24,), (24, 8)),
                               dtypes=(*ring.dtypes, torch.bfloat16, torch.float32, torch.bfloat16))
    with pytest.raises(SpecError, match="ReplaySSM"):
        sv.spec_from_vllm(ring, 2, GRANITE_CFG, conv_layout="DS")


def test_conv_layout_none_is_vllms_cached_layout_and_never_fills_the_cache(monkeypatch):
    from transformers import PretrainedConfig

    mamba_spec = sv.to_vllm_mamba_spec(GRANITE_FP32, 4)  # DS shapes
    config = PretrainedConfig(**GRANITE_CFG)
    with sv.vllm_conv_layout_set("DS"):
        assert vllm_mamba.get_conv_state_layout() == "DS"  # vLLM decided: DS
        monkeypatch.setenv("VLLM_SSM_CONV_STATE_LAYOUT", "SD")  # too late for vLLM
        assert sv.vllm_conv_layout() == "DS"
        assert sv.spec_from_vllm(mamba_spec, 4, config).conv_layout == "DS"
    # nothing cached: the variable, by vLLM's rule, and the cache stays empty
    vllm_mamba.get_conv_state_layout.cache_clear()
    monkeypatch.setenv("VLLM_SSM_CONV_STATE_LAYOUT", "SD")
    with pytest.raises(SpecError, match=r"is DS-shaped .* conv_layout is 'SD' \(vLLM's layout in this process\)"):
        sv.spec_from_vllm(mamba_spec, 4, config)
    assert vllm_mamba.get_conv_state_layout.cache_info().currsize == 0
    monkeypatch.setenv("VLLM_SSM_CONV_STATE_LAYOUT", "sd")
    with pytest.raises(SpecError, match=r"not a layout vLLM accepts"):
        sv.vllm_conv_layout()
    with pytest.raises(ValueError, match=r"Invalid value 'sd'"):  # vLLM refuses it too
        vllm_mamba.get_conv_state_layout()
    vllm_mamba.get_conv_state_layout.cache_clear()


# vLLM's temporal dtype when --mamba-ssm-cache-dtype is "auto": its model hooks
# (vllm/model_executor/models/config.py) give Nemotron-H float32 (or its config's
# mamba_ssm_cache_dtype) and Qwen3.5 its text config's mamba_ssm_dtype; otherwise the
# conv dtype. Then MambaStateDtypeCalculator applies the rule.
AUTO_SSM = {"granite-4.0-h-tiny": "auto", "nemotron-h-8b": "float32", "qwen3.5-0.8b": "float32",
            "jamba-v0.1": "auto", "falcon-h1-7b": "auto"}


def preset_config(name: str) -> dict:
    import json
    from importlib import resources

    text = resources.files("ssm_split.specs").joinpath("data", f"{name}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


@pytest.mark.parametrize("name", list(AUTO_SSM))
@pytest.mark.parametrize("tp, model_dtype, ssm", [(1, "bfloat16", "auto"), (2, "float16", "float32"),
                                                  (4, "bfloat16", "bfloat16")])
def test_spec_from_vllm_config_follows_vllms_dtype_rule(name, tp, model_dtype, ssm):
    vllm_config = types.SimpleNamespace(
        model_config=types.SimpleNamespace(hf_config=preset_config(name), dtype=getattr(torch, model_dtype)),
        parallel_config=types.SimpleNamespace(tensor_parallel_size=tp),
        cache_config=types.SimpleNamespace(mamba_cache_dtype="auto", mamba_ssm_cache_dtype=ssm),
        num_speculative_tokens=0)
    spec = sv.spec_from_vllm_config(vllm_config, conv_layout="DS")
    preset = ssm_split.model(name)
    assert dataclasses.replace(spec, conv_dtype=preset.conv_dtype, ssm_dtype=preset.ssm_dtype) == preset
    hooked = AUTO_SSM[name] if ssm == "auto" else ssm
    want = vllm_mamba.MambaStateDtypeCalculator._mamba_state_dtype(getattr(torch, model_dtype), "auto", hooked)
    assert (getattr(torch, spec.conv_dtype), getattr(torch, spec.ssm_dtype)) == want
    if model_dtype == "bfloat16" and ssm == "auto":  # the preset is what vLLM holds by default
        assert spec == preset
    # the engine's own MambaSpec reads back to it, its dtypes checked against the engine's
    assert sv.spec_from_vllm(sv.to_vllm_mamba_spec(spec, tp), vllm_config=vllm_config,
                             conv_layout="DS") == spec


def test_vllm_reads_are_vllms_published_offsets():
    # vllm.md §4.1, with --mamba-ssm-cache-dtype float32: Granite-4.0-H-Tiny, P TP1 -> D TP2
    conv = [[(r.src_offset, r.nbytes) for r in sv.vllm_reads(GRANITE_FP32, 1, 2, rank)[:3]]
            for rank in range(2)]
    assert conv == [[(0, 9216), (18432, 768), (19968, 768)], [(9216, 9216), (19200, 768), (20736, 768)]]
    info = vllm_ssm.MambaConvSplitInfo(3, (20, 10, 10), 2, (240, 0))  # vllm.md §6
    assert info.remote_conv_offsets(0, -2) == [(0, 60), (60, 30), (90, 30)]


@pytest.mark.parametrize("spec, src_tp, dst_tp, match", [
    (Mamba2Spec(num_heads=12, head_dim=2, num_groups=12, state_size=2), 4, 6, "divide"),
    (dataclasses.replace(GRANITE_FP32, conv_layout="SD"), 1, 2, "DS"),
    (ShortConvSpec(conv_dim=8), 1, 2, "Mamba1, Mamba2 and GDN"),
])
def test_vllm_reads_refuses_what_vllm_refuses(spec, src_tp, dst_tp, match):
    with pytest.raises(PlanError, match=match):
        sv.vllm_reads(spec, src_tp, dst_tp, 0)
    with pytest.raises(SpecError, match="key heads"):
        sv.to_vllm_mamba_spec(GDNSpec(num_k_heads=1, num_v_heads=4, head_k_dim=2, head_v_dim=2), 2)


def test_granite_tiny_1_to_2_vllm_rebuilds_wrong_pages_ssm_split_right_ones():
    for spec in (GRANITE_FP32, ssm_split.model("granite-4.0-h-tiny")):  # fp32 and vLLM's bf16
        state = random_state(spec, 11)
        theirs = [sv.vllm_reads(spec, 1, 2, rank) for rank in range(2)]
        src_nbytes = max(r.src_end for reads in theirs for r in reads)
        src_pages, want = shard(spec, state, 1, page_nbytes=src_nbytes), shard(spec, state, 2)
        for rank in range(2):
            ours = apply_reads(ssm_split.plan_reads(spec, 1, 2, rank).reads, src_pages, len(want[rank]))
            np.testing.assert_array_equal(ours, want[rank])
            assert not np.array_equal(apply_reads(theirs[rank], src_pages, len(want[rank])), want[rank])


# -- memory allocated by vLLM's own KV-cache planning and views ----------------------------

def vllm_rank(num_mamba: int, num_attn: int, tp: int, num_blocks: int):
    """One Granite-4.0-H-Tiny rank (bf16 state) as vLLM 0.33 allocates it: its grouping,
    its KVCacheTensors, one backing buffer and `create_kv_cache_views` (the body of
    `vllm.v1.worker.utils.allocate_kv_cache`, whose module needs packages the minimal
    CPU install lacks), then each Mamba layer bound by `MambaBase.bind_kv_cache`."""
    with sv.vllm_conv_layout_set("DS"):
        shapes = vllm_mamba.MambaStateShapeCalculator.mamba2_state_shape(tp, 3072, 1, 48, 64, 128, 4)
    page = {1: 819200, 2: 409600}[tp]  # page_size_padded, CUDA FLASH_ATTN block 16
    mamba = MambaSpec(block_size=4096, shapes=shapes, dtypes=(torch.bfloat16, torch.bfloat16),
                      page_size_padded=page, mamba_type=vllm_mamba.MambaAttentionBackendEnum.MAMBA2)
    attention = FullAttentionSpec(block_size=400, num_kv_heads=4 // tp, head_size=128, dtype=torch.bfloat16)
    assert attention.page_size_bytes == mamba.page_size_bytes
    specs = {f"model.layers.{i}.mixer": mamba for i in range(num_mamba)}
    specs |= {f"model.layers.{num_mamba + i}.self_attn.attn": attention for i in range(num_attn)}
    groups = _get_kv_cache_groups_uniform_page_size(specs)
    stub = types.SimpleNamespace(
        attention_config=types.SimpleNamespace(hisparse_config=None),
        cache_config=types.SimpleNamespace(get_resolved_kv_cache_layout=lambda: KVCacheLayout.LBHNC,
                                           num_gpu_blocks_override=num_blocks,
                                           prefix_cache_retention_interval=None))
    config = get_kv_cache_config_from_groups(stub, groups, available_memory=1 << 40)
    size, = {t.size for t in config.kv_cache_tensors}
    buffer = torch.zeros(size, dtype=torch.int8)
    kv_caches = {}
    for tensor in config.kv_cache_tensors:
        spec = next(g.kv_cache_spec for g in config.kv_cache_groups if tensor.layers[0] in g.layer_names)
        views = create_kv_cache_views(buffer, spec, config.num_blocks_of(tensor), KVCacheLayout.LBHNC, tensor)
        kv_caches.update(zip(tensor.layers, views))
    layers = {}
    for name in (n for n in kv_caches if n.endswith("mixer")):
        holder = types.SimpleNamespace(get_state_shape=lambda: mamba.shapes, get_state_dtype=lambda: mamba.dtypes)
        MambaBase.bind_kv_cache(holder, kv_caches[name])
        layers[name] = holder.kv_cache
    return mamba, config, buffer, kv_caches, layers


def test_regions_from_vllms_own_allocation():
    mamba, config, buffer, kv_caches, layers = vllm_rank(num_mamba=6, num_attn=2, tp=2, num_blocks=5)
    mamba_names = list(layers)
    page_views = {n: kv_caches[n] for n in mamba_names}
    regions = sv.region_set_from_vllm(page_views, mamba)
    slots = sv.vllm_layer_slots(page_views)
    groups = [g.layer_names for g in config.kv_cache_groups if isinstance(g.kv_cache_spec, MambaSpec)]
    assert len(groups) == 3 and regions.num_layers == 2  # 3 Mamba groups alias 2 slots
    assert regions.buffers == (ssm_split.Buffer(buffer.data_ptr(), buffer.numel()),)
    assert {slots[n] for g in groups for n in g} == {0, 1}
    for name, (conv, temporal) in layers.items():
        region = regions.layers[slots[name]]
        assert (region.page_nbytes, region.page_stride_nbytes, region.num_blocks) == (409600, 409600, 5)
        for block in range(5):  # vLLM's own views: conv at the page, temporal right after
            assert conv[block].data_ptr() == regions.page_addr(slots[name], block)
            assert temporal[block].data_ptr() == conv[block].data_ptr() + 10752
    # the bound (conv, temporal) views give the same regions
    assert sv.region_set_from_vllm(layers, mamba) == regions
    # and allocate_vllm_state lays memory out exactly as vLLM does
    _, ours = sv.allocate_vllm_state(page_nbytes=409600, content_nbytes=mamba.real_page_size_bytes,
                                     num_slots=2, num_blocks=5)
    for name in mamba_names:
        theirs = kv_caches[name]
        mine = ours[slots[name]]
        assert (tuple(mine.shape), mine.stride()) == (tuple(theirs.shape), theirs.stride())
        assert mine.storage_offset() == theirs.storage_offset()
    with pytest.raises(PlanError, match=r"pages are 409600 bytes apart, but the MambaSpec's page is 819200"):
        sv.region_set_from_vllm(page_views, vllm_rank(1, 1, 1, 2)[0])
