"""The performance suites: `ssm-split bench` cases run back to back, one JSON and one PNG.

Every case times the library's own `Reader`/`Endpoint` (`ssm_split.bench.run_bench`):
each strategy and vLLM's descriptor pattern, verified byte for byte, next to torch's copy
of the same bytes between the same GPUs and NIXL's one-descriptor READ, all dst ranks at
once. On a machine with two GPUs the src ranks run on GPU 0 and the dst ranks on GPU 1,
as prefill and decode engines would; `one-gpu` puts every rank on GPU 0.

    UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y python benchmarks/bench_strategies.py \\
        --suite qwen,stacked,nemotron,one-gpu \\
        --out benchmarks/results/latest-gpu.json --plot benchmarks/results/latest-gpu.png

Suites: `qwen` (Qwen3.5-27B, all 48 layers, batch 64, 1 -> 2 and 2 -> 1), `nemotron`
(Nemotron-H-56B, all 54 layers, batch 64, 2 -> 4), `one-gpu` (Qwen3.5-27B 1 -> 2 with
every rank on GPU 0, per-layer and stacked pages), `stacked` (Qwen3.5-27B 1 -> 2 and
2 -> 1 on stacked pages: one region whose pages hold all 48 layers; vLLM's per-layer
pattern is skipped there, compare with `qwen`), `quick` (Qwen3.5-0.8B, 4 layers, a smoke test).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssm_split.bench._run import BenchOptions, format_records, plot_records, run_bench, write_json  # noqa: E402
from ssm_split.specs import preset_info  # noqa: E402

ALL = ("baseline", "auto", "direct", "staged", "packed", "peer")


def _case(model: str, src_tp: int, dst_tp: int, *, layers=None, batch=64, blocks=None, devices=None,
          strategies=ALL, area_mib=2048, pages="per-layer") -> BenchOptions:
    import torch

    info = preset_info(model)
    count = torch.cuda.device_count()
    src, dst = devices or ((0,), (1,) if count >= 2 else (0,))
    return BenchOptions(model=info.name, spec=info.spec, layers=layers or info.num_state_layers, src_tp=src_tp,
                        dst_tp=dst_tp, batches=(batch,), num_blocks=blocks or 2 * batch, strategies=strategies,
                        device="cuda", src_devices=src, dst_devices=dst, repeats=5, warmup=2,
                        staging_nbytes=area_mib << 20, pack_nbytes=area_mib << 20, pages=pages)


SUITES = {
    "qwen": lambda: [_case("qwen3.5-27b", 1, 2), _case("qwen3.5-27b", 2, 1)],
    "nemotron": lambda: [_case("nemotron-h-56b", 2, 4, blocks=80, area_mib=1024)],
    "one-gpu": lambda: [_case("qwen3.5-27b", 1, 2, devices=((0,), (0,))),
                        _case("qwen3.5-27b", 1, 2, devices=((0,), (0,)), pages="stacked")],
    "stacked": lambda: [_case("qwen3.5-27b", 1, 2, pages="stacked"), _case("qwen3.5-27b", 2, 1, pages="stacked")],
    "quick": lambda: [_case("qwen3.5-0.8b", 1, 2, layers=4, batch=16)],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="qwen,stacked,nemotron,one-gpu")
    parser.add_argument("--out", default=None, help="write (replace) the records in this JSON file")
    parser.add_argument("--plot", default=None, help="write a PNG of the times")
    args = parser.parse_args()
    records = []
    for name in args.suite.split(","):
        for options in SUITES[name]():
            started = time.perf_counter()
            got = run_bench(options)
            for record in got:
                record["suite"] = name
            records += got
            print(format_records(got), f"\n({time.perf_counter() - started:.0f} s)", flush=True)
    if args.out:
        if os.path.exists(args.out):
            os.remove(args.out)
        write_json(args.out, records)
    if args.plot:
        plot_records(records, args.plot)
    return 0 if all(r["verified"] or r.get("skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
