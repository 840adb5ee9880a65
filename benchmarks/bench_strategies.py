"""Run the issue's benchmark suites with `ssm-split bench` and write one JSON + one PNG.

Each case starts fresh src/dst rank processes (`ssm_split.bench`):

- `qwen`: Qwen3.5-27B, 48 GDN layers, 1 -> 2 and 2 -> 1, batches 8..64, per-layer regions
  (vLLM's layout: baseline, ssm_split, staged, packed); `qwen-stacked`: the stacked layout
  (ssm_split, staged); `qwen-threads`: more UCX threads at batch 64;
- `nemotron`: Nemotron-H-56B, 2 -> 4, batches 16..64, 16 of its 54 Mamba2 layers (the
  most whose src + dst pages of 96 blocks, 4 x 1 GiB staging and the copy-limit buffers
  fit in an H100's 80 GB one after another), both layouts.

    UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y python benchmarks/bench_strategies.py --suite qwen,qwen-stacked,nemotron \
        --out benchmarks/results/latest-gpu.json --plot benchmarks/results/latest-gpu.png

`--quick` runs one small case (any device) to check the set-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ssm_split.bench import _run as _bench  # noqa: E402

QWEN = "--model qwen3.5-27b --layers 48"
NEMOTRON = "--model nemotron-h-56b --layers 16 --blocks 96 --src-tp 2 --dst-tp 4"
ALL = "--strategies baseline,ssm_split,staged,packed"
SUITES = {
    "qwen": [  # per-layer regions, as vLLM lays them out
        f"{QWEN} --src-tp 1 --dst-tp 2 --batch 8,16,32,64 --baseline-threads 0,4 {ALL} --staging-mib 4096",
        f"{QWEN} --src-tp 2 --dst-tp 1 --batch 8,16,32,64 --baseline-threads 0,4 {ALL} --staging-mib 4096",
    ],
    "qwen-stacked": [
        f"{QWEN} --src-tp 1 --dst-tp 2 --batch 8,16,32,64 --layout stacked --threads 4,16",
        f"{QWEN} --src-tp 2 --dst-tp 1 --batch 8,16,32,64 --layout stacked --threads 4,16",
    ],
    "qwen-threads": [  # more UCX threads, per-layer, batch 64
        f"{QWEN} --src-tp 1 --dst-tp 2 --batch 64 --baseline-threads 4,16 --threads 8,16 --strategies baseline,ssm_split,staged",
        f"{QWEN} --src-tp 2 --dst-tp 1 --batch 64 --baseline-threads 4,16 --threads 8,16 --strategies baseline,ssm_split,staged",
    ],
    "nemotron": [
        f"{NEMOTRON} --batch 16,32,64 {ALL} --staging-mib 2048",
        f"{NEMOTRON} --batch 16,32,64 --layout stacked --threads 4,16",
    ],
    "quick": [
        "--model qwen3.5-0.8b --layers 4 --src-tp 1 --dst-tp 2 --batch 2,4 --blocks 8 --repeats 2 --warmup 1",
        "--model qwen3.5-0.8b --layers 4 --src-tp 1 --dst-tp 2 --batch 2,4 --blocks 8 --repeats 2 --warmup 1 --layout stacked",
    ],
}


def _write(path: str, records: list) -> None:
    if os.path.exists(path):
        os.remove(path)
    _bench.append_json(path, records)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="qwen", help=f"comma list of {sorted(SUITES)}")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", default=None, help="JSON file (records of every case, replaced)")
    p.add_argument("--plot", default=None, help="PNG file")
    p.add_argument("--extra", default="", help="arguments added to every case, e.g. '--threads 4,8'")
    opts = p.parse_args(argv)
    records, failed = [], False
    for suite in opts.suite.split(","):
        for case in SUITES[suite]:
            bench = argparse.ArgumentParser()
            _bench.add_arguments(bench)
            args = bench.parse_args(f"{case} --device {opts.device} {opts.extra}".split())
            t0 = time.perf_counter()
            print(f"== {case}", flush=True)
            try:
                recs = _bench.run_config(args)
            except Exception as error:  # keep the other cases
                print(f"case failed: {error}", flush=True)
                failed = True
                continue
            records += recs
            print(_bench.format_records(recs), flush=True)
            if opts.out:  # after every case, so a run cut short keeps what it measured
                _write(opts.out, records)
            print(f"({time.perf_counter() - t0:.0f} s)", flush=True)
    _bench._speedups(records)
    print("\n== all cases (median_s: dst ranks one after another, summed)")
    print(_bench.format_records(records), flush=True)
    if opts.out:
        _write(opts.out, records)
    if opts.plot:
        _bench.plot_records(records, opts.plot)
    return 1 if failed or not all(r["verified"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
