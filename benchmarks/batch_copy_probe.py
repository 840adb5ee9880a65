"""Copy engines against the peer kernel on one real batch: `cuMemcpyBatchAsync` vs `run_paged`.

The peer strategy moves a batch with one Triton kernel (`nixl_backend._gather.run_paged`)
that reads the src pages through the SMs. CUDA 12.8+ can instead hand a whole list of
copies to the copy engines in one driver call (`cuMemcpyBatchAsync`). This probe times
both on identical copies - the library's own `paged_copies` of Qwen3.5-27B's plan (48
layers, 64 requests, scattered blocks), per-layer and stacked pages - next to torch's
copy of the same bytes, in one process (src pages on GPU 0, dst pages on GPU 1, peer
access enabled; `--one-gpu` puts both on GPU 0). Each way is checked against the other
byte for byte. It is a probe: what the Reader runs is measured by `ssm-split bench`.

    python benchmarks/batch_copy_probe.py --out benchmarks/results/batch-copy-probe-h200x2.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssm_split.layout import RegionSet  # noqa: E402
from ssm_split.nixl_backend._gather import PagedTable, run_paged  # noqa: E402
from ssm_split.plan import plan_reads  # noqa: E402
from ssm_split.specs import preset_info  # noqa: E402
from ssm_split.strategies import paged_copies, stack_layers  # noqa: E402

_ALREADY_ENABLED = 704  # CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _Attributes(ctypes.Structure):
    _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocHint", _Location), ("dstLocHint", _Location),
                ("flags", ctypes.c_uint)]


def _driver():
    lib = ctypes.CDLL("libcuda.so.1")
    p = ctypes.POINTER
    if hasattr(lib, "cuMemcpyBatchAsync_v2"):
        batch = lib.cuMemcpyBatchAsync_v2
        batch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, p(_Attributes),
                          ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        call = lambda d, s, n, count, attrs, idx, stream: batch(d, s, n, count, attrs, idx, 1, stream)  # noqa: E731
    else:  # CUDA 12.8/12.9: one more argument, the index of a failed copy
        batch = lib.cuMemcpyBatchAsync
        batch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, p(_Attributes),
                          ctypes.c_void_p, ctypes.c_size_t, p(ctypes.c_size_t), ctypes.c_void_p]
        fail = ctypes.c_size_t()
        call = lambda d, s, n, count, attrs, idx, stream: batch(d, s, n, count, attrs, idx, 1,  # noqa: E731
                                                                  ctypes.byref(fail), stream)
    return lib, call


def _enable_peer(lib, src_device: int, dst_device: int) -> None:
    if src_device == dst_device:
        return
    src_ctx, dst_ctx = ctypes.c_void_p(), ctypes.c_void_p()
    for ctx, device in ((src_ctx, src_device), (dst_ctx, dst_device)):
        rc = lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device)
        if rc:
            raise RuntimeError(f"cuDevicePrimaryCtxRetain({device}): {rc}")
    lib.cuCtxSetCurrent(dst_ctx)
    rc = lib.cuCtxEnablePeerAccess(src_ctx, 0)
    if rc not in (0, _ALREADY_ENABLED):
        raise RuntimeError(f"cuCtxEnablePeerAccess: {rc}")


def _time(torch, stream, fn, repeats: int) -> tuple[float, list[float], float]:
    """Median GPU seconds of `fn()` on `stream`, the samples, and the median host seconds of
    the call itself."""
    fn()
    stream.synchronize()
    gpu, host = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        end.record(stream)
        end.synchronize()
        gpu.append(start.elapsed_time(end) / 1e3)
    return statistics.median(gpu), gpu, statistics.median(host)


def _case(torch, lib, call, *, model: str, src_tp: int, dst_tp: int, stacked: bool, src_device: int,
          dst_device: int, num_requests: int, repeats: int) -> list[dict]:
    info = preset_info(model)
    num_layers = info.num_state_layers
    spec = stack_layers(info.spec, num_layers) if stacked else info.spec
    region_layers = 1 if stacked else num_layers
    plan = plan_reads(spec, src_tp, dst_tp, 0)
    num_blocks = 2 * num_requests
    gen = torch.Generator(device=f"cuda:{src_device}").manual_seed(0)
    srcs, src_regions = [], []
    for _ in plan.src_ranks:
        nbytes = region_layers * num_blocks * plan.src_content_nbytes
        t = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=f"cuda:{src_device}", generator=gen)
        srcs.append(t)
        src_regions.append(RegionSet.packed(t.data_ptr(), num_layers=region_layers, num_blocks=num_blocks,
                                            page_nbytes=plan.src_content_nbytes))
    dst_page = plan.dst_content_nbytes
    dsts = [torch.full((region_layers * num_blocks * dst_page,), 0xEE, dtype=torch.uint8,
                       device=f"cuda:{dst_device}") for _ in range(2)]
    regions = [RegionSet.packed(d.data_ptr(), num_layers=region_layers, num_blocks=num_blocks, page_nbytes=dst_page)
               for d in dsts]
    rng = np.random.default_rng(1)
    pairs = np.stack([rng.permutation(num_blocks)[:num_requests], rng.permutation(num_blocks)[:num_requests]], 1)
    stream = torch.cuda.Stream(device=f"cuda:{dst_device}")
    total = None
    records = []
    with torch.cuda.device(dst_device), torch.cuda.stream(stream):
        paged = paged_copies(plan, src_regions, regions[0], pairs)
        table = PagedTable.build(paged, anchor=dsts[0])
        total = paged.total_nbytes
        kernel_s, kernel_samples, kernel_host = _time(torch, stream, lambda: run_paged(table, stream), repeats)
        base = dict(model=model, src_tp=src_tp, dst_tp=dst_tp, pages="stacked" if stacked else "per-layer",
                    layers=num_layers, requests=num_requests, nbytes=total, src_device=src_device,
                    dst_device=dst_device)
        records.append(dict(base, way="peer kernel (run_paged)", copies=paged.num_copies, median_s=kernel_s,
                            samples_s=kernel_samples, host_call_s=kernel_host))
        for piece_nbytes in (1 << 40, 1 << 20):
            rows = paged_copies(plan, src_regions, regions[1], pairs, piece_nbytes=piece_nbytes).expand()
            d = np.ascontiguousarray(rows.dst_addrs, dtype=np.uint64)
            s = np.ascontiguousarray(rows.src_addrs, dtype=np.uint64)
            n = np.ascontiguousarray(rows.nbytes, dtype=np.uint64)
            idx = np.zeros(1, dtype=np.uint64)
            for flags in (0, 1):
                attrs = _Attributes(1, _Location(1, src_device), _Location(1, dst_device), flags)  # order: stream

                def batch():
                    rc = call(d.ctypes.data, s.ctypes.data, n.ctypes.data, d.size, ctypes.byref(attrs),
                              idx.ctypes.data, stream.cuda_stream)
                    if rc:
                        raise RuntimeError(f"cuMemcpyBatchAsync: error {rc}")
                dsts[1].fill_(0xEE)
                try:
                    ce_s, ce_samples, ce_host = _time(torch, stream, batch, repeats)
                    same = bool(torch.equal(dsts[0].to(dsts[1].device), dsts[1]))
                    records.append(dict(base, way=f"copy engines (cuMemcpyBatchAsync, flags={flags})",
                                        piece_nbytes=min(piece_nbytes, int(n.max())), copies=int(d.size),
                                        median_s=ce_s, samples_s=ce_samples, host_call_s=ce_host, same_bytes=same))
                except RuntimeError as error:
                    records.append(dict(base, way=f"copy engines (flags={flags})", error=str(error)))
        flat_src = srcs[0][:total] if srcs[0].numel() >= total else torch.empty(total, dtype=torch.uint8,
                                                                                   device=f"cuda:{src_device}")
        flat_dst = torch.empty(total, dtype=torch.uint8, device=f"cuda:{dst_device}")
        copy_s, copy_samples, _ = _time(torch, stream, lambda: flat_dst.copy_(flat_src, non_blocking=True), repeats)
        records.append(dict(base, way="torch copy_ (one contiguous range)", median_s=copy_s, samples_s=copy_samples))
    for r in records:
        if r.get("median_s"):
            r["gbps"] = total / r["median_s"] / 1e9
            r["pct_of_copy"] = 100 * copy_s / r["median_s"]
    del srcs, dsts
    torch.cuda.empty_cache()
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--one-gpu", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch

    src_device = 0
    dst_device = 0 if args.one_gpu or torch.cuda.device_count() < 2 else 1
    for device in {src_device, dst_device}:
        torch.empty(1, device=f"cuda:{device}")
    lib, call = _driver()
    _enable_peer(lib, src_device, dst_device)
    records = []
    placements = [(src_device, dst_device)] + ([(0, 0)] if dst_device != 0 else [])
    for src, dst in placements:
        for src_tp, dst_tp, stacked in ((1, 2, False), (2, 1, False), (2, 1, True)):
            got = _case(torch, lib, call, model="qwen3.5-27b", src_tp=src_tp, dst_tp=dst_tp, stacked=stacked,
                        src_device=src, dst_device=dst, num_requests=64, repeats=args.repeats)
            for r in got:
                print(f"GPU{src}->GPU{dst} {src_tp}->{dst_tp} {r['pages']:9s} {r['way']:52s} "
                      + (f"{r['median_s'] * 1e3:8.2f} ms {r['gbps']:7.0f} GB/s {r['pct_of_copy']:5.1f}% "
                         f"host {r.get('host_call_s', 0) * 1e3:6.2f} ms copies {r.get('copies', '-')} "
                         f"same {r.get('same_bytes', '-')}" if r.get("median_s") else r.get("error", "")),
                      flush=True)
            records += got
    versions = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__)
    for r in records:
        r.update(versions)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
