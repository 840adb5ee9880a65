"""Build a layer-state spec from a Hugging Face `config.json` (a plain mapping).

The family is decided from `model_type` (also looked up inside `text_config`, for
multimodal wrappers such as Qwen3.5) or, failing that, from `architectures`; a
`mamba_ssm`-format config (`d_model` + `ssm_cfg`, e.g. `state-spaces/mamba2-2.7b`) is
recognised too. Each family reads its own fields:

| model_type | spec | fields |
|---|---|---|
| qwen3_next, qwen3_5* | GDNSpec | `linear_num_{key,value}_heads`, `linear_{key,value}_head_dim`, `linear_conv_kernel_dim` |
| kimi_linear (KDA) | GDNSpec, nk = nv | `linear_attn_config.{num_heads, head_dim, short_conv_kernel_size}` |
| nemotron_h | Mamba2Spec | `mamba_num_heads`, `mamba_head_dim`, `n_groups`, `ssm_state_size`, `conv_kernel` |
| falcon_h1, granitemoehybrid, bamba | Mamba2Spec | `mamba_n_heads`, `mamba_d_head`, `mamba_n_groups`, `mamba_d_state`, `mamba_d_conv` |
| mamba2 | Mamba2Spec | `num_heads`, `head_dim`, `n_groups`, `state_size`, `conv_kernel` |
| jamba | Mamba1Spec | `mamba_expand * hidden_size`, `mamba_d_state`, `mamba_d_conv` |
| mamba, falcon_mamba | Mamba1Spec | `intermediate_size`, `state_size`, `conv_kernel` |
| lfm2 | ShortConvSpec | `conv_dim` (else `hidden_size`), `conv_L_cache` |
| minimax_text_01, minimax_m1 | LinearAttentionSpec | `num_attention_heads`, `head_dim` |

dtypes: what vLLM 0.33 holds with its default cache settings (`--mamba-cache-dtype auto
--mamba-ssm-cache-dtype auto`) for a bfloat16 checkpoint. The conv state is bfloat16
(the model's dtype). The temporal state is the dtype the config names in
`mamba_ssm_dtype` or `mamba_ssm_cache_dtype` (Qwen3.5 names float32); otherwise float32
where vLLM defaults to it (Nemotron-H, and KDA, whose state is always float32) and the
conv state's bfloat16 elsewhere (Granite-4.0-H, Falcon-H1, Bamba, Mamba2, Jamba, Mamba1,
Qwen3-Next). An engine started with another `--mamba-ssm-cache-dtype` holds that dtype
instead: `dataclasses.replace(spec, ssm_dtype="float32")`, or read the engine's own
`MambaSpec` with `ssm_split.integrations.vllm.spec_from_vllm`. The conv layout is "DS"
and there are no speculative tokens: change either with `dataclasses.replace`.

The number of layers that carry the state is read from whichever description the
family uses: `layer_types`, `hybrid_override_pattern`, `layers_block_type`,
`full_attention_interval`, `attn_layer_indices`, `attn_layer_period`/`offset`,
`linear_attn_config.kda_layers`, `full_attn_idxs`, `attn_type_list`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

from ..errors import SpecError
from ._spec import GDNSpec, LinearAttentionSpec, Mamba1Spec, Mamba2Spec, ShortConvSpec, Spec

__all__ = ["ParsedConfig", "parse_hf_config", "from_hf_config", "MODEL_TYPES", "ARCHITECTURES"]

_DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


@dataclass(frozen=True, slots=True)
class ParsedConfig:
    """What a config says about the recurrent state of one model.

    Attributes:
        spec: the per-layer state spec (identical for every state layer).
        model_type: the family key the config was read as (e.g. `"nemotron_h"`).
        layer_kind: the recurrent mixer, in words (`"Mamba2"`, `"KDA"`, ...).
        num_state_layers: layers that carry this state (one page each per request).
        num_layers: all decoder layers of the model.
    """

    spec: Spec
    model_type: str
    layer_kind: str
    num_state_layers: int
    num_layers: int


class _Reader:
    """Typed access to one config's fields, with errors that name the model type."""

    def __init__(self, config: Mapping, model_type: str) -> None:
        text = config.get("text_config")
        self.fields: Mapping = text if isinstance(text, Mapping) else config
        self.top = config
        self.model_type = model_type

    def get(self, key: str, default: object = None) -> object:
        if key in self.fields:
            return self.fields[key]
        return self.top.get(key, default)

    def error(self, message: str) -> SpecError:
        return SpecError(f"{self.model_type} config: {message}")

    def integer(self, key: str, default: int | None = None, *, minimum: int = 1) -> int:
        value = self.get(key, default)
        if value is None:
            raise self.error(f"missing `{key}`. Copy it from the model's config.json.")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(f"`{key}` must be an int >= {minimum}, got {value!r}.")
        return value

    def sequence(self, key: str) -> tuple | None:
        value = self.get(key)
        if value is None:
            return None
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise self.error(f"`{key}` must be a list, got {value!r}.")
        return tuple(value)

    def ssm_dtype(self, default: str) -> str:
        for key in ("mamba_ssm_dtype", "mamba_ssm_cache_dtype"):
            value = self.get(key)
            if value is None or value == "auto":
                continue
            name = _DTYPE_ALIASES.get(str(value).removeprefix("torch.").lower())
            if name is None:
                raise self.error(
                    f"`{key}`={value!r} is not a dtype ssm_split knows; use one of "
                    f"{sorted(set(_DTYPE_ALIASES.values()))}.")
            return name
        return default

    def num_layers(self) -> int:
        return self.integer("num_hidden_layers")

    def count_listed(self, key: str, wanted: Callable[[object], bool]) -> int | None:
        """Count entries of the per-layer list `key` for which `wanted` holds."""
        values = self.sequence(key)
        if values is None:
            return None
        num_layers = self.get("num_hidden_layers")
        if num_layers is not None and len(values) != num_layers:
            raise self.error(
                f"`{key}` lists {len(values)} layers but `num_hidden_layers` is {num_layers}; "
                f"the two must agree.")
        return sum(1 for v in values if wanted(v))

    def count_not_in(self, key: str) -> int | None:
        """Layers not named in the index list `key` (0-based attention layer indices)."""
        indices = self.sequence(key)
        if indices is None:
            return None
        num_layers = self.num_layers()
        if any(not isinstance(i, int) or not 0 <= i < num_layers for i in indices):
            raise self.error(f"`{key}` must hold layer indices in [0, {num_layers}), got {list(indices)}.")
        return num_layers - len(set(indices))

    def no_layer_info(self, keys: str) -> SpecError:
        return self.error(f"cannot tell which layers are recurrent: none of {keys} is set.")


def _gdn(r: _Reader) -> tuple[Spec, str, int]:
    spec = GDNSpec(
        num_k_heads=r.integer("linear_num_key_heads"), num_v_heads=r.integer("linear_num_value_heads"),
        head_k_dim=r.integer("linear_key_head_dim"), head_v_dim=r.integer("linear_value_head_dim"),
        conv_kernel=r.integer("linear_conv_kernel_dim", 4), ssm_dtype=r.ssm_dtype("bfloat16"),
    )
    count = r.count_listed("layer_types", lambda t: t == "linear_attention")
    if count is None:
        interval = r.get("full_attention_interval")
        if interval is None:
            raise r.no_layer_info("`layer_types`, `full_attention_interval`")
        interval = r.integer("full_attention_interval")
        count = sum(1 for i in range(r.num_layers()) if (i + 1) % interval)
    return spec, "Gated DeltaNet", count


def _kda(r: _Reader) -> tuple[Spec, str, int]:
    lac = r.get("linear_attn_config")
    if not isinstance(lac, Mapping):
        raise r.error("missing `linear_attn_config` (a mapping with num_heads, head_dim, ...).")
    sub = _Reader(lac, f"{r.model_type} linear_attn_config")
    heads, head_dim = sub.integer("num_heads"), sub.integer("head_dim")
    spec = GDNSpec(num_k_heads=heads, num_v_heads=heads, head_k_dim=head_dim, head_v_dim=head_dim,
                   conv_kernel=sub.integer("short_conv_kernel_size", 4), ssm_dtype="float32")
    kda = sub.sequence("kda_layers")
    if kda is not None:
        count = len(set(kda))
    else:
        full = sub.sequence("full_attn_layers")
        if full is None:
            raise r.no_layer_info("`linear_attn_config.kda_layers`, `.full_attn_layers`")
        count = r.num_layers() - len(set(full))
    return spec, "KDA", count


def _mamba2_spec(r: _Reader, heads: str, head_dim: str, groups: str, state: str, kernel: str,
                 d_ssm: str | None = None, ssm_default: str = "bfloat16") -> Mamba2Spec:
    """A Mamba2 spec; the temporal dtype defaults to `ssm_default` (vLLM's default for the
    model type) unless the config names one."""
    num_heads = r.integer(heads)
    if r.get(head_dim) is not None:
        dim = r.integer(head_dim)
    elif d_ssm and r.get(d_ssm) is not None:
        dim = r.integer(d_ssm) // num_heads
    else:
        dim = r.integer("mamba_expand", 2) * r.integer("hidden_size") // num_heads
    if d_ssm and r.get(d_ssm) is not None and r.integer(d_ssm) != num_heads * dim:
        raise r.error(f"`{d_ssm}`={r.get(d_ssm)} is not `{heads}` * `{head_dim}` = "
                      f"{num_heads} * {dim}; the config is inconsistent.")
    return Mamba2Spec(num_heads=num_heads, head_dim=dim, num_groups=r.integer(groups, 1),
                      state_size=r.integer(state), conv_kernel=r.integer(kernel, 4),
                      ssm_dtype=r.ssm_dtype(ssm_default))


def _nemotron_h(r: _Reader) -> tuple[Spec, str, int]:
    spec = _mamba2_spec(r, "mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size",
                        "conv_kernel", ssm_default="float32")  # vLLM's NemotronH default
    pattern = r.get("hybrid_override_pattern")
    if isinstance(pattern, str):
        if r.get("num_hidden_layers") is not None and len(pattern) != r.num_layers():
            raise r.error(f"`hybrid_override_pattern` has {len(pattern)} layers but "
                          f"`num_hidden_layers` is {r.num_layers()}.")
        return spec, "Mamba2", pattern.count("M")
    count = r.count_listed("layers_block_type", lambda t: t == "mamba")
    if count is None:
        raise r.no_layer_info("`hybrid_override_pattern`, `layers_block_type`")
    return spec, "Mamba2", count


def _falcon_h1(r: _Reader) -> tuple[Spec, str, int]:
    spec = _mamba2_spec(r, "mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state",
                        "mamba_d_conv", d_ssm="mamba_d_ssm")
    return spec, "Mamba2 (parallel hybrid)", r.num_layers()  # every layer has a Mamba2 mixer


def _granite(r: _Reader) -> tuple[Spec, str, int]:
    spec = _mamba2_spec(r, "mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state",
                        "mamba_d_conv")
    count = r.count_listed("layer_types", lambda t: t == "mamba")
    if count is None:
        count = r.count_listed("layers_block_type", lambda t: t == "mamba")
    if count is None:
        raise r.no_layer_info("`layer_types`, `layers_block_type`")
    return spec, "Mamba2", count


def _bamba(r: _Reader) -> tuple[Spec, str, int]:
    spec = _mamba2_spec(r, "mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state",
                        "mamba_d_conv")
    count = r.count_not_in("attn_layer_indices")
    return spec, "Mamba2", r.num_layers() if count is None else count


def _hf_mamba2(r: _Reader) -> tuple[Spec, str, int]:
    spec = _mamba2_spec(r, "num_heads", "head_dim", "n_groups", "state_size", "conv_kernel")
    return spec, "Mamba2", r.num_layers()


def _mamba_ssm(r: _Reader) -> tuple[Spec, str, int]:
    """`mamba_ssm` format; missing fields take `mamba_ssm`'s module defaults."""
    ssm_cfg = r.get("ssm_cfg") or {}
    if not isinstance(ssm_cfg, Mapping):
        raise r.error(f"`ssm_cfg` must be a mapping, got {ssm_cfg!r}.")
    sub = _Reader(ssm_cfg, f"{r.model_type} ssm_cfg")
    d_model, layer = r.integer("d_model"), ssm_cfg.get("layer", "Mamba1")
    inner = sub.integer("d_ssm") if sub.get("d_ssm") is not None else sub.integer("expand", 2) * d_model
    attn = r.sequence("attn_layer_idx") or ()
    count = r.integer("n_layer") - len(set(attn))
    if layer == "Mamba2":
        head_dim = sub.integer("headdim", 64)
        if inner % head_dim:
            raise r.error(f"the Mamba2 width {inner} is not a multiple of headdim {head_dim}.")
        spec: Spec = Mamba2Spec(num_heads=inner // head_dim, head_dim=head_dim,
                                num_groups=sub.integer("ngroups", 1), state_size=sub.integer("d_state", 128),
                                conv_kernel=sub.integer("d_conv", 4), ssm_dtype=r.ssm_dtype("bfloat16"))
        return spec, "Mamba2", count
    if layer == "Mamba1":
        spec = Mamba1Spec(intermediate_size=inner, state_size=sub.integer("d_state", 16),
                          conv_kernel=sub.integer("d_conv", 4), ssm_dtype=r.ssm_dtype("bfloat16"))
        return spec, "Mamba1", count
    raise r.error(f"`ssm_cfg.layer`={layer!r} is not supported; expected 'Mamba1' or 'Mamba2'.")


def _jamba(r: _Reader) -> tuple[Spec, str, int]:
    spec = Mamba1Spec(intermediate_size=r.integer("mamba_expand", 2) * r.integer("hidden_size"),
                      state_size=r.integer("mamba_d_state"), conv_kernel=r.integer("mamba_d_conv", 4),
                      ssm_dtype=r.ssm_dtype("bfloat16"))
    count = r.count_listed("layers_block_type", lambda t: t == "mamba")
    if count is None:
        period = r.integer("attn_layer_period")
        offset = r.integer("attn_layer_offset", minimum=0)
        count = sum(1 for i in range(r.num_layers()) if i % period != offset)
    return spec, "Mamba1", count


def _hf_mamba(r: _Reader) -> tuple[Spec, str, int]:
    spec = Mamba1Spec(intermediate_size=r.integer("intermediate_size"), state_size=r.integer("state_size"),
                      conv_kernel=r.integer("conv_kernel", 4), ssm_dtype=r.ssm_dtype("bfloat16"))
    return spec, "Mamba1", r.num_layers()


def _lfm2(r: _Reader) -> tuple[Spec, str, int]:
    dim = r.integer("conv_dim") if r.get("conv_dim") is not None else r.integer("hidden_size")
    spec = ShortConvSpec(conv_dim=dim, conv_kernel=r.integer("conv_L_cache"))
    count = r.count_listed("layer_types", lambda t: t == "conv")
    if count is None:
        count = r.count_not_in("full_attn_idxs")
    if count is None:
        raise r.no_layer_info("`layer_types`, `full_attn_idxs`")
    return spec, "short conv", count


def _minimax(r: _Reader) -> tuple[Spec, str, int]:
    heads = r.integer("num_attention_heads")
    head_dim = r.integer("head_dim") if r.get("head_dim") is not None else r.integer("hidden_size") // heads
    spec = LinearAttentionSpec(num_heads=heads, head_dim=head_dim, ssm_dtype=r.ssm_dtype("bfloat16"))
    count = r.count_listed("attn_type_list", lambda t: t == 0)
    if count is None:
        raise r.no_layer_info("`attn_type_list`")
    return spec, "lightning attention", count


_Parser = Callable[[_Reader], tuple]

_PARSERS: dict[str, _Parser] = {
    "qwen3_next": _gdn, "qwen3_5": _gdn, "qwen3_5_text": _gdn,
    "qwen3_5_moe": _gdn, "qwen3_5_moe_text": _gdn,
    "kimi_linear": _kda,
    "nemotron_h": _nemotron_h,
    "falcon_h1": _falcon_h1, "granitemoehybrid": _granite, "bamba": _bamba,
    "mamba2": _hf_mamba2, "mamba_ssm": _mamba_ssm,
    "jamba": _jamba, "mamba": _hf_mamba, "falcon_mamba": _hf_mamba,
    "lfm2": _lfm2,
    "minimax_text_01": _minimax, "minimax_m1": _minimax,
}

ARCHITECTURES: dict[str, str] = {
    "Qwen3NextForCausalLM": "qwen3_next",
    "Qwen3_5ForConditionalGeneration": "qwen3_5", "Qwen3_5ForCausalLM": "qwen3_5_text",
    "Qwen3_5MoeForConditionalGeneration": "qwen3_5_moe", "Qwen3_5MoeForCausalLM": "qwen3_5_moe_text",
    "KimiLinearForCausalLM": "kimi_linear",
    "NemotronHForCausalLM": "nemotron_h",
    "FalconH1ForCausalLM": "falcon_h1",
    "GraniteMoeHybridForCausalLM": "granitemoehybrid",
    "BambaForCausalLM": "bamba",
    "Mamba2ForCausalLM": "mamba2",
    "JambaForCausalLM": "jamba",
    "MambaForCausalLM": "mamba", "FalconMambaForCausalLM": "falcon_mamba",
    "Lfm2ForCausalLM": "lfm2",
    "MiniMaxText01ForCausalLM": "minimax_text_01", "MiniMaxM1ForCausalLM": "minimax_m1",
}
"""Hugging Face architecture class -> the model_type ssm_split reads it as."""

MODEL_TYPES: tuple[str, ...] = tuple(sorted(_PARSERS))
"""Every `model_type` ssm_split can read."""


def _decide_model_type(config: Mapping) -> str:
    text = config.get("text_config")
    candidates = [config.get("model_type")]
    if isinstance(text, Mapping):
        candidates.append(text.get("model_type"))
    for candidate in candidates:
        if isinstance(candidate, str) and candidate in _PARSERS:
            return candidate
    architectures = config.get("architectures") or ()
    if isinstance(architectures, str):
        architectures = (architectures,)
    for arch in architectures:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    if "d_model" in config and "ssm_cfg" in config:
        return "mamba_ssm"
    seen = [c for c in candidates if c] + list(architectures)
    raise SpecError(
        f"Unsupported architecture {seen or 'unknown (no model_type or architectures)'}: "
        f"ssm_split reads model_type {list(MODEL_TYPES)} and architectures "
        f"{sorted(ARCHITECTURES)}. For anything else build a spec directly, e.g. "
        f"`Mamba2Spec(num_heads=..., head_dim=..., num_groups=..., state_size=...)`."
    )


def parse_hf_config(config: Mapping) -> ParsedConfig:
    """Read a config.json mapping: the state spec, the mixer and how many layers carry it.

    Raises:
        SpecError: `config` is not a mapping, names an unsupported architecture, lacks a
            field its family needs, or describes no recurrent layer.
    """
    if not isinstance(config, Mapping):
        raise SpecError(f"A Hugging Face config must be a mapping (the parsed config.json), "
                        f"got {type(config).__name__}.")
    model_type = _decide_model_type(config)
    reader = _Reader(config, model_type)
    spec, kind, num_state = _PARSERS[model_type](reader)
    num_layers = reader.integer("n_layer") if model_type == "mamba_ssm" else reader.num_layers()
    if num_state < 1:
        raise reader.error(f"no layer carries {kind} state (all {num_layers} layers are attention "
                           f"or MLP), so there is nothing to transfer.")
    return ParsedConfig(spec, model_type, kind, num_state, num_layers)


def from_hf_config(config: Mapping) -> Spec:
    """The per-layer state spec described by a Hugging Face `config.json` mapping.

    Example: `from_hf_config(json.load(open("config.json")))` on Nemotron-H-8B gives
    `Mamba2Spec(num_heads=128, head_dim=64, num_groups=8, state_size=128, ...)`.

    Raises:
        SpecError: see `parse_hf_config`.
    """
    return parse_hf_config(config).spec
