"""`ssm-split bench`: time transfer strategies on the same buffers, each verified first.

For one preset model, layer count, (src_tp, dst_tp), layout and a list of batch sizes,
it starts every src and dst rank as its own process (`bench/_rank.py`), fills the src
pages, and for every batch (scattered block ids) measures:

- `copy-limit`: a device-to-device copy of exactly the bytes the dst ranks need;
- `baseline`: vLLM's descriptor pattern (`ssm_split.strategies.baseline_reads`), per-layer layout only;
- `ssm_split`: the plan, expanded and merged (`expand_plan`), one READ per src rank;
- `staged`: spans into a bounded staging buffer plus one gather kernel, with groups chosen
  by a cost model fitted in the same run (`ssm_split.strategies.fit_cost_model`, `ssm_split.strategies.stage_plan`).

Every strategy is first run once on poisoned dst memory and checked byte for byte
(content, padding, untouched blocks), then timed: warm-up runs, then the median of
`--repeats`. `serial` times each dst rank alone and adds them up (one GPU holds all ranks:
this is its full capacity, as `copy-limit` is); `concurrent` starts all dst ranks at a
barrier and takes first post to last completion (on one GPU the dst processes then
time-slice the device). It prints a table and can write JSON records and a PNG.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

from ._packed import replies, run_packed, send_all

HELP = "time vLLM's descriptor pattern against ssm_split's strategies on real NIXL READs"


def add_arguments(p) -> None:
    p.add_argument("--model", default="qwen3.5-27b", help="preset name (ssm-split models)")
    p.add_argument("--layers", type=int, default=None, help="state layers (default: the model's)")
    p.add_argument("--src-tp", type=int, default=1)
    p.add_argument("--dst-tp", type=int, default=2)
    p.add_argument("--batch", default="64", help="comma-separated batch sizes (requests)")
    p.add_argument("--blocks", type=int, default=None, help="blocks per region (default 2 x largest batch)")
    p.add_argument("--layout", choices=("per-layer", "stacked"), default="per-layer")
    p.add_argument("--strategies", default=None,
                   help="comma list of baseline, ssm_split, staged, packed (default: all but packed)")
    p.add_argument("--threads", default="4", help="UCX num_threads for ssm_split strategies (comma list)")
    p.add_argument("--baseline-threads", default="4", help="UCX num_threads for the baseline (comma list)")
    p.add_argument("--staging-mib", type=int, default=1024, help="staging buffer bound per dst rank")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mode", choices=("serial", "concurrent", "both"), default="both")
    p.add_argument("--no-calibrate", action="store_true", help="use the default cost model")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="append records to this JSON file")
    p.add_argument("--plot", default=None, help="write a PNG of time vs batch size")


def _align(n: int, to: int = 4096) -> int:
    return -(-n // to) * to


def build_config(args) -> dict:
    from ..specs import preset_info
    from ..layout._layout import page_layout

    info = preset_info(args.model)
    layers = args.layers or info.num_state_layers
    spec = info.spec
    stacked = args.layout == "stacked"
    scale = layers if stacked else 1
    src_content = page_layout(spec, args.src_tp, 0).content_nbytes * scale
    dst_contents = [page_layout(spec, args.dst_tp, r).content_nbytes * scale for r in range(args.dst_tp)]
    batches = [int(b) for b in str(args.batch).split(",")]
    strategies = args.strategies.split(",") if args.strategies else (
        ["ssm_split", "staged"] if stacked else ["baseline", "ssm_split", "staged"])
    runs = []
    for name in strategies:
        threads = args.baseline_threads if name == "baseline" else args.threads
        runs += [(name, int(t)) for t in str(threads).split(",")]
    return dict(model=args.model, spec=spec, layers=layers, src_tp=args.src_tp, dst_tp=args.dst_tp,
                layout=args.layout, device=args.device, seed=args.seed, batches=batches,
                num_blocks=args.blocks or 2 * max(batches), runs=runs,
                src_page_nbytes=_align(src_content), dst_page_nbytes=_align(max(dst_contents)),
                per_batch_nbytes=sum(dst_contents) * (1 if stacked else layers),
                staging_nbytes=(args.staging_mib << 20) if {"staged", "packed"} & set(strategies) else 0,
                pack_nbytes=(args.staging_mib << 20) if "packed" in strategies else 0)


def _call(pipe, command, **args):
    pipe.send((command, args))
    status, value = pipe.recv()
    if status != "ok":
        raise RuntimeError(f"rank failed on {command}:\n{value}")
    return value


def _versions(device: str) -> dict:
    out = {"python": platform.python_version(), "ucx_cuda_ipc_get_zcopy": os.environ.get("UCX_CUDA_IPC_ENABLE_GET_ZCOPY")}
    from importlib import metadata

    for dist in ("nixl", "nixl-cu13", "torch", "triton", "numpy", "ssm-split"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if device == "cuda":
        import torch

        out["device"] = torch.cuda.get_device_name()
    else:
        out["device"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    return out


def _label(name: str, threads: int) -> str:
    return f"{name}@t{threads}"


def run_config(args) -> list[dict]:
    """Run one configuration; returns its JSON records."""
    from ._rank import rank_main

    os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")
    cfg = build_config(args)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(cfg["dst_tp"])
    procs, src_pipes, dst_pipes = [], [], []
    for role, n, pipes in (("src", cfg["src_tp"], src_pipes), ("dst", cfg["dst_tp"], dst_pipes)):
        for rank in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=rank_main, args=(role, rank, cfg, child, barrier), daemon=True)
            proc.start()
            procs.append(proc)
            pipes.append(parent)
    try:
        for pipe in src_pipes + dst_pipes:
            status, value = pipe.recv()
            if status != "ok":
                raise RuntimeError(value)
        copy_s = _call(dst_pipes[0], "copy_limit", nbytes=[b * cfg["per_batch_nbytes"] for b in cfg["batches"]])
        src_info = [_call(p, "setup") for p in src_pipes]
        for p in dst_pipes:
            _call(p, "setup", src_info=src_info)
            _call(p, "staging", nbytes=cfg["staging_nbytes"])
        model = None
        if any(name == "staged" for name, _ in cfg["runs"]) and not args.no_calibrate:
            threads = next(t for name, t in cfg["runs"] if name == "staged")
            model = _call(dst_pipes[0], "calibrate", threads=threads)
            print(f"cost model (fitted, t{threads}): {model['desc_s'] * 1e6:.2f} us/descriptor, "
                  f"{1e-9 / max(model['byte_s'], 1e-30):.0f} GB/s", flush=True)
        versions = _versions(cfg["device"])
        records = []
        rng = __import__("numpy").random.default_rng(args.seed + 1)
        for batch, copy_limit in zip(cfg["batches"], copy_s):
            pairs = [[int(s), int(d)] for s, d in zip(rng.choice(cfg["num_blocks"], batch, replace=False),
                                                      rng.choice(cfg["num_blocks"], batch, replace=False))]
            nbytes = batch * cfg["per_batch_nbytes"]
            records.append(_record(cfg, versions, batch, "copy-limit", None, dict(descriptors=0, requests=0,
                               read_nbytes=nbytes, gathered_nbytes=0, staging_nbytes=0), nbytes,
                               {"serial": copy_limit, "concurrent": copy_limit}, copy_limit, True, model))
            for name, threads in cfg["runs"]:
                if name == "packed":
                    total, times, ok = run_packed(cfg, threads, pairs, src_pipes, dst_pipes, args)
                    records.append(_record(cfg, versions, batch, "packed", threads, total, nbytes, times,
                                           copy_limit, ok, None))
                    continue
                fit = {k: model[k] for k in ("desc_s", "byte_s", "gather_byte_s", "gather_launch_s")} if model else None
                stats = [_call(p, "prepare", name=name, threads=threads, pairs=pairs, model=fit,
                               staging_cap=cfg["staging_nbytes"]) for p in dst_pipes]
                total = {k: sum(s[k] for s in stats) for k in ("descriptors", "requests", "read_nbytes",
                                                               "gathered_nbytes", "staging_nbytes")}
                total["staging_nbytes"] = max(s["staging_nbytes"] for s in stats)
                total["waves"] = max(s["waves"] for s in stats)
                ok = all(_call(p, "verify") for p in dst_pipes)
                times = _time(dst_pipes, args) if ok else {}
                records.append(_record(cfg, versions, batch, name, threads, total, nbytes, times, copy_limit, ok,
                                       model if name == "staged" else None))
        _speedups(records)
        return records
    finally:
        for pipe in src_pipes + dst_pipes:
            try:
                pipe.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()


def _time(pipes, args) -> dict:
    out = {}
    modes = ("serial", "concurrent") if args.mode == "both" else (args.mode,)
    for mode in modes:
        samples = []
        for i in range(args.warmup + args.repeats):
            if mode == "serial":
                spans = [_call(p, "run") for p in pipes]
                wall = sum(t1 - t0 for t0, t1 in spans)
            else:
                send_all(pipes, "run", concurrent=True)
                spans = replies(pipes)
                wall = max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans)
            if i >= args.warmup:
                samples.append(wall)
        out[mode] = statistics.median(samples)
        out[f"{mode}_samples"] = samples
    return out


def _record(cfg, versions, batch, name, threads, stats, nbytes, times, copy_limit, ok, model) -> dict:
    median = times.get("serial", times.get("concurrent"))
    rec = dict(model=cfg["model"], src_tp=cfg["src_tp"], dst_tp=cfg["dst_tp"], batch=batch, layers=cfg["layers"],
               layout=cfg["layout"], strategy=name if threads is None else _label(name, threads),
               threads=threads, descriptors=stats["descriptors"], requests=stats["requests"], nbytes=nbytes,
               read_nbytes=stats["read_nbytes"], gathered_nbytes=stats["gathered_nbytes"],
               staging_nbytes=stats["staging_nbytes"], waves=stats.get("waves", 0), verified=bool(ok),
               median_s=median, concurrent_s=times.get("concurrent"), samples_s=times.get("serial_samples"),
               gbps=(nbytes / median / 1e9) if median else None,
               pct_of_copy_limit=(100.0 * copy_limit / median) if median else None,
               copy_limit_s=copy_limit, speedup_vs_baseline=None, num_blocks=cfg["num_blocks"],
               device=versions.get("device"), versions=versions, cost_model=model)
    return rec


def _speedups(records: list[dict]) -> None:
    """Fill `speedup_vs_baseline` against vLLM's default (`baseline@t4`, UCX num_threads=4;
    else the fastest baseline run) and `speedup_vs_best_baseline` against the fastest
    baseline of any thread count, for the same model, TP pair, layer count and batch
    (whatever the layout)."""
    key = lambda r: (r["model"], r["src_tp"], r["dst_tp"], r["layers"], r["batch"])  # noqa: E731
    default: dict = {}
    best: dict = {}
    for r in records:
        if r["strategy"].startswith("baseline@") and r["median_s"]:
            best[key(r)] = min(best.get(key(r), float("inf")), r["median_s"])
            if r["threads"] == 4:
                default[key(r)] = r["median_s"]
    for r in records:
        if key(r) in best and r["median_s"]:
            r["speedup_vs_baseline"] = default.get(key(r), best[key(r)]) / r["median_s"]
            r["speedup_vs_best_baseline"] = best[key(r)] / r["median_s"]


def format_records(records: list[dict]) -> str:
    from .._text import format_table

    rows = []
    for r in records:
        rows.append([f"{r['model']} {r['src_tp']}->{r['dst_tp']} {r['layout']} b{r['batch']}", r["strategy"],
                     str(r["descriptors"]), f"{r['nbytes'] / 2**20:.0f} MiB",
                     f"{r['median_s'] * 1e3:.3f}" if r["median_s"] else ("FAILED" if not r["verified"] else "-"),
                     f"{r['concurrent_s'] * 1e3:.3f}" if r.get("concurrent_s") else "-",
                     f"{r['gbps']:.0f}" if r["gbps"] else "-",
                     f"{r['pct_of_copy_limit']:.0f}%" if r["pct_of_copy_limit"] else "-",
                     f"{r['speedup_vs_baseline']:.2f}x" if r["speedup_vs_baseline"] else "-"])
    header = ["case", "strategy", "descriptors", "bytes", "median ms", "concurrent ms", "GB/s", "% copy", "vs baseline"]
    return format_table(header, rows)


_COLORS = {"copy-limit": "black", "baseline": "tab:red", "ssm_split": "tab:blue", "staged": "tab:orange",
           "packed": "tab:green"}
_MARKERS = {None: "s", 0: "v", 4: "o", 8: "^", 16: "D"}


def plot_records(records: list[dict], path: str) -> bool:
    """Time vs batch size per strategy, one panel per case (color: strategy; solid:
    per-layer regions, dashed: stacked layout; marker: UCX threads). False when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases: dict = {}
    for r in records:
        if r["median_s"]:
            case = f"{r['model']} {r['src_tp']}->{r['dst_tp']} ({r['layers']} layers)"
            key = (r["layout"], r["strategy"], r["threads"])
            if r["strategy"] == "copy-limit":
                key = ("", "copy-limit", None)
            cases.setdefault(case, {}).setdefault(key, {})[r["batch"]] = r["median_s"]
    fig, axes = plt.subplots(1, len(cases), figsize=(6.5 * len(cases), 5), squeeze=False)
    for ax, (case, series) in zip(axes[0], cases.items()):
        for (layout, strategy, threads), pts in sorted(series.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            name = strategy.split("@")[0]
            batches = sorted(pts)
            ax.plot(batches, [pts[b] * 1e3 for b in batches], color=_COLORS.get(name, "gray"),
                    linestyle="--" if layout == "stacked" else "-", marker=_MARKERS.get(threads, "o"),
                    label=strategy if name == "copy-limit" else f"{layout}: {strategy}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (requests)")
        ax.set_ylabel("time (ms), dst ranks summed")
        ax.set_title(case, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def append_json(path: str, records: list[dict]) -> None:
    old = []
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    with open(path, "w") as f:
        json.dump(old + records, f, indent=1)


def run(args) -> int:
    t0 = time.perf_counter()
    records = run_config(args)
    print(format_records(records))
    print(f"({time.perf_counter() - t0:.1f} s; median_s = dst ranks timed one after another and added; "
          f"concurrent = all dst ranks at once)", flush=True)
    if args.json:
        append_json(args.json, records)
    if args.plot and not plot_records(records, args.plot):
        print("matplotlib is not installed: no plot written", file=sys.stderr)
    return 0 if all(r["verified"] for r in records) else 1


COMMANDS = {"bench": (HELP, add_arguments, run)}
