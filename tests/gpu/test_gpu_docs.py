"""The doc blocks marked `<!-- docs-test: gpu -->` (docs/cli.md), run where a CUDA GPU is.
tests/docs/test_doc_blocks.py runs every other block and skips these."""

from __future__ import annotations

import pytest

from tests.docs._blocks import doc_blocks, run_block
from tests.docs.test_doc_blocks import DOCS

pytestmark = pytest.mark.gpu

GPU_BLOCKS = doc_blocks(DOCS, kind="gpu")


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_there_are_gpu_blocks():
    assert GPU_BLOCKS, "docs/backend.md shows `ssm-split demo --device cuda`: marked gpu"


@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU and torch with CUDA")
@pytest.mark.parametrize("block", GPU_BLOCKS, ids=lambda b: b.id)
def test_gpu_doc_block_runs(block):
    run_block(block)
