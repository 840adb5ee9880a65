"""`ssm-split vllm-check`: the table, `--strict` (a CI job can fail on vLLM's reads),
`--json` (one `ssm-split/vllm-check` document, reads as the API names them) and one-line
errors for bad arguments."""

from __future__ import annotations

import json
import sys

import pytest

from ssm_split import Read, model, plan_reads

from tests._vllm import importing_vllm

with importing_vllm():
    import vllm  # noqa: F401
    from vllm.distributed.kv_transfer.kv_connector.v1 import ssm_conv_transfer_utils  # noqa: F401

from ssm_split.cli._main import main  # noqa: E402
from ssm_split.integrations import vllm as sv  # noqa: E402

pytestmark = pytest.mark.vllm


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["vllm-check", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def marked_rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.startswith("* ")]


def test_granite_1_to_2_marks_vllms_wrong_reads_and_strict_fails(capsys):
    rc, out, err = run(capsys, "granite-4.0-h-tiny", "--src-tp", "1", "--dst-tp", "2")
    assert rc == 0 and err == ""
    marked = marked_rows(out)
    # rank 0: C read from the src temporal state; rank 1: B from the src C, C from temporal
    assert [(row[1], row[-1]) for row in marked] == [("conv.C", "ssm_split"), ("conv.B", "ssm_split"),
                                                    ("conv.C", "ssm_split")]
    assert "[19968, 20736) temporal" in " ".join(marked[0])
    assert "[19200, 19968) conv.C" in " ".join(marked[1])
    assert "vLLM's reads give wrong pages on dst ranks [0, 1]." in out
    assert "ssm_split's reads give the reference pages on every dst rank checked." in out
    rc, out, err = run(capsys, "granite-4.0-h-tiny", "--src-tp", "1", "--dst-tp", "2", "--strict")
    assert rc == 1 and "--strict: vLLM's reads differ from ssm_split's on dst ranks [0, 1]." in err


def test_strict_passes_where_vllm_is_right(capsys):
    rc, out, err = run(capsys, "nemotron-h-8b", "--src-tp", "4", "--dst-tp", "2", "--rank", "1", "--strict")
    assert rc == 0 and err == "" and marked_rows(out) == []
    assert "vLLM's reads give the reference pages on every dst rank checked." in out


def test_what_vllm_refuses_fails_only_under_strict(capsys):
    rc, out, _ = run(capsys, "lfm2-1.2b", "--src-tp", "1", "--dst-tp", "2")
    assert rc == 0 and "vLLM refuses this transfer" in out and "dst rank 1 of tp=2" in out
    rc, _, err = run(capsys, "lfm2-1.2b", "--src-tp", "1", "--dst-tp", "2", "--strict")
    assert rc == 1 and "--strict: vLLM refuses this transfer." in err


def test_json_is_the_comparison_with_reads_as_the_api_names_them(capsys):
    rc, out, err = run(capsys, "granite-4.0-h-tiny", "--src-tp", "1", "--dst-tp", "2", "--json", "--strict")
    doc = json.loads(out)
    assert rc == 1 == doc["exit_status"] and err == ""
    assert (doc["schema"], doc["version"]) == ("ssm-split/vllm-check", 1)
    assert (doc["src_tp"], doc["dst_tp"], doc["conv_layout"], doc["strict"]) == (1, 2, "DS", True)
    assert doc["spec"]["class"] == "Mamba2Spec" and doc["spec"]["fields"]["num_groups"] == 1
    assert doc["vllm_differs"] is True and doc["vllm_refused"] is None
    assert doc["vllm_wrong_ranks"] == [0, 1] and doc["ssm_split_wrong_ranks"] == []
    granite = model("granite-4.0-h-tiny")
    for rank in doc["ranks"]:
        r = rank["dst_rank"]
        assert [Read(**x) for x in rank["ssm_split_reads"]] == list(plan_reads(granite, 1, 2, r).reads)
        assert [Read(**x) for x in rank["vllm_reads"]] == list(sv.vllm_reads(granite, 1, 2, r))
        assert rank["differs"] and not rank["vllm_right"] and rank["ssm_split_right"]
        assert sum(row["nbytes"] for row in rank["rows"]) == plan_reads(granite, 1, 2, r).dst_content_nbytes
        assert any(row["differs"] and row["segment"] == "conv.C" for row in rank["rows"])
    rc, out, _ = run(capsys, "lfm2-1.2b", "--src-tp", "1", "--dst-tp", "2", "--json")
    doc = json.loads(out)
    assert rc == 0 and "Mamba1, Mamba2 and GDN" in doc["vllm_refused"] and len(doc["plans"]) == 2


@pytest.mark.parametrize("argv, phrase", [
    (["granite-4.0-h-tiny", "--src-tp", "x", "--dst-tp", "2"], "argument --src-tp: expected a whole number >= 1, got 'x'"),
    (["granite-4.0-h-tiny", "--src-tp", "0", "--dst-tp", "2"], "argument --src-tp: must be >= 1, got 0"),
    (["granite-4.0-h-tiny", "--src-tp", "1", "--dst-tp", "2", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["granite-4.0-h-tiny", "--dst-tp", "2"], "the following arguments are required: --src-tp"),
    (["granite-4.0-h-tiny", "--src-tp", "1", "--dst-tp", "2", "--rank", "7"], "`dst_rank` must be an int in [0, 2)"),
    (["nope", "--src-tp", "1", "--dst-tp", "2"], "Unknown model 'nope'"),
    (["falcon-h1-7b", "--src-tp", "16", "--dst-tp", "2"], "24 heads"),
])
def test_bad_arguments_get_one_line_and_exit_2(capsys, argv, phrase):
    with pytest.raises(SystemExit) as exited:
        rc = main(["vllm-check", *argv])
        raise SystemExit(rc)
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and phrase in err and "Traceback" not in err


def test_without_vllm_the_error_says_how_to_install_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    for argv in (["--json"], ["--strict"]):
        rc, out, err = run(capsys, "granite-4.0-h-tiny", "--src-tp", "1", "--dst-tp", "2", *argv)
        assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
        assert "install vLLM" in err and "scripts/install-vllm.sh" in err
