"""The processes of `ssm-split bench`: one per src rank, one per dst rank, each on its GPU.

A src rank fills its pages, opens an `Endpoint` (with its pack area) and serves its
handshake; it also offers a plain buffer through a bare NIXL agent, which the dst reads
with one descriptor to measure the transport's own ceiling. A dst rank opens an
`Endpoint` and, per strategy, a `Reader`: it connects, warms up, reads the batch once
into poisoned pages and checks every byte, then answers "run" commands, each one
`Reader.read` of the batch timed from a barrier shared by all dst ranks. Nothing here
moves state except the library's own `Endpoint` and `Reader`.

Commands (pipe, `(name, args)` in, `("ok", value)` or `("error", text)` out): src:
"stop"; dst: "copy_limit", "ceiling", "prepare", "run", "release", "stop".
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import numpy as np

from ._common import (Memory, copy_limit_s, page_keys, per_layer_regions, split_rows, template_pages,
                      time_read_s)

SRC_PAD, DST_PAD = 0xA7, 0x5A
_COPY_SAMPLE_NBYTES = 4 << 30


def _setup_process(device: str) -> None:
    sys.stdout.flush()
    os.dup2(2, 1)  # NIXL and UCX log to stdout; the parent's stdout is the report's
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    if device == "cuda":
        os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")


def _serve(conn, handle) -> None:
    """Answer commands until "stop" (or the parent is gone)."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None or message[0] == "stop":
            return
        name, args = message
        try:
            conn.send(("ok", handle(name, args)))
        except Exception:  # the parent shows it; the rank stays usable
            conn.send(("error", traceback.format_exc()))


def _pages(cfg: dict, mem: Memory, side: str, rank: int):
    tp = cfg[f"{side}_tp"]
    page = cfg[f"{side}_page_nbytes"]
    content = template_pages(cfg["spec"], tp, cfg["seed"])[rank]
    padded = np.full(page, SRC_PAD if side == "src" else DST_PAD, dtype=np.uint8)
    padded[:content.size] = content
    template, keys = mem.put(padded), mem.put(page_keys(cfg["layers"], cfg["num_blocks"]))
    buffers = [mem.zeros(cfg["num_blocks"], page) for _ in range(cfg["layers"])]
    for layer, buf in enumerate(buffers):
        if side == "src":
            mem.fill(buf, template, keys[layer])
        else:
            mem.poison(buf)
    mem.sync()
    regions = per_layer_regions([mem.addr(b) for b in buffers], cfg["num_blocks"], page, mem.index)
    return buffers, regions, template, keys, content.size // 2


def _bare_agent(name: str, mem: Memory, nbytes: int):
    """A NIXL agent with the UCX settings of an endpoint of this memory, and a registered
    buffer of `nbytes` (the transport ceiling's src or dst)."""
    from ..nixl_backend._endpoint import VRAM_NUM_THREADS, VRAM_SPLIT_BATCH_SIZE
    from ..nixl_backend._nixl import make_agent

    threads = VRAM_NUM_THREADS if mem.cuda else 0
    params = {"split_batch_size": str(VRAM_SPLIT_BATCH_SIZE)} if threads else {}
    agent = make_agent(f"{name}-{os.getpid()}", num_threads=threads, ucx_params=params)
    buf = mem.zeros(1, nbytes).reshape(-1)
    table = np.array([[mem.addr(buf), nbytes, mem.index]], dtype=np.uint64)
    agent.register_memory(agent.get_reg_descs(table, mem.mem_type))
    return agent, buf


def src_main(cfg: dict, rank: int, device: int, conn) -> None:
    _setup_process(cfg["device"])
    try:
        from ..nixl_backend import Endpoint

        mem = Memory(cfg["device"], device)
        buffers, regions, _, _, _ = _pages(cfg, mem, "src", rank)
        endpoint = Endpoint(cfg["spec"], tp=cfg["src_tp"], rank=rank, regions=regions, memory=buffers,
                            pack_area_nbytes=cfg["pack_nbytes"], name=f"bench-src{rank}-{os.getpid()}")
        address = endpoint.serve()
        agent, ceiling = _bare_agent("bench-ceiling-src", mem, cfg["ceiling_nbytes"])
        conn.send(("ok", {"address": address, "device": mem.index, "ipc": endpoint.ipc_unavailable,
                          "ceiling": (agent.get_agent_metadata(), mem.addr(ceiling), mem.index)}))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return

    def handle(name, args):
        raise ValueError(f"a src rank has no command {name!r}")

    while not conn.poll(0.05):  # drain read-done notifications while readers read
        endpoint.poll_notifications()
    _serve(conn, handle)
    endpoint.close()


class _Dst:
    """One dst rank: its pages, endpoint and the reader of the strategy under test."""

    def __init__(self, cfg: dict, rank: int, device: int, barrier):
        from ..nixl_backend import Endpoint

        self.cfg, self.rank, self.barrier = cfg, rank, barrier
        self.mem = Memory(cfg["device"], device)
        self.buffers, self.regions, self.template, self.keys, self.content_words = _pages(cfg, self.mem, "dst", rank)
        self.endpoint = Endpoint(cfg["spec"], tp=cfg["dst_tp"], rank=rank, regions=self.regions,
                                 memory=self.buffers, pack_area_nbytes=0, name=f"bench-dst{rank}-{os.getpid()}")
        self._vllm_endpoint = None
        self.reader = None
        self.pairs = None

    def vllm_endpoint(self):
        """The endpoint vLLM's pattern runs on: the same pages, with vLLM's UCX settings
        (4 worker threads, UCX's default split of 1024 descriptors)."""
        from ..nixl_backend import Endpoint

        if self._vllm_endpoint is None:
            self._vllm_endpoint = Endpoint(self.cfg["spec"], tp=self.cfg["dst_tp"], rank=self.rank,
                                           regions=self.regions, memory=self.buffers, pack_area_nbytes=0,
                                           peer_access=False, ucx_params={"split_batch_size": "1024"},
                                           name=f"bench-vllm{self.rank}-{os.getpid()}")
        return self._vllm_endpoint

    def handle(self, name: str, args: dict):
        return getattr(self, f"_{name}")(**args)

    def _copy_limit(self, nbytes: int, src_device: int) -> float:
        """Seconds of torch's copy of `nbytes` between the two devices: measured on at
        most 4 GiB (the rate is flat beyond a few hundred MiB) and scaled to `nbytes`."""
        sample = min(nbytes, _COPY_SAMPLE_NBYTES)
        return copy_limit_s(self.cfg["device"], src_device, self.mem.index, sample) * nbytes / sample

    def _ceiling(self, metadata: bytes, addr: int, device: int, nbytes: int, splits=(1, 4)) -> dict:
        agent, buf = _bare_agent("bench-ceiling-dst", self.mem, nbytes)
        remote = agent.add_remote_agent(metadata)
        out = {parts: time_read_s(agent, remote, split_rows(self.mem.addr(buf), nbytes, self.mem.index, parts),
                                  split_rows(addr, nbytes, device, parts), self.mem.mem_type)
               for parts in splits}
        agent.remove_remote_agent(remote)
        return out

    def _prepare(self, strategy: str, addresses, pairs) -> dict:
        from ..errors import PlanError, SsmSplitError
        from ..nixl_backend import Reader
        from ..strategies._baseline import baseline_plan

        self._release()
        cfg = self.cfg
        if strategy == "baseline":
            try:
                plan = baseline_plan(cfg["spec"], cfg["src_tp"], cfg["dst_tp"], self.rank)
            except PlanError as error:  # vLLM's offsets leave the pages (replicated groups), stacked pages
                return {"verified": False, "skipped": f"vLLM's pattern cannot run here: {error}",
                        "strategy_run": "-", "descriptors": 0, "waves": 0, "nbytes": 0, "transfers": 0,
                        "why_not": {}}
            self.reader = Reader(self.vllm_endpoint(), strategy="direct", prepare="once", plan=plan)
        else:
            self.reader = Reader(self.endpoint, strategy=strategy, staging_nbytes=cfg["staging_nbytes"])
        for address in addresses:
            self.reader.connect_to(*address)
        for rank in [r for r in list(self.reader.peers) if r not in self.reader.plan.src_ranks]:
            self.reader.disconnect(rank)
        why_not = {k: v for k, v in self.reader.strategies().items() if v}
        if strategy in why_not:
            self._release()
            return {"verified": False, "skipped": why_not[strategy], "strategy_run": "-", "descriptors": 0,
                    "waves": 0, "nbytes": 0, "transfers": 0, "why_not": why_not}
        self.reader.warm_up()
        self.pairs = np.asarray(pairs, dtype=np.int64)
        for buf in self.buffers:
            self.mem.poison(buf)
        self.mem.sync()
        try:
            stats = self.reader.read(self.pairs, f"verify-{strategy}-{self.rank}", timeout_s=120)
        except SsmSplitError as error:  # does not fit these sizes (PlanError), or failed
            self._release()
            what = "skipped" if isinstance(error, PlanError) else "failed"
            return {"verified": False, what: f"{type(error).__name__}: {error}", "strategy_run": "-",
                    "descriptors": 0, "waves": 0, "nbytes": 0, "transfers": 0, "why_not": why_not}
        self.mem.sync()
        verified = all(self.mem.check(buf, self.template, self.keys[layer], self.pairs, self.content_words)
                       for layer, buf in enumerate(self.buffers))
        return {"verified": bool(verified), "strategy_run": stats.strategy, "peer_engine": stats.engine,
                "descriptors": stats.num_descriptors,
                "waves": stats.num_waves, "nbytes": stats.nbytes, "transfers": stats.num_transfers,
                "why_not": why_not, "skipped": None}

    def _run(self, request_id: str) -> tuple[float, float]:
        self.barrier.wait()
        t0 = time.perf_counter()
        self.reader.read(self.pairs, request_id, timeout_s=120)
        return t0, time.perf_counter()

    def _release(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    def close(self) -> None:
        self._release()
        if self._vllm_endpoint is not None:
            self._vllm_endpoint.close()
        self.endpoint.close()


def dst_main(cfg: dict, rank: int, device: int, conn, barrier) -> None:
    _setup_process(cfg["device"])
    try:
        dst = _Dst(cfg, rank, device, barrier)
        conn.send(("ok", {"device": dst.mem.index}))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    _serve(conn, dst.handle)
    dst.close()
