"""docs/vllm.md runs as written: its Python blocks, in order, and the recipe (the block
that is a script) with real NIXL READs between processes, its output as the doc shows."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from tests._vllm import importing_vllm

with importing_vllm():
    import vllm  # noqa: F401
    import vllm.model_executor.layers.mamba.mamba_utils  # noqa: F401
    import vllm.v1.attention.backends.registry  # noqa: F401
    import vllm.v1.kv_cache_interface  # noqa: F401

from ssm_split.integrations import vllm as sv  # noqa: E402

pytestmark = pytest.mark.vllm

DOC = Path(__file__).resolve().parents[2] / "docs" / "vllm.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(kind: str) -> list[str]:
    return [body for lang, body in FENCE.findall(DOC.read_text()) if lang == kind]


def scripts() -> list[str]:
    return [b for b in blocks("python") if 'if __name__ == "__main__":' in b]


def test_the_doc_has_the_recipe_and_other_blocks():
    assert len(scripts()) == 1 and len(blocks("python")) >= 2
    assert scripts()[0].rstrip().endswith('if __name__ == "__main__":\n    main()')


def test_every_other_python_block_runs_as_written():
    namespace: dict = {"__name__": "vllm_md"}
    for body in blocks("python"):
        if body not in scripts():
            exec(compile(body, str(DOC), "exec"), namespace)  # noqa: S102 - the doc's own code


def test_the_recipe_moves_vllm_state_over_nixl_and_prints_what_the_doc_says(tmp_path, monkeypatch, capsys):
    pytest.importorskip("nixl")
    path = tmp_path / "vllm_recipe.py"
    path.write_text(scripts()[0])
    monkeypatch.syspath_prepend(str(tmp_path))  # the spawned prefill process imports it by name
    monkeypatch.setenv("NIXL_LOG_LEVEL", "WARN")
    with sv.vllm_conv_layout_set("DS"):  # what the script sets before vLLM decides, restored after
        spec = importlib.util.spec_from_file_location("vllm_recipe", path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(__import__("sys").modules, "vllm_recipe", module)
        spec.loader.exec_module(module)
        module.main()  # what `python vllm_recipe.py` runs
    printed = capsys.readouterr().out
    shown = next(b for b in blocks("") if "decode pages equal to reference.shard" in b)
    for line in shown.strip().splitlines():
        assert line in printed
