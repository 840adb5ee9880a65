"""The `--json` output of every `ssm-split` subcommand: one versioned document per run.

Every document is a JSON object whose first two keys say what it is::

    {"schema": "ssm-split/<command>", "version": 1, ...}

`version` changes only when a key changes meaning or disappears; new keys may be added
within a version. Values use the API's own names and units: a read is
`{"src_rank", "src_offset", "dst_offset", "nbytes"}` exactly as `ssm_split.Read` gives
it (byte offsets from the start of each page), a spec is its family and constructor
fields (`spec_json`). The schemas are documented in docs/cli.md.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from ..layout._layout import PageLayout, Segment, UnitRange
from ..plan._plan import Plan, Read
from ..specs._presets import ModelInfo
from ..specs._spec import Spec, spec_fields

__all__ = ["SCHEMA_VERSION", "document", "emit", "read_json", "plan_json", "spec_json",
           "model_json", "segment_json", "units_json", "layout_json", "add_json_option"]

SCHEMA_VERSION = 1


def document(command: str, payload: dict[str, Any]) -> dict[str, Any]:
    """`payload` under the schema header of `command`."""
    return {"schema": f"ssm-split/{command}", "version": SCHEMA_VERSION, **payload}


def emit(command: str, payload: dict[str, Any], out: TextIO | None = None) -> None:
    """Print the document of `command` as indented JSON (one document per run)."""
    json.dump(document(command, payload), out or sys.stdout, indent=2)
    (out or sys.stdout).write("\n")


def read_json(read: Read) -> dict[str, int]:
    """A `Read` as the API names its fields."""
    return {"src_rank": read.src_rank, "src_offset": read.src_offset,
            "dst_offset": read.dst_offset, "nbytes": read.nbytes}


def spec_json(spec: Spec) -> dict[str, Any]:
    """A spec as `{"family": ..., "class": ..., "fields": {constructor fields}}`."""
    return {"family": spec.family, "class": type(spec).__name__, "fields": spec_fields(spec)}


def plan_json(plan: Plan) -> dict[str, Any]:
    """A plan: its TP sizes, dst rank, content sizes, src ranks and reads."""
    return {"src_tp": plan.src_tp, "dst_tp": plan.dst_tp, "dst_rank": plan.dst_rank,
            "src_content_nbytes": plan.src_content_nbytes,
            "dst_content_nbytes": plan.dst_content_nbytes,
            "src_ranks": list(plan.src_ranks), "nbytes": plan.nbytes,
            "reads": [read_json(r) for r in plan.reads]}


def model_json(info: ModelInfo) -> dict[str, Any]:
    """A model as `ModelInfo` names it (without its spec: see `spec_json`)."""
    return {"name": info.name, "hf_id": info.hf_id, "family": info.family,
            "model_type": info.model_type, "layer_kind": info.layer_kind,
            "num_state_layers": info.num_state_layers, "num_layers": info.num_layers}


def segment_json(segment: Segment) -> dict[str, Any]:
    """A `Segment`: byte range `[offset, offset + nbytes)` of the page, and its units
    `[unit_start, unit_stop)` (half-open, like `UnitRange`); `row` is null except in SD."""
    return {"name": segment.name, "offset": segment.offset, "nbytes": segment.nbytes,
            "unit_start": segment.unit_start, "unit_stop": segment.unit_stop, "row": segment.row}


def units_json(units: UnitRange) -> dict[str, Any]:
    """A `UnitRange`: the units `[start, stop)` of one part a rank holds."""
    return {"part": units.part, "start": units.start, "stop": units.stop,
            "replicated": units.replicated}


def layout_json(layout: PageLayout) -> dict[str, Any]:
    """A rank's `PageLayout`: sizes, segments in page order, and its units per part."""
    return {"tp": layout.tp, "rank": layout.rank, "conv_nbytes": layout.conv_nbytes,
            "temporal_nbytes": layout.temporal_nbytes, "content_nbytes": layout.content_nbytes,
            "segments": [segment_json(s) for s in layout.segments],
            "units": [units_json(u) for u in layout.units]}


def add_json_option(parser: Any, command: str) -> None:
    """The `--json` flag of a subcommand, named after its schema."""
    parser.add_argument("--json", action="store_true",
                        help=f"print one JSON document (schema ssm-split/{command}, version "
                             f"{SCHEMA_VERSION}; docs/cli.md) instead of the tables")
