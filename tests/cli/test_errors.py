"""Every bad argument of every subcommand gets one line, exit status 2, no traceback
(issue 15). The cases are in `_bad_args.CASES`; missing NIXL, vLLM or a GPU are such
errors too, and so are failures inside the demo's rank processes."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import sys

import pytest

from ssm_split.errors import TransferError
from ._bad_args import CASES, Bad
from ._run import Result, run_main, run_subprocess

PARAMS = [pytest.param(case, id=f"{command or 'ssm-split'}: {case.id}")
          for command, cases in CASES.items() for case in cases]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "empty").mkdir()
    (root / "bad.json").write_text("{not json")
    (root / "list.json").write_text("[1, 2]")
    (root / "llama.json").write_text(json.dumps({"model_type": "llama"}))
    return root


def assert_one_line_error(result: Result, command: str, phrase: str) -> None:
    """The contract of docs/cli.md for a refused command line."""
    assert result.rc == 2, result
    assert result.out == "", result
    assert "Traceback" not in result.err and "BrokenPipe" not in result.err, result.err
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    prefix = f"ssm-split {command}: error: " if command else "ssm-split: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert phrase in lines[0], lines[0]


@pytest.mark.parametrize("case", PARAMS)
def test_a_bad_argument_gets_one_line_and_status_2(case: Bad, scratch, capsys):
    for module in case.needs:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}")
    argv = [arg.replace("{tmp}", str(scratch)) for arg in case.argv]
    result = run_subprocess(*argv) if case.subprocess else run_main(capsys, *argv)
    command = case.argv[0] if case.argv and case.argv[0] in CASES else ""
    assert_one_line_error(result, command, case.phrase)


def test_every_subcommand_has_bad_argument_cases():
    from ssm_split.cli._main import SUBCOMMANDS

    covered = set(CASES)
    owned_elsewhere = {"bench"}  # the bench harness's cases are added with its rewrite
    assert {name for name, _ in SUBCOMMANDS} - owned_elsewhere <= covered


def test_missing_nixl_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nixl", None)  # find_spec and import now fail
    assert_one_line_error(run_main(capsys, "demo"), "demo", "pip install --no-deps nixl==1.5.1")


def test_missing_vllm_is_one_line(monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "vllm", None)
    result = run_main(capsys, "vllm-check", "granite-4.0-h-tiny", "--src-tp", "1", "--dst-tp", "2")
    assert_one_line_error(result, "vllm-check", "install vLLM")


def test_verbose_adds_the_traceback_above_the_line(capsys):
    result = run_main(capsys, "-v", "layout", "falcon-h1-7b", "--tp", "16")
    assert result.rc == 2 and "Traceback" in result.err and "ShardingError" in result.err
    assert result.err.splitlines()[-1].startswith("ssm-split layout: error: Cannot shard")


def test_help_exits_0(capsys):
    result = run_main(capsys, "layout", "--help")
    assert result.rc == 0 and "--json" in result.out and "config.json" in result.out


# -- the demo's rank processes ----------------------------------------------------------

def _fail_in_child(conn) -> None:
    from ssm_split.cli._demo_worker import _guard

    def body():
        raise RuntimeError("the GPU caught fire\nsecond line")
    _guard("src", 0, conn, body)


def test_a_failing_rank_process_reports_one_line():
    from ssm_split.cli._demo_worker import _guard

    parent, child = mp.Pipe()
    with pytest.raises(SystemExit):
        _guard("dst", 1, child, lambda: (_ for _ in ()).throw(ValueError("bad\nthing")))
    what, role, rank, (text, details) = parent.recv()
    assert (what, role, rank) == ("error", "dst", 1)
    assert text == "ValueError: bad thing" and "Traceback" in details


def test_a_rank_process_whose_parent_left_exits_quietly(capfd):
    from ssm_split.cli._demo_worker import _guard

    parent, child = mp.Pipe()
    parent.close()  # the parent gave up (timeout, Ctrl-C): sending now breaks the pipe
    with pytest.raises(SystemExit) as exit:
        _guard("src", 0, child, lambda: (_ for _ in ()).throw(RuntimeError("late")))
    assert exit.value.code == 1
    assert capfd.readouterr().err == ""


def test_the_parent_turns_a_child_failure_into_one_error():
    from ssm_split.cli._console import Progress
    from ssm_split.cli._demo_children import Children

    children = Children(timeout_s=60, progress=Progress(enabled=False))
    try:
        children.start("src", 0, _child_target)
        with pytest.raises(TransferError, match=r"src rank 0 process failed: RuntimeError: "
                                                r"the GPU caught fire second line$"):
            children.collect("ready", "src", 1)
    finally:
        children.close()


def _child_target(rank, conn):  # spawned: module-level, importable as tests.cli.test_errors
    _fail_in_child(conn)
