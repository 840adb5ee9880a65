"""GPU checks of the performance strategies (skipped without CUDA and NIXL).

Run on a GPU machine with `UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y python -m pytest tests/gpu`.
"""

from __future__ import annotations

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


def test_device_copier_moves_exact_bytes():
    """The copier the scatter and the src's pack use: one launch for 800 scattered copies
    (the peer strategy's copies from another GPU's mapped memory: tests/gpu/test_gpu_transfer.py)."""
    from ssm_split.nixl_backend._copier import DeviceCopier
    from ssm_split.strategies import CopyTable

    src = torch.randint(0, 255, (1 << 24,), dtype=torch.uint8, device="cuda:0")
    dst = torch.zeros(1 << 24, dtype=torch.uint8, device="cuda:0")
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 256, 800) * 16  # at most 3.2 MB in all: fits dst
    dst_off = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    src_off = rng.integers(0, (1 << 24) - 256 * 16, 800) // 16 * 16
    table = CopyTable((src.data_ptr() + src_off).astype(np.uint64), (dst.data_ptr() + dst_off).astype(np.uint64),
                      lengths.astype(np.uint64))
    launched = DeviceCopier(0).launch(table)
    launched.wait()
    assert launched.done()
    host_src, got = src.cpu().numpy(), dst.cpu().numpy()
    want = np.zeros_like(got)
    for s, d, k in zip(src_off, dst_off, lengths):
        want[d:d + k] = host_src[s:s + k]
    assert np.array_equal(got, want)


@pytest.mark.parametrize("engine", ["kernel", "copy-engines"])
def test_device_copier_runs_paged_copies_on_either_engine(engine):
    """The peer strategy's table on each engine: the same bytes as the host's expansion.
    Both sides on one GPU: across GPUs the kernel needs the src mapped as the Reader maps
    it (CUDA IPC), which tests/gpu/test_gpu_transfer.py runs for both engines."""
    from ssm_split import GDNSpec, RegionSet, plan_reads
    from ssm_split.nixl_backend._batchcopy import batch_copy_available
    from ssm_split.nixl_backend._copier import DeviceCopier
    from ssm_split.strategies import paged_copies

    if engine == "copy-engines" and not batch_copy_available():
        pytest.skip("this CUDA driver has no batched copies (CUDA >= 12.8)")
    dst_gpu = torch.cuda.device_count() - 1
    plan = plan_reads(GDNSpec(num_k_heads=2, num_v_heads=4, head_k_dim=32, head_v_dim=32), 2, 1, 0)
    layers, blocks = 4, 8
    srcs = [torch.randint(0, 255, (layers * blocks * plan.src_content_nbytes,), dtype=torch.uint8,
                          device=f"cuda:{dst_gpu}") for _ in plan.src_ranks]
    src_regions = [RegionSet.packed(t.data_ptr(), num_layers=layers, num_blocks=blocks,
                                    page_nbytes=plan.src_content_nbytes) for t in srcs]
    dst = torch.full((layers * blocks * plan.dst_content_nbytes,), 0xEE, dtype=torch.uint8, device=f"cuda:{dst_gpu}")
    dst_regions = RegionSet.packed(dst.data_ptr(), num_layers=layers, num_blocks=blocks,
                                   page_nbytes=plan.dst_content_nbytes)
    pairs = np.array([[7, 0], [2, 5], [4, 3]])
    table = paged_copies(plan, src_regions, dst_regions, pairs, piece_nbytes=1024, engine=engine)
    launched = DeviceCopier(dst_gpu).launch(table)
    launched.wait()
    want = np.full(dst.numel(), 0xEE, np.uint8)
    hosts = {t.data_ptr(): t.cpu().numpy() for t in srcs}
    rows = table.expand()
    for s, d, n in zip(rows.src_addrs.tolist(), rows.dst_addrs.tolist(), rows.nbytes.tolist()):
        base = max(b for b in hosts if b <= s)
        want[d - dst.data_ptr(): d - dst.data_ptr() + n] = hosts[base][s - base: s - base + n]
    assert np.array_equal(dst.cpu().numpy(), want)
    assert int(rows.nbytes.sum()) == plan.nbytes * len(pairs) * layers  # every read of every page, once


def test_a_batch_the_copy_engines_refuse_is_a_transfer_error(monkeypatch):
    from ssm_split import GDNSpec, RegionSet, plan_reads
    from ssm_split.errors import TransferError
    from ssm_split.nixl_backend import _copier
    from ssm_split.nixl_backend._ipc import IpcError
    from ssm_split.strategies import paged_copies

    def refuse(*args, **kwargs):
        raise IpcError("cuMemcpyBatchAsync of 3 copies failed: CUDA_ERROR_INVALID_VALUE")

    monkeypatch.setattr(_copier, "batch_copy", refuse)
    plan = plan_reads(GDNSpec(num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8), 1, 1, 0)
    pages = torch.zeros(4 * plan.src_content_nbytes, dtype=torch.uint8, device="cuda:0")
    regions = RegionSet.packed(pages.data_ptr(), num_layers=1, num_blocks=4, page_nbytes=plan.src_content_nbytes)
    table = paged_copies(plan, [regions], regions, np.array([[0, 1]]), engine="copy-engines")
    with pytest.raises(TransferError, match="copy engines refused the batch.*INVALID_VALUE"):
        _copier.DeviceCopier(0).launch(table)


def test_paged_kernel_rebuilds_pages_from_the_factored_table():
    """The peer strategy's kernel (`_gather.run_paged`) on one GPU: pages of a replicated
    Mamba2 1 -> 2 and a GDN 2 -> 1 (SD) batch, against the reference."""
    from ssm_split import GDNSpec, Mamba2Spec, RegionSet, plan_reads, reference
    from ssm_split.nixl_backend._gather import PagedTable, run_paged
    from ssm_split.strategies import paged_copies

    cases = [(Mamba2Spec(num_heads=8, head_dim=16, num_groups=1, state_size=16, ssm_dtype="float32"), 1, 2, 1),
             (GDNSpec(num_k_heads=2, num_v_heads=4, head_k_dim=16, head_v_dim=16, conv_layout="SD"), 2, 1, 0)]
    for spec, src_tp, dst_tp, rank in cases:
        plan = plan_reads(spec, src_tp, dst_tp, rank)
        layers, blocks = 3, 6
        src_page, dst_page = plan.src_content_nbytes + 32, plan.dst_content_nbytes + 48
        srcs, src_regions = [], []
        for r in range(src_tp):
            host = np.zeros(layers * blocks * src_page, np.uint8)
            regions = RegionSet.packed(0, num_layers=layers, num_blocks=blocks, page_nbytes=src_page)
            for layer in range(layers):
                for block in range(blocks):
                    page = reference.shard(spec, reference.random_state(spec, 10 * layer + block), src_tp)[r]
                    host[regions.page_addr(layer, block): regions.page_addr(layer, block) + page.size] = page
            t = torch.from_numpy(host).to("cuda:0")
            srcs.append(t)
            src_regions.append(RegionSet.packed(t.data_ptr(), num_layers=layers, num_blocks=blocks,
                                                page_nbytes=src_page))
        dst = torch.full((layers * blocks * dst_page,), 0xEE, dtype=torch.uint8, device="cuda:0")
        dst_regions = RegionSet.packed(dst.data_ptr(), num_layers=layers, num_blocks=blocks, page_nbytes=dst_page,
                                       order="block")
        pairs = np.array([[5, 0], [1, 3], [0, 2]])
        run_paged(PagedTable.build(paged_copies(plan, src_regions, dst_regions, pairs, piece_nbytes=512),
                                   anchor=dst))
        torch.cuda.synchronize()
        want = np.full(dst.numel(), 0xEE, np.uint8)
        for layer in range(layers):
            for s, d in pairs.tolist():
                page = reference.shard(spec, reference.random_state(spec, 10 * layer + s), dst_tp)[rank]
                at = dst_regions.page_addr(layer, d) - dst.data_ptr()
                want[at: at + page.size] = page
        assert np.array_equal(dst.cpu().numpy(), want), spec.family


def test_bench_runs_every_strategy_on_the_gpus(tmp_path):
    """`ssm-split bench` on VRAM (src on GPU 0, dst on GPU 1 when there are two): every
    strategy verified byte for byte through the Reader, and its record says where."""
    pytest.importorskip("nixl")
    import json
    import subprocess
    import sys

    dst_gpu = 1 if torch.cuda.device_count() >= 2 else 0
    argv = [sys.executable, "-m", "ssm_split", "bench", "--model", "qwen3.5-0.8b", "--layers", "3",
            "--batch", "8", "--src-tp", "1", "--dst-tp", "2", "--repeats", "1", "--warmup", "0",
            "--staging-mib", "64", "--pack-mib", "64", "--src-devices", "0", "--dst-devices", str(dst_gpu),
            "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = {r["strategy"]: r for r in json.loads(done.stdout)["records"]}
    assert set(records) == {"baseline", "auto", "direct", "staged", "packed", "peer"}
    for name, record in records.items():
        assert record["verified"] and record["median_s"] > 0, (name, record.get("skipped"))
        assert record["src_devices"] == [0] and record["dst_devices"] == [dst_gpu, dst_gpu]
