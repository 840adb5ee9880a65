"""The stacked page spec: `num_layers` layers of one spec in one page, unit-major, and the
checks that accept it wherever a page is described (layout, plan, endpoints, handshakes).

vLLM keeps one tensor per layer, so a request's state is `layers x reads` small ranges.
An engine that can choose its layout can instead keep, per rank and per block, one page
for all `L` state layers with every part stored unit-major across layers::

    stacked page of rank r (DS conv), every part as an array (units_r, L, unit ...):
    | conv.x (units_r, L, head_dim, rows) | conv.B (...) | conv.C (...) | temporal (units_r, L, *tail) |

That page is exactly the page of a spec whose every part has `unit_size * L` (temporal
tail `(L, *tail)`), so `StackedSpec` offers the attributes the layout code reads with
those sizes, and `page_layout`, `plan_reads`, `Endpoint` and the Reader's programs take it
like any spec: one "layer" region whose pages are stacked pages. Kernels that need one
layer's view of it are in `ssm_split.strategies` (`layer_view`, `stack_pages`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

from ..errors import SpecError, SpecMismatchError
from ._spec import SPEC_TYPES, Part, Spec, check_is_spec, spec_fields

__all__ = ["StackedSpec", "stack_layers", "PageSpec", "check_is_page_spec", "check_transferable",
           "page_spec_fields"]


@dataclass(frozen=True, slots=True)
class StackedSpec:
    """`num_layers` layers of `base` in one page, every part unit-major across layers.

    It offers the spec attributes the layout code reads (`parts`, `conv_parts`,
    `temporal_part`, `temporal_tail`, `conv_rows`, dtypes, `conv_layout`, `family`),
    with every unit size multiplied by `num_layers`.

    Raises:
        SpecError: `base` is not a per-layer spec, or `num_layers` is not an int >= 1.
    """

    base: Spec
    num_layers: int

    def __post_init__(self) -> None:
        check_is_spec(self.base, "base")
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise SpecError(f"StackedSpec.num_layers must be an int >= 1 (the layers held by one "
                            f"stacked page), got {self.num_layers!r}.")

    @property
    def family(self) -> str:
        return self.base.family

    @property
    def conv_rows(self) -> int:
        return self.base.conv_rows

    @property
    def conv_layout(self) -> str:
        return getattr(self.base, "conv_layout", "DS")

    @property
    def conv_nbytes_per_elem(self) -> int:
        return self.base.conv_nbytes_per_elem

    @property
    def ssm_nbytes_per_elem(self) -> int:
        return self.base.ssm_nbytes_per_elem

    @property
    def conv_parts(self) -> tuple[Part, ...]:
        return tuple(dataclasses.replace(p, unit_size=p.unit_size * self.num_layers) for p in self.base.conv_parts)

    @property
    def temporal_part(self) -> Part | None:
        part = self.base.temporal_part
        return None if part is None else dataclasses.replace(part, unit_size=part.unit_size * self.num_layers)

    @property
    def temporal_tail(self) -> tuple[int, ...]:
        return (self.num_layers, *self.base.temporal_tail) if self.base.temporal_part is not None else ()

    @property
    def parts(self) -> tuple[Part, ...]:
        tail = (self.temporal_part,) if self.temporal_part is not None else ()
        return self.conv_parts + tail


PageSpec = Union[Spec, StackedSpec]
"""What one page holds: one layer's state (a `Spec`) or several layers' (`StackedSpec`)."""


def stack_layers(spec: Spec, num_layers: int) -> StackedSpec:
    """The stacked page of `num_layers` layers of `spec` (see the module doc)."""
    return StackedSpec(spec, num_layers)


def check_is_page_spec(value: object, argument: str = "spec") -> None:
    """Raise `SpecError` unless `value` is a spec or a `StackedSpec`."""
    if not isinstance(value, (*SPEC_TYPES, StackedSpec)):
        check_is_spec(value, argument)  # raises, naming the spec classes and how to build one


def page_spec_fields(spec: PageSpec) -> dict[str, object]:
    """A page spec's fields as a plain dict: the spec's own, or a stacked spec's base
    fields and `num_layers` (for messages)."""
    if isinstance(spec, StackedSpec):
        return {**spec_fields(spec.base), "num_layers": spec.num_layers}
    return spec_fields(spec)


def _name(spec: PageSpec) -> str:
    if isinstance(spec, StackedSpec):
        return f"StackedSpec of {type(spec.base).__name__}"
    return type(spec).__name__


def check_transferable(src_spec: PageSpec, dst_spec: PageSpec) -> None:
    """Raise `SpecMismatchError` unless state of `src_spec` can be copied into `dst_spec`.

    Both sides must describe the same family with equal dimensions, dtypes, conv layout
    and conv rows (spec tokens), stacked alike (the same number of layers per page, or
    both per layer); only the TP size and the page padding may differ.
    """
    check_is_page_spec(src_spec, "src_spec")
    check_is_page_spec(dst_spec, "dst_spec")
    src_base = src_spec.base if isinstance(src_spec, StackedSpec) else src_spec
    dst_base = dst_spec.base if isinstance(dst_spec, StackedSpec) else dst_spec
    if type(src_base) is not type(dst_base) or isinstance(src_spec, StackedSpec) != isinstance(dst_spec, StackedSpec):
        raise SpecMismatchError(
            f"src is a {_name(src_spec)} but dst is a {_name(dst_spec)}: state moves only between "
            f"layers of the same family, kept per layer on both sides or stacked on both. Check "
            f"that both engines serve the same model and layer and lay their pages out alike."
        )
    src_fields, dst_fields = page_spec_fields(src_spec), page_spec_fields(dst_spec)
    diffs = [f"{k}: src={src_fields[k]!r}, dst={dst_fields[k]!r}"
             for k in src_fields if src_fields[k] != dst_fields[k]]
    if diffs:
        hint = ""
        if src_spec.conv_rows != dst_spec.conv_rows:
            hint = (f" Conv rows differ (src {src_spec.conv_rows}, dst {dst_spec.conv_rows}): "
                    f"run both engines with the same number of speculative tokens.")
        raise SpecMismatchError(
            f"src and dst {_name(src_spec)} differ in {'; '.join(diffs)}. "
            f"Only the TP size and page padding may differ between the sides; configure "
            f"both engines with the same model, dtypes and conv layout.{hint}"
        )
