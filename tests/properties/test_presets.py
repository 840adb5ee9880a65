"""Model presets and `from_hf_config`: every preset builds, matches vLLM's published
shapes and sizes, and bad configs fail with a typed error that says what is wrong."""

from __future__ import annotations

import copy
import dataclasses
import json
from importlib import resources

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ssm_split
from ssm_split import (
    GDNSpec,
    LinearAttentionSpec,
    Mamba1Spec,
    Mamba2Spec,
    ShortConvSpec,
    SpecError,
    from_hf_config,
    model,
    models,
    page_layout,
)
from ssm_split.errors import ShardingError
from ssm_split.specs import preset_info
from ssm_split.layout import sharded_shapes, sub_projection_widths

# The presets the project promises, with the state family each model is known to have.
EXPECTED_FAMILY = {
    "qwen3.5-0.8b": GDNSpec, "qwen3.5-4b": GDNSpec, "qwen3.5-27b": GDNSpec,
    "qwen3-next-80b-a3b": GDNSpec, "kimi-linear-48b-a3b": GDNSpec,
    "nemotron-h-8b": Mamba2Spec, "nemotron-h-56b": Mamba2Spec,
    "nemotron-3-nano-30b-a3b": Mamba2Spec, "falcon-h1-7b": Mamba2Spec,
    "falcon-h1-34b": Mamba2Spec, "granite-4.0-h-small": Mamba2Spec,
    "granite-4.0-h-tiny": Mamba2Spec, "mamba2-2.7b": Mamba2Spec,
    "jamba-v0.1": Mamba1Spec, "lfm2-1.2b": ShortConvSpec, "minimax-text-01": LinearAttentionSpec,
}


def stored_config(name: str) -> dict:
    text = resources.files("ssm_split.specs").joinpath("data", f"{name}.json").read_text("utf-8")
    return json.loads(text)


def test_the_promised_presets_exist_sorted():
    assert set(EXPECTED_FAMILY) <= set(models())
    assert list(models()) == sorted(models())


@pytest.mark.parametrize("name", sorted(EXPECTED_FAMILY))
def test_preset_builds_hashable_with_the_right_family(name):
    spec = model(name)
    assert type(spec) is EXPECTED_FAMILY[name]
    assert hash(spec) == hash(model(name))
    assert {spec: name}[model(name)] == name
    info = preset_info(name)
    assert info.spec == spec and info.family == spec.family and info.name == name
    assert 1 <= info.num_state_layers <= info.num_layers
    assert info.source, "every preset says where its values come from"
    assert page_layout(spec, 1, 0).content_nbytes > 0


@pytest.mark.parametrize("name", sorted(EXPECTED_FAMILY))
def test_hf_id_and_case_insensitive_names_give_the_same_spec(name):
    info = preset_info(name)
    assert "/" in info.hf_id
    assert model(info.hf_id) == model(name)
    assert model(info.hf_id.upper()) == model(name.upper()) == model(f"  {name}  ")
    for alias in stored_config(name).get("_hf_aliases", ()):
        assert model(alias) == model(name)


@pytest.mark.parametrize("name", sorted(EXPECTED_FAMILY))
def test_from_hf_config_on_the_stored_json_equals_the_preset(name):
    config = stored_config(name)
    assert from_hf_config(config) == model(name)
    public = {k: v for k, v in config.items() if not k.startswith("_")}
    assert from_hf_config(public) == model(name)


def test_names_are_lowercase_short_and_ids_unique():
    ids = [preset_info(n).hf_id.lower() for n in models()]
    assert len(set(ids)) == len(ids)
    for name in models():
        assert name == name.lower() and "/" not in name
        assert not name.endswith(("-instruct", "-base"))


def test_suffixed_ids_and_bare_names_resolve():
    assert model("tiiuae/Falcon-H1-7B-Base") == model("falcon-h1-7b")
    assert model("Qwen3.5-27B") == model("qwen3.5-27b")
    assert model("someorg/Qwen3.5-27B-Instruct") == model("qwen3.5-27b")


def test_unknown_name_lists_every_preset():
    with pytest.raises(SpecError, match="Unknown model 'llama-3-8b'") as caught:
        model("llama-3-8b")
    for name in models():
        assert name in str(caught.value)
    with pytest.raises(SpecError, match="must be a str"):
        model(27)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="Unknown model"):
        preset_info("")


# vLLM's published cases (tests/v1/kv_connector/unit/test_nixl_connector_hma.py, and
# vLLM 0.33.0's MambaStateShapeCalculator for Nemotron-H-8B at TP8): per-rank conv shape,
# temporal shape, sub-projection widths.
VLLM_CASES = [
    ("nemotron-h-8b", 1, (10240, 3), (128, 64, 128), (8192, 1024, 1024)),
    ("nemotron-h-8b", 4, (2560, 3), (32, 64, 128), (2048, 256, 256)),
    ("nemotron-h-8b", 8, (1280, 3), (16, 64, 128), (1024, 128, 128)),
    ("nemotron-3-nano-30b-a3b", 1, (6144, 3), (64, 64, 128), (4096, 1024, 1024)),
    ("qwen3.5-0.8b", 1, (6144, 3), (16, 128, 128), (2048, 2048, 2048)),
    ("qwen3.5-0.8b", 4, (1536, 3), (4, 128, 128), (512, 512, 512)),
    ("qwen3.5-4b", 1, (8192, 3), (32, 128, 128), (2048, 2048, 4096)),
    ("qwen3.5-27b", 1, (10240, 3), (48, 128, 128), (2048, 2048, 6144)),
    ("qwen3.5-27b", 8, (1280, 3), (6, 128, 128), (256, 256, 768)),
]


@pytest.mark.parametrize("name, tp, conv, temporal, widths", VLLM_CASES)
def test_vllm_published_shapes(name, tp, conv, temporal, widths):
    spec = model(name)
    assert sharded_shapes(spec, tp) == (conv, temporal)
    assert sub_projection_widths(spec, tp) == widths


@pytest.mark.parametrize("tp, widths, conv_nbytes, temporal_nbytes", [  # bf16 state, vLLM's default
    (1, (3072, 256, 256), 21504, 1572864),
    (2, (1536, 256, 256), 12288, 786432),
    (4, (768, 256, 256), 7680, 393216),
    (8, (384, 256, 256), 5376, 196608),
])
def test_falcon_h1_7b_replicates_its_single_group(tp, widths, conv_nbytes, temporal_nbytes):
    spec = model("falcon-h1-7b")
    assert sub_projection_widths(spec, tp) == widths
    layout = page_layout(spec, tp, tp - 1)
    assert (layout.conv_nbytes, layout.temporal_nbytes) == (conv_nbytes, temporal_nbytes)


def test_falcon_h1_7b_cannot_run_on_16_ranks():
    with pytest.raises(ShardingError, match="24 heads"):
        page_layout(model("falcon-h1-7b"), 16, 0)


# Per-layer (conv bytes, temporal bytes) per rank, from vllm.md section 5 and vLLM's
# compute_physical_blocks_per_logical test (Nemotron-Nano-30B). vllm.md assumes a float32
# Mamba2 state; vLLM 0.33 keeps float32 by default only for Nemotron-H (its config hook):
# Granite-4.0-H and Mamba2 keep the model's bfloat16, half the bytes.
VLLM_BYTES = [
    ("nemotron-3-nano-30b-a3b", 1, 36864, 2097152),
    ("nemotron-3-nano-30b-a3b", 2, 18432, 1048576),
    ("nemotron-3-nano-30b-a3b", 4, 9216, 524288),
    ("nemotron-h-8b", 1, 61440, 4194304),
    ("nemotron-h-8b", 8, 7680, 524288),
    ("nemotron-h-56b", 1, 122880, 16777216),
    ("nemotron-h-56b", 8, 15360, 2097152),
    ("mamba2-2.7b", 1, 32256, 1310720),
    ("jamba-v0.1", 1, 49152, 262144),
    ("qwen3-next-80b-a3b", 1, 49152, 1048576),  # "as Qwen3.5-4B", bf16 state
    ("granite-4.0-h-tiny", 1, 19968, 786432),
]


@pytest.mark.parametrize("name, tp, conv_nbytes, temporal_nbytes", VLLM_BYTES)
def test_vllm_published_page_sizes(name, tp, conv_nbytes, temporal_nbytes):
    layout = page_layout(model(name), tp, 0)
    assert (layout.conv_nbytes, layout.temporal_nbytes) == (conv_nbytes, temporal_nbytes)


def test_qwen35_state_is_float32_as_its_config_says():
    # vllm.md assumes a bf16 GDN state (196 608 B at TP8); the checkpoints ask for float32.
    spec = model("qwen3.5-27b")
    assert spec.ssm_dtype == "float32" and model("qwen3-next-80b-a3b").ssm_dtype == "bfloat16"
    layout = page_layout(spec, 8, 0)
    assert (layout.conv_nbytes, layout.temporal_nbytes) == (7680, 2 * 196608)


def test_granite_tiny_page_matches_the_worked_example():
    # vllm.md section 4.1: TP1 page x [0, 18432), B [18432, 19200), C [19200, 19968),
    # temporal from 19968: to 806400 with vLLM's default bf16 state (the preset), to
    # 1592832 with --mamba-ssm-cache-dtype float32 (vllm.md's numbers).
    spec = model("granite-4.0-h-tiny")
    assert spec.ssm_dtype == "bfloat16"
    for ssm_dtype, end in (("bfloat16", 806400), ("float32", 1592832)):
        segments = page_layout(dataclasses.replace(spec, ssm_dtype=ssm_dtype), 1, 0).segments
        assert [(s.name, s.offset, s.end) for s in segments] == [
            ("conv.x", 0, 18432), ("conv.B", 18432, 19200), ("conv.C", 19200, 19968),
            ("temporal", 19968, end)]


def test_falcon_h1_34b_has_two_groups():
    # vLLM PR #19924: group duplication lets Falcon-H1-34B run at TP4 instead of TP2.
    spec = model("falcon-h1-34b")
    assert spec.num_groups == 2
    assert sub_projection_widths(spec, 2) == (2048, 256, 256)
    assert sub_projection_widths(spec, 4) == (1024, 256, 256)


@pytest.mark.parametrize("name, num_state_layers, num_layers", [
    ("nemotron-h-8b", 24, 52), ("nemotron-h-56b", 54, 118),   # Nemotron-H paper
    ("nemotron-3-nano-30b-a3b", 23, 52), ("jamba-v0.1", 28, 32),
    ("qwen3.5-0.8b", 18, 24), ("qwen3.5-27b", 48, 64), ("qwen3-next-80b-a3b", 36, 48),
    ("kimi-linear-48b-a3b", 20, 27), ("lfm2-1.2b", 10, 16), ("minimax-text-01", 70, 80),
    ("falcon-h1-7b", 44, 44), ("granite-4.0-h-tiny", 36, 40), ("mamba2-2.7b", 64, 64),
])
def test_state_layer_counts(name, num_state_layers, num_layers):
    info = preset_info(name)
    assert (info.num_state_layers, info.num_layers) == (num_state_layers, num_layers)


def test_kda_and_short_conv_specs():
    assert model("kimi-linear-48b-a3b") == GDNSpec(32, 32, 128, 128, 4, "bfloat16", "float32")
    assert model("lfm2-1.2b") == ShortConvSpec(conv_dim=2048, conv_kernel=3)
    assert sharded_shapes(model("lfm2-1.2b"), 2) == ((1024, 2), None)
    assert model("minimax-text-01") == LinearAttentionSpec(64, 128, "bfloat16")


# -- from_hf_config on configs that are not presets -------------------------------------

def test_unsupported_architecture_names_what_is_supported():
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096}
    with pytest.raises(SpecError, match="Unsupported architecture") as caught:
        from_hf_config(llama)
    assert "llama" in str(caught.value) and "nemotron_h" in str(caught.value)
    assert "NemotronHForCausalLM" in str(caught.value)
    with pytest.raises(SpecError, match="no model_type or architectures"):
        from_hf_config({})
    with pytest.raises(SpecError, match="must be a mapping"):
        from_hf_config([("model_type", "mamba2")])  # type: ignore[arg-type]


def test_architectures_alone_decide_the_family():
    config = stored_config("nemotron-h-8b")
    del config["model_type"]
    assert from_hf_config(config) == model("nemotron-h-8b")


def test_ssm_dtype_from_the_config_wins_except_for_kda():
    config = stored_config("nemotron-h-8b")
    config["mamba_ssm_dtype"] = "bfloat16"
    assert from_hf_config(config).ssm_dtype == "bfloat16"
    config["mamba_ssm_dtype"] = "auto"
    assert from_hf_config(config).ssm_dtype == "float32"
    config["mamba_ssm_dtype"] = "int8"
    with pytest.raises(SpecError, match="mamba_ssm_dtype"):
        from_hf_config(config)
    kimi = stored_config("kimi-linear-48b-a3b")
    kimi["mamba_ssm_dtype"] = "bfloat16"
    assert from_hf_config(kimi).ssm_dtype == "float32"


@pytest.mark.parametrize("name, path", [
    ("nemotron-h-8b", ("mamba_num_heads",)),
    ("falcon-h1-7b", ("mamba_d_state",)),
    ("qwen3.5-27b", ("text_config", "linear_num_value_heads")),
    ("kimi-linear-48b-a3b", ("linear_attn_config", "num_heads")),
    ("jamba-v0.1", ("mamba_d_state",)),
    ("minimax-text-01", ("num_attention_heads",)),
])
def test_missing_field_is_named(name, path):
    config = stored_config(name)
    parent = config
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    with pytest.raises(SpecError, match=f"missing `{path[-1]}`"):
        from_hf_config(config)


def test_bad_layer_descriptions_are_errors():
    granite = stored_config("granite-4.0-h-tiny")
    granite["layer_types"] = granite["layer_types"][:-1]
    with pytest.raises(SpecError, match="lists 39 layers but `num_hidden_layers` is 40"):
        from_hf_config(granite)
    granite["layer_types"] = ["attention"] * 40
    with pytest.raises(SpecError, match="nothing to transfer"):
        from_hf_config(granite)
    nemotron = stored_config("nemotron-h-8b")
    nemotron["hybrid_override_pattern"] += "M"
    with pytest.raises(SpecError, match="hybrid_override_pattern"):
        from_hf_config(nemotron)
    del nemotron["hybrid_override_pattern"]
    with pytest.raises(SpecError, match="cannot tell which layers"):
        from_hf_config(nemotron)
    falcon = stored_config("falcon-h1-7b")
    falcon["mamba_d_ssm"] = 4096
    with pytest.raises(SpecError, match="inconsistent"):
        from_hf_config(falcon)
    qwen = stored_config("qwen3.5-4b")
    qwen["text_config"]["linear_num_key_heads"] = "16"
    with pytest.raises(SpecError, match="must be an int"):
        from_hf_config(qwen)


def test_plain_hf_mamba_configs():
    codestral = {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
                 "num_heads": 128, "head_dim": 64, "n_groups": 8, "state_size": 128,
                 "conv_kernel": 4, "num_hidden_layers": 64, "hidden_size": 4096}
    assert from_hf_config(codestral) == Mamba2Spec(128, 64, 8, 128)  # vLLM: the model's bf16
    mamba1 = {"model_type": "mamba", "intermediate_size": 1536, "state_size": 16,
              "conv_kernel": 4, "num_hidden_layers": 24}
    assert from_hf_config(mamba1) == Mamba1Spec(1536, 16)


def test_mamba_ssm_format_uses_its_defaults():
    assert model("mamba2-2.7b") == Mamba2Spec(80, 64, 1, 128)  # vLLM: the model's bf16
    mamba1 = {"d_model": 768, "n_layer": 24, "ssm_cfg": {}}
    assert from_hf_config(mamba1) == Mamba1Spec(1536, 16)
    with pytest.raises(SpecError, match="not supported"):
        from_hf_config({"d_model": 768, "n_layer": 24, "ssm_cfg": {"layer": "Mamba3"}})


@given(num_k=st.integers(1, 8), ratio=st.integers(1, 4), head_k=st.sampled_from([16, 64, 128]),
       head_v=st.sampled_from([16, 64, 128]), kernel=st.integers(2, 5), num_blocks=st.integers(1, 8),
       interval=st.integers(2, 4))
def test_gdn_config_round_trip(num_k, ratio, head_k, head_v, kernel, num_blocks, interval):
    num_layers = num_blocks * interval
    config = {"model_type": "qwen3_next", "num_hidden_layers": num_layers,
              "full_attention_interval": interval, "linear_num_key_heads": num_k,
              "linear_num_value_heads": num_k * ratio, "linear_key_head_dim": head_k,
              "linear_value_head_dim": head_v, "linear_conv_kernel_dim": kernel}
    info = ssm_split.specs.model_info_from_hf_config(config)
    assert info.spec == GDNSpec(num_k, num_k * ratio, head_k, head_v, kernel)
    assert info.num_state_layers == num_layers - num_blocks
    wrapped = {"model_type": "qwen3_5", "text_config": copy.deepcopy(config)}
    wrapped["text_config"]["model_type"] = "qwen3_5_text"
    assert from_hf_config(wrapped) == info.spec


@given(heads=st.integers(1, 16), group_div=st.integers(1, 4), head_dim=st.sampled_from([32, 64]),
       state=st.sampled_from([16, 128]), pattern=st.text("M*-E", min_size=1, max_size=20))
def test_nemotron_and_falcon_config_round_trip(heads, group_div, head_dim, state, pattern):
    groups = group_div if heads % group_div == 0 else 1
    expected = Mamba2Spec(heads, head_dim, groups, state, ssm_dtype="float32")  # vLLM's Nemotron-H default
    nemotron = {"model_type": "nemotron_h", "num_hidden_layers": len(pattern),
                "hybrid_override_pattern": pattern, "mamba_num_heads": heads,
                "mamba_head_dim": head_dim, "n_groups": groups, "ssm_state_size": state,
                "conv_kernel": 4}
    if "M" in pattern:
        info = ssm_split.specs.model_info_from_hf_config(nemotron)
        assert info.spec == expected and info.num_state_layers == pattern.count("M")
    else:
        with pytest.raises(SpecError, match="nothing to transfer"):
            from_hf_config(nemotron)
    falcon = {"architectures": ["FalconH1ForCausalLM"], "num_hidden_layers": 3,
              "mamba_n_heads": heads, "mamba_d_ssm": heads * head_dim, "mamba_n_groups": groups,
              "mamba_d_state": state, "mamba_d_conv": 4}
    assert from_hf_config(falcon) == dataclasses.replace(expected, ssm_dtype="bfloat16")  # the model's
