"""What every `ssm-split bench` rank shares: its state memory, what its pages hold, its
regions and the plan of each strategy.

Memory is CUDA tensors (`device="cuda"`, VRAM) or numpy arrays (`device="cpu"`, DRAM,
for trying the benchmark without a GPU).

Page contents: every rank's template page is `reference.shard` of a random full state
(`stack_pages` of one state per layer for the stacked layout); the page of (layer l,
block b) is the template XOR a 16-bit key of (l, b). A correct transfer of src block s
into dst block d leaves `dst_template ^ key(l, s)` in the dst content, poison in the
padding and in every block not read into.
"""

from __future__ import annotations

import time

import numpy as np

from .. import reference
from ..strategies._cost import DEFAULT_COST_MODEL, CostModel
from ..strategies._baseline import baseline_plan
from ..layout._regions import RegionSet
from ..plan._plan import plan_reads
from ..strategies._stacked import stack_layers, stack_pages, stacked_plan
from ..strategies._staging import stage_plan

POISON = 0x5A5A


def page_keys(num_layers: int, num_blocks: int) -> np.ndarray:
    """Shape `(num_layers, num_blocks)` uint16 keys, never 0 and distinct across pages."""
    layer = np.arange(num_layers, dtype=np.int64)[:, None]
    block = np.arange(num_blocks, dtype=np.int64)[None, :]
    return ((layer * 40503 + block * 9973 + 12345) % 65521 + 1).astype(np.uint16)


def template_pages(spec, tp: int, num_layers: int, layout: str, seed: int) -> list[np.ndarray]:
    """Per rank, the content bytes of one page (per-layer) or one stacked page."""
    if layout == "stacked":
        states = [reference.random_state(spec, seed + layer) for layer in range(num_layers)]
        stacked = stack_layers(spec, num_layers)
        shards = [reference.shard(spec, s, tp) for s in states]
        return [stack_pages(stacked, [shards[layer][rank] for layer in range(num_layers)], tp, rank)
                for rank in range(tp)]
    return reference.shard(spec, reference.random_state(spec, seed), tp)


class Memory:
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

    def nbytes(self, buf) -> int:
        return int(buf.numel()) if self.cuda else int(buf.nbytes)

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
        self.words(buf)[:] = POISON

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
            from ..nixl_backend._gather import GatherTable

            return GatherTable.build(src, dst, nbytes, anchor=anchor)
        return (np.asarray(src, np.int64), np.asarray(dst, np.int64), np.asarray(nbytes, np.int64))

    def gather(self, table) -> None:
        if self.cuda:
            from ..nixl_backend._gather import run_gather

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


def regions(addrs, num_blocks: int, page_nbytes: int, dev_id: int) -> RegionSet:
    """One region per buffer (layer, or the stacked layout's one buffer)."""
    return RegionSet.per_layer(list(addrs), num_blocks=num_blocks, page_nbytes=page_nbytes, device_id=dev_id)


def plan_for(name: str, cfg: dict, dst_rank: int, model: CostModel | None):
    """The plan (or staged plan) of strategy `name` for this dst rank."""
    spec, src_tp, dst_tp = cfg["spec"], cfg["src_tp"], cfg["dst_tp"]
    if cfg["layout"] == "stacked":
        plan = stacked_plan(stack_layers(spec, cfg["layers"]), src_tp, dst_tp, dst_rank)
    elif name == "baseline":
        plan = baseline_plan(spec, src_tp, dst_tp, dst_rank)
    else:
        plan = plan_reads(spec, src_tp, dst_tp, dst_rank)
    if name == "staged":
        return stage_plan(plan, model=model if model is not None else DEFAULT_COST_MODEL)
    return plan


def num_regions(cfg: dict) -> int:
    """Layers as the transfer sees them: one stacked region, or every layer."""
    return 1 if cfg["layout"] == "stacked" else cfg["layers"]
