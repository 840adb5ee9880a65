"""vLLM's `MambaSpec` (per-rank state shapes) <-> ssm_split specs (full state).

A vLLM `MambaSpec` holds one rank's state: `shapes[0]` the conv state, `(channels_r,
rows)` in DS or `(rows, channels_r)` in SD, `shapes[1]` the temporal state with its first
axis sharded (Mamba2 `(heads_r, head_dim, N)`, GDN `(v_heads_r, dv, dk)`, Mamba1
`(I_r, N)`); short-conv has only the conv state and linear attention only the temporal
one. Multiplying the per-rank counts by the TP size gives the full spec, except where a
rank holds one *replicated* unit: a Mamba2 rank whose B and C hold exactly one group (G = 1
replicated at any TP, or G = tp sharded) and a GDN rank holding one key head. There the
model's config must say how many groups (key heads) there are.

vLLM is imported only by `to_vllm_mamba_spec` and `vllm_conv_layout`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

from ..errors import SpecError
from ..specs._hf_config import parse_hf_config
from ..layout._layout import page_layout, sharded_shapes
from ..specs._spec import (
    DTYPE_NBYTES,
    GDNSpec,
    LinearAttentionSpec,
    Mamba1Spec,
    Mamba2Spec,
    ShortConvSpec,
    Spec,
    check_is_spec,
)

__all__ = ["MAMBA_TYPES", "vllm_conv_layout", "spec_from_vllm", "spec_from_vllm_config",
           "to_vllm_mamba_spec"]

MAMBA_TYPES: dict[str, str] = {
    "MAMBA1": "mamba1", "MAMBA2": "mamba2", "GDN_ATTN": "gdn",
    "SHORT_CONV": "short_conv", "LINEAR": "linear_attention",
}
"""vLLM's `MambaAttentionBackendEnum` member name -> ssm_split family."""

_LEGACY_TYPES = {"mamba1": "MAMBA1", "mamba2": "MAMBA2", "gdn_attention": "GDN_ATTN",
                 "short_conv": "SHORT_CONV", "linear_attention": "LINEAR"}
_DTYPE_ALIASES = {"float": "float32", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
                  "fp16": "float16"}
_LAYOUT_VAR = "VLLM_SSM_CONV_STATE_LAYOUT"

# hf_config keys, in lookup order; "a.b" is key b of the sub-mapping a
_HF_KEYS = {
    "n_groups": ("n_groups", "mamba_n_groups", "ngroups", "ssm_cfg.ngroups"),
    "state_size": ("ssm_state_size", "mamba_d_state", "state_size", "d_state", "ssm_cfg.d_state"),
    "num_k_heads": ("linear_num_key_heads", "num_k_heads", "linear_attn_config.num_heads"),
    "head_k_dim": ("linear_key_head_dim", "head_k_dim", "linear_attn_config.head_dim"),
    "head_v_dim": ("linear_value_head_dim", "head_v_dim", "linear_attn_config.head_dim"),
    "conv_kernel": ("conv_kernel", "mamba_d_conv", "linear_conv_kernel_dim", "d_conv",
                    "conv_L_cache", "ssm_cfg.d_conv", "linear_attn_config.short_conv_kernel_size"),
}


def vllm_conv_layout() -> str:
    """The conv state layout vLLM uses in this process, "DS" or "SD".

    vLLM's own `get_conv_state_layout()` when vLLM can be imported; otherwise the same
    rule read directly: the environment variable `VLLM_SSM_CONV_STATE_LAYOUT`, default SD.
    """
    try:
        from vllm.model_executor.layers.mamba.mamba_utils import get_conv_state_layout
    except ImportError:
        value = os.environ.get(_LAYOUT_VAR)
        return value if value in ("DS", "SD") else "SD"
    return str(get_conv_state_layout())


def _family(mamba_type: object) -> str:
    name = mamba_type if isinstance(mamba_type, str) else getattr(mamba_type, "name", None)
    if isinstance(name, str):
        key = name.rsplit(".", 1)[-1]  # "MambaAttentionBackendEnum.MAMBA2" -> "MAMBA2"
        key = key if key in MAMBA_TYPES else _LEGACY_TYPES.get(key.lower(), "")
        if key:
            return MAMBA_TYPES[key]
    raise SpecError(
        f"MambaSpec.mamba_type {mamba_type!r} is not a state ssm_split knows. Supported: "
        f"MambaAttentionBackendEnum.{', .'.join(MAMBA_TYPES)} (or the older strings "
        f"{', '.join(repr(s) for s in _LEGACY_TYPES)})."
    )


def _dtype_name(value: object, what: str) -> str:
    name = str(value).removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_NBYTES:
        raise SpecError(f"The {what} dtype {value!r} is not one ssm_split moves; it handles "
                        f"{sorted(DTYPE_NBYTES)}. Run vLLM with a supported cache dtype.")
    return name


def _as_mapping(config: object) -> Mapping:
    if isinstance(config, Mapping):
        return config
    if callable(getattr(config, "to_dict", None)):  # transformers.PretrainedConfig
        return config.to_dict()
    if hasattr(config, "__dict__"):  # a namespace-like object
        return {k: _as_mapping(v) if hasattr(v, "__dict__") and not isinstance(v, type) else v
                for k, v in vars(config).items()}
    raise SpecError(f"hf_config must be a mapping or a transformers config, got "
                    f"{type(config).__name__}.")


def _hf_int(config: Mapping | None, field: str) -> tuple[str, int] | None:
    """`(key, value)` of the first key for `field` that the config sets, or None."""
    if config is None:
        return None
    scopes = [config]
    if isinstance(config.get("text_config"), Mapping):
        scopes.insert(0, config["text_config"])
    for key in _HF_KEYS[field]:
        for scope in scopes:
            value = scope
            for part in key.split("."):
                value = value.get(part) if isinstance(value, Mapping) else None
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"hf_config `{key}` must be an int >= 1, got {value!r}.")
            return key, value
    return None


def _units(what: str, per_rank: int, tp: int, config: Mapping | None, field: str,
           hint: str) -> int:
    """Total count of a replicable unit (groups, key heads) from its per-rank count."""
    found = _hf_int(config, field)
    if found is not None:
        key, total = found
        sharded = total % tp == 0 and total // tp == per_rank
        replicated = total < tp and tp % total == 0 and per_rank == 1
        if not (sharded or replicated):
            raise SpecError(
                f"hf_config `{key}`={total} does not fit the MambaSpec: each of the tp={tp} "
                f"ranks holds {per_rank} {what}, which needs {per_rank * tp} {what} (or fewer "
                f"than tp, replicated, when a rank holds one). Check `tp` and the config.")
        return total
    if tp == 1 or per_rank > 1:
        return per_rank * tp
    raise SpecError(
        f"The MambaSpec is ambiguous: each of the tp={tp} ranks holds one {what[:-1]}, which "
        f"is either {tp} {what} sharded or fewer {what} replicated on every rank ({hint}). "
        f"Pass `hf_config` (the model's config, or just {{'{_HF_KEYS[field][0]}': ...}}).")


def _conv_dims(shape: Sequence[int], layout: str) -> tuple[int, int]:
    if len(shape) != 2:
        raise SpecError(f"The conv state shape {tuple(shape)} is not 2-D; vLLM's Mamba "
                        f"conv state is (channels, rows) in DS or (rows, channels) in SD.")
    return (shape[0], shape[1]) if layout == "DS" else (shape[1], shape[0])


def _expect(shape: Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
    if len(shape) != ndim:
        raise SpecError(f"The {what} shape {tuple(shape)} should have {ndim} axes.")
    return tuple(shape)


def _kernel(family: str, rows: int, mamba_spec: object, config: Mapping | None) -> dict:
    """`conv_kernel` and `spec_tokens`, which the page knows only as their sum `rows`."""
    found = _hf_int(config, "conv_kernel")
    if found is not None:
        key, kernel = found
        if kernel - 1 > rows:
            raise SpecError(f"hf_config `{key}`={kernel} needs {kernel - 1} conv rows, but "
                            f"the MambaSpec keeps {rows}.")
        return {"conv_kernel": kernel, "spec_tokens": rows - (kernel - 1)}
    spec_tokens = 0
    if family != "mamba1":  # vLLM's Mamba1 rows never include speculative tokens
        blocks = getattr(mamba_spec, "num_speculative_blocks", 0) or 0
        if isinstance(blocks, int) and 0 < blocks <= rows:
            spec_tokens = blocks
    return {"conv_kernel": rows + 1 - spec_tokens, "spec_tokens": spec_tokens}


def _parse(family: str, shapes: tuple, dtypes: tuple, tp: int, layout: str, mamba_spec: object,
           config: Mapping | None) -> Spec:
    if family == "linear_attention":
        heads, head_dim, head_dim2 = _expect(shapes[0], 3, "linear-attention state")
        if head_dim != head_dim2:
            raise SpecError(f"The linear-attention state {shapes[0]} is not (heads, d, d).")
        return LinearAttentionSpec(num_heads=heads * tp, head_dim=head_dim, ssm_dtype=dtypes[0])
    channels, rows = _conv_dims(shapes[0], layout)
    conv = {"conv_dtype": dtypes[0], "conv_layout": layout,
            **_kernel(family, rows, mamba_spec, config)}
    if family == "short_conv":
        return ShortConvSpec(conv_dim=channels * tp, **conv)
    if family == "mamba1":
        inner, state = _expect(shapes[1], 2, "Mamba1 temporal state")
        if inner != channels:
            raise SpecError(f"Mamba1 conv state has {channels} channels per rank but the "
                            f"temporal state {shapes[1]} has {inner}; they must be equal.")
        return Mamba1Spec(intermediate_size=inner * tp, state_size=state, ssm_dtype=dtypes[1], **conv)
    if family == "mamba2":
        heads, head_dim, state = _expect(shapes[1], 3, "Mamba2 temporal state")
        rest = channels - heads * head_dim
        if rest <= 0 or rest % (2 * state):
            raise SpecError(
                f"The Mamba2 conv state has {channels} channels per rank; x alone takes "
                f"{heads} heads x {head_dim}, and the remaining {rest} is not B and C of whole "
                f"groups of state {state}. Is conv_layout={layout!r} right?")
        found = _hf_int(config, "state_size")
        if found is not None and found[1] != state:
            raise SpecError(f"hf_config `{found[0]}`={found[1]} differs from the state size "
                            f"{state} of the MambaSpec's temporal state {shapes[1]}.")
        groups = _units("groups", rest // (2 * state), tp, config, "n_groups",
                        "Granite-4.0-H and Falcon-H1 have n_groups=1")
        return Mamba2Spec(num_heads=heads * tp, head_dim=head_dim, num_groups=groups,
                          state_size=state, ssm_dtype=dtypes[1], **conv)
    v_heads, dv, dk = _expect(shapes[1], 3, "GDN temporal state")
    for field, got in (("head_k_dim", dk), ("head_v_dim", dv)):
        found = _hf_int(config, field)
        if found is not None and found[1] != got:
            raise SpecError(
                f"hf_config `{found[0]}`={found[1]} differs from the MambaSpec's temporal state "
                f"{shapes[1]}, read as (value heads, dv, dk). Older vLLM stored (value heads, "
                f"dk, dv); ssm_split follows the newer order.")
    rest = channels - v_heads * dv
    if rest <= 0 or rest % (2 * dk):
        raise SpecError(
            f"The GDN conv state has {channels} channels per rank; V alone takes {v_heads} "
            f"heads x {dv}, and the remaining {rest} is not Q and K of whole key heads of "
            f"{dk}. Is conv_layout={layout!r} right?")
    k_heads = _units("key heads", rest // (2 * dk), tp, config, "num_k_heads",
                     "vLLM itself never replicates them")
    return GDNSpec(num_k_heads=k_heads, num_v_heads=v_heads * tp, head_k_dim=dk, head_v_dim=dv,
                   ssm_dtype=dtypes[1], **conv)


def spec_from_vllm(mamba_spec: object, tp: int, hf_config: object = None, *,
                   conv_layout: str | None = None) -> Spec:
    """The full state spec behind one rank's vLLM `MambaSpec`.

    Args:
        mamba_spec: a `vllm.v1.kv_cache_interface.MambaSpec`, or any object with its
            `shapes`, `dtypes` (torch dtypes or their names) and `mamba_type`
            (`MambaAttentionBackendEnum` member, or an older string such as "mamba2").
        tp: the engine's tensor-parallel size; per-rank counts are multiplied by it.
        hf_config: the model's Hugging Face config (a `PretrainedConfig` or a mapping; a
            partial one such as `{"n_groups": 1}` is enough). Needed when a rank holds a
            single Mamba2 group or GDN key head, which could be sharded or replicated.
            Also gives `conv_kernel`; without it, speculative rows are taken from
            `num_speculative_blocks` (vLLM sets it to the speculative tokens).
        conv_layout: "DS" or "SD". Default: `vllm_conv_layout()`, the layout vLLM uses
            in this process (its `VLLM_SSM_CONV_STATE_LAYOUT`, default SD).

    Returns:
        A spec whose `sharded_shapes(spec, tp)` are exactly `mamba_spec.shapes`. Padding
        (`page_size_padded`) is a property of the page, not of the state: pass the page
        stride to `block_descriptors`.

    Raises:
        SpecError: unknown `mamba_type`, an unsupported dtype, shapes that fit no spec of
            the family, a `tp_replicated` or multi-buffer (ReplaySSM) spec, or the
            ambiguity above without `hf_config`.
    """
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise SpecError(f"`tp` must be the engine's tensor-parallel size, an int >= 1, got {tp!r}.")
    layout = vllm_conv_layout() if conv_layout is None else conv_layout
    if layout not in ("DS", "SD"):
        raise SpecError(f"`conv_layout` must be \"DS\" or \"SD\", got {conv_layout!r}.")
    family = _family(getattr(mamba_spec, "mamba_type", "mamba2"))
    if getattr(mamba_spec, "tp_replicated", False):
        raise SpecError("This MambaSpec is tp_replicated: every rank holds the whole state, so "
                        "there is nothing to re-shard; copy the page from any one src rank.")
    shapes = tuple(tuple(int(n) for n in s) for s in getattr(mamba_spec, "shapes", ()))
    want = 1 if family in ("short_conv", "linear_attention") else 2
    if len(shapes) != want or len(tuple(getattr(mamba_spec, "dtypes", ()))) != want:
        raise SpecError(
            f"A {family} MambaSpec must hold {want} state tensor(s) with one dtype each, got "
            f"shapes {shapes}. Extra tensors (e.g. ReplaySSM rings) are not supported.")
    what = ("state",) if family == "linear_attention" else ("conv", "temporal")[:want]
    dtypes = tuple(_dtype_name(d, w) for d, w in zip(mamba_spec.dtypes, what))
    config = None if hf_config is None else _as_mapping(hf_config)
    spec = _parse(family, shapes, dtypes, tp, layout, mamba_spec, config)
    ours = tuple(s for s in sharded_shapes(spec, tp) if s is not None)
    if ours != shapes:  # e.g. a shape that divides unevenly
        raise SpecError(f"{spec!r} on tp={tp} gives per-rank shapes {ours}, not the MambaSpec's "
                        f"{shapes}; check `tp` and `conv_layout`.")
    return spec


def _config_dtypes(spec: Spec, vllm_config: object, model_type: str) -> dict:
    """dtypes by vLLM's rule: the conv state uses the mamba cache dtype ('auto': the model's
    dtype); the temporal state the mamba SSM cache dtype ('auto': the conv dtype, float32
    for KDA); linear attention's only state follows the conv rule."""
    cache = getattr(vllm_config, "cache_config", None)
    if cache is None:
        return {}
    conv = getattr(cache, "mamba_cache_dtype", "auto")
    if conv in (None, "auto"):
        conv = getattr(getattr(vllm_config, "model_config", None), "dtype", None)
    conv = None if conv in (None, "auto") else _dtype_name(conv, "mamba cache")
    ssm = getattr(cache, "mamba_ssm_cache_dtype", "auto")
    if ssm in (None, "auto"):
        ssm = "float32" if model_type == "kimi_linear" else conv
    else:
        ssm = _dtype_name(ssm, "mamba SSM cache")
    if isinstance(spec, LinearAttentionSpec):
        return {"ssm_dtype": conv} if conv else {}
    if isinstance(spec, ShortConvSpec):
        return {"conv_dtype": conv} if conv else {}
    return {k: v for k, v in (("conv_dtype", conv), ("ssm_dtype", ssm)) if v is not None}


def spec_from_vllm_config(vllm_config: object, *, conv_layout: str | None = None) -> Spec:
    """The per-layer state spec of the model a vLLM engine serves (every state layer of
    the supported families has the same one).

    Args:
        vllm_config: a `vllm.config.VllmConfig`, or any object with
            `.model_config.hf_config` (a `PretrainedConfig` or a mapping) and
            `.parallel_config.tensor_parallel_size`. When it also has `.cache_config`
            (`mamba_cache_dtype`, `mamba_ssm_cache_dtype`) and `.model_config.dtype`, the
            dtypes follow vLLM's rule; otherwise those of `ssm_split.from_hf_config`.
            Speculative rows come from `.num_speculative_tokens` (or
            `.speculative_config.num_speculative_tokens`) for Mamba2, GDN and short-conv.
        conv_layout: as for `spec_from_vllm`.

    Returns:
        The full (unsharded) spec, checked to shard on the engine's TP size.

    Raises:
        SpecError: unsupported model, missing config fields, or a TP size the state
            cannot be sharded on (`ShardingError`).
    """
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is None or getattr(model_config, "hf_config", None) is None:
        raise SpecError("`vllm_config` needs `.model_config.hf_config` (a VllmConfig has it).")
    tp = getattr(getattr(vllm_config, "parallel_config", None), "tensor_parallel_size", None)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise SpecError(f"`vllm_config.parallel_config.tensor_parallel_size` must be an int "
                        f">= 1, got {tp!r}.")
    parsed = parse_hf_config(_as_mapping(model_config.hf_config))
    spec = parsed.spec
    changes = _config_dtypes(spec, vllm_config, parsed.model_type)
    if hasattr(spec, "conv_layout"):
        changes["conv_layout"] = vllm_conv_layout() if conv_layout is None else conv_layout
    if not isinstance(spec, (Mamba1Spec, LinearAttentionSpec)):
        spec_config = getattr(vllm_config, "speculative_config", None)
        tokens = getattr(vllm_config, "num_speculative_tokens", None)
        if not isinstance(tokens, int):
            tokens = getattr(spec_config, "num_speculative_tokens", 0) if spec_config else 0
        changes["spec_tokens"] = tokens or 0
    spec = dataclasses.replace(spec, **changes)
    page_layout(spec, tp, 0)  # raises ShardingError if tp does not fit
    return spec


def to_vllm_mamba_spec(spec: Spec, tp: int, *, block_size: int = 1,
                       page_size_padded: int | None = None) -> object:
    """A real vLLM `MambaSpec` for one rank of `spec` sharded on `tp` (imports vLLM).

    `block_size` (tokens per block) does not change the state's layout. The speculative
    rows become `num_speculative_blocks`, as vLLM sets them.

    Raises:
        SpecError: layouts vLLM never builds: GDN with fewer key heads than ranks (vLLM
            does not replicate them), Mamba1 with speculative rows.
        ImportError: vLLM is not installed.
    """
    check_is_spec(spec)
    if isinstance(spec, GDNSpec) and spec.num_k_heads % tp:
        raise SpecError(f"vLLM does not replicate GDN key heads: {spec.num_k_heads} key heads "
                        f"on tp={tp} have no vLLM layout.")
    if isinstance(spec, Mamba1Spec) and spec.spec_tokens:
        raise SpecError("vLLM keeps conv_kernel - 1 rows for Mamba1 whatever the speculative "
                        "tokens; a Mamba1Spec with spec_tokens has no vLLM layout.")
    import torch
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
    from vllm.v1.kv_cache_interface import MambaSpec

    shapes = tuple(s for s in sharded_shapes(spec, tp) if s is not None)
    names = [getattr(spec, "conv_dtype", None), getattr(spec, "ssm_dtype", None)]
    dtypes = tuple(getattr(torch, n) for n in names if n is not None)
    family_type = {v: k for k, v in MAMBA_TYPES.items()}[spec.family]
    return MambaSpec(block_size=block_size, shapes=shapes, dtypes=dtypes,
                     page_size_padded=page_size_padded,
                     mamba_type=MambaAttentionBackendEnum[family_type],
                     num_speculative_blocks=getattr(spec, "spec_tokens", 0))

