"""`ssm-split bench`: time the library's own `Reader`/`Endpoint` on real NIXL transfers.

For one model, layer count, `(src_tp, dst_tp)` and list of batch sizes, it starts every
src and dst rank as its own process on its own device (`bench/_rank.py`; src ranks on
`src_devices`, dst ranks on `dst_devices`, round robin), and for every batch (scattered
block ids) measures, in the same run:

- `copy limit`: torch's copy of exactly the bytes the dst ranks receive, from the first
  src device to the first dst device (numpy's copy on the CPU);
- `transport ceiling`: one NIXL READ of the same byte count (capped at 2 GiB) between bare
  agents with the endpoints' UCX settings, the best of 1 and 4 descriptors;
- each strategy: `Reader(strategy=...)` ("auto", "direct", "staged", "packed", "peer")
  and "baseline", vLLM's descriptor pattern (`strategies.baseline_plan`) run by the same
  `Reader` with vLLM's UCX settings. Each is read once into poisoned pages and checked
  byte for byte (content, padding, untouched blocks) before it is timed; the time of a
  batch is from the first dst rank's start to the last one's end, all dst ranks at once
  (they start at a barrier), median of `repeats` after `warmup`.

Records (JSON) carry the fields docs/performance.md describes; `format_records` prints
them as a table and `plot_records` draws them.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import statistics
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import SetupError
from ..layout._layout import page_layout
from ..specs._stacked import stack_layers

__all__ = ["BenchOptions", "run_bench", "format_records", "plot_records", "write_json", "STRATEGIES"]

STRATEGIES = ("baseline", "auto", "direct", "staged", "packed", "peer")


@dataclass(frozen=True)
class BenchOptions:
    """What one `ssm-split bench` run measures (the CLI validates the values)."""

    model: str
    spec: object
    layers: int
    src_tp: int
    dst_tp: int
    batches: tuple[int, ...]
    num_blocks: int
    strategies: tuple[str, ...]
    device: str
    src_devices: tuple[int, ...]
    dst_devices: tuple[int, ...]
    repeats: int = 5
    warmup: int = 2
    staging_nbytes: int = 512 << 20
    pack_nbytes: int = 512 << 20
    seed: int = 0
    pages: str = "per-layer"
    """"per-layer" (vLLM's: one region per layer) or "stacked" (one region whose pages
    hold every layer unit-major, `ssm_split.specs.StackedSpec`)."""


def _align(n: int, to: int = 4096) -> int:
    return -(-n // to) * to


def _config(o: BenchOptions) -> dict:
    """What every rank process needs; `layers` there counts regions (1 for stacked pages)."""
    stacked = o.pages == "stacked"
    spec, regions = (stack_layers(o.spec, o.layers), 1) if stacked else (o.spec, o.layers)
    dst_contents = [page_layout(spec, o.dst_tp, r).content_nbytes for r in range(o.dst_tp)]
    per_request = sum(dst_contents) * regions
    return dict(spec=spec, layers=regions, src_tp=o.src_tp, dst_tp=o.dst_tp, device=o.device, seed=o.seed,
                num_blocks=o.num_blocks, src_page_nbytes=_align(page_layout(spec, o.src_tp, 0).content_nbytes),
                dst_page_nbytes=_align(max(dst_contents)), staging_nbytes=o.staging_nbytes,
                pack_nbytes=o.pack_nbytes, per_request_nbytes=per_request,
                ceiling_nbytes=min(_align(max(dst_contents) * regions * max(o.batches)), 2 << 30))


def _call(pipes, name: str, args_of) -> list:
    """Send `name` to every pipe (args per rank), then collect the answers in order."""
    for rank, pipe in enumerate(pipes):
        pipe.send((name, args_of(rank)))
    out = []
    for rank, pipe in enumerate(pipes):
        status, value = pipe.recv()
        if status != "ok":
            raise RuntimeError(f"dst rank {rank} failed on {name}:\n{value}")
        out.append(value)
    return out


def _start(ctx, target, args) -> tuple:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child), daemon=True)
    proc.start()
    status, value = parent.recv()
    if status != "ok":
        proc.join(5)
        raise RuntimeError(value)
    return proc, parent, value


def run_bench(o: BenchOptions) -> list[dict]:
    """Run every measurement (module doc); returns the records."""
    from ._rank import src_main

    cfg = _config(o)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(o.dst_tp)
    procs, src_pipes, dst_pipes, srcs, dsts = [], [], [], [], []
    try:
        for rank in range(o.src_tp):
            proc, pipe, info = _start(ctx, src_main, (cfg, rank, o.src_devices[rank % len(o.src_devices)]))
            procs.append(proc), src_pipes.append(pipe), srcs.append(info)
        for rank in range(o.dst_tp):
            proc, pipe, info = _start(ctx, _dst_target, (cfg, rank, o.dst_devices[rank % len(o.dst_devices)],
                                                         barrier))
            procs.append(proc), dst_pipes.append(pipe), dsts.append(info)
        addresses = [s["address"] for s in srcs]
        versions = _versions(o.device)
        metadata, ceiling_addr, ceiling_device = srcs[0]["ceiling"]
        ceiling = _call(dst_pipes[:1], "ceiling", lambda r: dict(metadata=metadata, addr=ceiling_addr,
                                                               device=ceiling_device, nbytes=cfg["ceiling_nbytes"]))[0]
        ceiling_gbps = cfg["ceiling_nbytes"] / min(ceiling.values()) / 1e9
        records = []
        rng = np.random.default_rng(o.seed + 1)
        for batch in o.batches:
            pairs = np.stack([rng.choice(o.num_blocks, batch, replace=False),
                              rng.choice(o.num_blocks, batch, replace=False)], axis=1).tolist()
            nbytes = batch * cfg["per_request_nbytes"]
            copy_s = _call(dst_pipes[:1], "copy_limit", lambda r: dict(nbytes=nbytes,
                                                                       src_device=srcs[0]["device"]))[0]
            for strategy in o.strategies:
                prepared = _call(dst_pipes, "prepare", lambda r: dict(strategy=strategy, addresses=addresses,
                                                                       pairs=pairs))
                samples = []
                if all(p["verified"] for p in prepared):
                    for i in range(o.warmup + o.repeats):
                        spans = _call(dst_pipes, "run", lambda r: dict(request_id=f"{strategy}-{batch}-{i}-{r}"))
                        if i >= o.warmup:
                            samples.append(max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans))
                _call(dst_pipes, "release", lambda r: {})
                records.append(_record(o, versions, batch, strategy, prepared, samples, nbytes, copy_s,
                                       ceiling_gbps, [s["device"] for s in srcs], [d["device"] for d in dsts]))
        _speedups(records)
        return records
    finally:
        for pipe in src_pipes + dst_pipes:
            try:
                pipe.send(("stop", {}))
            except (BrokenPipeError, OSError):
                pass
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()


def _dst_target(cfg, rank, device, barrier, conn):
    from ._rank import dst_main

    dst_main(cfg, rank, device, conn, barrier)


def _record(o, versions, batch, strategy, prepared, samples, nbytes, copy_s, ceiling_gbps, src_devs, dst_devs):
    median = statistics.median(samples) if samples else None
    gbps = nbytes / median / 1e9 if median else None
    copy_gbps = nbytes / copy_s / 1e9
    return dict(model=o.model, src_tp=o.src_tp, dst_tp=o.dst_tp, layers=o.layers, batch=batch, pages=o.pages,
                executor="Reader", strategy=strategy,
                strategy_run=sorted({p["strategy_run"] for p in prepared}),
                peer_engine=sorted({p["peer_engine"] for p in prepared if p.get("peer_engine")}),
                descriptors=sum(p["descriptors"] for p in prepared), waves=max(p["waves"] for p in prepared),
                transfers=sum(p["transfers"] for p in prepared), nbytes=nbytes,
                verified=all(p["verified"] for p in prepared), median_s=median, samples_s=samples, gbps=gbps,
                skipped=next((p["skipped"] for p in prepared if p.get("skipped")), None),
                failed=next((p["failed"] for p in prepared if p.get("failed")), None),
                src_devices=src_devs, dst_devices=dst_devs, copy_limit_s=copy_s, copy_limit_gbps=copy_gbps,
                pct_of_copy_limit=100.0 * gbps / copy_gbps if gbps else None,
                transport_ceiling_gbps=ceiling_gbps,
                pct_of_transport_ceiling=100.0 * gbps / ceiling_gbps if gbps else None,
                speedup_vs_baseline=None, unavailable=prepared[0]["why_not"], num_blocks=o.num_blocks,
                device=versions.get("device"), versions=versions)


def _speedups(records: list[dict]) -> None:
    """`speedup_vs_baseline`: the baseline's median time over the record's, same batch."""
    base = {r["batch"]: r["median_s"] for r in records if r["strategy"] == "baseline" and r["median_s"]}
    for r in records:
        if r["median_s"] and r["batch"] in base:
            r["speedup_vs_baseline"] = base[r["batch"]] / r["median_s"]


def _versions(device: str) -> dict:
    from importlib import metadata

    out = {"python": platform.python_version(),
           "ucx_cuda_ipc_get_zcopy": os.environ.get("UCX_CUDA_IPC_ENABLE_GET_ZCOPY")}
    for dist in ("nixl", "nixl-cu13", "torch", "triton", "numpy", "ssm-split"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if device == "cuda":
        import torch

        out["device"] = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}"
    else:
        out["device"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    return out


def format_records(records: Sequence[dict]) -> str:
    from .._text import format_table

    def pct(value):
        return f"{value:.0f}%" if value else "-"

    rows = [[f"{r['model']} {r['src_tp']}->{r['dst_tp']} b{r['batch']}" + (" stacked" * (r["pages"] == "stacked")),
             r["strategy"],
             "+".join(r["strategy_run"]) + "".join(f" ({e})" for e in r.get("peer_engine", ())),
             str(r["descriptors"]), f"{r['nbytes'] / 2**20:.0f} MiB",
             f"{r['median_s'] * 1e3:.2f}" if r["median_s"] else ("skipped" if r.get("skipped") else
                                                                 "FAILED" if not r["verified"] else "-"),
             f"{r['gbps']:.0f}" if r["gbps"] else "-", pct(r["pct_of_copy_limit"]),
             pct(r["pct_of_transport_ceiling"]),
             f"{r['speedup_vs_baseline']:.2f}x" if r["speedup_vs_baseline"] else "-"] for r in records]
    header = ["case", "strategy", "ran", "descriptors", "bytes", "ms", "GB/s", "% copy", "% NIXL 1-desc",
              "vs vLLM"]
    return format_table(header, rows)


def plot_records(records: Sequence[dict], path: str) -> bool:
    """Time per strategy and batch size (bars), one panel per case; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases: dict = {}
    for r in records:
        if r["median_s"]:
            gpus = f"GPU {sorted(set(r['src_devices']))} -> GPU {sorted(set(r['dst_devices']))}"
            pages = ", stacked" if r["pages"] == "stacked" else ""
            case = f"{r['model']} {r['src_tp']}->{r['dst_tp']}, {r['layers']} layers{pages}, b{r['batch']}, {gpus}"
            cases.setdefault(case, []).append(r)
    num_cols = min(max(len(cases), 1), 4)
    num_rows = -(-max(len(cases), 1) // num_cols)
    fig, axes = plt.subplots(num_rows, num_cols, figsize=(5.5 * num_cols, 4.2 * num_rows), squeeze=False)
    for ax in axes.flat[len(cases):]:
        ax.set_visible(False)
    for ax, (case, rows) in zip(axes.flat, cases.items()):
        names = [r["strategy"] for r in rows]
        ax.bar(names, [r["median_s"] * 1e3 for r in rows], color="tab:blue")
        ax.axhline(rows[0]["copy_limit_s"] * 1e3, color="black", linestyle="--", label="torch copy")
        ax.set_ylabel("ms, all dst ranks at once")
        ax.set_title(case.replace(", b", ",\nb", 1), fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def write_json(path: str, records: Sequence[dict]) -> None:
    """Append `records` to the JSON list in `path` (created if missing)."""
    old = []
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    with open(path, "w") as f:
        json.dump(old + list(records), f, indent=1)


def check_devices(device: str, src_devices: Sequence[int], dst_devices: Sequence[int]) -> None:
    """`SetupError` when the GPUs asked for are not there."""
    if device != "cuda":
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise SetupError("--device cuda needs a CUDA GPU, and none is visible; use --device cpu.")
    bad = sorted({d for d in list(src_devices) + list(dst_devices) if d >= count})
    if bad:
        raise SetupError(f"GPUs {bad} are not there: this machine has {count} (0..{count - 1}).")
