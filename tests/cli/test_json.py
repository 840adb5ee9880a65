"""`--json` of models, layout, plan and demo: one versioned document on stdout, whose
values are what the API returns for the same arguments (docs/cli.md)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from ssm_split import model, models, page_layout, plan_reads
from ssm_split.layout import Segment, UnitRange, rank_units, valid_tp_sizes
from ssm_split.plan import Read
from ssm_split.specs import preset_info
from ssm_split.specs._spec import spec_fields
from ._run import run_main, run_subprocess


def document(result, command: str) -> dict:
    assert result.rc == 0 and result.err == "", result.err
    doc = json.loads(result.out)  # the whole of stdout is one document
    assert list(doc)[:2] == ["schema", "version"]
    assert doc["schema"] == f"ssm-split/{command}" and doc["version"] == 1
    return doc


def test_models_json_matches_the_presets(capsys):
    doc = document(run_main(capsys, "models", "--tp", "16", "--json"), "models")
    assert doc["tp"] == 16 and [m["name"] for m in doc["models"]] == list(models())
    for entry in doc["models"]:
        info = preset_info(entry["name"])
        assert entry["spec"] == {"family": info.family, "class": type(info.spec).__name__,
                                 "fields": spec_fields(info.spec)}
        assert entry["num_state_layers"] == info.num_state_layers
        assert entry["tp_sizes"] == list(valid_tp_sizes(info.spec))
        if 16 in entry["tp_sizes"]:
            layout = page_layout(info.spec, 16, 0)
            assert entry["page"] == {
                "conv_nbytes": layout.conv_nbytes, "temporal_nbytes": layout.temporal_nbytes,
                "content_nbytes": layout.content_nbytes,
                "request_nbytes": layout.content_nbytes * info.num_state_layers}
        else:
            assert entry["page"] is None
    assert {m["name"]: m["page"] for m in doc["models"]}["falcon-h1-7b"] is None  # 24 heads


@pytest.mark.parametrize("argv, tp, ranks", [
    (("granite-4.0-h-tiny", "--tp", "4", "--all-ranks"), 4, range(4)),
    (("qwen3.5-27b", "--tp", "8", "--rank", "5"), 8, [5]),
    (("nemotron-h-8b", "--tp", "2", "--conv-layout", "SD", "--spec-tokens", "1"), 2, [0]),
])
def test_layout_json_is_page_layout(capsys, argv, tp, ranks):
    doc = document(run_main(capsys, "layout", *argv, "--json"), "layout")
    spec = model(argv[0])
    if "--conv-layout" in argv:
        spec = type(spec)(**{**spec_fields(spec), "conv_layout": "SD", "spec_tokens": 1})
    assert doc["spec"]["fields"] == spec_fields(spec) and doc["tp"] == tp
    assert [page["rank"] for page in doc["pages"]] == list(ranks)
    for page in doc["pages"]:
        layout = page_layout(spec, tp, page["rank"])
        assert tuple(Segment(**s) for s in page["segments"]) == layout.segments
        assert tuple(UnitRange(**u) for u in page["units"]) == rank_units(spec, tp, page["rank"])
        assert page["content_nbytes"] == layout.content_nbytes


@pytest.mark.parametrize("name, src_tp, dst_tp, rank", [
    ("falcon-h1-7b", 4, 6, None), ("granite-4.0-h-tiny", 1, 2, 1), ("qwen3.5-0.8b", 4, 2, None),
])
def test_plan_json_reads_are_plan_reads(capsys, name, src_tp, dst_tp, rank):
    argv = ["plan", name, "--src-tp", str(src_tp), "--dst-tp", str(dst_tp), "--json"]
    if rank is not None:
        argv += ["--rank", str(rank)]
    doc = document(run_main(capsys, *argv), "plan")
    spec = model(name)
    ranks = range(dst_tp) if rank is None else [rank]
    assert [p["dst_rank"] for p in doc["plans"]] == list(ranks)
    for entry in doc["plans"]:
        plan = plan_reads(spec, src_tp, dst_tp, entry["dst_rank"])
        assert tuple(Read(**r) for r in entry["reads"]) == plan.reads
        assert entry["src_ranks"] == list(plan.src_ranks) and entry["nbytes"] == plan.nbytes
    assert doc["num_reads"] == sum(len(p["reads"]) for p in doc["plans"])
    assert doc["model"]["name"] == name and doc["spec"]["fields"] == spec_fields(spec)


@pytest.mark.skipif(importlib.util.find_spec("nixl") is None, reason="needs nixl")
def test_demo_json_is_one_document_that_agrees_with_the_plans():
    # UCX would warn about this variable on a CPU run; quiet by default (issue 15)
    result = run_subprocess("demo", "--model", "qwen3.5-0.8b", "--src-tp", "2", "--dst-tp", "1",
                            "--requests", "4", "--layers", "2", "--json",
                            UCX_CUDA_IPC_ENABLE_GET_ZCOPY="y")
    doc = document(result, "demo")  # also: nothing on stderr, no NIXL INFO or UCX lines
    spec = model("qwen3.5-0.8b")
    (rank,) = doc["dst_ranks"]
    plan = plan_reads(spec, 2, 1, 0)
    assert rank["reads_per_page"] == len(plan.reads) and rank["src_ranks"] == [0, 1]
    assert rank["nbytes"] == plan.nbytes * 4 * 2 == doc["nbytes"]
    assert rank["num_reads"] == len(plan.reads) * 4 * 2
    assert rank["verified"] and rank["mismatched_nbytes"] == 0 and doc["verified"]
    assert doc["src_ranks"] == [{"src_rank": r, "num_requests": 4, "num_readers": 1} for r in (0, 1)]
    assert doc["dst_content_nbytes"] == page_layout(spec, 1, 0).content_nbytes
