"""A Hypothesis state machine over a Reader's lifecycle, with real NIXL agents on DRAM.

Rules: connect (fetch a fresh handshake), warm up, read a batch, the src deregisters or
registers its pages again, disconnect, close the reader and start a new one. The model
is which handshake generation the reader holds and, per dst block, which src block it
was last received from. After every step the dst pages of every received block must
equal the reference model's shard of that src block's state (`reference.shard`), and
blocks never read must hold their initial fill: a received batch never changes, a
refused one is never reported received.

Case: Mamba2 with one B/C group (replicated) from src TP 1 to dst rank 0 of TP 2.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nixl")

from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule  # noqa: E402

from ssm_split import Mamba2Spec  # noqa: E402
from ssm_split.errors import HandshakeError, TransferError  # noqa: E402
from ssm_split.nixl_backend import Endpoint, Reader  # noqa: E402
from ssm_split.reference import shard  # noqa: E402
from tests.nixl._cluster import DST_FILL, Case  # noqa: E402

pytestmark = pytest.mark.nixl

NUM_BLOCKS = 5
CASE = Case(Mamba2Spec(num_heads=4, head_dim=4, num_groups=1, state_size=8), src_tp=1, dst_tp=2,
            num_layers=2, num_blocks=NUM_BLOCKS, pairs=tuple((b, b) for b in range(NUM_BLOCKS)))
DST_RANK = 0


class _Engines:
    """One src and one dst endpoint for the whole module (agents take ~0.5 s to start)."""

    def __init__(self):
        self.src_memory = CASE.src_memory(0)  # every src block holds a known state
        self.src = Endpoint(CASE.spec, tp=1, rank=0, regions=CASE.regions("src", self.src_memory.ctypes.data),
                            memory=[self.src_memory])
        self.address = self.src.serve()
        self.dst_memory = CASE.dst_memory()
        self.dst = Endpoint(CASE.spec, tp=2, rank=DST_RANK,
                            regions=CASE.regions("dst", self.dst_memory.ctypes.data), memory=[self.dst_memory])
        self.layout = CASE.regions("dst", 0)
        page = CASE.page_nbytes("dst")
        self.expected = {(layer, block): shard(CASE.spec, CASE.state(layer, block), 2, page_nbytes=page,
                                                pad_byte=DST_FILL)[DST_RANK]
                         for layer in range(CASE.num_layers) for block in range(NUM_BLOCKS)}

    def page(self, layer: int, block: int) -> np.ndarray:
        start = self.layout.page_addr(layer, block)
        return self.dst_memory[start: start + CASE.page_nbytes("dst")]

    def close(self) -> None:
        self.dst.close()
        self.src.close()


_ENGINES: list[_Engines] = []


def engines() -> _Engines:
    if not _ENGINES:
        _ENGINES.append(_Engines())
    return _ENGINES[0]


def teardown_module() -> None:
    while _ENGINES:
        _ENGINES.pop().close()


class ReaderLifecycle(RuleBasedStateMachine):
    @initialize()
    def start(self):
        self.e = engines()
        if not self.e.src.registered:
            self.e.src.register()
        self.e.dst_memory[:] = DST_FILL
        self.reader = Reader(self.e.dst)
        self.held: int | None = None  # generation of the handshake the reader holds
        self.received: dict[int, int] = {}  # dst block -> src block it was received from
        self.unknown: set[int] = set()  # dst blocks a refused batch may have written
        self.count = 0
        self.connect()  # most rules need a connected reader: start with one

    def _fresh(self) -> bool:
        return self.held is not None and self.held == self.e.src.generation

    @rule()
    def connect(self):
        if not self.e.src.registered:
            with pytest.raises(HandshakeError, match="deregistered"):
                self.reader.connect_to(*self.e.address)
            return
        self.reader.connect_to(*self.e.address)
        self.held = self.e.src.generation

    @precondition(lambda self: self.held is not None)
    @rule()
    def warm_up(self):
        if self._fresh():
            self.reader.warm_up()
        else:
            with pytest.raises(HandshakeError, match="stale"):
                self.reader.warm_up()

    @precondition(lambda self: self.held is not None)
    @rule(src_blocks=st.permutations(range(NUM_BLOCKS)), dst_blocks=st.permutations(range(NUM_BLOCKS)),
          count=st.integers(1, 3))
    def read(self, src_blocks, dst_blocks, count):
        self._read(src_blocks, dst_blocks, count)

    @precondition(lambda self: self.held is not None)
    @rule(src_blocks=st.permutations(range(NUM_BLOCKS)), dst_blocks=st.permutations(range(NUM_BLOCKS)),
          count=st.integers(1, 3))
    def read_again(self, src_blocks, dst_blocks, count):  # a second rule: reads are the point
        self._read(src_blocks, dst_blocks, count)

    def _read(self, src_blocks, dst_blocks, count):
        pairs = np.array(list(zip(src_blocks[:count], dst_blocks[:count])), dtype=np.int64)
        self.count += 1
        ids = [f"b{self.count}-{i}" for i in range(count)]
        if self._fresh():
            stats = self.reader.read(pairs, ids, timeout_s=10.0)
            assert stats.request_ids == tuple(ids) and stats.nbytes > 0
            for src, dst in pairs.tolist():
                self.received[dst] = src
                self.unknown.discard(dst)
            return
        with pytest.raises(TransferError, match="generation"):  # StaleHandshakeError
            self.reader.read(pairs, ids, timeout_s=10.0)
        for dst in pairs[:, 1].tolist():  # the refused batch's bytes are not trusted
            self.received.pop(dst, None)
            self.unknown.add(dst)

    @precondition(lambda self: self.e.src.registered)
    @rule()
    def src_deregisters(self):
        self.e.src.deregister()

    @precondition(lambda self: not self.e.src.registered)
    @rule()
    def src_registers_again(self):
        self.e.src.register()

    @precondition(lambda self: self.held is not None)
    @rule()
    def disconnect(self):
        self.reader.disconnect(0)
        self.held = None

    @rule()
    def close_and_start_a_new_reader(self):
        self.reader.close()
        self.reader = Reader(self.e.dst)
        self.held = None

    @invariant()
    def received_pages_equal_the_reference(self):
        for dst, src in self.received.items():
            for layer in range(CASE.num_layers):
                got, want = self.e.page(layer, dst), self.e.expected[(layer, src)]
                assert np.array_equal(got, want), f"layer {layer}, dst block {dst} (from src {src})"

    @invariant()
    def untouched_pages_keep_their_fill(self):
        for dst in set(range(NUM_BLOCKS)) - set(self.received) - self.unknown:
            for layer in range(CASE.num_layers):
                assert (self.e.page(layer, dst) == DST_FILL).all(), f"layer {layer}, dst block {dst}"

    def teardown(self):
        self.reader.close()


# each example starts a Reader and runs up to 20 NIXL steps: 1/10 of the profile's examples
ReaderLifecycle.TestCase.settings = settings(max_examples=max(5, settings.default.max_examples // 10),
                                             stateful_step_count=20, deadline=None)
test_reader_lifecycle = ReaderLifecycle.TestCase
