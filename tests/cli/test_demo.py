"""`ssm-split demo`, the README's main job: separate processes, real NIXL READs, checked
against the reference model."""

from __future__ import annotations

import pytest

pytest.importorskip("nixl")

from ssm_split.cli._main import main  # noqa: E402

pytestmark = pytest.mark.nixl


def test_demo_moves_and_verifies_state(capsys):
    assert main(["demo", "--requests", "4", "--layers", "2", "--seed", "3"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # not a terminal: no progress line
    assert "granite-4.0-h-tiny" in out and "src_tp 1 -> dst_tp 2" in out
    assert "verified: 16 decode pages byte for byte" in out  # 4 requests x 2 layers x 2 ranks
    assert "src rank 0: 4 requests x 2 readers" in out
    assert "FAILED" not in out


def test_demo_rejects_a_tp_the_model_cannot_use(capsys):
    assert main(["demo", "--model", "granite-4.0-h-tiny", "--dst-tp", "5"]) == 2
    assert "Cannot shard" in capsys.readouterr().err  # more cases: test_errors.py


def test_demo_rejects_more_layers_than_the_model_has(capsys):
    assert main(["demo", "--model", "qwen3.5-0.8b", "--layers", "19"]) == 2
    assert "18 state layers" in capsys.readouterr().err


@pytest.mark.parametrize("strategy", ["auto", "direct", "staged", "packed"])
def test_demo_runs_and_verifies_every_strategy_on_dram(strategy, capsys):
    import json

    argv = ["demo", "--model", "qwen3.5-0.8b", "--src-tp", "2", "--dst-tp", "1", "--requests", "6",
            "--layers", "2", "--batch", "3", "--strategy", strategy, "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["strategy"] == strategy and report["verified"]
    for rank in report["dst_ranks"]:
        assert rank["verified"] and rank["mismatched_nbytes"] == 0
        if strategy != "auto":
            assert rank["strategies"] == [strategy]  # what ran is what was asked for
