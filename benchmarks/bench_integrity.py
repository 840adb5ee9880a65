"""Cost of the reader's checks on DRAM: the generation fence (on by default) and integrity
mode (off by default), against the plain READ, on this machine's CPU.

For each case, src ranks and one dst rank are endpoints in this process (UCX's default
cma transport). Timed, median of `--runs` after one warm-up:

- `plain`: `Reader(endpoint, check_generation=False).read(...)`: the READs alone;
- `fence`: `Reader(endpoint).read(...)`: plus one 16-byte READ per src rank and the
  read-done notification sent after it;
- `integrity`: `Reader(endpoint, integrity=True).read(...)`: plus the digest requests to
  every src rank (which digest their pages) and the dst's digests of what landed;
- `src digest`, `dst digest`: the pure digest computations alone (`src_digests` over the
  src rank read most, `dst_digests` over the dst pages).

    .venv/bin/python benchmarks/bench_integrity.py [--runs 5] [--json benchmarks/results/integrity-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")

from ssm_split import RegionSet, model, page_layout, plan_reads  # noqa: E402
from ssm_split.integrity._digests import PageMemory, dst_digests, src_digests  # noqa: E402
from ssm_split.nixl_backend import Endpoint, Reader  # noqa: E402

CASES = [  # (label, preset, src_tp, dst_tp, layers, requests)
    ("granite-4.0-h-tiny 1->2, 16 req x 4 layers", "granite-4.0-h-tiny", 1, 2, 4, 16),
    ("qwen3-next-80b-a3b 2->1, 16 req x 4 layers", "qwen3-next-80b-a3b", 2, 1, 4, 16),
    ("lfm2-1.2b 2->1, 256 req x 8 layers", "lfm2-1.2b", 2, 1, 8, 256),
    ("granite-4.0-h-tiny 1->2, 1 req x 1 layer", "granite-4.0-h-tiny", 1, 2, 1, 1),
]


def median_time(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run_case(label, preset, src_tp, dst_tp, layers, requests, runs):
    spec = model(preset)
    blocks = requests + 1
    rng = np.random.default_rng(0)
    src_page = page_layout(spec, src_tp, 0).content_nbytes
    dst_page = page_layout(spec, dst_tp, 0).content_nbytes
    src_mem = [rng.integers(0, 256, layers * blocks * src_page, dtype=np.uint8) for _ in range(src_tp)]
    sources = [Endpoint(spec, tp=src_tp, rank=r, memory=[m],
                        regions=RegionSet.packed(m.ctypes.data, num_layers=layers, num_blocks=blocks,
                                                 page_nbytes=src_page))
               for r, m in enumerate(src_mem)]
    for s in sources:
        s.serve()
    dst_mem = np.zeros(layers * blocks * dst_page, np.uint8)
    dst_regions = RegionSet.packed(dst_mem.ctypes.data, num_layers=layers, num_blocks=blocks, page_nbytes=dst_page)
    dst = Endpoint(spec, tp=dst_tp, rank=0, memory=[dst_mem], regions=dst_regions)
    pairs = np.stack([rng.permutation(blocks)[:requests], rng.permutation(blocks)[:requests]], axis=1)
    readers = {}
    for name, options in (("plain", {"check_generation": False}), ("fence", {}),
                          ("integrity", {"integrity": True})):
        reader = Reader(dst, **options)
        for s in sources:
            reader.connect_to(*s.address)
        reader.warm_up()
        readers[name] = reader
    row = {"case": label, "bytes": 0}
    counter = iter(range(1 << 30))
    for name, reader in readers.items():
        def once(reader=reader):
            stats = reader.read(pairs, f"{name}-{next(counter)}")
            row["bytes"] = stats.nbytes
        row[name] = median_time(once, runs)
    plan = plan_reads(spec, src_tp, dst_tp, 0)
    busiest = max(plan.src_ranks, key=lambda r: sum(x.nbytes for x in plan.reads_from(r)))
    src_memory = PageMemory(sources[busiest].regions, (src_mem[busiest],))
    layer_ids = list(range(layers))
    row["src digest"] = median_time(lambda: src_digests(plan, busiest, src_memory, pairs[:, 0], layer_ids), runs)
    dst_memory = PageMemory(dst_regions, (dst_mem,))
    row["dst digest"] = median_time(lambda: dst_digests(plan, dst_memory, pairs[:, 1], layer_ids), runs)
    for reader in readers.values():
        reader.close()
    dst.close()
    for s in sources:
        s.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = [run_case(*case, args.runs) for case in CASES]
    print(f"{'case':45} {'MB':>7} {'plain ms':>9} {'fence ms':>9} {'integ ms':>9} "
          f"{'src dig':>8} {'dst dig':>8} {'integ/plain':>11}")
    for r in rows:
        print(f"{r['case']:45} {r['bytes'] / 1e6:7.2f} {r['plain'] * 1e3:9.2f} {r['fence'] * 1e3:9.2f} "
              f"{r['integrity'] * 1e3:9.2f} {r['src digest'] * 1e3:8.2f} {r['dst digest'] * 1e3:8.2f} "
              f"{r['integrity'] / r['plain']:11.1f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                       "runs": args.runs, "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()
