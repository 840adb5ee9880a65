"""`spec_from_vllm` on malformed and contradictory input: every fault a typed error that
names what was wrong (no vLLM needed: a stand-in with `MambaSpec`'s fields).

The cases follow the survey of vLLM 0.33.0's `MambaSpec` (which validates none of these
fields): missing or non-int shapes, wrong tensor counts, speculative blocks that do not
fit the rows, a config that contradicts the shapes at `tp`, the other conv layout.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
import types
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest

from ssm_split import GDNSpec, Mamba1Spec, Mamba2Spec, ShortConvSpec, SpecError
from ssm_split.integrations import vllm as sv


class Kind(enum.Enum):  # stands for vLLM's MambaAttentionBackendEnum (matched by name)
    MAMBA1 = 1
    MAMBA2 = 2
    GDN_ATTN = 3
    SHORT_CONV = 4
    LINEAR = 5
    CUSTOM = 6


@dataclasses.dataclass(frozen=True)
class FakeMambaSpec:
    """The fields of vLLM's `MambaSpec` that `spec_from_vllm` reads."""

    shapes: object
    dtypes: object
    mamba_type: object = Kind.MAMBA2
    num_speculative_blocks: object = 0
    tp_replicated: object = False
    page_size_padded: object = None


GRANITE_TP2 = FakeMambaSpec(((1792, 3), (24, 64, 128)), ("bfloat16", "bfloat16"))
GRANITE_CFG = {"model_type": "granitemoehybrid", "hidden_size": 1536, "num_hidden_layers": 2,
               "layer_types": ["mamba", "attention"], "mamba_n_heads": 48, "mamba_d_head": 64,
               "mamba_n_groups": 1, "mamba_d_state": 128, "mamba_d_conv": 4, "mamba_expand": 2}
GRANITE = Mamba2Spec(num_heads=48, head_dim=64, num_groups=1, state_size=128)
QWEN_TP2 = FakeMambaSpec(((4096, 3), (16, 128, 128)), ("bfloat16", "float32"), Kind.GDN_ATTN)
QWEN_CFG = {"model_type": "qwen3_5", "text_config": {
    "model_type": "qwen3_5_text", "num_hidden_layers": 4, "full_attention_interval": 4,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "mamba_ssm_dtype": "float32"}}
QWEN = GDNSpec(num_k_heads=16, num_v_heads=32, head_k_dim=128, head_v_dim=128, ssm_dtype="float32")


def granite(**changes) -> FakeMambaSpec:
    return dataclasses.replace(GRANITE_TP2, **changes)


def no_shapes():
    return types.SimpleNamespace(dtypes=("bfloat16", "bfloat16"), mamba_type=Kind.MAMBA2)


def test_the_two_models_of_the_recipe_read_back_with_their_configs():
    assert sv.spec_from_vllm(GRANITE_TP2, 2, GRANITE_CFG, conv_layout="DS") == GRANITE
    assert sv.spec_from_vllm(QWEN_TP2, 2, QWEN_CFG, conv_layout="DS") == QWEN
    # a partial mapping with the family's counts is enough
    assert sv.spec_from_vllm(GRANITE_TP2, 2, {"mamba_n_heads": 48, "mamba_n_groups": 1},
                             conv_layout="DS") == GRANITE


MALFORMED = [  # (MambaSpec, match): vLLM 0.33 builds every one of these without complaint
    (no_shapes(), r"MambaSpec.shapes must be a sequence of shapes .*got None"),
    (granite(shapes=None), r"MambaSpec.shapes must be a sequence of shapes"),
    (granite(shapes=(1792, 3)), r"MambaSpec.shapes\[0\] must be a sequence of ints .*got 1792"),
    (granite(shapes="((1792, 3),)"), r"MambaSpec.shapes must be a sequence of shapes"),
    (granite(shapes={0: (1792, 3)}), r"MambaSpec.shapes must be a sequence of shapes"),
    (granite(shapes=(s for s in GRANITE_TP2.shapes)), r"MambaSpec.shapes must be a sequence"),
    (granite(shapes=((1792.0, 3), (24, 64, 128))), r"shapes\[0\]\[0\] is 1792.0 \(float\)"),
    (granite(shapes=((1792, 3), (24, np.float64(64), 128))), r"shapes\[1\]\[1\] is .*float64"),
    (granite(shapes=((1792, Fraction(3)), (24, 64, 128))), r"shapes\[0\]\[1\] is .*Fraction"),
    (granite(shapes=((1792, Decimal(3)), (24, 64, 128))), r"shapes\[0\]\[1\] is .*Decimal"),
    (granite(shapes=(("1792", 3), (24, 64, 128))), r"shapes\[0\]\[0\] is '1792' \(str\)"),
    (granite(shapes=((1792, True), (24, 64, 128))), r"shapes\[0\]\[1\] is True \(bool\)"),
    (granite(shapes=((1792, 0), (24, 64, 128))), r"shapes\[0\]\[1\] is 0; dimensions must be ints >= 1"),
    (granite(shapes=((1792, 3), (-24, 64, 128))), r"shapes\[1\]\[0\] is -24"),
    (granite(shapes=((1792, 3), (24, 64, 128), (24, 8)), dtypes=("bfloat16",) * 3), r"holds 2 state tensor"),
    (granite(shapes=GRANITE_TP2.shapes * 2 + ((8,),), dtypes=("bfloat16",) * 5), r"ReplaySSM"),
    (granite(shapes=((1792, 3),), dtypes=("bfloat16",)), r"A mamba2 MambaSpec holds 2 state tensor"),
    (granite(dtypes=("bfloat16",)), r"2 shapes but 1 dtypes \(shapes is longer\)"),
    (granite(dtypes=("bfloat16",) * 3), r"2 shapes but 3 dtypes \(dtypes is longer\)"),
    (granite(dtypes=None), r"MambaSpec.dtypes must be a sequence of dtypes"),
    (granite(dtypes=("float8_e4m3fn", "bfloat16")), r"conv dtype 'float8_e4m3fn' is not one ssm_split moves"),
    (granite(dtypes=("bfloat61", "bfloat16")), r"not one ssm_split moves"),
    (granite(dtypes=(np.float32, "bfloat16")), r"conv dtype .* is not a dtype"),
    (granite(shapes=((1792, 3, 1), (24, 64, 128))), r"conv state shape \(1792, 3, 1\) is not 2-D"),
    (granite(shapes=((1792, 3), (24, 8192))), r"temporal state shape \(24, 8192\) should have 3 axes"),
    (granite(num_speculative_blocks=-1), r"num_speculative_blocks must be an int >= 0 .*got -1"),
    (granite(num_speculative_blocks=1.0), r"num_speculative_blocks must be an int >= 0 .*got 1.0"),
    (granite(num_speculative_blocks=None), r"num_speculative_blocks must be an int >= 0 .*got None"),
    (granite(num_speculative_blocks=True), r"num_speculative_blocks must be an int >= 0 .*got True"),
    (granite(num_speculative_blocks=5), r"keeps 3 rows.*conv_kernel - 1\) must be >= 1"),
    (granite(num_speculative_blocks=2), r"`mamba_d_conv`=4 contradicts .* = 5 conv rows, but the conv state \(1792, 3\) has 3"),
    (granite(mamba_type="kda"), r"mamba_type 'kda' is not a state ssm_split knows"),
    (granite(mamba_type=Kind.CUSTOM), r"mamba_type <Kind.CUSTOM: 6> is not a state"),
    (granite(mamba_type=None), r"mamba_type None is not a state"),
    (granite(tp_replicated=True), r"tp_replicated"),
    (granite(shapes=((1793, 3), (24, 64, 128))), r"remaining 257 is not B and C of whole groups"),
    (granite(shapes=((3, 1792), (24, 64, 128))), r"\(3, 1792\) is SD-shaped \(\(rows, channels\)\) but conv_layout is 'DS' \(given\)"),
    (granite(mamba_type=Kind.GDN_ATTN), r"holds gdn state but hf_config describes a mamba2 model"),
]


@pytest.mark.parametrize("mamba_spec, match", MALFORMED)
def test_every_malformed_mamba_spec_gets_a_spec_error(mamba_spec, match):
    with pytest.raises(SpecError, match=match):
        sv.spec_from_vllm(mamba_spec, 2, GRANITE_CFG, conv_layout="DS")


def test_numpy_ints_torch_sizes_and_lists_are_dimensions_too():
    odd = granite(shapes=[np.array([1792, 3]).tolist(), (np.int64(24), np.int32(64), 128)])
    assert sv.spec_from_vllm(odd, 2, GRANITE_CFG, conv_layout="DS") == GRANITE
    assert sv.read_mamba_spec(odd).shapes == ((1792, 3), (24, 64, 128))


@pytest.mark.parametrize("tp", [1, 3, 4, 8])
def test_a_wrong_tp_is_named_with_the_tp_the_shapes_were_made_at(tp):
    with pytest.raises(SpecError, match=rf"`mamba_n_heads`=48 .* 24 heads per rank, {24 * tp} at "
                                        rf"tp={tp}. Likely cause: wrong `tp`: .* pass tp=2"):
        sv.spec_from_vllm(GRANITE_TP2, tp, GRANITE_CFG, conv_layout="DS")
    with pytest.raises(SpecError, match=r"`linear_num_value_heads`=32 .* pass tp=2"):
        sv.spec_from_vllm(QWEN_TP2, tp, QWEN_CFG, conv_layout="DS")


def test_without_a_config_it_asks_for_one_whatever_the_family():
    cases = [GRANITE_TP2, QWEN_TP2, FakeMambaSpec(((512, 3), (512, 16)), ("bfloat16",) * 2, Kind.MAMBA1),
             FakeMambaSpec(((512, 2),), ("bfloat16",), Kind.SHORT_CONV)]
    for mamba_spec in cases:
        with pytest.raises(SpecError, match=r"needs the model's config .* a wrong `tp` goes unnoticed"):
            sv.spec_from_vllm(mamba_spec, 2, conv_layout="DS")


@pytest.mark.parametrize("mamba_spec, config, match", [
    (GRANITE_TP2, {"mamba_n_groups": 1}, r"gives no `num_heads` \(mamba_num_heads or mamba_n_heads\)"),
    (GRANITE_TP2, {"mamba_n_heads": 48}, r"ambiguous: each of the tp=2 ranks holds one group.*mamba_n_groups"),
    (GRANITE_TP2, {"mamba_n_heads": 48, "n_groups": 3}, r"`n_groups`=3 contradicts the MambaSpec"),
    (GRANITE_TP2, GRANITE_CFG | {"mamba_d_head": 32}, r"`mamba_d_head`=32 contradicts the MambaSpec"),
    (GRANITE_TP2, GRANITE_CFG | {"mamba_d_state": 64}, r"`mamba_d_state`=64 contradicts"),
    (GRANITE_TP2, GRANITE_CFG | {"mamba_expand": 3}, r"`mamba_expand \* hidden_size`=4608 is vLLM's width of x"),
    (GRANITE_TP2, GRANITE_CFG | {"torch_dtype": "float16"}, r"conv state is bfloat16, but hf_config `torch_dtype` says float16"),
    (GRANITE_TP2, {"mamba_n_heads": "48"}, r"`mamba_n_heads` must be an int >= 1, got '48'"),
    (GRANITE_TP2, ["mamba_n_heads"], r"hf_config must be a mapping"),
    (GRANITE_TP2, {"model_type": "zamba2"}, r"Unsupported architecture .* partial mapping"),
    (dataclasses.replace(QWEN_TP2, dtypes=("bfloat16", "bfloat16")), QWEN_CFG,
     r"temporal state is bfloat16, but hf_config `mamba_ssm_dtype` says float32. .*--mamba-ssm-cache-dtype"),
    (dataclasses.replace(QWEN_TP2, shapes=((4096, 3), (16, 64, 256))), QWEN_CFG,
     r"`linear_key_head_dim`=128 contradicts .* \(value heads, dv, dk\) has 256.*vLLM before 0.33"),
    (dataclasses.replace(QWEN_TP2, shapes=((512, 3), (2, 128, 128))), {"linear_num_value_heads": 4},
     r"ambiguous: each of the tp=2 ranks holds one key head, .*vLLM never replicates them.*linear_num_key_heads"),
])
def test_a_config_that_contradicts_the_shapes_is_named(mamba_spec, config, match):
    with pytest.raises(SpecError, match=match):
        sv.spec_from_vllm(mamba_spec, 2, config, conv_layout="DS")


def test_replication_follows_the_config():
    one_per_rank = granite(shapes=((1792, 3), (24, 64, 128)))
    # n_groups=2 at tp=2 (sharded) and n_groups=1 (replicated) give the same shapes
    assert sv.spec_from_vllm(one_per_rank, 2, {"mamba_n_heads": 48, "mamba_n_groups": 2},
                             conv_layout="DS").num_groups == 2
    # the library's own rule (not vLLM 0.33's): 2 groups replicated on 4 ranks
    tp4 = granite(shapes=((1024, 3), (12, 64, 128)))
    assert sv.spec_from_vllm(tp4, 4, {"mamba_n_heads": 48, "mamba_n_groups": 2},
                             conv_layout="DS").num_groups == 2
    # GDN key heads: one per rank, the config says 16 on 16 ranks
    qwen16 = FakeMambaSpec(((512, 3), (2, 128, 128)), ("bfloat16", "float32"), Kind.GDN_ATTN)
    assert sv.spec_from_vllm(qwen16, 16, QWEN_CFG, conv_layout="DS").num_k_heads == 16


def test_speculative_rows_and_families_without_temporal_or_conv_state():
    mtp = granite(shapes=((1792, 5), (24, 64, 128)), num_speculative_blocks=2)
    assert sv.spec_from_vllm(mtp, 2, GRANITE_CFG, conv_layout="DS") == dataclasses.replace(GRANITE, spec_tokens=2)
    # Mamba1 rows never hold speculative tokens, whatever num_speculative_blocks says
    jamba = FakeMambaSpec(((4096, 3), (4096, 16)), ("bfloat16", "bfloat16"), Kind.MAMBA1, 2)
    assert sv.spec_from_vllm(jamba, 2, {"intermediate_size": 8192, "mamba_d_conv": 4},
                             conv_layout="DS") == Mamba1Spec(intermediate_size=8192, state_size=16)
    lfm = FakeMambaSpec(((1024, 2),), ("bfloat16",), Kind.SHORT_CONV)
    assert sv.spec_from_vllm(lfm, 2, {"conv_dim": 2048, "conv_L_cache": 3},
                             conv_layout="DS") == ShortConvSpec(conv_dim=2048, conv_kernel=3)
    minimax = FakeMambaSpec(((32, 128, 128),), ("float32",), Kind.LINEAR)
    assert sv.spec_from_vllm(minimax, 2, {"num_attention_heads": 64, "head_dim": 128}).num_heads == 64


@pytest.mark.parametrize("tp, match", [(0, r"`tp` must be .* got 0"), (True, r"got True"),
                                      (2.0, r"got 2.0"), (None, r"`tp` is missing")])
def test_tp_must_be_a_tp_size(tp, match):
    with pytest.raises(SpecError, match=match):
        sv.spec_from_vllm(GRANITE_TP2, tp, GRANITE_CFG, conv_layout="DS")


def engine_config(tp: int, ssm: str = "auto", hf_config=GRANITE_CFG):
    return types.SimpleNamespace(
        model_config=types.SimpleNamespace(hf_config=hf_config, dtype="bfloat16"),
        parallel_config=types.SimpleNamespace(tensor_parallel_size=tp),
        cache_config=types.SimpleNamespace(mamba_cache_dtype="auto", mamba_ssm_cache_dtype=ssm))


def test_a_vllm_config_gives_tp_and_the_engines_dtypes():
    assert sv.spec_from_vllm(GRANITE_TP2, vllm_config=engine_config(2), conv_layout="DS") == GRANITE
    with pytest.raises(SpecError, match=r"`tp`=4 contradicts vllm_config.parallel_config.tensor_parallel_size=2"):
        sv.spec_from_vllm(GRANITE_TP2, 4, vllm_config=engine_config(2), conv_layout="DS")
    # --mamba-ssm-cache-dtype float32: the engine holds float32; the MambaSpec must say so
    fp32 = granite(dtypes=("bfloat16", "float32"))
    assert sv.spec_from_vllm(fp32, vllm_config=engine_config(2, "float32"), conv_layout="DS").ssm_dtype == "float32"
    with pytest.raises(SpecError, match=r"temporal state is bfloat16, but vllm_config.cache_config.mamba_ssm_cache_dtype says float32"):
        sv.spec_from_vllm(GRANITE_TP2, vllm_config=engine_config(2, "float32"), conv_layout="DS")
    # the Qwen3.5 config says float32; an engine started with bfloat16 is believed
    qwen_bf16 = dataclasses.replace(QWEN_TP2, dtypes=("bfloat16", "bfloat16"))
    assert sv.spec_from_vllm(qwen_bf16, vllm_config=engine_config(2, "bfloat16", QWEN_CFG),
                             conv_layout="DS").ssm_dtype == "bfloat16"


@pytest.fixture
def no_vllm_cache(monkeypatch):
    """As in a process where vLLM's layout module was never imported."""
    monkeypatch.delitem(sys.modules, "vllm.model_executor.layers.mamba.mamba_utils", raising=False)
    return monkeypatch


def test_conv_layout_none_reads_the_variable_as_vllm_does(no_vllm_cache):
    no_vllm_cache.delenv("VLLM_SSM_CONV_STATE_LAYOUT", raising=False)
    assert sv.vllm_conv_layout() == "SD"  # vLLM's default
    with pytest.raises(SpecError, match=r"\(1792, 3\) is DS-shaped .* conv_layout is 'SD' \(vLLM's layout in this process\)"):
        sv.spec_from_vllm(GRANITE_TP2, 2, GRANITE_CFG)
    sd = granite(shapes=((3, 1792), (24, 64, 128)))
    assert sv.spec_from_vllm(sd, 2, GRANITE_CFG).conv_layout == "SD"
    no_vllm_cache.setenv("VLLM_SSM_CONV_STATE_LAYOUT", "DS")
    assert sv.spec_from_vllm(GRANITE_TP2, 2, GRANITE_CFG).conv_layout == "DS"
    for bad in ("ds", "", "DS "):
        no_vllm_cache.setenv("VLLM_SSM_CONV_STATE_LAYOUT", bad)
        with pytest.raises(SpecError, match=r"VLLM_SSM_CONV_STATE_LAYOUT=.* is not a layout vLLM accepts"):
            sv.spec_from_vllm(GRANITE_TP2, 2, GRANITE_CFG)
    with pytest.raises(SpecError, match=r"`conv_layout` must be \"DS\" or \"SD\""):
        sv.spec_from_vllm(GRANITE_TP2, 2, GRANITE_CFG, conv_layout="ds")
