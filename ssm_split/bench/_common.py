"""What every `ssm-split bench` process shares: its state memory, what its pages hold,
and how it checks a transfer.

Memory is CUDA tensors on the rank's GPU (`device="cuda"`, VRAM) or numpy arrays
(`device="cpu"`, DRAM, to try the benchmark without a GPU). Each layer is its own buffer
of `num_blocks` pages, as vLLM allocates one tensor per layer.

Page contents: a rank's template page is `reference.shard` of a random full state; the
page of (layer l, block b) is the template XOR a 16-bit key of (l, b). Elements are 2 or
4 bytes and every piece a plan moves starts at an even offset, so a correct transfer of
src block s into dst block d leaves `dst_template ^ key(l, s)` in the dst content and
poison in the padding and in every block not read into.
"""

from __future__ import annotations

import time

import numpy as np

from .. import reference
from ..layout._regions import RegionSet
from ..specs._stacked import StackedSpec
from ..strategies._stacked import stack_pages

POISON = 0x5A5A


def page_keys(num_layers: int, num_blocks: int) -> np.ndarray:
    """Shape `(num_layers, num_blocks)` uint16 keys, never 0 and distinct across pages."""
    layer = np.arange(num_layers, dtype=np.int64)[:, None]
    block = np.arange(num_blocks, dtype=np.int64)[None, :]
    return ((layer * 40503 + block * 9973 + 12345) % 65521 + 1).astype(np.uint16)


def template_pages(spec, tp: int, seed: int) -> list[np.ndarray]:
    """Per rank, the content bytes of one page (of a stacked page: `stack_pages` of one
    random state per layer)."""
    if isinstance(spec, StackedSpec):
        layers = [template_pages(spec.base, tp, seed + k) for k in range(spec.num_layers)]
        return [stack_pages(spec, [pages[rank] for pages in layers], tp, rank) for rank in range(tp)]
    return reference.shard(spec, reference.random_state(spec, seed), tp)


class Memory:
    """State memory on one device: per layer a 2-D `(num_blocks, page_nbytes)` uint8 array.

    Args:
        device: "cuda" or "cpu".
        index: the CUDA device of this rank (ignored on the CPU).
    """

    def __init__(self, device: str, index: int = 0):
        self.cuda = device == "cuda"
        self.index = index if self.cuda else 0
        if self.cuda:
            import torch

            self.torch = torch
            torch.cuda.set_device(index)
            torch.zeros(1, device=f"cuda:{index}")  # the context before any NIXL agent
        self.mem_type = "VRAM" if self.cuda else "DRAM"

    def zeros(self, rows: int, cols: int):
        if self.cuda:
            return self.torch.zeros((rows, cols), dtype=self.torch.uint8, device=f"cuda:{self.index}")
        return np.zeros((rows, cols), dtype=np.uint8)

    @staticmethod
    def addr(buf) -> int:
        return int(buf.ctypes.data) if isinstance(buf, np.ndarray) else int(buf.data_ptr())

    def words(self, buf):
        return buf.view(self.torch.int16) if self.cuda else buf.view(np.uint16)

    def put(self, array: np.ndarray):
        if self.cuda:
            return self.torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).to(f"cuda:{self.index}")
        return np.ascontiguousarray(array).view(np.uint16)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.index)

    def fill(self, buf, template, keys) -> None:
        """`buf[b] = template ^ keys[b]` (16-bit words), one block at a time."""
        words = self.words(buf)
        for b in range(words.shape[0]):
            words[b] = template ^ keys[b]

    def poison(self, buf) -> None:
        self.words(buf)[:] = POISON

    def check(self, buf, template, keys, pairs: np.ndarray, content_words: int) -> bool:
        """Blocks `pairs[:, 1]` hold `template ^ key(pairs[:, 0])`, then poison; the other
        blocks poison. Checked on the rank's device, a few blocks at a time."""
        words = self.words(buf)
        rows = words.shape[0]
        src_of = np.full(rows, -1, dtype=np.int64)
        src_of[pairs[:, 1]] = pairs[:, 0]
        hit = src_of >= 0
        if self.cuda:
            torch = self.torch
            dev = f"cuda:{self.index}"
            if bool((words[torch.from_numpy(~hit).to(dev)] != POISON).any()):
                return False
            got = words[torch.from_numpy(hit).to(dev)]
            k = keys.index_select(0, torch.from_numpy(src_of[hit]).to(dev))
            return (torch.equal(got[:, :content_words], template[None, :content_words] ^ k[:, None])
                    and not bool((got[:, content_words:] != POISON).any()))
        if (words[~hit] != POISON).any():
            return False
        got = words[hit]
        want = template[None, :content_words] ^ keys[src_of[hit]][:, None]
        return np.array_equal(got[:, :content_words], want) and not (got[:, content_words:] != POISON).any()


def copy_limit_s(device: str, src_index: int, dst_index: int, nbytes: int, repeats: int = 5) -> float:
    """Median seconds of one copy of `nbytes` from GPU `src_index` to GPU `dst_index`
    (torch's `copy_`), or of a host copy on the CPU (`device="cpu"`)."""
    if device == "cuda":
        import torch

        a = torch.empty(nbytes // 4, dtype=torch.int32, device=f"cuda:{src_index}")
        b = torch.empty(nbytes // 4, dtype=torch.int32, device=f"cuda:{dst_index}")
        times = []
        for i in range(repeats + 2):
            torch.cuda.synchronize(src_index)
            torch.cuda.synchronize(dst_index)
            t0 = time.perf_counter()
            b.copy_(a)
            torch.cuda.synchronize(dst_index)
            torch.cuda.synchronize(src_index)
            if i >= 2:
                times.append(time.perf_counter() - t0)
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


def per_layer_regions(addrs, num_blocks: int, page_nbytes: int, device_id: int) -> RegionSet:
    """One buffer per layer, as vLLM allocates its state."""
    return RegionSet.per_layer(list(addrs), num_blocks=num_blocks, page_nbytes=page_nbytes, device_id=device_id)


def time_read_s(agent, remote: str, local_rows: np.ndarray, remote_rows: np.ndarray, mem_type: str, *,
                repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of one NIXL READ of `remote_rows` into `local_rows` (`(k, 3)` uint64
    `(addr, nbytes, device)`) through a bare `agent`: the transport's own cost, nothing
    of the library's. Descriptors are not merged (`skip_desc_merge`)."""
    local = agent.prep_xfer_dlist("NIXL_INIT_AGENT", local_rows, mem_type)
    far = agent.prep_xfer_dlist(remote, remote_rows, mem_type)
    index = np.arange(local_rows.shape[0], dtype=np.int32)
    times = []
    try:
        for i in range(warmup + repeats):
            handle = agent.make_prepped_xfer("READ", local, index, far, index, skip_desc_merge=True)
            started = time.perf_counter()
            state = agent.transfer(handle)
            while state != "DONE":
                if state == "ERR":
                    raise RuntimeError("a timed READ failed")
                state = agent.check_xfer_state(handle)
            if i >= warmup:
                times.append(time.perf_counter() - started)
            agent.release_xfer_handle(handle)
    finally:
        agent.release_dlist_handle(local)
        agent.release_dlist_handle(far)
    return float(np.median(times))


def split_rows(addr: int, nbytes: int, device: int, parts: int) -> np.ndarray:
    """`(parts, 3)` uint64 rows cutting `[addr, addr + nbytes)` into equal descriptors."""
    step = nbytes // parts
    return np.array([[addr + i * step, step, device] for i in range(parts)], dtype=np.uint64)
