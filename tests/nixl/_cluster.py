"""Build src and dst ranks' memories from the reference model, for backend tests.

A `Case` fixes a transfer: spec, TP sizes, layers, block count, the batch's scattered
`(src_block, dst_block)` pairs, how each side lays out and pads its pages. Request `i` of
layer `l` holds `reference.random_state(spec, seed(l, i))`. A src rank's memory has its
shard of every batch page and `SRC_FILL` elsewhere; a dst rank's memory starts as
`DST_FILL`, and after the transfer must equal `expected_dst`: the reference shard of
every batch page, `DST_FILL` everywhere else (padding and other blocks untouched).

With a `StackedSpec` a page holds `spec.num_layers` layers of `spec.base`: each gets its
own state, and the page is `stack_pages` of their reference shards.

Used by tests in this folder and by `tests/gpu/` (with torch tensors for memory).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from ssm_split import Mamba2Spec, RegionSet, page_layout, plan_reads
from ssm_split.reference import random_state, shard
from ssm_split.specs import StackedSpec
from ssm_split.strategies import stack_pages

SRC_FILL, DST_FILL = 0x5A, 0xEE

TCP = {"engine_config": "TLS=tcp"}
"""UCX parameters of a src serving READs over UCX's tcp transport only: its READs are
emulated in software, slow enough to hurt mid-flight (a stopped src never answers one)."""
EMULATING = {"engine_config": "PROTO_EMULATION_ENABLE=y"}
"""UCX parameters of a dst endpoint that accepts emulated READs (to read a `TCP` src);
endpoints refuse them by default (`ssm_split.nixl_backend._ucx`)."""


@dataclass(frozen=True)
class Case:
    spec: object
    src_tp: int
    dst_tp: int
    num_layers: int = 3
    num_blocks: int = 9
    pairs: tuple = ((7, 2), (0, 5), (3, 4), (8, 0))  # scattered; dst 4, 5 adjacent
    src_order: str = "layer"
    dst_order: str = "layer"
    src_pad: int = 24
    dst_pad: int = 40
    seed: int = 1
    _states: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def pairs_array(self) -> np.ndarray:
        return np.array(self.pairs, dtype=np.int64).reshape(-1, 2)

    @property
    def request_ids(self) -> list[str]:
        return [f"req-{i}" for i in range(len(self.pairs))]

    def state(self, layer: int, request: int, stacked_layer: int = 0) -> dict:
        """The full state of `request` in `layer` (of `stacked_layer` in a stacked page)."""
        key = (layer, request, stacked_layer)
        if key not in self._states:
            entropy = [self.seed, layer, request] + ([stacked_layer] if stacked_layer else [])
            seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
            base = self.spec.base if isinstance(self.spec, StackedSpec) else self.spec
            self._states[key] = random_state(base, seed)
        return self._states[key]

    def page(self, layer: int, request: int, tp: int, rank: int, page_nbytes: int, fill: int) -> np.ndarray:
        """Rank `rank`'s page of `request` in `layer`, padded with `fill`."""
        if not isinstance(self.spec, StackedSpec):
            return shard(self.spec, self.state(layer, request), tp, page_nbytes=page_nbytes, pad_byte=fill)[rank]
        layers = [shard(self.spec.base, self.state(layer, request, k), tp)[rank]
                  for k in range(self.spec.num_layers)]
        page = np.full(page_nbytes, fill, dtype=np.uint8)
        content = stack_pages(self.spec, layers, tp, rank)
        page[:len(content)] = content
        return page

    def page_nbytes(self, side: str) -> int:
        tp = self.src_tp if side == "src" else self.dst_tp
        pad = self.src_pad if side == "src" else self.dst_pad
        return page_layout(self.spec, tp, 0).content_nbytes + pad

    def memory_nbytes(self, side: str) -> int:
        return self.num_layers * self.num_blocks * self.page_nbytes(side)

    def regions(self, side: str, base_addr: int, device_id: int = 0) -> RegionSet:
        order = self.src_order if side == "src" else self.dst_order
        return RegionSet.packed(base_addr, num_layers=self.num_layers, num_blocks=self.num_blocks,
                                page_nbytes=self.page_nbytes(side), order=order, device_id=device_id)

    def _fill(self, side: str, rank: int, fill: int) -> np.ndarray:
        tp = self.src_tp if side == "src" else self.dst_tp
        page_nbytes = self.page_nbytes(side)
        memory = np.full(self.memory_nbytes(side), fill, dtype=np.uint8)
        layout = self.regions(side, 0)
        column = 0 if side == "src" else 1
        for layer in range(self.num_layers):
            for request, pair in enumerate(self.pairs):
                page = self.page(layer, request, tp, rank, page_nbytes, fill)
                start = layout.page_addr(layer, pair[column])
                memory[start: start + page_nbytes] = page
        return memory

    def src_memory(self, rank: int) -> np.ndarray:
        """A src rank's memory, with its shard of every batch page filled in."""
        return self._fill("src", rank, SRC_FILL)

    def dst_memory(self) -> np.ndarray:
        """A dst rank's memory before the transfer."""
        return np.full(self.memory_nbytes("dst"), DST_FILL, dtype=np.uint8)

    def expected_dst(self, rank: int) -> np.ndarray:
        """A dst rank's memory after a correct transfer of the whole batch."""
        return self._fill("dst", rank, DST_FILL)


TCP_VICTIM_SPEC = Mamba2Spec(num_heads=32, head_dim=64, num_groups=1, state_size=64, ssm_dtype="float32")
"""512 KiB pages at TP 1: a src serving 31 of them over UCX tcp (`TCP`) keeps a 31 MiB READ
in flight for tens of ms, long enough for a fault to hit it."""


def tcp_victim_case(seed: int) -> Case:
    """32 requests of `TCP_VICTIM_SPEC` at TP 1 -> 1, block i -> block i, 2 layers."""
    return Case(TCP_VICTIM_SPEC, 1, 1, num_layers=2, num_blocks=40, pairs=tuple((i, i) for i in range(32)),
                seed=seed)


@contextlib.contextmanager
def emulating_dst(case: Case):
    """`(endpoint, memory)` of dst rank 0 of `case` on DRAM, accepting emulated READs (it
    reads `TCP` srcs); the endpoint is closed afterwards."""
    from ssm_split.nixl_backend import Endpoint

    memory = case.dst_memory()
    endpoint = Endpoint(case.spec, tp=case.dst_tp, rank=0, memory=[memory],
                        regions=case.regions("dst", memory.ctypes.data), ucx_params=EMULATING)
    try:
        yield endpoint, memory
    finally:
        endpoint.close()


def random_src_memory(case: Case, rank: int) -> np.ndarray:
    """A src rank's memory filled with seeded random bytes (fast, for large runs); the
    dst side regenerates it to work out `expected_by_reads`."""
    rng = np.random.default_rng([case.seed, rank])
    return np.frombuffer(rng.bytes(case.memory_nbytes("src")), dtype=np.uint8).copy()


def expected_by_reads(case: Case, rank: int, src_memories: list[np.ndarray]) -> np.ndarray:
    """A dst rank's memory after the batch, by applying the plan's reads one by one to
    every (layer, request): an independent check of the expansion and of NIXL."""
    expected = case.dst_memory()
    src_layout, dst_layout = case.regions("src", 0), case.regions("dst", 0)
    for layer in range(case.num_layers):
        for src_block, dst_block in case.pairs:
            src_page = src_layout.page_addr(layer, src_block)
            dst_page = dst_layout.page_addr(layer, dst_block)
            for read in plan_reads(case.spec, case.src_tp, case.dst_tp, rank).reads:
                src = src_memories[read.src_rank]
                expected[dst_page + read.dst_offset: dst_page + read.dst_end] = \
                    src[src_page + read.src_offset: src_page + read.src_end]
    return expected


def first_difference(got: np.ndarray, want: np.ndarray) -> str:
    bad = np.flatnonzero(got != want)
    return "identical" if not bad.size else f"{bad.size} bytes differ, first at {int(bad[0])}"
