"""Frozen, validated specs of one layer's recurrent state, one class per family.

A spec describes the *full* (unsharded) state of one layer for one request. Every
family reduces to the same vocabulary, used by the layout and the planner:

- `conv_parts`: the conv sub-projections in page order, each a `Part` sharded on its
  own by whole units (heads, groups, key heads or channels);
- `temporal_part`: the temporal (SSM) state, sharded on its first axis;
- `conv_rows`: `conv_kernel - 1 + spec_tokens` rows kept per conv channel.

Specs never know about ranks, bytes on a wire or NIXL.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Union

from ..errors import SpecError, SpecMismatchError

__all__ = [
    "DTYPE_NBYTES",
    "Part",
    "Mamba2Spec",
    "GDNSpec",
    "Mamba1Spec",
    "ShortConvSpec",
    "LinearAttentionSpec",
    "Spec",
    "SPEC_TYPES",
    "check_is_spec",
    "spec_fields",
]

DTYPE_NBYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Element size in bytes of each dtype name a spec accepts."""

_LAYOUTS = ("DS", "SD")


@dataclass(frozen=True, slots=True)
class Part:
    """One independently sharded piece of a layer's state.

    Attributes:
        name: segment name, e.g. `"conv.x"`, `"conv.B"`, `"temporal"`.
        num_units: number of shardable units in the full state (heads, groups, channels).
        unit_size: for a conv part, channels per unit; for the temporal part, elements
            per unit (the product of the temporal shape after its first axis).
        unit_name: what a unit is, for messages (`"heads"`, `"groups"`, ...).
        replicable: True when ranks may hold whole copies of a unit if `num_units < tp`
            (Mamba2 B/C groups, GDN Q/K key heads).
    """

    name: str
    num_units: int
    unit_size: int
    unit_name: str
    replicable: bool = False


def _check_positive_int(spec_name: str, field: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(
            f"{spec_name}: `{field}` must be an int, got {value!r} of type "
            f"{type(value).__name__}. Pass a plain Python int, e.g. `{field}=4`."
        )
    if value < minimum:
        raise SpecError(
            f"{spec_name}: `{field}` must be >= {minimum}, got {value}. "
            f"Use the value from the model's config.json."
        )


def _check_dtype(spec_name: str, field: str, value: object) -> None:
    if value not in DTYPE_NBYTES:
        raise SpecError(
            f"{spec_name}: `{field}` must be one of {sorted(DTYPE_NBYTES)}, got {value!r}. "
            f"Spell the dtype as a string, e.g. `{field}=\"bfloat16\"`."
        )


def _check_conv(spec: "_ConvSpec") -> None:
    name = type(spec).__name__
    _check_positive_int(name, "conv_kernel", spec.conv_kernel, minimum=1)
    _check_positive_int(name, "spec_tokens", spec.spec_tokens, minimum=0)
    _check_dtype(name, "conv_dtype", spec.conv_dtype)
    if spec.conv_layout not in _LAYOUTS:
        raise SpecError(
            f"{name}: `conv_layout` must be \"DS\" (dim-first, vLLM's "
            f"VLLM_SSM_CONV_STATE_LAYOUT=DS) or \"SD\" (rows-first), got {spec.conv_layout!r}."
        )
    if spec.conv_rows < 1:
        raise SpecError(
            f"{name}: conv_kernel={spec.conv_kernel} with spec_tokens={spec.spec_tokens} "
            f"keeps {spec.conv_rows} conv rows, so there is no conv state to move. "
            f"`conv_kernel` must be >= 2 (or `spec_tokens` >= 1)."
        )


class _Spec:
    """Behaviour shared by every family. Abstract: the concrete specs are final."""

    __slots__ = ()
    family: ClassVar[str]
    _dims: ClassVar[tuple[str, ...]]  # the fields that must be positive ints

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in self._dims:
            _check_positive_int(name, field, getattr(self, field))
        self._check_conv()
        if self.temporal_part is not None:
            _check_dtype(name, "ssm_dtype", self.ssm_dtype)  # type: ignore[attr-defined]
        self._check_relations()

    def _check_conv(self) -> None:
        """Validate the conv fields (families with a conv state)."""

    def _check_relations(self) -> None:
        """Validate how the dims relate to each other (family-specific)."""

    @property
    def conv_rows(self) -> int:
        """Rows kept per conv channel: `conv_kernel - 1 + spec_tokens` (0: no conv state)."""
        return 0

    @property
    def conv_parts(self) -> tuple[Part, ...]:
        """The conv sub-projections in page order (empty when there is no conv state)."""
        return ()

    @property
    def temporal_part(self) -> Part | None:
        """The temporal state's first (sharded) axis, or None when there is none."""
        return None

    @property
    def temporal_tail(self) -> tuple[int, ...]:
        """The temporal state's shape after its first axis."""
        return ()

    @property
    def conv_nbytes_per_elem(self) -> int:
        """Element size of the conv state in bytes (0 when there is none)."""
        return 0

    @property
    def ssm_nbytes_per_elem(self) -> int:
        """Element size of the temporal state in bytes (0 when there is none)."""
        if self.temporal_part is None:
            return 0
        return DTYPE_NBYTES[self.ssm_dtype]  # type: ignore[attr-defined]

    @property
    def parts(self) -> tuple[Part, ...]:
        """Every sharded part in page order: conv sub-projections, then temporal."""
        tail = (self.temporal_part,) if self.temporal_part is not None else ()
        return self.conv_parts + tail

    @property
    def full_conv_channels(self) -> int:
        """Conv channels of the full (unsharded) state, without replication."""
        return sum(p.num_units * p.unit_size for p in self.conv_parts)

    @property
    def full_temporal_shape(self) -> tuple[int, ...] | None:
        """Shape of the full temporal state, or None."""
        part = self.temporal_part
        return None if part is None else (part.num_units, *self.temporal_tail)


class _ConvSpec(_Spec):
    __slots__ = ()

    def _check_conv(self) -> None:
        _check_conv(self)

    @property
    def conv_rows(self) -> int:
        return self.conv_kernel - 1 + self.spec_tokens  # type: ignore[attr-defined]

    @property
    def conv_nbytes_per_elem(self) -> int:
        return DTYPE_NBYTES[self.conv_dtype]  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Mamba2Spec(_ConvSpec):
    """Mamba2 layer (Nemotron-H, Falcon-H1, Granite-4.0-H, Mamba2, Bamba, Zamba2).

    Full conv channels `[x: num_heads*head_dim | B: num_groups*state_size | C: same]`,
    temporal state of shape `(num_heads, head_dim, state_size)`. B and C are replicated
    when `num_groups` is smaller than the TP size.
    """

    num_heads: int
    head_dim: int
    num_groups: int
    state_size: int
    conv_kernel: int = 4
    conv_dtype: str = "bfloat16"
    ssm_dtype: str = "bfloat16"
    conv_layout: str = "DS"
    spec_tokens: int = 0
    family: ClassVar[str] = "mamba2"
    _dims: ClassVar[tuple[str, ...]] = ("num_heads", "head_dim", "num_groups", "state_size")

    def _check_relations(self) -> None:
        if self.num_heads % self.num_groups:
            raise SpecError(
                f"Mamba2Spec: `num_heads`={self.num_heads} is not a multiple of "
                f"`num_groups`={self.num_groups}; every group must own the same number of heads. "
                f"Check `mamba_num_heads` and `n_groups` (the spec's `num_groups`) in the model's config.json."
            )

    @property
    def conv_parts(self) -> tuple[Part, ...]:
        return (
            Part("conv.x", self.num_heads, self.head_dim, "heads"),
            Part("conv.B", self.num_groups, self.state_size, "groups", replicable=True),
            Part("conv.C", self.num_groups, self.state_size, "groups", replicable=True),
        )

    @property
    def temporal_part(self) -> Part:
        return Part("temporal", self.num_heads, self.head_dim * self.state_size, "heads")

    @property
    def temporal_tail(self) -> tuple[int, ...]:
        return (self.head_dim, self.state_size)


@dataclass(frozen=True, slots=True)
class GDNSpec(_ConvSpec):
    """Gated DeltaNet layer (Qwen3-Next, Qwen3.5; Kimi-Linear's KDA uses the same page).

    Full conv channels `[Q: num_k_heads*head_k_dim | K: same | V: num_v_heads*head_v_dim]`,
    temporal state of shape `(num_v_heads, head_v_dim, head_k_dim)`. Q and K are
    replicated when `num_k_heads` is smaller than the TP size.
    """

    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int = 4
    conv_dtype: str = "bfloat16"
    ssm_dtype: str = "bfloat16"
    conv_layout: str = "DS"
    spec_tokens: int = 0
    family: ClassVar[str] = "gdn"
    _dims: ClassVar[tuple[str, ...]] = ("num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim")

    def _check_relations(self) -> None:
        if self.num_v_heads % self.num_k_heads:
            raise SpecError(
                f"GDNSpec: `num_v_heads`={self.num_v_heads} is not a multiple of "
                f"`num_k_heads`={self.num_k_heads}; each key head must serve the same "
                f"number of value heads. Check `linear_num_value_heads` and "
                f"`linear_num_key_heads` in the model's config.json."
            )

    @property
    def conv_parts(self) -> tuple[Part, ...]:
        return (
            Part("conv.Q", self.num_k_heads, self.head_k_dim, "key heads", replicable=True),
            Part("conv.K", self.num_k_heads, self.head_k_dim, "key heads", replicable=True),
            Part("conv.V", self.num_v_heads, self.head_v_dim, "value heads"),
        )

    @property
    def temporal_part(self) -> Part:
        return Part("temporal", self.num_v_heads, self.head_v_dim * self.head_k_dim, "value heads")

    @property
    def temporal_tail(self) -> tuple[int, ...]:
        return (self.head_v_dim, self.head_k_dim)


@dataclass(frozen=True, slots=True)
class Mamba1Spec(_ConvSpec):
    """Mamba1 layer (Jamba): conv channels `[x: intermediate_size]`, temporal state of
    shape `(intermediate_size, state_size)`, both sharded by channels."""

    intermediate_size: int
    state_size: int
    conv_kernel: int = 4
    conv_dtype: str = "bfloat16"
    ssm_dtype: str = "bfloat16"
    conv_layout: str = "DS"
    spec_tokens: int = 0
    family: ClassVar[str] = "mamba1"
    _dims: ClassVar[tuple[str, ...]] = ("intermediate_size", "state_size")

    @property
    def conv_parts(self) -> tuple[Part, ...]:
        return (Part("conv.x", self.intermediate_size, 1, "channels"),)

    @property
    def temporal_part(self) -> Part:
        return Part("temporal", self.intermediate_size, self.state_size, "channels")

    @property
    def temporal_tail(self) -> tuple[int, ...]:
        return (self.state_size,)


@dataclass(frozen=True, slots=True)
class ShortConvSpec(_ConvSpec):
    """Short-conv layer (LFM2): conv channels `[x: conv_dim]` sharded by channels;
    no temporal state."""

    conv_dim: int
    conv_kernel: int = 4
    conv_dtype: str = "bfloat16"
    conv_layout: str = "DS"
    spec_tokens: int = 0
    family: ClassVar[str] = "short_conv"
    _dims: ClassVar[tuple[str, ...]] = ("conv_dim",)

    @property
    def conv_parts(self) -> tuple[Part, ...]:
        return (Part("conv.x", self.conv_dim, 1, "channels"),)


@dataclass(frozen=True, slots=True)
class LinearAttentionSpec(_Spec):
    """Lightning/linear attention layer (MiniMax): no conv state; temporal state of shape
    `(num_heads, head_dim, head_dim)` sharded by heads."""

    num_heads: int
    head_dim: int
    ssm_dtype: str = "bfloat16"
    family: ClassVar[str] = "linear_attention"
    _dims: ClassVar[tuple[str, ...]] = ("num_heads", "head_dim")

    @property
    def temporal_part(self) -> Part:
        return Part("temporal", self.num_heads, self.head_dim * self.head_dim, "heads")

    @property
    def temporal_tail(self) -> tuple[int, ...]:
        return (self.head_dim, self.head_dim)


Spec = Union[Mamba2Spec, GDNSpec, Mamba1Spec, ShortConvSpec, LinearAttentionSpec]
"""Any layer-state spec."""

SPEC_TYPES: tuple[type, ...] = (Mamba2Spec, GDNSpec, Mamba1Spec, ShortConvSpec, LinearAttentionSpec)


def check_is_spec(value: object, argument: str = "spec") -> None:
    """Raise `SpecError` unless `value` is one of the spec classes."""
    if not isinstance(value, SPEC_TYPES):
        names = ", ".join(t.__name__ for t in SPEC_TYPES)
        raise SpecError(
            f"`{argument}` must be a state spec ({names}), got {type(value).__name__}. "
            f"Build one, e.g. `Mamba2Spec(num_heads=8, head_dim=64, num_groups=1, state_size=128)`, "
            f"or look up a preset with `ssm_split.model(name)`."
        )


def spec_fields(spec: Spec) -> dict[str, object]:
    """The spec's constructor fields as a plain dict (for messages and serialisation)."""
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
