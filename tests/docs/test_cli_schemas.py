"""The `--json` schemas documented in docs/cli.md are the documents the commands print:
every documented key is there with its documented type, and no undocumented key is."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from tests.cli._run import run_subprocess
from ._blocks import REPO

_ROW = re.compile(r"^\| `(\w+)` \| ([^|]+?) \|")
_OBJECT = re.compile(r"^`(\w+)`(?: \(.*\))?:$")
_SCHEMA = re.compile(r"^### `(ssm-split/[\w-]+)`$")


def documented() -> dict[str, dict[str, str]]:
    """`{table name: {key: type}}` of docs/cli.md: schemas and objects."""
    tables: dict[str, dict[str, str]] = {}
    name = None
    for line in (REPO / "docs" / "cli.md").read_text(encoding="utf-8").splitlines():
        heading = _SCHEMA.match(line) or _OBJECT.match(line)
        if heading:
            name = heading.group(1)
            tables[name] = {}
        elif name and (row := _ROW.match(line)):
            tables[name][row.group(1)] = row.group(2).strip()
        elif line.startswith("#"):
            name = None
    return tables


TABLES = documented()


def check(value, kind: str, where: str) -> None:
    """`value` is of the documented type `kind` ("int", "list of read", "str or null")."""
    errors = []
    for alternative in kind.split(" or "):
        try:
            _check_one(value, alternative.strip(), where)
            return
        except AssertionError as error:
            errors.append(str(error))
    raise AssertionError(" / ".join(errors))


def _check_one(value, kind: str, where: str) -> None:
    simple = {"int": int, "float": (int, float), "str": str, "bool": bool, "object": dict}
    if kind == "null":
        assert value is None, f"{where}: {value!r} is not null"
    elif kind in simple:
        assert isinstance(value, simple[kind]) and (kind == "bool") == isinstance(value, bool), \
            f"{where}: {value!r} is not {kind}"
    elif kind.startswith("list of "):
        assert isinstance(value, list), f"{where}: {value!r} is not a list"
        for i, item in enumerate(value):
            check(item, kind[len("list of "):], f"{where}[{i}]")
    else:
        assert kind in TABLES, f"{where}: docs/cli.md names a type {kind!r} it does not define"
        check_object(value, TABLES[kind], where)


def check_object(value, table: dict[str, str], where: str) -> None:
    assert isinstance(value, dict), f"{where}: {value!r} is not an object"
    assert list(value) == list(table), (f"{where}: keys {list(value)} printed, "
                                        f"{list(table)} documented")
    for key, kind in table.items():
        check(value[key], kind, f"{where}.{key}")


def test_docs_define_every_command_schema():
    assert {"ssm-split/models", "ssm-split/layout", "ssm-split/plan", "ssm-split/demo"} <= set(TABLES)
    assert all(TABLES.values())  # no table left empty by a parsing slip


@pytest.mark.parametrize("argv", [
    ("models", "--tp", "16"),
    ("layout", "nemotron-h-8b", "--tp", "16", "--conv-layout", "SD", "--all-ranks"),
    ("layout", "qwen3.5-27b", "--tp", "8"),
    ("plan", "falcon-h1-7b", "--src-tp", "4", "--dst-tp", "6"),
    ("demo", "--requests", "2", "--layers", "1", "--dst-tp", "4"),
], ids=lambda argv: " ".join(argv))
def test_a_json_document_follows_its_documented_schema(argv):
    if argv[0] == "demo" and importlib.util.find_spec("nixl") is None:
        pytest.skip("needs nixl")
    result = run_subprocess(*argv, "--json")
    assert result.rc == 0, result.err
    doc = json.loads(result.out)
    check_object(doc, TABLES[f"ssm-split/{argv[0]}"], argv[0])


def test_the_checker_catches_a_wrong_document():
    table = TABLES["read"]
    check_object({"src_rank": 0, "src_offset": 1, "dst_offset": 2, "nbytes": 3}, table, "read")
    for wrong in ({"src_rank": 0, "src_offset": 1, "dst_offset": 2},
                  {"src_rank": 0, "src_offset": 1, "dst_offset": 2, "nbytes": 3, "extra": 1},
                  {"src_rank": True, "src_offset": 1, "dst_offset": 2, "nbytes": 3},
                  {"src_rank": "0", "src_offset": 1, "dst_offset": 2, "nbytes": 3}):
        with pytest.raises(AssertionError):
            check_object(wrong, table, "read")
