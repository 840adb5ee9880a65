"""`ssm-split demo`: move real state between prefill and decode processes with NIXL.

Starts `src_tp` prefill and `dst_tp` decode endpoints as separate processes on this
machine. Each prefill rank fills its pages (scattered block ids, several layers) from
`reference.shard` of a random full state per (layer, request) and serves its handshake
on a loopback TCP side channel; each decode rank fetches the handshakes, reads the batch
with real NIXL READs (one per src rank and batch), and checks every byte of its memory
against `reference.shard(state, dst_tp)`: content where requests landed, untouched bytes
everywhere else. The prefill ranks then wait for the readers' notifications, as an
engine would before freeing the blocks.

    ssm-split demo                                   # granite-4.0-h-tiny, 1 -> 2, DRAM
    ssm-split demo --model qwen3.5-27b --src-tp 2 --dst-tp 4 --requests 32 --layers 4
    ssm-split demo --device cuda                     # VRAM (needs torch with CUDA)
    ssm-split demo --json                            # one JSON document (docs/cli.md)

On a terminal a status line shows each phase (filling pages, reading batches); it stays
off with --json and when stderr is not a terminal. A missing NIXL or GPU, a TP size the
model cannot use or a run too big for the host is refused in one line before any process
starts; a rank process that fails reports one line (its traceback with -v).
"""

from __future__ import annotations

import argparse
import dataclasses
import bisect
import importlib.util
from typing import Any

import numpy as np

from ..errors import PlanError, SetupError
from ..layout._layout import page_layout
from ..plan._plan import plan_all
from .._text import format_bytes, format_table
from ._core import MODEL_HELP, resolve_model
from ._console import Progress, non_negative_int, positive_int, positive_seconds
from ._demo_children import Children
from ._demo_worker import DemoConfig, dst_main, src_main
from ._json import add_json_option, emit, model_json, spec_json

__all__ = ["COMMANDS"]

_MAX_MEMORY_NBYTES = 8 << 30
_SRC_PAGE_ALIGN, _DST_PAGE_ALIGN = 512, 4096  # the two sides pad differently


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="granite-4.0-h-tiny", metavar="MODEL",
                        help=f"{MODEL_HELP} (default granite-4.0-h-tiny)")
    parser.add_argument("--src-tp", type=positive_int, default=1,
                        help="prefill TP size, one process per rank (default 1)")
    parser.add_argument("--dst-tp", type=positive_int, default=2,
                        help="decode TP size, one process per rank (default 2)")
    parser.add_argument("--requests", type=positive_int, default=16,
                        help="requests moved (default 16)")
    parser.add_argument("--layers", type=positive_int, default=4,
                        help="state layers per request (default 4)")
    parser.add_argument("--batch", type=positive_int, default=64,
                        help="requests per READ batch (default 64)")
    parser.add_argument("--order", choices=("layer", "block"), default="layer",
                        help="page order: layer-major like vLLM, or block-major (all layers of a "
                             "block together, lets reads merge across layers)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: DRAM pages (numpy); cuda: VRAM pages (torch), default cpu")
    parser.add_argument("--strategy", choices=("auto", "direct", "staged", "packed", "peer"), default="auto",
                        help="how the decode ranks read (Reader(strategy=...); docs/performance.md), "
                             "default auto")
    parser.add_argument("--src-devices", type=_gpu_list, default=None, metavar="GPU[,GPU...]",
                        help="with --device cuda: GPUs of the prefill ranks, round robin (default GPU 0)")
    parser.add_argument("--dst-devices", type=_gpu_list, default=None, metavar="GPU[,GPU...]",
                        help="with --device cuda: GPUs of the decode ranks (default GPU 1 when there are "
                             "two or more GPUs, else GPU 0)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of states and block ids (default 0)")
    parser.add_argument("--timeout", type=positive_seconds, default=120.0, metavar="SECONDS",
                        help="seconds each step may take before giving up (default 120)")
    add_json_option(parser, "demo")


def _gpu_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU numbers, got {text!r}") from None
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"GPU numbers are >= 0, got {text!r}")
    return values


def _devices(args: argparse.Namespace) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Each side's GPUs: as given, else src on GPU 0 and dst on GPU 1 when there are two."""
    if args.device != "cuda":
        return (0,), (0,)
    import torch

    count = torch.cuda.device_count()
    src = args.src_devices or (0,)
    dst = args.dst_devices or ((1,) if count >= 2 else (0,))
    bad = sorted({d for d in src + dst if d >= count})
    if bad:
        raise SetupError(f"GPUs {bad} are not there: this machine has {count} (0..{count - 1}).")
    return src, dst


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def _num_blocks(requests: int) -> int:
    return requests + max(4, requests // 2)


def _memory_nbytes(args: argparse.Namespace, requests: int, src_page: int, dst_page: int) -> int:
    slots = args.layers * _num_blocks(requests)
    return slots * (args.src_tp * src_page * 2 + args.dst_tp * dst_page * 3)


def _config(args: argparse.Namespace) -> tuple[DemoConfig, Any]:
    info = resolve_model(args.model)
    if args.layers > info.num_state_layers:
        raise PlanError(f"{info.name} has {info.num_state_layers} state layers; pass "
                        f"--layers {info.num_state_layers} or fewer.")
    src_content = page_layout(info.spec, args.src_tp, 0).content_nbytes  # ShardingError if unfit
    dst_content = page_layout(info.spec, args.dst_tp, 0).content_nbytes
    src_page = _round_up(src_content, _SRC_PAGE_ALIGN)
    dst_page = _round_up(dst_content, _DST_PAGE_ALIGN)
    total = _memory_nbytes(args, args.requests, src_page, dst_page)
    if total > _MAX_MEMORY_NBYTES:
        fits = bisect.bisect_right(range(1, args.requests), _MAX_MEMORY_NBYTES,
                                   key=lambda n: _memory_nbytes(args, n, src_page, dst_page))
        per_layer = _memory_nbytes(argparse.Namespace(**{**vars(args), "layers": 1}), 1,
                                   src_page, dst_page)
        fix = (f"pass --requests {fits} or fewer at --layers {args.layers}" if fits
               else f"pass --layers {_MAX_MEMORY_NBYTES // per_layer} or fewer (with --requests 1)"
               if per_layer <= _MAX_MEMORY_NBYTES else "use a smaller model")
        raise PlanError(f"This run needs about {format_bytes(total)} of host memory (pages and "
                        f"their reference copies), above the demo's limit of "
                        f"{format_bytes(_MAX_MEMORY_NBYTES)}: {fix}.")
    num_blocks = _num_blocks(args.requests)
    rng = np.random.default_rng(args.seed)
    pairs = np.stack([rng.choice(num_blocks, args.requests, replace=False),
                      rng.choice(num_blocks, args.requests, replace=False)], axis=1)
    cfg = DemoConfig(
        spec=info.spec, src_tp=args.src_tp, dst_tp=args.dst_tp, num_layers=args.layers,
        pairs=tuple((int(s), int(d)) for s, d in pairs), num_blocks=num_blocks,
        src_page_nbytes=src_page, dst_page_nbytes=dst_page,
        order=args.order, device=args.device, seed=args.seed, batch=args.batch,
        timeout_s=args.timeout, strategy=args.strategy)
    return cfg, info


def _check_machine(device: str) -> None:
    """Refuse early, in one line, what the rank processes would fail on."""
    if importlib.util.find_spec("nixl") is None:  # the processes import it
        from ..nixl_backend._nixl_hint import INSTALL_HINT

        raise SetupError(f"the demo moves state with NIXL, which is not installed. {INSTALL_HINT}")
    if device != "cuda":
        return
    if importlib.util.find_spec("torch") is None:
        raise SetupError("--device cuda keeps pages in CUDA tensors and needs torch, which is "
                         "not installed: install a CUDA build of torch, or use --device cpu.")
    import torch

    if not torch.cuda.is_available():
        raise SetupError(f"--device cuda needs a CUDA GPU, and torch {torch.__version__} sees "
                         f"none (no device, or a build without CUDA): use --device cpu, or run "
                         f"on a machine with a GPU.")


def _report(cfg: DemoConfig, info: Any, results: dict[int, dict], freed: dict[int, dict]) -> dict:
    """The run as the `ssm-split/demo` JSON document's payload (docs/cli.md)."""
    plans = plan_all(cfg.spec, cfg.src_tp, cfg.dst_tp)
    dst_ranks = []
    for rank in sorted(results):
        r, v = results[rank], results[rank]["verify"]
        dst_ranks.append({
            "dst_rank": rank, "src_ranks": list(r["src_ranks"]),
            "reads_per_page": len(plans[rank].reads), "num_reads": r["reads"],
            "num_descriptors": r["descriptors"], "num_transfers": r["transfers"],
            "nbytes": r["nbytes"], "elapsed_s": r["elapsed_s"], "num_pages": v["pages"],
            "checked_nbytes": v["checked_nbytes"], "mismatched_nbytes": v["mismatched_nbytes"],
            "first_mismatch": v.get("first_mismatch"), "verified": not v["mismatched_nbytes"],
            "strategies": r["strategies"], "gpu": r["gpu"] if cfg.device == "cuda" else None})
    return {
        "model": model_json(info), "spec": spec_json(cfg.spec), "src_tp": cfg.src_tp,
        "dst_tp": cfg.dst_tp, "device": cfg.device, "order": cfg.order, "strategy": cfg.strategy,
        "src_devices": list(cfg.src_devices) if cfg.device == "cuda" else None,
        "dst_devices": list(cfg.dst_devices) if cfg.device == "cuda" else None,
        "num_requests": len(cfg.pairs), "num_layers": cfg.num_layers,
        "num_blocks": cfg.num_blocks, "batch": cfg.batch, "seed": cfg.seed,
        "src_page_nbytes": cfg.src_page_nbytes, "dst_page_nbytes": cfg.dst_page_nbytes,
        "src_content_nbytes": page_layout(cfg.spec, cfg.src_tp, 0).content_nbytes,
        "dst_content_nbytes": page_layout(cfg.spec, cfg.dst_tp, 0).content_nbytes,
        "dst_ranks": dst_ranks,
        "src_ranks": [{"src_rank": rank, "num_requests": f["requests"], "num_readers": f["readers"]}
                      for rank, f in sorted(freed.items())],
        "nbytes": sum(d["nbytes"] for d in dst_ranks),
        "elapsed_s": max(d["elapsed_s"] for d in dst_ranks),
        "verified": all(d["verified"] for d in dst_ranks),
    }


def _summary(report: dict) -> str:
    """The report as text: a header, one row per dst rank, totals and the verdict."""
    mem = "VRAM (CUDA tensors)" if report["device"] == "cuda" else "DRAM (numpy)"
    ranks = report["dst_ranks"]
    lines = [
        f"ssm-split demo: {report['model']['name']} ({report['model']['layer_kind']}), src_tp "
        f"{report['src_tp']} -> dst_tp {report['dst_tp']}, {mem}, "
        f"{report['src_tp'] + report['dst_tp']} processes, NIXL over UCX",
        f"  {report['num_requests']} requests x {report['num_layers']} layers, scattered blocks "
        f"of {report['num_blocks']}, {report['order']}-major pages; src page "
        f"{format_bytes(report['src_page_nbytes'])} (content "
        f"{format_bytes(report['src_content_nbytes'])}), dst page "
        f"{format_bytes(report['dst_page_nbytes'])} (content "
        f"{format_bytes(report['dst_content_nbytes'])})",
        "",
    ]
    rows = [[d["dst_rank"], ",".join(map(str, d["src_ranks"])), "+".join(d["strategies"]), d["reads_per_page"],
             d["num_reads"], d["num_descriptors"], d["num_transfers"], format_bytes(d["nbytes"]),
             f"{d['elapsed_s'] * 1e3:.1f}", f"{d['nbytes'] / d['elapsed_s'] / 1e9:.2f}",
             "ok" if d["verified"] else f"{d['mismatched_nbytes']} bad bytes"] for d in ranks]
    lines.append(format_table(["dst rank", "src ranks", "strategy", "reads/page", "reads", "descriptors",
                               "READs", "bytes", "ms", "GB/s", "verified"], rows))
    lines += [
        "",
        f"  total: {sum(d['num_reads'] for d in ranks)} reads in the plans, "
        f"{sum(d['num_descriptors'] for d in ranks)} descriptors after merging, "
        f"{format_bytes(report['nbytes'])} in {report['elapsed_s'] * 1e3:.1f} ms = "
        f"{report['nbytes'] / report['elapsed_s'] / 1e9:.2f} GB/s (all dst ranks at once)",
    ]
    for d in ranks:
        if not d["verified"]:
            lines.append(f"  FAILED dst rank {d['dst_rank']}: {d['mismatched_nbytes']} bytes "
                         f"differ from reference.shard; first at {d['first_mismatch']}")
    if report["verified"]:
        lines.append(f"  verified: {sum(d['num_pages'] for d in ranks)} decode pages byte for "
                     f"byte against reference.shard(state, dst_tp={report['dst_tp']}), and every "
                     f"other byte untouched "
                     f"({format_bytes(sum(d['checked_nbytes'] for d in ranks))} checked)")
    notified = ", ".join(f"src rank {s['src_rank']}: {s['num_requests']} requests x "
                         f"{s['num_readers']} readers" for s in report["src_ranks"])
    lines.append(f"  notifications received (blocks may be freed): {notified}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    cfg, info = _config(args)
    _check_machine(cfg.device)
    if args.strategy == "peer" and cfg.device != "cuda":
        raise SetupError("--strategy peer maps GPU memory between processes: use it with --device cuda.")
    src_devices, dst_devices = _devices(args)
    cfg = dataclasses.replace(cfg, src_devices=src_devices, dst_devices=dst_devices)
    children = Children(cfg.timeout_s, Progress(enabled=not args.json), args.verbose)
    try:
        for rank in range(cfg.src_tp):
            children.start("src", rank, src_main, cfg)
        for rank in range(cfg.dst_tp):  # they set up while the src ranks fill their pages
            children.start("dst", rank, dst_main, cfg)
        addresses = children.collect("ready", "src", cfg.src_tp)
        children.send("dst", [addresses[r] for r in range(cfg.src_tp)])  # like a config entry
        children.collect("ready", "dst", cfg.dst_tp)
        children.send("dst", "go")
        results = children.collect("done", "dst", cfg.dst_tp)
        children.send("src", "collect")
        freed = children.collect("freed", "src", cfg.src_tp)
        children.send("src", "stop")
    finally:
        children.close()
    report = _report(cfg, info, results, freed)
    if args.json:
        emit("demo", report)
    else:
        print(_summary(report), flush=True)
    return 0 if report["verified"] else 1


COMMANDS = {
    "demo": ("move state between prefill and decode processes with real NIXL READs, and verify it",
             _add_arguments, _run),
}
