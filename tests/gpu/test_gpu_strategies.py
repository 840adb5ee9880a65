"""GPU checks of the performance strategies (skipped without CUDA and NIXL).

Run on a GPU machine with `UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y python -m pytest tests/gpu`.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():  # pragma: no cover - CPU machines
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.mark.parametrize("align", [2, 4, 16])
def test_gather_kernel_moves_exact_bytes(align):
    from ssm_split.nixl_backend._gather import GatherTable, run_gather

    rng = np.random.default_rng(align)
    src = torch.randint(0, 255, (1 << 22,), dtype=torch.uint8, device="cuda")
    dst = torch.zeros(1 << 22, dtype=torch.uint8, device="cuda")
    n = 500
    lengths = rng.integers(1, 200, n) * align  # at most 1.6 MB in all
    dst_off = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # disjoint dst ranges
    src_off = rng.integers(0, (1 << 22) - 200 * align, n) // align * align
    table = GatherTable.build(src.data_ptr() + src_off, dst.data_ptr() + dst_off, lengths, anchor=src,
                              chunk_nbytes=4096)
    assert table.word_nbytes == min(align, 4)
    run_gather(table)
    torch.cuda.synchronize()
    want = torch.zeros_like(dst)
    for s, d, k in zip(src_off, dst_off, lengths):
        want[d:d + k] = src[s:s + k]
    assert torch.equal(dst, want)


@pytest.mark.parametrize("layout", ["per-layer", "stacked"])
@pytest.mark.parametrize("tps", [(1, 2), (2, 1)])
def test_every_strategy_verifies_on_vram(layout, tps, monkeypatch):
    pytest.importorskip("nixl")
    monkeypatch.setenv("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")
    from ssm_split.bench import _run as _bench

    parser = argparse.ArgumentParser()
    _bench.add_arguments(parser)
    args = parser.parse_args(f"--model qwen3.5-0.8b --layers 3 --src-tp {tps[0]} --dst-tp {tps[1]} --batch 4 "
                             f"--blocks 8 --layout {layout} --repeats 1 --warmup 0 --staging-mib 64".split())
    records = _bench.run_config(args)
    assert {r["strategy"].split("@")[0] for r in records} >= {"copy-limit", "ssm_split", "staged"}
    assert all(r["verified"] for r in records)
    assert all(r["median_s"] > 0 for r in records)
