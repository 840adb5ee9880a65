"""One rank's checked `MambaState` + `tp` + the model's config -> the full spec.

Per family, the per-rank counts are read off the shapes (in the chosen conv layout),
multiplied by `tp`, and every one the config gives is compared with it. A contradiction
is a `SpecError` that names both values and the likely cause; for a count that the
config's total divides, the cause is `tp` (the shapes name the TP size they were made
at). Widths that do not add up in this layout raise `WidthError`, so that the caller
can try the other layout and say "this is an SD spec".
"""

from __future__ import annotations

from ..errors import SpecError
from ..specs._spec import GDNSpec, LinearAttentionSpec, Mamba1Spec, Mamba2Spec, ShortConvSpec, Spec
from ._vllm_config import KEYS, ConfigFacts
from ._vllm_mamba_spec import MambaState

__all__ = ["WidthError", "spec_from_state"]


class WidthError(SpecError):
    """The conv widths do not split into the family's sub-projections in this layout."""


def _require(facts: ConfigFacts, name: str, family: str, why: str) -> tuple[str, int]:
    found = facts.get(name)
    if found is None:
        raise SpecError(f"hf_config gives no `{name}` ({' or '.join(KEYS[family][name])}); "
                        f"spec_from_vllm needs it {why}. Pass the model's whole config or "
                        f"`vllm_config`.")
    return found


def _scaled(facts: ConfigFacts, family: str, name: str, per_rank: int, tp: int, what: str,
            origin: str) -> int:
    """A count sharded on every rank (heads, channels): `per_rank * tp`, equal to the
    config's (required: it is what shows a wrong `tp`)."""
    key, value = _require(facts, name, family, "to check `tp` (per-rank shapes times any "
                          "tp give a valid model)")
    total = per_rank * tp
    if value == total:
        return total
    if value % per_rank == 0:
        cause = (f"wrong `tp`: {per_rank} {what} per rank is the tp={value // per_rank} shard of "
                 f"{value}, so pass tp={value // per_rank}")
    else:
        cause = "a config of another model (or a MambaSpec of another layer)"
    raise SpecError(f"hf_config `{key}`={value} contradicts the MambaSpec: {origin} holds "
                    f"{per_rank} {what} per rank, {total} at tp={tp}. Likely cause: {cause}.")


def _same(facts: ConfigFacts, name: str, got: int, origin: str, hint: str = "") -> None:
    found = facts.get(name)
    if found is not None and found[1] != got:
        raise SpecError(f"hf_config `{found[0]}`={found[1]} contradicts the MambaSpec: {origin} "
                        f"has {got}. Likely cause: a config of another model{hint}.")


def _units(facts: ConfigFacts, name: str, per_rank: int, tp: int, what: str, family: str,
           note: str) -> int:
    """Total of a replicable unit (Mamba2 groups, GDN key heads) from its per-rank count."""
    found = facts.get(name)
    if found is None:
        if tp == 1 or per_rank > 1:
            return per_rank * tp
        raise SpecError(
            f"The MambaSpec is ambiguous: each of the tp={tp} ranks holds one {what[:-1]}, which "
            f"is either {tp} {what} sharded or fewer {what} replicated on every rank ({note}). "
            f"Pass `hf_config` with {' or '.join(f'`{k}`' for k in KEYS[family][name])} (or the "
            f"whole config).")
    key, total = found
    if (total % tp == 0 and total // tp == per_rank) or (per_rank == 1 and total < tp and tp % total == 0):
        return total
    raise SpecError(
        f"hf_config `{key}`={total} contradicts the MambaSpec: each of the tp={tp} ranks holds "
        f"{per_rank} {what}, which needs {per_rank * tp} {what} (or, with one per rank, fewer "
        f"than tp dividing it, replicated). Likely cause: wrong `tp` or another model's config.")


def _kernel(facts: ConfigFacts, family: str, rows: int, blocks: int, conv: tuple) -> tuple[int, int]:
    """`(conv_kernel, spec_tokens)`: vLLM keeps `kernel - 1 + speculative tokens` rows
    (Mamba1: `kernel - 1`, whatever the speculative tokens)."""
    if family == "mamba1":
        kernel, spec_tokens, rule = rows + 1, 0, "conv_kernel - 1"
    else:
        if blocks >= rows:
            raise SpecError(
                f"MambaSpec.num_speculative_blocks={blocks} but the conv state {conv} keeps {rows} "
                f"rows; vLLM keeps conv_kernel - 1 + speculative tokens rows, so rows - "
                f"num_speculative_blocks (= conv_kernel - 1) must be >= 1.")
        kernel, spec_tokens = rows - blocks + 1, blocks
        rule = f"conv_kernel - 1 + num_speculative_blocks ({blocks})"
    found = facts.get("conv_kernel")
    if found is not None and found[1] != kernel:
        raise SpecError(
            f"hf_config `{found[0]}`={found[1]} contradicts the MambaSpec: vLLM keeps {rule} = "
            f"{found[1] - 1 + spec_tokens} conv rows, but the conv state {conv} has {rows}. Likely "
            f"cause: `num_speculative_blocks` is not the engine's speculative tokens, or the "
            f"wrong conv_layout, or another model's config.")
    return kernel, spec_tokens


def _conv_dims(state: MambaState, layout: str) -> tuple[int, int]:
    channels, rows = state.conv_shape if layout == "DS" else state.conv_shape[::-1]
    return channels, rows


def _mamba2(state: MambaState, tp: int, layout: str, facts: ConfigFacts) -> dict:
    channels, rows = _conv_dims(state, layout)
    heads, head_dim, size = state.temporal_shape
    origin = f"the temporal state {state.temporal_shape}"
    rest = channels - heads * head_dim
    if rest <= 0 or rest % (2 * size):
        raise WidthError(f"The Mamba2 conv state has {channels} channels per rank; x alone takes "
                         f"{heads} heads x {head_dim}, and the remaining {rest} is not B and C of "
                         f"whole groups of state {size}. Is conv_layout={layout!r} right?")
    num_heads = _scaled(facts, "mamba2", "num_heads", heads, tp, "heads", origin)
    _same(facts, "head_dim", head_dim, f"{origin} (heads, head_dim, state)")
    _same(facts, "state_size", size, f"{origin} (heads, head_dim, state)")
    groups = _units(facts, "num_groups", rest // (2 * size), tp, "groups", "mamba2",
                    "Granite-4.0-H and Falcon-H1 have n_groups=1")
    if facts.intermediate is not None and facts.intermediate[1] != num_heads * head_dim:
        key, value = facts.intermediate
        raise SpecError(f"hf_config `{key}`={value} is vLLM's width of x, but the heads give "
                        f"{num_heads} x {head_dim} = {num_heads * head_dim}: the config is "
                        f"inconsistent, and vLLM's conv state would not be [x | B | C].")
    kernel, spec_tokens = _kernel(facts, "mamba2", rows, state.num_speculative_blocks, state.conv_shape)
    return dict(cls=Mamba2Spec, num_heads=num_heads, head_dim=head_dim, num_groups=groups,
                state_size=size, conv_kernel=kernel, spec_tokens=spec_tokens)


def _gdn(state: MambaState, tp: int, layout: str, facts: ConfigFacts) -> dict:
    channels, rows = _conv_dims(state, layout)
    v_heads, dv, dk = state.temporal_shape
    origin = f"the temporal state {state.temporal_shape}, read as (value heads, dv, dk)"
    swapped = " (vLLM before 0.33 stored (value heads, dk, dv); ssm_split reads the newer order)"
    _same(facts, "head_k_dim", dk, origin, swapped)
    _same(facts, "head_v_dim", dv, origin, swapped)
    rest = channels - v_heads * dv
    if rest <= 0 or rest % (2 * dk):
        raise WidthError(f"The GDN conv state has {channels} channels per rank; V alone takes "
                         f"{v_heads} heads x {dv}, and the remaining {rest} is not Q and K of whole "
                         f"key heads of {dk}. Is conv_layout={layout!r} right?")
    num_v_heads = _scaled(facts, "gdn", "num_v_heads", v_heads, tp, "value heads", origin)
    k_heads = _units(facts, "num_k_heads", rest // (2 * dk), tp, "key heads", "gdn",
                     "vLLM never replicates them; ssm_split does")
    kernel, spec_tokens = _kernel(facts, "gdn", rows, state.num_speculative_blocks, state.conv_shape)
    return dict(cls=GDNSpec, num_k_heads=k_heads, num_v_heads=num_v_heads, head_k_dim=dk,
                head_v_dim=dv, conv_kernel=kernel, spec_tokens=spec_tokens)


def _mamba1(state: MambaState, tp: int, layout: str, facts: ConfigFacts) -> dict:
    channels, rows = _conv_dims(state, layout)
    inner, size = state.temporal_shape
    if inner != channels:
        raise WidthError(f"Mamba1 conv state has {channels} channels per rank but the temporal "
                         f"state {state.temporal_shape} has {inner}; they must be equal. Is "
                         f"conv_layout={layout!r} right?")
    total = _scaled(facts, "mamba1", "intermediate_size", inner, tp, "channels",
                    f"the temporal state {state.temporal_shape}")
    _same(facts, "state_size", size, f"the temporal state {state.temporal_shape} (channels, state)")
    kernel, _ = _kernel(facts, "mamba1", rows, state.num_speculative_blocks, state.conv_shape)
    return dict(cls=Mamba1Spec, intermediate_size=total, state_size=size, conv_kernel=kernel)


def _short_conv(state: MambaState, tp: int, layout: str, facts: ConfigFacts) -> dict:
    channels, rows = _conv_dims(state, layout)
    total = _scaled(facts, "short_conv", "conv_dim", channels, tp, "channels",
                    f"the conv state {state.conv_shape}")
    kernel, spec_tokens = _kernel(facts, "short_conv", rows, state.num_speculative_blocks,
                                  state.conv_shape)
    return dict(cls=ShortConvSpec, conv_dim=total, conv_kernel=kernel, spec_tokens=spec_tokens)


def _linear(state: MambaState, tp: int, layout: str, facts: ConfigFacts) -> dict:
    heads, head_dim, other = state.temporal_shape
    if head_dim != other:
        raise SpecError(f"The linear-attention state {state.temporal_shape} is not (heads, d, d).")
    origin = f"the state {state.temporal_shape} (heads, head_dim, head_dim)"
    total = _scaled(facts, "linear_attention", "num_heads", heads, tp, "heads", origin)
    _same(facts, "head_dim", head_dim, origin)
    return dict(cls=LinearAttentionSpec, num_heads=total, head_dim=head_dim)


_PARSERS = {"mamba2": _mamba2, "gdn": _gdn, "mamba1": _mamba1, "short_conv": _short_conv,
            "linear_attention": _linear}


def spec_from_state(state: MambaState, tp: int, layout: str, facts: ConfigFacts) -> Spec:
    """The full spec of `state` (one rank of `tp`, conv layout `layout`), checked against
    `facts`; dtypes are the state's own.

    Raises:
        WidthError: widths that do not add up in `layout`.
        SpecError: any contradiction with the config, or a missing config count.
    """
    fields = _PARSERS[state.family](state, tp, layout, facts)
    cls = fields.pop("cls")
    if state.conv_shape is not None:
        fields.update(conv_dtype=state.conv_dtype, conv_layout=layout)
    if state.temporal_shape is not None:
        fields.update(ssm_dtype=state.ssm_dtype)
    return cls(**fields)
