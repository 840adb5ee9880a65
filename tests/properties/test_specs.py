"""Specs: frozen, hashable values that round-trip through `dataclasses.replace`, whose
parts follow the design's family table, and that reject every impossible field."""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ssm_split import (
    GDNSpec,
    LinearAttentionSpec,
    Mamba1Spec,
    Mamba2Spec,
    ShortConvSpec,
    SpecError,
)
from ssm_split.errors import SpecMismatchError
from ssm_split.specs import check_transferable
from ssm_split.reference import state_shapes
from tests.strategies import layout_cases, specs, transfer_cases

# one valid set of arguments per family
VALID = {
    Mamba2Spec: dict(num_heads=8, head_dim=4, num_groups=2, state_size=16),
    GDNSpec: dict(num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8),
    Mamba1Spec: dict(intermediate_size=16, state_size=4),
    ShortConvSpec: dict(conv_dim=16),
    LinearAttentionSpec: dict(num_heads=4, head_dim=8),
}
SIZE_FIELDS = {
    Mamba2Spec: ("num_heads", "head_dim", "num_groups", "state_size", "conv_kernel"),
    GDNSpec: ("num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim", "conv_kernel"),
    Mamba1Spec: ("intermediate_size", "state_size", "conv_kernel"),
    ShortConvSpec: ("conv_dim", "conv_kernel"),
    LinearAttentionSpec: ("num_heads", "head_dim"),
}
DTYPE_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls) if f.name.endswith("_dtype"))
                for cls in VALID}
CONV_CLASSES = (Mamba2Spec, GDNSpec, Mamba1Spec, ShortConvSpec)


# --- values -------------------------------------------------------------------------------


@given(spec=specs())
def test_specs_are_frozen_hashable_values(spec):
    twin = type(spec)(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)})
    assert twin == spec and hash(twin) == hash(spec) and twin is not spec
    assert len({spec, twin}) == 1
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert eval(repr(spec), {cls.__name__: cls for cls in VALID}) == spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(spec, dataclasses.fields(spec)[0].name, 7)
    with pytest.raises((AttributeError, TypeError)):  # slots: no new attributes either
        object.__setattr__(spec, "extra", 1)


def _same_family_pairs():
    return specs().flatmap(lambda old: st.tuples(st.just(old), specs(families=(old.family,))))


@given(pair=_same_family_pairs())
def test_replace_round_trips(pair):
    """Replacing every field of `old` with those of `new` (same family) gives `new`, and
    back; `old` is left unchanged."""
    old, new = pair
    before = dataclasses.astuple(old)
    changed = dataclasses.replace(old, **{f.name: getattr(new, f.name) for f in dataclasses.fields(new)})
    assert changed == new and hash(changed) == hash(new)
    assert dataclasses.astuple(old) == before
    assert dataclasses.replace(changed, **{f.name: getattr(old, f.name) for f in dataclasses.fields(old)}) == old


@given(spec=specs())
def test_parts_follow_the_family_table(spec):
    """The spec's parts give the same full state as the reference model's own table."""
    shapes = {name: shape for name, (shape, _) in state_shapes(spec).items()}
    assert [p.name for p in spec.parts] == list(shapes)
    for part in spec.conv_parts:
        assert shapes[part.name] == (part.num_units * part.unit_size, spec.conv_rows)
    assert spec.full_conv_channels == sum(shapes[p.name][0] for p in spec.conv_parts)
    if spec.temporal_part is None:
        assert "temporal" not in shapes and spec.full_temporal_shape is None
    else:
        assert spec.full_temporal_shape == shapes["temporal"]
        assert spec.temporal_part.unit_size == math.prod(shapes["temporal"][1:])
    replicable = {p.name for p in spec.parts if p.replicable}
    assert replicable == ({"conv.B", "conv.C"} if isinstance(spec, Mamba2Spec)
                          else {"conv.Q", "conv.K"} if isinstance(spec, GDNSpec) else set())


@given(case=layout_cases(families=("mamba2", "gdn", "mamba1", "short_conv")))
def test_conv_rows_count_kernel_and_spec_tokens(case):
    spec, _ = case
    assert spec.conv_rows == spec.conv_kernel - 1 + spec.spec_tokens >= 1


def test_defaults_are_the_issue_contract():
    spec = Mamba2Spec(num_heads=8, head_dim=4, num_groups=2, state_size=16)
    assert (spec.conv_kernel, spec.conv_dtype, spec.ssm_dtype, spec.conv_layout, spec.spec_tokens) == (
        4, "bfloat16", "bfloat16", "DS", 0)
    assert LinearAttentionSpec(num_heads=4, head_dim=8).ssm_dtype == "bfloat16"
    assert ShortConvSpec(conv_dim=4).conv_rows == 3


@given(case=transfer_cases())
def test_a_spec_is_transferable_to_itself_only(case):
    spec, _, _ = case
    check_transferable(spec, dataclasses.replace(spec))
    other = next(s for s in (Mamba2Spec(num_heads=1, head_dim=1, num_groups=1, state_size=1),
                             ShortConvSpec(conv_dim=1)) if type(s) is not type(spec))
    with pytest.raises(SpecMismatchError, match=f"src is a {type(spec).__name__}"):
        check_transferable(spec, other)


# --- invalid fields ------------------------------------------------------------------------


def _size_cases():
    for cls, fields in SIZE_FIELDS.items():
        for field in fields:
            for bad, match in ((0, "must be >= 1, got 0"), (-3, "must be >= 1, got -3"),
                               (True, "must be an int, got True of type bool"),
                               (2.0, "must be an int, got 2.0 of type float"),
                               ("4", "must be an int, got '4' of type str"),
                               (None, "must be an int, got None")):
                yield pytest.param(cls, field, bad, match, id=f"{cls.__name__}-{field}-{bad!r}")
    for cls in CONV_CLASSES:
        yield pytest.param(cls, "spec_tokens", -1, "must be >= 0, got -1", id=f"{cls.__name__}-spec_tokens")
        yield pytest.param(cls, "spec_tokens", 1.0, "must be an int", id=f"{cls.__name__}-spec_tokens-float")


@pytest.mark.parametrize("cls, field, bad, match", list(_size_cases()))
def test_bad_sizes_name_the_field(cls, field, bad, match):
    with pytest.raises(SpecError, match=f"{cls.__name__}: `{field}` {match}"):
        cls(**{**VALID[cls], field: bad})


@pytest.mark.parametrize("cls", list(VALID))
@pytest.mark.parametrize("bad", ["float64", "fp8", "bf16", "BFLOAT16", None, 2])
def test_bad_dtypes_name_the_field_and_the_choices(cls, bad):
    for field in DTYPE_FIELDS[cls]:
        with pytest.raises(SpecError, match=rf"`{field}` must be one of \['bfloat16', 'float16', "
                                            rf"'float32'\], got {bad!r}"):
            cls(**{**VALID[cls], field: bad})


@pytest.mark.parametrize("cls", CONV_CLASSES)
@pytest.mark.parametrize("bad", ["ds", "XY", "", None])
def test_bad_conv_layouts_are_rejected(cls, bad):
    with pytest.raises(SpecError, match=rf"`conv_layout` must be \"DS\".*got {bad!r}"):
        cls(**{**VALID[cls], "conv_layout": bad})


@pytest.mark.parametrize("cls", CONV_CLASSES)
def test_no_conv_rows_is_rejected(cls):
    with pytest.raises(SpecError, match="keeps 0 conv rows.*`conv_kernel` must be >= 2"):
        cls(**{**VALID[cls], "conv_kernel": 1, "spec_tokens": 0})
    assert cls(**{**VALID[cls], "conv_kernel": 1, "spec_tokens": 1}).conv_rows == 1


def test_heads_must_split_evenly_among_groups():
    with pytest.raises(SpecError, match="`num_heads`=6 is not a multiple of `num_groups`=4"):
        Mamba2Spec(num_heads=6, head_dim=4, num_groups=4, state_size=16)
    with pytest.raises(SpecError, match="`num_v_heads`=6 is not a multiple of `num_k_heads`=4"):
        GDNSpec(num_k_heads=4, num_v_heads=6, head_k_dim=8, head_v_dim=8)


@pytest.mark.parametrize("cls", list(VALID))
def test_unknown_or_missing_fields_are_type_errors(cls):
    with pytest.raises(TypeError):
        cls(**{**VALID[cls], "num_layers": 2})
    with pytest.raises(TypeError):
        cls()


@given(spec=specs(), value=st.integers(-5, 0))
def test_replace_validates_too(spec, value):
    field = dataclasses.fields(spec)[0].name  # the first size field of every family
    with pytest.raises(SpecError, match=f"`{field}` must be >= 1, got {value}"):
        dataclasses.replace(spec, **{field: value})
