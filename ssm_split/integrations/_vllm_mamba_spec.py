"""Reading one vLLM `MambaSpec` object safely: every field checked, every fault typed.

vLLM's `MambaSpec` (`vllm/v1/kv_cache_interface.py`) is a frozen dataclass that checks
none of `shapes`, `dtypes`, `mamba_type` or `num_speculative_blocks`; a wrong value
shows up later, if at all (`page_size_bytes` silently drops unpaired shapes, accepts
float dimensions). `read_mamba_spec` turns one into a `MambaState`, or raises a
`SpecError` that names the field, the value and the fix. It imports no vLLM: the enum
member is recognised by its name, dtypes by their names (`torch.bfloat16` or
`"bfloat16"`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import SpecError
from ..specs._spec import DTYPE_NBYTES

__all__ = ["MAMBA_TYPES", "MambaState", "read_mamba_spec", "dtype_name"]

MAMBA_TYPES: dict[str, str] = {
    "MAMBA1": "mamba1", "MAMBA2": "mamba2", "GDN_ATTN": "gdn",
    "SHORT_CONV": "short_conv", "LINEAR": "linear_attention",
}
"""vLLM's `MambaAttentionBackendEnum` member name -> ssm_split family."""

_LEGACY_TYPES = {"mamba1": "MAMBA1", "mamba2": "MAMBA2", "gdn_attention": "GDN_ATTN",
                 "short_conv": "SHORT_CONV", "linear_attention": "LINEAR"}
_DTYPE_ALIASES = {"float": "float32", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
                  "fp16": "float16"}
_TENSORS = {"mamba1": ("conv", "temporal"), "mamba2": ("conv", "temporal"),
            "gdn": ("conv", "temporal"), "short_conv": ("conv",), "linear_attention": ("temporal",)}
_TEMPORAL_AXES = {"mamba1": 2, "mamba2": 3, "gdn": 3, "linear_attention": 3}


@dataclass(frozen=True, slots=True)
class MambaState:
    """One rank's state as a checked `MambaSpec` describes it.

    Attributes:
        family: "mamba2", "gdn", "mamba1", "short_conv" or "linear_attention".
        conv_shape: the conv state's shape (2 ints, layout not yet decided), or None.
        temporal_shape: the temporal state's shape, or None.
        conv_dtype, ssm_dtype: dtype names of the two states (None where absent).
        num_speculative_blocks: vLLM's speculative tokens kept in the conv rows.
    """

    family: str
    conv_shape: tuple[int, ...] | None
    temporal_shape: tuple[int, ...] | None
    conv_dtype: str | None
    ssm_dtype: str | None
    num_speculative_blocks: int

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(s for s in (self.conv_shape, self.temporal_shape) if s is not None)


def family_of(mamba_type: object) -> str:
    """The ssm_split family of a `MambaAttentionBackendEnum` member (or an older string)."""
    name = mamba_type if isinstance(mamba_type, str) else getattr(mamba_type, "name", None)
    if isinstance(name, str):
        key = name.rsplit(".", 1)[-1]  # "MambaAttentionBackendEnum.MAMBA2" -> "MAMBA2"
        key = key if key in MAMBA_TYPES else _LEGACY_TYPES.get(key.lower(), "")
        if key:
            return MAMBA_TYPES[key]
    raise SpecError(
        f"MambaSpec.mamba_type {mamba_type!r} is not a state ssm_split knows. Supported: "
        f"MambaAttentionBackendEnum.{', .'.join(MAMBA_TYPES)} (or the older strings "
        f"{', '.join(repr(s) for s in _LEGACY_TYPES)}).")


def dtype_name(value: object, what: str) -> str:
    """`torch.bfloat16`, `"bfloat16"` or an alias (`"bf16"`) -> `"bfloat16"`."""
    if not isinstance(value, str) and type(value).__name__ != "dtype":
        raise SpecError(f"The {what} dtype {value!r} is not a dtype; give a torch dtype "
                        f"(torch.bfloat16) or its name (\"bfloat16\").")
    name = str(value).removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_NBYTES:
        raise SpecError(f"The {what} dtype {value!r} is not one ssm_split moves; it handles "
                        f"{sorted(DTYPE_NBYTES)}. Run vLLM with a supported cache dtype.")
    return name


def _dimension(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SpecError(f"MambaSpec.{where} is {value!r} ({type(value).__name__}); a dimension "
                        f"must be an int. Build the spec from vLLM's MambaStateShapeCalculator.")
    if value < 1:
        raise SpecError(f"MambaSpec.{where} is {value}; dimensions must be ints >= 1.")
    return int(value)


def _sequence(value: object, where: str, what: str) -> Sequence:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise SpecError(f"MambaSpec.{where} must be a sequence of {what}, got {value!r}.")
    return value


def _shapes(mamba_spec: object) -> tuple[tuple[int, ...], ...]:
    shapes = _sequence(getattr(mamba_spec, "shapes", None), "shapes",
                       "shapes (one tuple of ints per state tensor)")
    out = []
    for i, shape in enumerate(shapes):
        shape = _sequence(shape, f"shapes[{i}]", "ints (one shape)")
        out.append(tuple(_dimension(n, f"shapes[{i}][{j}]") for j, n in enumerate(shape)))
    return tuple(out)


def _spec_blocks(mamba_spec: object) -> int:
    blocks = getattr(mamba_spec, "num_speculative_blocks", 0)
    if isinstance(blocks, bool) or not isinstance(blocks, (int, np.integer)) or blocks < 0:
        raise SpecError(f"MambaSpec.num_speculative_blocks must be an int >= 0 (vLLM sets it to "
                        f"the speculative tokens), got {blocks!r}.")
    return int(blocks)


def read_mamba_spec(mamba_spec: object) -> MambaState:
    """Check one `MambaSpec` (or any object with its fields) and return its state.

    Raises:
        SpecError: an unknown `mamba_type`; a `tp_replicated` spec; `shapes` or `dtypes`
            missing, not sequences, of different lengths or of the wrong count for the
            family (ReplaySSM specs hold 5); a dimension that is not an int >= 1 (floats
            such as 4096.0, bools and strings included); a shape with the wrong number of
            axes; an unsupported dtype; `num_speculative_blocks` not an int >= 0.
    """
    family = family_of(getattr(mamba_spec, "mamba_type", None))
    if getattr(mamba_spec, "tp_replicated", False) is True:
        raise SpecError("This MambaSpec is tp_replicated: every rank holds the whole state, so "
                        "there is nothing to re-shard; copy the page from any one src rank.")
    shapes = _shapes(mamba_spec)
    dtypes = tuple(_sequence(getattr(mamba_spec, "dtypes", None), "dtypes",
                             "dtypes (one per state tensor)"))
    tensors = _TENSORS[family]
    if len(shapes) != len(dtypes):
        longer = "shapes" if len(shapes) > len(dtypes) else "dtypes"
        raise SpecError(f"MambaSpec has {len(shapes)} shapes but {len(dtypes)} dtypes ({longer} "
                        f"is longer); every state tensor needs one of each.")
    if len(shapes) != len(tensors):
        hint = (" This looks like a ReplaySSM spec (extra ring tensors), which ssm_split does "
                "not move." if len(shapes) > len(tensors) else "")
        raise SpecError(f"A {family} MambaSpec holds {len(tensors)} state tensor(s) "
                        f"({', '.join(tensors)}), got {len(shapes)}: shapes {shapes}.{hint}")
    named = dict(zip(tensors, shapes))
    kinds = dict(zip(tensors, (dtype_name(d, w) for d, w in zip(dtypes, tensors))))
    conv, temporal = named.get("conv"), named.get("temporal")
    if conv is not None and len(conv) != 2:
        raise SpecError(f"The conv state shape {conv} is not 2-D; vLLM's conv state is "
                        f"(channels, rows) in DS or (rows, channels) in SD.")
    if temporal is not None and len(temporal) != _TEMPORAL_AXES[family]:
        raise SpecError(f"The {family} temporal state shape {temporal} should have "
                        f"{_TEMPORAL_AXES[family]} axes.")
    blocks = _spec_blocks(mamba_spec)
    return MambaState(family, conv, temporal, kinds.get("conv"), kinds.get("temporal"), blocks)
