"""The TP size and the state dtypes a vLLM engine uses, from its `VllmConfig`.

vLLM's rule (`MambaStateDtypeCalculator`, vLLM 0.33): the conv state uses
`cache_config.mamba_cache_dtype`, "auto" meaning the model's dtype; the temporal state
uses `cache_config.mamba_ssm_cache_dtype`, "auto" meaning the conv state's dtype, except
KDA (float32). Before that, vLLM's model hooks (`vllm/model_executor/models/config.py`)
replace an "auto" temporal dtype: Nemotron-H by its config's `mamba_ssm_cache_dtype`,
else float32; Qwen3.5 by its text config's `mamba_ssm_dtype` when set. A real
`VllmConfig` has run those hooks already; a plain namespace gets them applied here.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import SpecError
from ._vllm_mamba_spec import dtype_name

__all__ = ["vllm_config_tp", "vllm_config_dtypes"]


def vllm_config_tp(vllm_config: object) -> int:
    """`vllm_config.parallel_config.tensor_parallel_size`, checked.

    Raises:
        SpecError: no `.model_config.hf_config`, or a TP size that is not an int >= 1.
    """
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is None or getattr(model_config, "hf_config", None) is None:
        raise SpecError("`vllm_config` needs `.model_config.hf_config` (a VllmConfig has it).")
    tp = getattr(getattr(vllm_config, "parallel_config", None), "tensor_parallel_size", None)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise SpecError(f"`vllm_config.parallel_config.tensor_parallel_size` must be an int "
                        f">= 1, got {tp!r}.")
    return tp


def _text_value(config: Mapping, key: str) -> object:
    text = config.get("text_config")
    if isinstance(text, Mapping) and text.get(key) is not None:
        return text[key]
    return config.get(key)


def vllm_config_dtypes(vllm_config: object, family: str, model_type: str | None,
                       config: Mapping) -> dict[str, tuple[str, str]]:
    """`{"conv": (source, dtype), "temporal": (source, dtype)}` the engine holds, by
    vLLM's rule from `vllm_config.cache_config` and `.model_config.dtype`; only the
    entries the config decides (empty without a `cache_config`)."""
    cache = getattr(vllm_config, "cache_config", None)
    if cache is None:
        return {}
    conv = getattr(cache, "mamba_cache_dtype", "auto")
    source = "vllm_config.cache_config.mamba_cache_dtype"
    if conv in (None, "auto"):
        conv, source = getattr(getattr(vllm_config, "model_config", None), "dtype", None), \
            "vllm_config.model_config.dtype"
    found = {}
    if conv not in (None, "auto"):
        found["conv"] = (source, dtype_name(conv if isinstance(conv, str) else conv, "conv"))
    ssm = getattr(cache, "mamba_ssm_cache_dtype", "auto")
    source = "vllm_config.cache_config.mamba_ssm_cache_dtype"
    if ssm in (None, "auto"):
        hooked = None
        if model_type == "nemotron_h":
            hooked = config.get("mamba_ssm_cache_dtype") or "float32"
        elif (model_type or "").startswith("qwen3_5"):
            hooked = _text_value(config, "mamba_ssm_dtype")
        elif model_type == "kimi_linear":
            hooked = "float32"
        if hooked not in (None, "auto"):
            ssm, source = hooked, f"vLLM's {model_type} default"
    if ssm not in (None, "auto"):
        found["temporal"] = (source, dtype_name(str(ssm).removeprefix("torch."), "temporal"))
    elif "conv" in found:
        found["temporal"] = ("the conv dtype (mamba_ssm_cache_dtype 'auto')", found["conv"][1])
    if family == "linear_attention":  # its one state follows the conv rule
        found = {"temporal": found["conv"]} if "conv" in found else {}
    if family == "short_conv":
        found.pop("temporal", None)
    return found
