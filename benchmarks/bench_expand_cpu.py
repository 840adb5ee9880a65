"""CPU benchmark: expanding plans into NIXL descriptors for a large batch.

For 48 layers x 4096 requests (scattered block ids, one region per layer as vLLM lays out
its state), time `ssm_split.expand_plan` for one dst rank's plan, against an equivalent
per-block Python loop (the same descriptors, merged the same way; checked equal) measured
in the same run. Writes JSON records (model, TP pair, dst rank, reads, descriptors, median
seconds of each, speed-up).

    python benchmarks/bench_expand_cpu.py --out benchmarks/results/latest-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ssm_split  # noqa: E402
from ssm_split.layout._regions import RegionSet
from ssm_split.expand._expand import expand_plan

CASES = [("qwen3.5-27b", 1, 2), ("qwen3.5-27b", 2, 1), ("nemotron-h-56b", 2, 4)]


def _regions(spec, tp, rank, layers, blocks, base):
    page = -(-ssm_split.page_layout(spec, tp, rank).content_nbytes // 4096) * 4096
    addrs = [base + layer * (blocks * page + (1 << 20)) for layer in range(layers)]
    return RegionSet.per_layer(addrs, num_blocks=blocks, page_nbytes=page)


def python_loop(plan, src_regions, dst_regions, pairs, layers):
    """The same expansion written as loops over layers, requests and reads."""
    out = {}
    order = sorted(range(len(pairs)), key=lambda i: pairs[i][1])
    for src_rank in plan.src_ranks:
        reads = plan.reads_from(src_rank)
        rows = []
        for layer in range(layers):
            d_reg, s_reg = dst_regions.layers[layer], src_regions[src_rank].layers[layer]
            for i in order:
                src_block, dst_block = pairs[i]
                d_page = d_reg.base_addr + dst_block * d_reg.page_stride_nbytes
                s_page = s_reg.base_addr + src_block * s_reg.page_stride_nbytes
                for r in reads:
                    d, s, n = d_page + r.dst_offset, s_page + r.src_offset, r.nbytes
                    if rows and rows[-1][0] + rows[-1][2] == d and rows[-1][1] + rows[-1][2] == s \
                            and rows[-1][3] == layer:
                        rows[-1][2] += n
                    else:
                        rows.append([d, s, n, layer])
        out[src_rank] = rows
    return out


def _median(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--requests", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--loop-repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    opts = p.parse_args(argv)
    rng = np.random.default_rng(0)
    blocks = 2 * opts.requests
    records = []
    for name, src_tp, dst_tp in CASES:
        spec = ssm_split.model(name)
        pairs = np.stack([rng.choice(blocks, opts.requests, replace=False),
                          rng.choice(blocks, opts.requests, replace=False)], axis=1)
        src = [_regions(spec, src_tp, r, opts.layers, blocks, (1 << 44) + (r << 40)) for r in range(src_tp)]
        for dst_rank in range(dst_tp):
            dst = _regions(spec, dst_tp, dst_rank, opts.layers, blocks, 1 << 36)
            plan = ssm_split.plan_reads(spec, src_tp, dst_tp, dst_rank)
            expand_plan(plan, src, dst, pairs)  # warm-up
            t_vec = _median(lambda: expand_plan(plan, src, dst, pairs), opts.repeats)
            exp = expand_plan(plan, src, dst, pairs)
            py_pairs = pairs.tolist()
            t_loop = _median(lambda: python_loop(plan, src, dst, py_pairs, opts.layers), opts.loop_repeats)
            loop = python_loop(plan, src, dst, py_pairs, opts.layers)
            same = all(np.array_equal(np.array([r[:3] for r in loop[rd.src_rank]], dtype=np.uint64),
                                      np.stack([rd.dst_descs[:, 0], rd.src_descs[:, 0], rd.dst_descs[:, 1]], 1))
                       for rd in exp.ranks)
            rec = dict(model=name, src_tp=src_tp, dst_tp=dst_tp, dst_rank=dst_rank, layers=opts.layers,
                       requests=opts.requests, reads=exp.num_reads, descriptors=exp.num_descriptors,
                       expand_s=t_vec, python_loop_s=t_loop, speedup=t_loop / t_vec, same_descriptors=same,
                       cpu=f"{platform.machine()}, {os.cpu_count()} cores", numpy=np.__version__,
                       python=platform.python_version())
            records.append(rec)
            print(f"{name:16} {src_tp}->{dst_tp} dst {dst_rank}: {exp.num_reads:>8} reads -> {exp.num_descriptors:>8} "
                  f"descriptors  expand {t_vec * 1e3:7.1f} ms  loop {t_loop * 1e3:8.1f} ms  "
                  f"{t_loop / t_vec:5.1f}x  same={same}", flush=True)
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(records, f, indent=1)
    ok = all(r["same_descriptors"] for r in records)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
