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
    ssm-split demo --model qwen3.5-27b --src-tp 2 --dst-tp 4 --requests 64 --layers 8
    ssm-split demo --device cuda                     # VRAM (needs torch with CUDA)
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import sys
import time
from multiprocessing.connection import wait
from typing import Any

import numpy as np

from ..errors import SsmSplitError, TransferError
from ..layout._layout import page_layout
from ..plan._plan import plan_all
from .._text import format_bytes, format_table
from ._demo_worker import DemoConfig, dst_main, src_main

__all__ = ["COMMANDS"]

_MAX_MEMORY_NBYTES = 8 << 30
_SRC_PAGE_ALIGN, _DST_PAGE_ALIGN = 512, 4096  # the two sides pad differently


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="granite-4.0-h-tiny",
                        help="preset name, Hugging Face id or config.json path (default granite-4.0-h-tiny)")
    parser.add_argument("--src-tp", type=int, default=1, help="prefill TP size, one process per rank (default 1)")
    parser.add_argument("--dst-tp", type=int, default=2, help="decode TP size, one process per rank (default 2)")
    parser.add_argument("--requests", type=int, default=16, help="requests moved (default 16)")
    parser.add_argument("--layers", type=int, default=4, help="state layers per request (default 4)")
    parser.add_argument("--batch", type=int, default=64, help="requests per READ batch (default 64)")
    parser.add_argument("--order", choices=("layer", "block"), default="layer",
                        help="page order: layer-major like vLLM, or block-major (all layers of a "
                             "block together, lets reads merge across layers)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: DRAM pages (numpy); cuda: VRAM pages (torch), default cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of states and block ids (default 0)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before giving up (default 120)")


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def _config(args: argparse.Namespace) -> tuple[DemoConfig, Any]:
    from ._core import resolve_model

    info = resolve_model(args.model)
    for name in ("src_tp", "dst_tp", "requests", "layers", "batch"):
        if getattr(args, name) < 1:
            raise SsmSplitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.layers > info.num_state_layers:
        raise SsmSplitError(f"{info.name} has {info.num_state_layers} state layers; pass "
                            f"--layers {info.num_state_layers} or fewer.")
    src_content = page_layout(info.spec, args.src_tp, 0).content_nbytes  # ShardingError if unfit
    dst_content = page_layout(info.spec, args.dst_tp, 0).content_nbytes
    num_blocks = args.requests + max(4, args.requests // 2)
    rng = np.random.default_rng(args.seed)
    pairs = np.stack([rng.choice(num_blocks, args.requests, replace=False),
                      rng.choice(num_blocks, args.requests, replace=False)], axis=1)
    cfg = DemoConfig(
        spec=info.spec, src_tp=args.src_tp, dst_tp=args.dst_tp, num_layers=args.layers,
        pairs=tuple((int(s), int(d)) for s, d in pairs), num_blocks=num_blocks,
        src_page_nbytes=_round_up(src_content, _SRC_PAGE_ALIGN),
        dst_page_nbytes=_round_up(dst_content, _DST_PAGE_ALIGN),
        order=args.order, device=args.device, seed=args.seed, batch=args.batch,
        timeout_s=args.timeout)
    slots = cfg.num_layers * cfg.num_blocks
    total = slots * (cfg.src_tp * cfg.src_page_nbytes * 2 + cfg.dst_tp * cfg.dst_page_nbytes * 3)
    if total > _MAX_MEMORY_NBYTES:
        raise SsmSplitError(f"This run needs about {format_bytes(total)} of host memory (pages and "
                            f"their reference copies), above the demo's limit of "
                            f"{format_bytes(_MAX_MEMORY_NBYTES)}: use fewer --requests or --layers.")
    return cfg, info


class _Children:
    """The demo's processes and their pipes; collects their messages."""

    def __init__(self, timeout_s: float):
        self.ctx = mp.get_context("spawn")
        self.procs: list = []
        self.conns: dict[tuple[str, int], Any] = {}
        self.timeout_s = timeout_s
        self.progress: dict[int, tuple[int, int]] = {}

    def start(self, role: str, rank: int, target, *args) -> None:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=target, args=(*args[:1], rank, child, *args[1:]),
                                name=f"ssm-split-demo-{role}-{rank}", daemon=True)
        proc.start()
        child.close()
        self.procs.append(proc)
        self.conns[role, rank] = parent

    def send(self, role: str, message: Any) -> None:
        for (r, _), conn in self.conns.items():
            if r == role:
                conn.send(message)

    def collect(self, kind: str, role: str, count: int) -> dict[int, Any]:
        """Wait for `count` messages `kind` from `role`; show progress meanwhile."""
        got: dict[int, Any] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(got) < count:
            ready = wait(list(self.conns.values()), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TransferError(f"The demo's {role} processes did not report {kind!r} within "
                                    f"{self.timeout_s} s (--timeout).")
            for conn in ready:
                try:
                    message = conn.recv()
                except EOFError:  # the process is gone: fine once it said what we wait for
                    key = next(k for k, c in self.conns.items() if c is conn)
                    del self.conns[key]
                    if key[0] == role and key[1] not in got:
                        raise TransferError(f"The demo's {key[0]} rank {key[1]} process exited "
                                            f"before reporting {kind!r}.") from None
                    continue
                self._handle(message, kind, role, got)
        return got

    def _handle(self, message: tuple, kind: str, role: str, got: dict) -> None:
        what, who, rank, payload = message
        if what == "error":
            raise TransferError(f"The demo's {who} rank {rank} process failed:\n{payload}")
        if what == "progress":
            self.progress[rank] = payload
            _draw_progress(self.progress)
            return
        if what == kind and who == role:
            got[rank] = payload

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        for proc in self.procs:
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5.0)


def _draw_progress(progress: dict[int, tuple[int, int]]) -> None:
    done = sum(d for d, _ in progress.values())
    total = sum(t for _, t in progress.values())
    if total <= len(progress) or not sys.stderr.isatty():
        return  # one batch per rank: nothing worth a bar
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r  reading [{'#' * filled}{'.' * (width - filled)}] {done}/{total} batches")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _summary(cfg: DemoConfig, info: Any, results: dict[int, dict], freed: dict[int, dict]) -> str:
    plans = plan_all(cfg.spec, cfg.src_tp, cfg.dst_tp)
    mem = "VRAM (CUDA tensors)" if cfg.device == "cuda" else "DRAM (numpy)"
    lines = [
        f"ssm-split demo: {info.name} ({info.layer_kind}), src_tp {cfg.src_tp} -> dst_tp "
        f"{cfg.dst_tp}, {mem}, {cfg.src_tp + cfg.dst_tp} processes, NIXL over UCX",
        f"  {len(cfg.pairs)} requests x {cfg.num_layers} layers, scattered blocks of {cfg.num_blocks}, "
        f"{cfg.order}-major pages; src page {format_bytes(cfg.src_page_nbytes)} "
        f"(content {format_bytes(page_layout(cfg.spec, cfg.src_tp, 0).content_nbytes)}), dst page "
        f"{format_bytes(cfg.dst_page_nbytes)} (content "
        f"{format_bytes(page_layout(cfg.spec, cfg.dst_tp, 0).content_nbytes)})",
        "",
    ]
    rows = []
    for rank in sorted(results):
        r = results[rank]
        v = r["verify"]
        rows.append([rank, ",".join(map(str, r["src_ranks"])), len(plans[rank].reads), r["reads"],
                     r["descriptors"], r["transfers"], format_bytes(r["nbytes"]),
                     f"{r['elapsed_s'] * 1e3:.1f}", f"{r['nbytes'] / r['elapsed_s'] / 1e9:.2f}",
                     "ok" if not v["mismatched_nbytes"] else f"{v['mismatched_nbytes']} bad bytes"])
    header = ["dst rank", "src ranks", "reads/page", "reads", "descriptors", "READs", "bytes",
              "ms", "GB/s", "verified"]
    lines.append(format_table(header, rows))
    nbytes = sum(r["nbytes"] for r in results.values())
    elapsed = max(r["elapsed_s"] for r in results.values())
    lines += [
        "",
        f"  total: {sum(r['reads'] for r in results.values())} reads in the plans, "
        f"{sum(r['descriptors'] for r in results.values())} descriptors after merging, "
        f"{format_bytes(nbytes)} in {elapsed * 1e3:.1f} ms = {nbytes / elapsed / 1e9:.2f} GB/s "
        f"(all dst ranks at once)",
    ]
    bad = {rank: r["verify"] for rank, r in results.items() if r["verify"]["mismatched_nbytes"]}
    if bad:
        for rank, v in sorted(bad.items()):
            lines.append(f"  FAILED dst rank {rank}: {v['mismatched_nbytes']} bytes differ from "
                         f"reference.shard; first at {v['first_mismatch']}")
    else:
        checked = sum(r["verify"]["checked_nbytes"] for r in results.values())
        lines.append(f"  verified: {sum(r['verify']['pages'] for r in results.values())} decode pages "
                     f"byte for byte against reference.shard(state, dst_tp={cfg.dst_tp}), and every "
                     f"other byte untouched ({format_bytes(checked)} checked)")
    notified = ", ".join(f"src rank {r}: {f['requests']} requests x {f['readers']} readers"
                         for r, f in sorted(freed.items()))
    lines.append(f"  notifications received (blocks may be freed): {notified}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    cfg, info = _config(args)
    if importlib.util.find_spec("nixl") is None:  # fail early; the processes import it
        from ..nixl_backend._nixl_hint import INSTALL_HINT

        print(f"ssm-split demo: error: {INSTALL_HINT}", file=sys.stderr)
        return 2

    children = _Children(cfg.timeout_s)
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
        print(_summary(cfg, info, results, freed), flush=True)
    finally:
        children.close()
    return 1 if any(r["verify"]["mismatched_nbytes"] for r in results.values()) else 0


COMMANDS = {
    "demo": ("move state between prefill and decode processes with real NIXL READs, and verify it",
             _add_arguments, _run),
}
