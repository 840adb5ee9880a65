"""Every shell command and Python block of README.md and docs/*.md runs, and prints what
the docs show (conventions: docs/cli.md, "Commands in the docs are tests").

docs/vllm.md is left to its own recipe test, written with that document (it needs vLLM,
whose import alone takes about 15 s here); its citations are still checked by
test_citations.py. Blocks marked gpu run in tests/gpu/test_gpu_docs.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ._blocks import REPO, Block, blocks, check_printed, console_commands, doc_blocks, \
    run_block, untested_commands

EXCLUDED = {"docs/vllm.md"}
DOCS = [p for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
        if str(p.relative_to(REPO)) not in EXCLUDED]


@pytest.mark.parametrize("block", doc_blocks(DOCS), ids=lambda b: b.id)
def test_doc_block_runs(block: Block):
    if block.marker == "skip":
        pytest.skip(f"marked skip: {block.marker_arg or 'no reason given'}")
    if block.marker == "gpu":
        pytest.skip("marked gpu: run by tests/gpu/test_gpu_docs.py on a CUDA machine")
    if block.marker == "needs" and importlib.util.find_spec(block.marker_arg) is None:
        pytest.skip(f"needs {block.marker_arg}, which is not installed")
    run_block(block)


def test_skips_say_why():
    unexplained = [b.id for b in doc_blocks(DOCS) if b.marker == "skip" and not b.marker_arg]
    assert unexplained == [], "give a reason: <!-- docs-test: skip REASON -->"


def test_no_command_hides_in_an_unlabelled_block():
    hidden = {b.id: untested_commands(b) for b in doc_blocks(DOCS, kind="all")}
    assert {k: v for k, v in hidden.items() if v} == {}, (
        "label these fences bash/console/python (or mark them skip) so they run")


# -- the runner itself ------------------------------------------------------------------

SAMPLE = """\
Text.

<!-- docs-test: skip installs things -->
```bash
pip install nothing
```

```console
$ echo one; echo two; echo three
one
three
```

```python
print("hello")
```
```output
hello
```

```
$ ssm-split models
```
"""


def test_the_parser_reads_languages_markers_and_outputs(tmp_path: Path):
    doc = tmp_path / "sample.md"
    doc.write_text(SAMPLE)
    found = blocks(doc)
    assert [(b.lang, b.marker, b.marker_arg) for b in found] == [
        ("bash", "skip", "installs things"), ("console", "", ""), ("python", "", ""), ("", "", "")]
    assert found[2].output == "hello\n" and found[0].line == 4
    assert console_commands(found[1].text) == [("echo one; echo two; echo three", "one\nthree")]
    assert untested_commands(found[3]) == ["$ ssm-split models"]


def test_the_runner_fails_on_wrong_output_or_status(tmp_path: Path):
    check_printed("one\nthree", "one\ntwo\nthree\n", "ok")
    with pytest.raises(AssertionError, match="does not print"):
        check_printed("three\none", "one\ntwo\nthree\n", "order matters")
    with pytest.raises(AssertionError, match="does not print"):
        check_printed("four", "one\n", "missing")
    doc = tmp_path / "bad.md"
    doc.write_text("```console\n$ ssm-split models --tp 1\nno-such-model\n```\n"
                   "```bash\nssm-split layout nope --tp 1\n```\n"
                   "```python\nprint(1)\n```\n```output\n2\n```\n")
    for block in blocks(doc):
        with pytest.raises(AssertionError):
            run_block(block)
