"""What a model's config says about its recurrent state, field by field, with key names.

`spec_from_vllm` needs the model's own numbers to check a `MambaSpec` against: its
per-rank shapes times any `tp` describe a valid model, so only the config can show that
`tp` (or the layout, or the config itself) is wrong. `config_facts` reads them:

- from a full Hugging Face config (a `model_type` or `architectures` ssm_split knows):
  the values `ssm_split.from_hf_config` derives (defaults included), each named by the
  key it came from;
- from a partial mapping (e.g. `{"mamba_n_heads": 48, "mamba_n_groups": 1}`): the keys
  listed below for the `MambaSpec`'s family, nothing else (generic keys such as
  `head_dim` mean other things in other models);
- with a `VllmConfig` (or any object with `.model_config.hf_config`,
  `.parallel_config.tensor_parallel_size` and optionally `.cache_config`): also the TP
  size and the dtypes the engine picks by vLLM's rule.

Dtypes a config names: the temporal state's from `mamba_ssm_dtype` (Qwen3.5) or
`mamba_ssm_cache_dtype` (Nemotron-H, whose default is float32 in vLLM), float32 for KDA;
the conv state's from `torch_dtype` / `dtype` when it is bfloat16 or float16 (vLLM runs
a float32 checkpoint in bfloat16 unless told otherwise, so float32 says nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import SpecError
from ..specs._hf_config import parse_hf_config
from ..specs._spec import spec_fields
from ._vllm_dtypes import vllm_config_dtypes, vllm_config_tp
from ._vllm_mamba_spec import dtype_name

__all__ = ["ConfigFacts", "config_facts", "as_mapping"]

# family -> spec field -> keys that may hold it (first found wins); "a.b" is key b of a
KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "mamba2": {"num_heads": ("mamba_num_heads", "mamba_n_heads"),
               "head_dim": ("mamba_head_dim", "mamba_d_head"),
               "num_groups": ("n_groups", "mamba_n_groups", "ngroups"),
               "state_size": ("ssm_state_size", "mamba_d_state"),
               "conv_kernel": ("conv_kernel", "mamba_d_conv")},
    "gdn": {"num_k_heads": ("linear_num_key_heads", "linear_attn_config.num_heads"),
            "num_v_heads": ("linear_num_value_heads", "linear_attn_config.num_heads"),
            "head_k_dim": ("linear_key_head_dim", "linear_attn_config.head_dim"),
            "head_v_dim": ("linear_value_head_dim", "linear_attn_config.head_dim"),
            "conv_kernel": ("linear_conv_kernel_dim", "linear_attn_config.short_conv_kernel_size")},
    "mamba1": {"intermediate_size": ("intermediate_size",),
               "state_size": ("mamba_d_state", "state_size"),
               "conv_kernel": ("mamba_d_conv", "conv_kernel")},
    "short_conv": {"conv_dim": ("conv_dim",), "conv_kernel": ("conv_L_cache",)},
    "linear_attention": {"num_heads": ("num_attention_heads",), "head_dim": ("head_dim",)},
}
"""Where each dimension is found (partial configs; names in messages for full ones)."""

# vLLM's width of the Mamba2 x sub-projection, when it does not use heads * head_dim
_VLLM_INTERMEDIATE = {"granitemoehybrid": ("mamba_expand", "hidden_size"),
                      "bamba": ("mamba_expand", "hidden_size"),
                      "falcon_h1": ("mamba_expand", "hidden_size"),
                      "mamba2": ("expand", "hidden_size")}


@dataclass(frozen=True, slots=True)
class ConfigFacts:
    """Config values to check a `MambaSpec` against.

    Attributes:
        family: the family the config describes (None for a partial mapping).
        model_type: the family key ssm_split read the config as, or None.
        values: `(spec field, key, value)` for every dimension the config gives.
        dtypes: `("conv" or "temporal", source, dtype name)` the engine holds by the
            config (or the `VllmConfig`'s cache settings).
        tp: the engine's TP size when a `VllmConfig` gave it, else None.
        intermediate: `(keys, value)` of vLLM's Mamba2 x width where it differs in how
            it is computed (`mamba_expand * hidden_size`), else None.
    """

    family: str | None
    model_type: str | None
    values: tuple[tuple[str, str, int], ...] = ()
    dtypes: tuple[tuple[str, str, str], ...] = ()
    tp: int | None = None
    intermediate: tuple[str, int] | None = None

    def get(self, name: str) -> tuple[str, int] | None:
        """`(key, value)` of spec field `name`, or None when the config does not give it."""
        return next(((key, value) for field_name, key, value in self.values if field_name == name), None)

    def dtype(self, what: str) -> tuple[str, str] | None:
        """`(source, dtype name)` of the "conv" or "temporal" state, or None."""
        return next(((source, name) for kind, source, name in self.dtypes if kind == what), None)


def as_mapping(config: object) -> Mapping:
    """A config as a mapping: a mapping as is, a `PretrainedConfig` by `to_dict()`, a
    namespace by its attributes (recursively)."""
    if isinstance(config, Mapping):
        return config
    if callable(getattr(config, "to_dict", None)):
        return config.to_dict()
    if hasattr(config, "__dict__") and not isinstance(config, type):
        return {k: as_mapping(v) if hasattr(v, "__dict__") and not isinstance(v, type) else v
                for k, v in vars(config).items()}
    raise SpecError(f"hf_config must be a mapping or a transformers config, got "
                    f"{type(config).__name__}.")


def _scopes(config: Mapping) -> list[Mapping]:
    text = config.get("text_config")
    return [text, config] if isinstance(text, Mapping) else [config]


def _lookup(config: Mapping, key: str) -> object:
    for scope in _scopes(config):
        value = scope
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if value is not None:
            return value
    return None


def _first_key(config: Mapping, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if _lookup(config, k) is not None), None)


def _partial_values(config: Mapping, family: str) -> dict[str, tuple[str, int]]:
    values = {}
    for name, keys in KEYS[family].items():
        key = _first_key(config, keys)
        if key is None:
            continue
        value = _lookup(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"hf_config `{key}` must be an int >= 1, got {value!r}.")
        values[name] = (key, value)
    if family == "mamba1" and "intermediate_size" not in values:
        expand, hidden = _lookup(config, "mamba_expand"), _lookup(config, "hidden_size")
        if isinstance(expand, int) and isinstance(hidden, int):  # Jamba
            values["intermediate_size"] = ("mamba_expand * hidden_size", expand * hidden)
    return values


def _named_dtypes(config: Mapping, model_type: str | None) -> dict[str, tuple[str, str]]:
    found = {}
    for key in ("mamba_ssm_dtype", "mamba_ssm_cache_dtype"):
        value = _lookup(config, key)
        if value is not None and value != "auto":
            found["temporal"] = (f"hf_config `{key}`", dtype_name(str(value), key))
            break
    else:
        if model_type == "kimi_linear":
            found["temporal"] = ("vLLM's KDA default (float32)", "float32")
        elif model_type == "nemotron_h":
            found["temporal"] = ("vLLM's Nemotron-H default mamba_ssm_cache_dtype", "float32")
    for key in ("torch_dtype", "dtype"):
        value = _lookup(config, key)
        if value is not None:
            name = str(value).removeprefix("torch.")
            if name in ("bfloat16", "float16"):
                found["conv"] = (f"hf_config `{key}`", name)
            break
    return found


def _full_values(config: Mapping, family: str) -> tuple[str, dict[str, tuple[str, int]], str]:
    try:
        parsed = parse_hf_config(config)
    except SpecError as error:
        keys = ", ".join(k[0] for k in KEYS[family].values())
        raise SpecError(f"{error} For spec_from_vllm a partial mapping (no `model_type`) with "
                        f"the {family} fields also works: {keys}.") from None
    values = {}
    for name, value in spec_fields(parsed.spec).items():
        if name in KEYS.get(parsed.spec.family, {}):
            key = _first_key(config, KEYS[parsed.spec.family][name]) or name
            values[name] = (key, value)
    return parsed.model_type, values, parsed.spec.family


def _intermediate(config: Mapping, model_type: str | None) -> tuple[str, int] | None:
    keys = _VLLM_INTERMEDIATE.get(model_type or "")
    if keys is None:
        return None
    if model_type == "falcon_h1" and isinstance(_lookup(config, "mamba_d_ssm"), int):
        return "mamba_d_ssm", _lookup(config, "mamba_d_ssm")
    expand, hidden = (_lookup(config, k) for k in keys)
    if isinstance(expand, (int, float)) and isinstance(hidden, int) and not isinstance(expand, bool):
        return f"{keys[0]} * {keys[1]}", int(expand * hidden)
    return None


def config_facts(family: str, hf_config: object = None, vllm_config: object = None) -> ConfigFacts:
    """The facts of `hf_config` (or of `vllm_config`'s model config) for a `MambaSpec`
    of `family`.

    Raises:
        SpecError: no config at all; a config that is not a mapping or names an
            unsupported or different family; a value that is not an int >= 1.
    """
    tp = None
    if vllm_config is not None:
        tp = vllm_config_tp(vllm_config)
        if hf_config is None:
            hf_config = vllm_config.model_config.hf_config
    if hf_config is None:
        raise SpecError(
            "spec_from_vllm needs the model's config (`hf_config`, or `vllm_config`): a "
            "MambaSpec's per-rank shapes times any tp describe a valid model, so without the "
            "model's own head counts a wrong `tp` goes unnoticed. In a connector pass "
            "`vllm_config` (or `vllm_config.model_config.hf_config`); a partial mapping "
            "such as {\"mamba_n_heads\": 48, \"mamba_n_groups\": 1} is enough.")
    config = as_mapping(hf_config)
    if config.get("model_type") or config.get("architectures") or isinstance(config.get("text_config"), Mapping):
        model_type, values, config_family = _full_values(config, family)
        if config_family != family:
            raise SpecError(
                f"The MambaSpec holds {family} state but hf_config describes a {config_family} "
                f"model ({model_type}); pass the config of the model this engine serves.")
    else:
        model_type, values = None, _partial_values(config, family)
    dtypes = _named_dtypes(config, model_type)
    if vllm_config is not None:
        dtypes = vllm_config_dtypes(vllm_config, family, model_type, config) or dtypes
    return ConfigFacts(family, model_type, tuple((k, *v) for k, v in values.items()),
                       tuple((k, *v) for k, v in dtypes.items()), tp, _intermediate(config, model_type))
