"""One rank of `ssm-split bench`: a process that owns state memory and, on the dst side,
executes strategies as NIXL READs (plus the staged gather), verifies and times them.

The coordinator (`_bench.py`) talks to each rank over a pipe: `(command, args)` in,
one reply out. Memory is CUDA tensors (`device="cuda"`, VRAM) or numpy arrays
(`device="cpu"`, DRAM, for trying the benchmark without a GPU).

Page contents: every rank's template page is `reference.shard` of a random full state
(`stack_pages` of one state per layer for the stacked layout); the page of (layer l,
block b) is the template XOR a 16-bit key of (l, b). A correct transfer of src block s
into dst block d leaves `dst_template ^ key(l, s)` in the dst content, poison in the
padding and in every block not read into.
"""

from __future__ import annotations

import time
import traceback

import numpy as np

from .. import reference
from .._cost import CostModel, baseline_plan, fit_cost_model
from .._expand import RegionSet, expand_plan
from .._plan import plan_reads
from .._stacked import stack_layers, stack_pages, stacked_plan
from .._staging import pack_plan, stage_plan

POISON = 0x5A5A


def page_keys(n_layers: int, num_blocks: int) -> np.ndarray:
    """Shape `(n_layers, num_blocks)` uint16 keys, never 0 and distinct across pages."""
    layer = np.arange(n_layers, dtype=np.int64)[:, None]
    block = np.arange(num_blocks, dtype=np.int64)[None, :]
    return ((layer * 40503 + block * 9973 + 12345) % 65521 + 1).astype(np.uint16)


def template_pages(spec, tp: int, n_layers: int, layout: str, seed: int) -> list[np.ndarray]:
    """Per rank, the content bytes of one page (per-layer) or one stacked page."""
    if layout == "stacked":
        states = [reference.random_state(spec, seed + layer) for layer in range(n_layers)]
        stacked = stack_layers(spec, n_layers)
        shards = [reference.shard(spec, s, tp) for s in states]
        return [stack_pages(stacked, [shards[layer][rank] for layer in range(n_layers)], tp, rank)
                for rank in range(tp)]
    return reference.shard(spec, reference.random_state(spec, seed), tp)


class _Memory:
    """State memory on one device: per region a 2-D `(num_blocks, page_nbytes)` uint8 array."""

    def __init__(self, device: str):
        self.device = device
        self.cuda = device == "cuda"
        if self.cuda:
            import torch

            self.torch = torch
            torch.cuda.init()
            self.dev_id = torch.cuda.current_device()
        else:
            self.dev_id = 0
        self.mem_type = "VRAM" if self.cuda else "DRAM"
        self._spans: list[tuple[int, int, object]] = []  # numpy address map for the gather

    def zeros(self, rows: int, cols: int):
        if self.cuda:
            return self.torch.zeros((rows, cols), dtype=self.torch.uint8, device="cuda")
        buf = np.zeros((rows, cols), dtype=np.uint8)
        self._spans.append((buf.ctypes.data, buf.nbytes, buf))
        return buf

    def addr(self, buf) -> int:
        return int(buf.data_ptr()) if self.cuda else int(buf.ctypes.data)

    def words(self, buf):
        return buf.view(self.torch.int16) if self.cuda else buf.view(np.uint16)

    def put(self, array: np.ndarray):
        if self.cuda:
            return self.torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).to("cuda")
        return np.ascontiguousarray(array).view(np.uint16)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def fill(self, buf, template, keys) -> None:
        """`buf[b] = template ^ keys[b]` (16-bit words), one block at a time (no big temporaries)."""
        w = self.words(buf)
        for b in range(w.shape[0]):
            w[b] = template ^ keys[b]

    def poison(self, buf) -> None:
        self.words(buf)[:] = POISON if not self.cuda else POISON

    def check(self, buf, template, keys, pairs: np.ndarray, content_words: int) -> bool:
        """Blocks `pairs[:, 1]` hold `template ^ key(pairs[:, 0])` then poison; others poison.

        Checked a few blocks at a time, so it needs little memory beyond the pages."""
        w = self.words(buf)
        rows, row_words = w.shape
        src_of = np.full(rows, -1, dtype=np.int64)
        src_of[pairs[:, 1]] = pairs[:, 0]
        step = max(1, (256 << 20) // (2 * row_words))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            chunk = w[r0:r1]
            src = src_of[r0:r1]
            hit = src >= 0
            if self.cuda:
                torch = self.torch
                if bool((chunk[torch.from_numpy(~hit).to("cuda")] != POISON).any()):
                    return False
                if hit.any():
                    rows_hit = chunk[torch.from_numpy(hit).to("cuda")]
                    k = keys.index_select(0, torch.from_numpy(src[hit]).to("cuda"))
                    if not torch.equal(rows_hit[:, :content_words], template[None, :content_words] ^ k[:, None]):
                        return False
                    if bool((rows_hit[:, content_words:] != POISON).any()):
                        return False
            else:
                if (chunk[~hit] != POISON).any():
                    return False
                rows_hit = chunk[hit]
                want = template[None, :content_words] ^ keys[src[hit]][:, None]
                if not np.array_equal(rows_hit[:, :content_words], want) or (rows_hit[:, content_words:] != POISON).any():
                    return False
        return True

    def gather_table(self, src, dst, nbytes, anchor):
        if self.cuda:
            from ._gather import GatherTable

            return GatherTable.build(src, dst, nbytes, anchor=anchor)
        return (np.asarray(src, np.int64), np.asarray(dst, np.int64), np.asarray(nbytes, np.int64))

    def gather(self, table) -> None:
        if self.cuda:
            from ._gather import run_gather

            run_gather(table)
            return
        for s, d, n in zip(*table):
            self._view(int(d), int(n))[:] = self._view(int(s), int(n))

    def _view(self, addr: int, n: int) -> np.ndarray:
        for base, size, buf in self._spans:
            if base <= addr and addr + n <= base + size:
                return buf.reshape(-1)[addr - base:addr - base + n]
        raise ValueError(f"address {addr:#x} is not in this process's memory")

    def copy_limit_s(self, nbytes: int, repeats: int = 5) -> float:
        """Median seconds of one device-to-device copy of `nbytes` bytes."""
        if self.cuda:
            torch = self.torch
            words = (nbytes + 3) // 4
            a = torch.randint(-(1 << 31), (1 << 31) - 1, (words,), dtype=torch.int32, device="cuda")
            b = torch.empty_like(a)
            times = []
            for i in range(repeats + 2):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                b.copy_(a)
                end.record()
                end.synchronize()
                if i >= 2:
                    times.append(start.elapsed_time(end) / 1e3)
            del a, b
            torch.cuda.empty_cache()
            return float(np.median(times))
        a = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
        b = np.empty_like(a)
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            np.copyto(b, a)
            if i:
                times.append(time.perf_counter() - t0)
        return float(np.median(times))


def _regions(addrs, num_blocks, page_nbytes, dev_id) -> RegionSet:
    return RegionSet.per_layer(list(addrs), num_blocks=num_blocks, page_nbytes=page_nbytes, device_id=dev_id)


def _plan_for(name: str, cfg: dict, dst_rank: int, model: CostModel | None):
    """The plan (or staged plan) of strategy `name` for this dst rank."""
    spec, src_tp, dst_tp = cfg["spec"], cfg["src_tp"], cfg["dst_tp"]
    if cfg["layout"] == "stacked":
        plan = stacked_plan(stack_layers(spec, cfg["layers"]), src_tp, dst_tp, dst_rank)
    elif name == "baseline":
        plan = baseline_plan(spec, src_tp, dst_tp, dst_rank)
    else:
        plan = plan_reads(spec, src_tp, dst_tp, dst_rank)
    if name == "staged":
        return stage_plan(plan, model=model)
    return plan


class _Prepared:
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
        self.mem = _Memory(cfg["device"])
        self.agent = None
        self.threads = None
        self.remotes: dict[int, str] = {}
        self.prepared: _Prepared | None = None
        self.staging = None

    # --- set-up ----------------------------------------------------------------------
    def setup(self, src_info=None):
        cfg = self.cfg
        tp = cfg["src_tp"] if self.role == "src" else cfg["dst_tp"]
        n_regions = 1 if cfg["layout"] == "stacked" else cfg["layers"]
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
        self.buffers = [self.mem.zeros(cfg["num_blocks"], page) for _ in range(n_regions)]
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
        from ._nixl import make_agent

        return make_agent(f"bench-{self.role}{self.rank}-t{threads}-{time.monotonic_ns()}", num_threads=threads)

    def _register(self, buffers) -> None:
        rows = np.array([[self.mem.addr(b), b.nbytes if not self.mem.cuda else b.numel(), self.mem.dev_id]
                         for b in buffers], dtype=np.uint64)
        self.agent.register_memory(self.agent.get_reg_descs(rows, self.mem.mem_type))

    def _use_threads(self, threads: int) -> None:
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

    # --- strategies ------------------------------------------------------------------
    def _src_regions(self):
        cfg = self.cfg
        return [_regions(info[1], cfg["num_blocks"], cfg["src_page_nbytes"], info[2]) for info in self.src_info]

    def _dst_regions(self):
        return _regions(self.addrs, self.cfg["num_blocks"], self.cfg["dst_page_nbytes"], self.mem.dev_id)

    def _prep(self, rank_desc) -> tuple:
        agent = self.agent
        local = agent.prep_xfer_dlist("NIXL_INIT_AGENT", agent.get_xfer_descs(np.ascontiguousarray(rank_desc.dst_descs), self.mem.mem_type), self.mem.mem_type)
        remote = agent.prep_xfer_dlist(self.remotes[rank_desc.src_rank], agent.get_xfer_descs(np.ascontiguousarray(rank_desc.src_descs), self.mem.mem_type), self.mem.mem_type)
        return rank_desc.src_rank, local, remote, np.arange(rank_desc.n_descriptors, dtype=np.int32)

    def prepare(self, name: str, threads: int, pairs: np.ndarray, model: dict | None, staging_cap: int):
        t_start = time.perf_counter()
        self._use_threads(threads)
        self.release()
        cfg = self.cfg
        cost = CostModel(**model) if model else None
        plan = _plan_for(name, cfg, self.rank, cost)
        layers = None if cfg["layout"] == "per-layer" else [0]
        n_layers = 1 if cfg["layout"] == "stacked" else cfg["layers"]
        prep = _Prepared()
        src_regions, dst_regions = self._src_regions(), self._dst_regions()
        staged = name == "staged"
        direct = plan.direct_plan() if staged else plan
        descriptors = requests = 0
        if direct.reads:
            exp = expand_plan(direct, src_regions, dst_regions, pairs, layers=layers)
            prep.direct = [self._prep(r) for r in exp.ranks]
            descriptors += exp.n_descriptors
            requests += len(exp.ranks)
        staging_used = 0
        if staged and plan.spans:
            slot = plan.slot_nbytes
            per_pair = slot * n_layers
            need = per_pair * len(pairs)
            if need <= staging_cap:
                wave_pairs, halves = len(pairs), 1
            else:
                wave_pairs, halves = max(staging_cap // 2 // per_pair, 0), 2
                if wave_pairs == 0:
                    raise ValueError(f"staging of {staging_cap} bytes cannot hold one request ({per_pair} bytes)")
            base = self.mem.addr(self.staging)
            for w, start in enumerate(range(0, len(pairs), wave_pairs)):
                chunk = pairs[start:start + wave_pairs]
                at = base + (w % halves) * wave_pairs * per_pair
                stage_regions = RegionSet.packed(at, num_layers=n_layers, num_blocks=len(chunk), page_nbytes=slot,
                                                 device_id=self.mem.dev_id)
                slots = np.arange(len(chunk), dtype=np.int64)
                spans = expand_plan(plan.spans_plan(), src_regions, stage_regions,
                                    np.stack([chunk[:, 0], slots], axis=1))
                prep.waves.append([self._prep(r) for r in spans.ranks])
                descriptors += spans.n_descriptors
                requests += len(spans.ranks)
                moves = expand_plan(plan.moves_plan(), [stage_regions], dst_regions,
                                    np.stack([slots, chunk[:, 1]], axis=1))
                rd = moves.ranks[0]
                prep.tables.append(self.mem.gather_table(rd.src_descs[:, 0], rd.dst_descs[:, 0], rd.dst_descs[:, 1],
                                                         self.staging))
                staging_used = max(staging_used, (w % halves + 1) * len(chunk) * per_pair)
            prep.stats["slot_nbytes"] = slot
        read_nbytes = (plan.read_nbytes_per_page if staged else plan.nbytes) * n_layers * len(pairs)
        prep.stats.update(descriptors=descriptors, requests=requests, read_nbytes=read_nbytes,
                          nbytes=plan.plan.nbytes * n_layers * len(pairs) if staged else plan.nbytes * n_layers * len(pairs),
                          gathered_nbytes=(plan.gathered_nbytes_per_page * n_layers * len(pairs)) if staged else 0,
                          staging_nbytes=staging_used, waves=len(prep.waves),
                          prep_s=time.perf_counter() - t_start)
        self.prepared = prep
        return prep.stats

    def _post(self, items, handles) -> None:
        for src_rank, local, remote, idx in items:
            h = self.agent.make_prepped_xfer("READ", local, idx, remote, idx)
            state = self.agent.transfer(h)
            if state == "ERR":
                raise RuntimeError(f"READ from src rank {src_rank} failed at post")
            handles.append(h)

    def _wait(self, handles, deadline: float) -> None:
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
        self._post(prep.direct, direct)
        events = []
        n = len(prep.waves)
        wave_handles: list[list] = [[] for _ in range(n)]
        if n:
            self._post(prep.waves[0], wave_handles[0])
        for w in range(n):
            if w + 1 < n:
                if w >= 1 and events:
                    events[w - 1].synchronize() if self.mem.cuda else None
                self._post(prep.waves[w + 1], wave_handles[w + 1])
            self._wait(wave_handles[w], deadline)
            self.mem.gather(prep.tables[w])
            if self.mem.cuda:
                ev = self.mem.torch.cuda.Event()
                ev.record()
                events.append(ev)
        self._wait(direct, deadline)
        self.mem.sync()
        return t0, time.perf_counter()

    def verify(self) -> bool:
        for buf in self.buffers:
            self.mem.poison(buf)
        self.mem.sync()
        self.run_once()
        pairs = self.pairs
        return all(self.mem.check(buf, self.template, self.keys[i], pairs, self.content_words)
                   for i, buf in enumerate(self.buffers))

    def calibrate(self, threads: int) -> dict:
        """Fit a `CostModel` from timed READs shaped like the transfer's: `count`
        descriptors of `size` bytes, each at the start of a different (layer, block) page
        of src rank 0, into distinct dst pages."""
        self._use_threads(threads)
        cfg = self.cfg
        src_addrs, src_dev = self.src_info[0][1], self.src_info[0][2]
        pages = len(self.addrs) * cfg["num_blocks"]
        largest = min(cfg["src_page_nbytes"], cfg["dst_page_nbytes"])
        samples = []
        for count, size in ((512, 4096), (2048, 4096), (512, 256 << 10), (2048, 256 << 10),
                            (256, 2 << 20), (1024, 2 << 20), (64, 16 << 20), (256, 16 << 20)):
            count, size = min(count, pages), min(size, largest)
            i = np.arange(count, dtype=np.int64)
            layer, block = i % len(self.addrs), i // len(self.addrs)
            src = np.zeros((count, 3), np.uint64)
            dst = np.zeros((count, 3), np.uint64)
            src[:, 0] = np.asarray(src_addrs, np.uint64)[layer] + (block * cfg["src_page_nbytes"]).astype(np.uint64)
            dst[:, 0] = np.asarray(self.addrs, np.uint64)[layer] + (block * cfg["dst_page_nbytes"]).astype(np.uint64)
            src[:, 1] = dst[:, 1] = size
            src[:, 2], dst[:, 2] = src_dev, self.mem.dev_id

            class _R:  # the shape `_prep` expects
                src_rank, dst_descs, src_descs, n_descriptors = 0, dst, src, count

            item = self._prep(_R)
            times = []
            for it in range(4):
                handles: list = []
                self.mem.sync()
                t0 = time.perf_counter()
                self._post([item], handles)
                self._wait(handles, t0 + 60)
                if it:
                    times.append(time.perf_counter() - t0)
            self.agent.release_dlist_handle(item[1])
            self.agent.release_dlist_handle(item[2])
            samples.append((count, count * size, float(np.median(times))))
        for b in self.buffers:  # calibration wrote over pages: restore the poison
            self.mem.poison(b)
        self.mem.sync()
        model = fit_cost_model([s[0] for s in samples], [s[1] for s in samples], [s[2] for s in samples])
        return dict(desc_s=model.desc_s, byte_s=model.byte_s, gather_byte_s=model.gather_byte_s,
                    gather_launch_s=model.gather_launch_s, samples=samples)

    # --- packed: the src gathers, the dst fetches one range per src rank, then scatters --
    def _packed(self, dst_rank: int):
        return pack_plan(_plan_for("ssm_split", self.cfg, dst_rank, None))

    def _layers(self) -> int:
        return 1 if self.cfg["layout"] == "stacked" else self.cfg["layers"]

    def pack_prepare(self, pairs: np.ndarray, wave_pairs: int) -> int:
        """Src side: one gather table per wave, packing what every dst rank needs."""
        cfg, n_layers = self.cfg, self._layers()
        mine = {self.rank: _regions(self.addrs, cfg["num_blocks"], cfg["src_page_nbytes"], self.mem.dev_id)}
        plans = [self._packed(r) for r in range(cfg["dst_tp"])]
        self.pack_tables = []
        half = cfg["pack_nbytes"] // 2  # waves alternate halves: pack w+1 while w is read
        for w, start in enumerate(range(0, len(pairs), wave_pairs)):
            chunk = pairs[start:start + wave_pairs]
            at, src_cols, dst_cols, len_cols = self.mem.addr(self.pack) + (w % 2) * half, [], [], []
            for packed in plans:
                slot = packed.slot_nbytes[self.rank]
                if not slot:
                    continue
                region = RegionSet.packed(at, num_layers=n_layers, num_blocks=len(chunk), page_nbytes=slot,
                                          device_id=self.mem.dev_id)
                exp = expand_plan(packed.pack_plan_for(self.rank), mine, region,
                                  np.stack([chunk[:, 0], np.arange(len(chunk))], axis=1))
                rd = exp.ranks[0]
                src_cols.append(rd.src_descs[:, 0])
                dst_cols.append(rd.dst_descs[:, 0])
                len_cols.append(rd.dst_descs[:, 1])
                at += n_layers * wave_pairs * slot
            self.pack_tables.append(self.mem.gather_table(np.concatenate(src_cols), np.concatenate(dst_cols),
                                                          np.concatenate(len_cols), self.pack))
        return len(self.pack_tables)

    def pack_run(self, wave: int) -> tuple[float, float]:
        self.mem.sync()
        t0 = time.perf_counter()
        self.mem.gather(self.pack_tables[wave])
        self.mem.sync()
        return t0, time.perf_counter()

    def prepare_packed(self, threads: int, pairs: np.ndarray, wave_pairs: int) -> dict:
        t_start = time.perf_counter()
        self._use_threads(threads)
        self.release()
        cfg, n_layers = self.cfg, self._layers()
        packed = self._packed(self.rank)
        before = [self._packed(r) for r in range(self.rank)]  # dst ranks packed ahead of us
        dst_regions = self._dst_regions()
        prep = _Prepared()
        descriptors = 0
        half = cfg["staging_nbytes"] // 2  # the same halves as the src pack buffers
        for w, start in enumerate(range(0, len(pairs), wave_pairs)):
            chunk = pairs[start:start + wave_pairs]
            slots = np.arange(len(chunk), dtype=np.int64)
            local_at = self.mem.addr(self.staging) + (w % 2) * half
            items, landed = [], {}
            for s in packed.plan.src_ranks:
                slot = packed.slot_nbytes[s]
                remote_at = (self.src_info[s][3] + (w % 2) * (cfg["pack_nbytes"] // 2)
                             + sum(n_layers * wave_pairs * p.slot_nbytes[s] for p in before))
                remote = RegionSet.packed(remote_at, num_layers=n_layers, num_blocks=len(chunk), page_nbytes=slot,
                                          device_id=self.src_info[s][2])
                local = RegionSet.packed(local_at, num_layers=n_layers, num_blocks=len(chunk), page_nbytes=slot,
                                         device_id=self.mem.dev_id)
                exp = expand_plan(packed.fetch_plan(s), {s: remote}, local, np.stack([slots, slots], axis=1))
                items += [self._prep(r) for r in exp.ranks]
                descriptors += exp.n_descriptors
                landed[s] = local
                local_at += n_layers * wave_pairs * slot
            prep.waves.append(items)
            moves = expand_plan(packed.unpack_plan(), landed, dst_regions, np.stack([slots, chunk[:, 1]], axis=1))
            prep.tables.append(self.mem.gather_table(
                np.concatenate([r.src_descs[:, 0] for r in moves.ranks]),
                np.concatenate([r.dst_descs[:, 0] for r in moves.ranks]),
                np.concatenate([r.dst_descs[:, 1] for r in moves.ranks]), self.staging))
        nbytes = packed.plan.nbytes * n_layers * len(pairs)
        prep.stats.update(descriptors=descriptors, requests=descriptors, read_nbytes=nbytes, nbytes=nbytes,
                          gathered_nbytes=nbytes,
                          staging_nbytes=n_layers * min(wave_pairs, len(pairs)) * sum(packed.slot_nbytes),
                          waves=len(prep.waves), prep_s=time.perf_counter() - t_start)
        self.prepared = prep
        return prep.stats

    def run_wave(self, wave: int) -> tuple[float, float]:
        """Packed, dst side: fetch wave `wave` (one descriptor per src rank) and scatter it."""
        prep = self.prepared
        self.mem.sync()
        t0 = time.perf_counter()
        handles: list = []
        self._post(prep.waves[wave], handles)
        self._wait(handles, t0 + 60.0)
        self.mem.gather(prep.tables[wave])
        self.mem.sync()
        return t0, time.perf_counter()

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
        if command == "setup":
            return self.setup(args.get("src_info"))
        if command == "copy_limit":
            return [self.mem.copy_limit_s(n) for n in args["nbytes"]]
        if command == "staging":
            return self.ensure_staging(args["nbytes"])
        if command == "calibrate":
            return self.calibrate(args["threads"])
        if command == "prepare":
            self.pairs = np.asarray(args["pairs"], dtype=np.int64)
            return self.prepare(args["name"], args["threads"], self.pairs, args.get("model"), args["staging_cap"])
        if command == "verify":
            return self.verify()
        if command == "pack_prepare":
            return self.pack_prepare(np.asarray(args["pairs"], dtype=np.int64), args["wave_pairs"])
        if command == "pack_run":
            return self.pack_run(args["wave"])
        if command == "prepare_packed":
            self.pairs = np.asarray(args["pairs"], dtype=np.int64)
            return self.prepare_packed(args["threads"], self.pairs, args["wave_pairs"])
        if command == "run_wave":
            return self.run_wave(args["wave"])
        if command == "poison":
            return self.poison_all()
        if command == "check":
            return self.check_all()
        if command == "run":
            return self.run_once(args.get("barrier"))
        raise ValueError(f"unknown command {command!r}")


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
