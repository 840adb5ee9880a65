"""vLLM's `MambaSpec` (one rank's state shapes) <-> ssm_split specs (the full state).

A vLLM `MambaSpec` holds one rank's state: `shapes[0]` the conv state, `(channels_r,
rows)` in DS or `(rows, channels_r)` in SD, `shapes[1]` the temporal state with its first
axis sharded (Mamba2 `(heads_r, head_dim, N)`, GDN `(v_heads_r, dv, dk)`, Mamba1
`(I_r, N)`); short-conv has only the conv state and linear attention only the temporal
one. Per-rank counts times `tp` give the full spec, so `spec_from_vllm` checks them
against the model's config, which it always needs (see `config_facts`).

vLLM is imported only by `to_vllm_mamba_spec`.
"""

from __future__ import annotations

import dataclasses

from ..errors import SpecError
from ..layout._layout import page_layout, sharded_shapes
from ..specs._hf_config import parse_hf_config
from ..specs._spec import GDNSpec, LinearAttentionSpec, Mamba1Spec, ShortConvSpec, Spec, check_is_spec
from ._vllm_config import ConfigFacts, as_mapping, config_facts
from ._vllm_dtypes import vllm_config_dtypes, vllm_config_tp
from ._vllm_import import import_vllm
from ._vllm_layout import LAYOUT_VARIABLE, vllm_conv_layout
from ._vllm_mamba_spec import MAMBA_TYPES, MambaState, read_mamba_spec
from ._vllm_shapes import WidthError, spec_from_state

__all__ = ["spec_from_vllm", "spec_from_vllm_config", "to_vllm_mamba_spec"]


def _check_dtypes(state: MambaState, facts: ConfigFacts) -> None:
    for what, got in (("conv", state.conv_dtype), ("temporal", state.ssm_dtype)):
        want = facts.dtype(what)
        if got is None or want is None or want[1] == got:
            continue
        raise SpecError(
            f"The MambaSpec's {what} state is {got}, but {want[0]} says {want[1]}. Likely cause: "
            f"the engine overrode it (--dtype, --mamba-cache-dtype, --mamba-ssm-cache-dtype); "
            f"pass `vllm_config` so its cache settings are used. Otherwise the config is "
            f"another model's.")


def _resolve_tp(tp: object, facts: ConfigFacts) -> int:
    if tp is None:
        if facts.tp is None:
            raise SpecError("`tp` is missing: pass the engine's tensor-parallel size (or "
                            "`vllm_config`, which holds it).")
        return facts.tp
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise SpecError(f"`tp` must be the engine's tensor-parallel size, an int >= 1, got {tp!r}.")
    if facts.tp is not None and facts.tp != tp:
        raise SpecError(f"`tp`={tp} contradicts vllm_config.parallel_config.tensor_parallel_size"
                        f"={facts.tp}; pass the TP size of the engine that built the MambaSpec.")
    return tp


def _parse(state: MambaState, tp: int, layout: str, facts: ConfigFacts, origin: str) -> Spec:
    """`spec_from_state` in `layout`; when that fails and the other layout fits, say so."""
    try:
        return spec_from_state(state, tp, layout, facts)
    except SpecError as error:
        if state.conv_shape is None or state.conv_shape[0] == state.conv_shape[1]:
            raise
        other = "SD" if layout == "DS" else "DS"
        try:
            spec_from_state(state, tp, other, facts)
        except SpecError:
            raise error from None
        why = "its widths do not add up" if isinstance(error, WidthError) else str(error)
        raise SpecError(
            f"The MambaSpec's conv state {state.conv_shape} is {other}-shaped "
            f"({'(rows, channels)' if other == 'SD' else '(channels, rows)'}) but conv_layout is "
            f"{layout!r} ({origin}); read as {layout}, {why}. Pass conv_layout={other!r}, or run "
            f"with {LAYOUT_VARIABLE}={other} as the engine that built it did.") from None


def spec_from_vllm(mamba_spec: object, tp: int | None = None, hf_config: object = None, *,
                   vllm_config: object = None, conv_layout: str | None = None) -> Spec:
    """The full state spec behind one rank's vLLM `MambaSpec`, checked against the model.

    Args:
        mamba_spec: a `vllm.v1.kv_cache_interface.MambaSpec`, or any object with its
            `shapes`, `dtypes` (torch dtypes or their names), `mamba_type`
            (`MambaAttentionBackendEnum` member or an older string such as "mamba2") and
            `num_speculative_blocks`.
        tp: the TP size of the engine that built it (default: `vllm_config`'s).
        hf_config: the model's Hugging Face config (a `PretrainedConfig` or a mapping;
            a partial mapping with the family's counts is enough, e.g.
            `{"mamba_n_heads": 48, "mamba_n_groups": 1}`). Required unless
            `vllm_config` is given: per-rank shapes times any `tp` give a valid model,
            so only the config can show a wrong `tp`.
        vllm_config: the engine's `VllmConfig` (or an object with `.model_config.hf_config`,
            `.parallel_config.tensor_parallel_size`, optionally `.cache_config` and
            `.model_config.dtype`): gives the config, checks `tp`, and checks the dtypes
            against the engine's cache settings instead of the config's.
        conv_layout: "DS" or "SD". None: what vLLM uses in this process
            (`vllm_conv_layout()`); the result's `conv_layout` says which was taken.

    Returns:
        A spec whose `sharded_shapes(spec, tp)` are exactly `mamba_spec.shapes`, with the
        `MambaSpec`'s dtypes. Padding (`page_size_padded`) belongs to the page, not the
        state: see `region_set_from_vllm`.

    Raises:
        SpecError: a malformed `MambaSpec` (`read_mamba_spec`); no config; a config count
            (heads, head dims, key/value heads, groups, state size, conv kernel and
            speculative rows, dtypes) that contradicts the shapes at `tp`, naming both
            values and the likely cause (wrong `tp`, wrong layout, another model's config);
            shapes of the other conv layout; an invalid `VLLM_SSM_CONV_STATE_LAYOUT`.
    """
    state = read_mamba_spec(mamba_spec)
    if conv_layout is None:
        layout, origin = vllm_conv_layout(), "vLLM's layout in this process"
    elif conv_layout in ("DS", "SD"):
        layout, origin = conv_layout, "given"
    else:
        raise SpecError(f"`conv_layout` must be \"DS\" or \"SD\" (or None for vLLM's), got "
                        f"{conv_layout!r}.")
    facts = config_facts(state.family, hf_config, vllm_config)
    tp = _resolve_tp(tp, facts)
    spec = _parse(state, tp, layout, facts, origin)
    _check_dtypes(state, facts)
    ours = tuple(s for s in sharded_shapes(spec, tp) if s is not None)
    oriented = tuple(state.shapes)
    if ours != oriented:  # a safety net: every count was derived from these shapes
        raise SpecError(f"{spec!r} on tp={tp} gives per-rank shapes {ours}, not the MambaSpec's "
                        f"{oriented}; check `tp` and `conv_layout`.")
    return spec


def spec_from_vllm_config(vllm_config: object, *, conv_layout: str | None = None) -> Spec:
    """The per-layer state spec of the model a vLLM engine serves, from its config alone
    (every state layer of the supported families has the same one).

    Args:
        vllm_config: a `VllmConfig`, or any object with `.model_config.hf_config` (a
            `PretrainedConfig` or a mapping) and `.parallel_config.tensor_parallel_size`.
            With `.cache_config` (and `.model_config.dtype`) the dtypes follow vLLM's rule
            (`_vllm_dtypes`); otherwise those of `ssm_split.from_hf_config`. Speculative
            rows come from `.num_speculative_tokens` (or
            `.speculative_config.num_speculative_tokens`) for Mamba2, GDN and short-conv.
        conv_layout: as for `spec_from_vllm`.

    Raises:
        SpecError: unsupported model, missing config fields, or a TP size the state
            cannot be sharded on (`ShardingError`).
    """
    tp = vllm_config_tp(vllm_config)
    config = as_mapping(vllm_config.model_config.hf_config)
    parsed = parse_hf_config(config)
    spec = parsed.spec
    dtypes = vllm_config_dtypes(vllm_config, spec.family, parsed.model_type, config)
    changes = {}
    if "conv" in dtypes and not isinstance(spec, LinearAttentionSpec):
        changes["conv_dtype"] = dtypes["conv"][1]
    if "temporal" in dtypes and not isinstance(spec, ShortConvSpec):
        changes["ssm_dtype"] = dtypes["temporal"][1]
    if hasattr(spec, "conv_layout"):
        if conv_layout not in (None, "DS", "SD"):
            raise SpecError(f"`conv_layout` must be \"DS\" or \"SD\" (or None for vLLM's), got "
                            f"{conv_layout!r}.")
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

    enum = import_vllm("vllm.v1.attention.backends.registry").MambaAttentionBackendEnum
    mamba_spec_class = import_vllm("vllm.v1.kv_cache_interface").MambaSpec

    shapes = tuple(s for s in sharded_shapes(spec, tp) if s is not None)
    names = [getattr(spec, "conv_dtype", None), getattr(spec, "ssm_dtype", None)]
    dtypes = tuple(getattr(torch, n) for n in names if n is not None)
    family_type = {v: k for k, v in MAMBA_TYPES.items()}[spec.family]
    return mamba_spec_class(block_size=block_size, shapes=shapes, dtypes=dtypes,
                            page_size_padded=page_size_padded, mamba_type=enum[family_type],
                            num_speculative_blocks=getattr(spec, "spec_tokens", 0))
