"""One rank of `ssm-split bench`: a process that owns state memory and, on the dst side,
executes strategies as NIXL READs, verifies and times them.

The coordinator (`bench/_run.py`) talks to each rank over a pipe: `(command, args)` in, one
reply out. This module holds the rank's set-up, agent, posting and waiting, and the
direct strategies (`baseline`: vLLM's descriptor pattern; `ssm_split`: the expanded
plan); `bench/_staged.py` and `bench/_packed.py` hold the other strategies, and
`bench/_common.py` the memory and page contents.
"""

from __future__ import annotations

import time
import traceback

import numpy as np

from ..strategies._cost import CostModel
from ..expand._expand import expand_plan
from . import _packed as packed
from . import _staged as staged
from ._common import Memory, num_regions, page_keys, plan_for, regions, template_pages


class Prepared:
    """Everything one strategy needs for one batch, built before timing."""

    def __init__(self):
        self.direct: list[tuple[int, object, object, np.ndarray]] = []  # (src_rank, local_h, remote_h, idx)
        self.waves: list[list[tuple[int, object, object, np.ndarray]]] = []
        self.tables: list[object] = []
        self.stats: dict = {}


class Rank:
    """State and NIXL agent of one rank; `handle(command, args)` serves the coordinator."""

    def __init__(self, role: str, rank: int, cfg: dict):
        self.role, self.rank, self.cfg = role, rank, cfg
        self.mem = Memory(cfg["device"])
        self.agent = None
        self.threads = None
        self.remotes: dict[int, str] = {}
        self.prepared: Prepared | None = None
        self.staging = None
        self.pairs = np.zeros((0, 2), np.int64)

    # --- set-up ----------------------------------------------------------------------
    def setup(self, src_info=None):
        cfg = self.cfg
        tp = cfg["src_tp"] if self.role == "src" else cfg["dst_tp"]
        template = template_pages(cfg["spec"], tp, cfg["layers"], cfg["layout"], cfg["seed"])[self.rank]
        page = cfg[f"{self.role}_page_nbytes"]
        self.content_words = len(template) // 2
        padded = np.full(page, 0xA7 if self.role == "src" else 0x5A, dtype=np.uint8)
        padded[:len(template)] = template
        keys = page_keys(cfg["layers"], cfg["num_blocks"])
        if cfg["layout"] == "stacked":
            keys = keys[:1]
        self.template = self.mem.put(padded)
        self.keys = [self.mem.put(k) for k in keys]
        self.buffers = [self.mem.zeros(cfg["num_blocks"], page) for _ in range(num_regions(cfg))]
        for i, buf in enumerate(self.buffers):
            if self.role == "src":
                self.mem.fill(buf, self.template, self.keys[i])
            else:
                self.mem.poison(buf)
        self.mem.sync()
        if self.mem.cuda:
            self.mem.torch.cuda.empty_cache()
        self.addrs = [self.mem.addr(b) for b in self.buffers]
        if self.role == "src":
            self.agent = self._make_agent(0)
            pack = cfg.get("pack_nbytes", 0)
            self.pack = self.mem.zeros(1, pack).reshape(-1) if pack else None
            self._register(self.buffers + ([self.pack] if pack else []))
            return (self.agent.get_agent_metadata(), self.addrs, self.mem.dev_id,
                    self.mem.addr(self.pack) if pack else 0)
        self.src_info = src_info
        return True

    def _make_agent(self, threads: int):
        from ..nixl_backend._nixl import make_agent

        return make_agent(f"bench-{self.role}{self.rank}-t{threads}-{time.monotonic_ns()}", num_threads=threads)

    def _register(self, buffers) -> None:
        rows = np.array([[self.mem.addr(b), self.mem.nbytes(b), self.mem.dev_id] for b in buffers], dtype=np.uint64)
        self.agent.register_memory(self.agent.get_reg_descs(rows, self.mem.mem_type))

    def use_threads(self, threads: int) -> None:
        """A fresh agent with `threads` UCX threads (unless the current one has them)."""
        if self.threads == threads:
            return
        self.release()
        if self.agent is not None:
            for name in self.remotes.values():
                self.agent.remove_remote_agent(name)
            del self.agent
        self.agent = self._make_agent(threads)
        self.threads = threads
        self._register(self.buffers + ([self.staging] if self.staging is not None else []))
        self.remotes = {r: self.agent.add_remote_agent(info[0]) for r, info in enumerate(self.src_info)}

    def ensure_staging(self, nbytes: int) -> None:
        """Allocate the staging buffer once (before any agent registers memory)."""
        if nbytes and self.staging is None:
            self.staging = self.mem.zeros(1, nbytes).reshape(-1)

    # --- direct strategies -----------------------------------------------------------
    def src_regions(self):
        cfg = self.cfg
        return [regions(info[1], cfg["num_blocks"], cfg["src_page_nbytes"], info[2]) for info in self.src_info]

    def dst_regions(self):
        return regions(self.addrs, self.cfg["num_blocks"], self.cfg["dst_page_nbytes"], self.mem.dev_id)

    def new_prepared(self) -> Prepared:
        return Prepared()

    def prep_lists(self, rank_desc) -> tuple:
        """Both lists of one src rank's `(M, 3)` descriptors, prepared for one READ."""
        agent, mem_type = self.agent, self.mem.mem_type
        local = agent.prep_xfer_dlist("NIXL_INIT_AGENT", agent.get_xfer_descs(
            np.ascontiguousarray(rank_desc.dst_descs), mem_type), mem_type)
        remote = agent.prep_xfer_dlist(self.remotes[rank_desc.src_rank], agent.get_xfer_descs(
            np.ascontiguousarray(rank_desc.src_descs), mem_type), mem_type)
        return rank_desc.src_rank, local, remote, np.arange(rank_desc.num_descriptors, dtype=np.int32)

    def prepare(self, name: str, threads: int, pairs: np.ndarray, model: dict | None, staging_cap: int):
        t_start = time.perf_counter()
        self.use_threads(threads)
        self.release()
        cfg = self.cfg
        plan = plan_for(name, cfg, self.rank, CostModel(**model) if model else None)
        layers = None if cfg["layout"] == "per-layer" else [0]
        num_layers = num_regions(cfg)
        prep = Prepared()
        src_regions, dst_regions = self.src_regions(), self.dst_regions()
        is_staged = name == "staged"
        direct = plan.direct_plan() if is_staged else plan
        descriptors = requests = staging_used = 0
        if direct.reads:
            exp = expand_plan(direct, src_regions, dst_regions, pairs, layers=layers)
            prep.direct = [self.prep_lists(r) for r in exp.ranks]
            descriptors += exp.num_descriptors
            requests += len(exp.ranks)
        if is_staged and plan.spans:
            d, r, staging_used = staged.stage_waves(self, plan, pairs, prep, src_regions, dst_regions,
                                                    num_layers, staging_cap)
            descriptors, requests = descriptors + d, requests + r
        per_page = plan.plan.nbytes if is_staged else plan.nbytes
        prep.stats.update(descriptors=descriptors, requests=requests,
                          read_nbytes=(plan.read_nbytes_per_page if is_staged else plan.nbytes) * num_layers * len(pairs),
                          nbytes=per_page * num_layers * len(pairs),
                          gathered_nbytes=(plan.gathered_nbytes_per_page * num_layers * len(pairs)) if is_staged else 0,
                          staging_nbytes=staging_used, waves=len(prep.waves), prep_s=time.perf_counter() - t_start)
        self.prepared = prep
        return prep.stats

    # --- running ---------------------------------------------------------------------
    def post(self, items, handles) -> None:
        for src_rank, local, remote, idx in items:
            h = self.agent.make_prepped_xfer("READ", local, idx, remote, idx)
            state = self.agent.transfer(h)
            if state == "ERR":
                raise RuntimeError(f"READ from src rank {src_rank} failed at post")
            handles.append(h)

    def wait(self, handles, deadline: float) -> None:
        pending = list(handles)
        while pending:
            still = []
            for h in pending:
                state = self.agent.check_xfer_state(h)
                if state == "ERR":
                    raise RuntimeError("READ failed")
                if state != "DONE":
                    still.append(h)
            pending = still
            if pending and time.perf_counter() > deadline:
                raise TimeoutError("READ did not complete in time")
        for h in handles:
            self.agent.release_xfer_handle(h)

    def run_once(self, barrier=None) -> tuple[float, float]:
        """Execute the prepared strategy; returns (start, end) on the shared monotonic clock."""
        prep = self.prepared
        self.mem.sync()
        if barrier is not None:
            barrier.wait()
        t0 = time.perf_counter()
        deadline = t0 + 60.0
        direct: list = []
        self.post(prep.direct, direct)
        events = []
        n = len(prep.waves)
        wave_handles: list[list] = [[] for _ in range(n)]
        if n:
            self.post(prep.waves[0], wave_handles[0])
        for w in range(n):
            if w + 1 < n:
                if w >= 1 and events:
                    events[w - 1].synchronize() if self.mem.cuda else None
                self.post(prep.waves[w + 1], wave_handles[w + 1])
            self.wait(wave_handles[w], deadline)
            self.mem.gather(prep.tables[w])
            if self.mem.cuda:
                ev = self.mem.torch.cuda.Event()
                ev.record()
                events.append(ev)
        self.wait(direct, deadline)
        self.mem.sync()
        return t0, time.perf_counter()

    def verify(self) -> bool:
        self.poison_all()
        self.run_once()
        return self.check_all()

    def poison_all(self) -> bool:
        for buf in self.buffers:
            self.mem.poison(buf)
        self.mem.sync()
        return True

    def check_all(self) -> bool:
        return all(self.mem.check(buf, self.template, self.keys[i], self.pairs, self.content_words)
                   for i, buf in enumerate(self.buffers))

    def release(self) -> None:
        prep, self.prepared = self.prepared, None
        if prep is None or self.agent is None:
            return
        for items in [prep.direct] + prep.waves:
            for _, local, remote, _ in items:
                self.agent.release_dlist_handle(local)
                self.agent.release_dlist_handle(remote)

    # --- dispatch --------------------------------------------------------------------
    def handle(self, command: str, args: dict):
        pairs = None
        if "pairs" in args:
            pairs = np.asarray(args["pairs"], dtype=np.int64)
            if command != "pack_prepare":  # the src packs; the pairs checked are the dst's
                self.pairs = pairs
        commands = {
            "setup": lambda: self.setup(args.get("src_info")),
            "copy_limit": lambda: [self.mem.copy_limit_s(n) for n in args["nbytes"]],
            "staging": lambda: self.ensure_staging(args["nbytes"]),
            "calibrate": lambda: staged.calibrate(self, args["threads"]),
            "prepare": lambda: self.prepare(args["name"], args["threads"], pairs, args.get("model"),
                                            args["staging_cap"]),
            "verify": self.verify,
            "pack_prepare": lambda: packed.pack_prepare(self, pairs, args["wave_pairs"]),
            "pack_run": lambda: packed.pack_run(self, args["wave"]),
            "prepare_packed": lambda: packed.prepare_packed(self, args["threads"], pairs, args["wave_pairs"]),
            "run_wave": lambda: packed.run_wave(self, args["wave"]),
            "poison": self.poison_all,
            "check": self.check_all,
            "run": lambda: self.run_once(args.get("barrier")),
        }
        if command not in commands:
            raise ValueError(f"unknown command {command!r}")
        return commands[command]()


def rank_main(role: str, rank: int, cfg: dict, conn, barrier) -> None:
    """Process entry point: serve commands until `None` arrives."""
    try:
        worker = Rank(role, rank, cfg)
        conn.send(("ok", None))
        while True:
            msg = conn.recv()
            if msg is None:
                break
            command, args = msg
            if command == "run" and args.get("concurrent"):
                args = dict(args, barrier=barrier)
            try:
                conn.send(("ok", worker.handle(command, args)))
            except Exception:  # report to the coordinator, keep serving
                conn.send(("error", traceback.format_exc()))
        worker.release()
    except Exception:
        conn.send(("error", traceback.format_exc()))
