"""Soak: a few thousand requests through real NIXL READs on DRAM, many batches in flight
at once, mixed TP pairs, every received page checked byte for byte.

Three src engines run in their own processes, one per TP pair; their ranks hold
`POOL` reference states per layer. In this process, every dst rank of every pair has
its own endpoint and reader (lists prepared once on even dst ranks, per batch on odd
ones) and keeps up to `IN_FLIGHT` batches of 1..`MAX_BATCH` requests posted; each
request reads a pool state into a free dst block. When a batch
completes, each of its pages must equal `reference.shard(state, dst_tp)` (content and
untouched padding); its content is then poisoned with a fresh byte and the block freed
for the next request, so a later READ that misses a byte cannot pass. At the end every
src rank must have received exactly one read-done notification per dst rank that reads
from it, for every request, and nothing else.

- 1 -> 2, Mamba2, one B/C group replicated on the dst side;
- 4 -> 2, GDN, key heads replicated on the src side;
- 2 -> 3, Mamba2 with the SD conv layout and 200 KB states, over UCX's tcp transport
  (READs stay in flight: with cma a READ completes inside its post call), in integrity
  mode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pytest

pytest.importorskip("nixl")

from ssm_split import GDNSpec, Mamba2Spec, RegionSet, plan_all  # noqa: E402
from ssm_split.nixl_backend import Endpoint, Reader  # noqa: E402
from ssm_split.reference import shard  # noqa: E402

from ._cluster import DST_FILL, EMULATING, TCP, Case  # noqa: E402
from ._peer import SrcEngine  # noqa: E402

pytestmark = pytest.mark.nixl

POOL, LAYERS, DST_BLOCKS = 24, 3, 160
REQUESTS_PER_PAIR, MAX_BATCH, IN_FLIGHT = 1000, 12, 8
TIME_LIMIT_S = 120.0

PAIRS = [  # (case, src UCX parameters, integrity mode)
    (Case(Mamba2Spec(num_heads=8, head_dim=4, num_groups=1, state_size=8), 1, 2, num_layers=LAYERS,
          num_blocks=POOL, pairs=tuple((b, b) for b in range(POOL)), seed=101), None, False),
    (Case(GDNSpec(num_k_heads=2, num_v_heads=8, head_k_dim=4, head_v_dim=4), 4, 2, num_layers=LAYERS,
          num_blocks=POOL, pairs=tuple((b, b) for b in range(POOL)), seed=202), None, False),
    (Case(Mamba2Spec(num_heads=24, head_dim=32, num_groups=1, state_size=64, conv_layout="SD",
                     spec_tokens=1, ssm_dtype="float32"), 2, 3, num_layers=LAYERS, num_blocks=POOL,
          pairs=tuple((b, b) for b in range(POOL)), seed=303), TCP, True),
]


@dataclass
class DstRank:
    """One dst rank of one pair: its endpoint, reader, memory and bookkeeping."""

    pair: int
    case: Case
    rank: int
    endpoint: Endpoint
    reader: Reader
    memory: np.ndarray
    regions: RegionSet
    expected: np.ndarray  # (LAYERS, POOL, page_nbytes): the reference page of each state
    queue: list = field(default_factory=list)  # requests still to read: (request id, state)
    free: list = field(default_factory=list)
    in_flight: list = field(default_factory=list)  # (PendingRead, [(request id, state, block)])


def make_dst(pair: int, case: Case, rank: int, src: SrcEngine, integrity: bool, rng) -> DstRank:
    page_nbytes = case.page_nbytes("dst")
    memory = np.full(LAYERS * DST_BLOCKS * page_nbytes, DST_FILL, np.uint8)
    regions = RegionSet.packed(memory.ctypes.data, num_layers=LAYERS, num_blocks=DST_BLOCKS,
                               page_nbytes=page_nbytes, order=("layer", "block")[rank % 2])
    endpoint = Endpoint(case.spec, tp=case.dst_tp, rank=rank, memory=[memory], regions=regions,
                        ucx_params=EMULATING if src.ucx_params == TCP else None)
    reader = Reader(endpoint, prepare=("once", "per-batch")[rank % 2], integrity=integrity)
    for address in src.addresses:
        reader.connect_to(*address)
    expected = np.stack([np.stack([shard(case.spec, case.state(layer, s), case.dst_tp, page_nbytes=page_nbytes,
                                         pad_byte=DST_FILL)[rank] for s in range(POOL)])
                         for layer in range(LAYERS)])
    states = rng.integers(0, POOL, REQUESTS_PER_PAIR)
    queue = [(f"p{pair}-r{i}", int(states[i])) for i in range(REQUESTS_PER_PAIR)][::-1]
    free = list(rng.permutation(DST_BLOCKS))
    return DstRank(pair, case, rank, endpoint, reader, memory, regions, expected, queue, free)


def check_and_free(dst: DstRank, batch, poison: int) -> int:
    """Compare every page of a completed batch with the reference; poison and free."""
    base = dst.regions.buffers[0].addr
    nbytes = dst.expected.shape[2]
    content = dst.reader.plan.dst_content_nbytes
    for request_id, state, block in batch:
        for layer in range(LAYERS):
            start = dst.regions.page_addr(layer, block) - base
            page = dst.memory[start: start + nbytes]
            if not np.array_equal(page, dst.expected[layer, state]):
                bad = np.flatnonzero(page != dst.expected[layer, state])
                raise AssertionError(f"{request_id} (state {state}) layer {layer} dst rank "
                                     f"{dst.rank} of pair {dst.pair}: {bad.size} bytes differ, "
                                     f"first at {int(bad[0])}")
            page[:content] = poison
        dst.free.append(block)
    return len(batch) * LAYERS


def test_soak_thousands_of_requests_many_in_flight_mixed_tp():
    rng = np.random.default_rng(7)
    started = time.monotonic()
    sources = [SrcEngine(case, ucx_params=params) for case, params, _ in PAIRS]
    dsts: list[DstRank] = []
    try:
        for pair, ((case, _, integrity), src) in enumerate(zip(PAIRS, sources)):
            dsts += [make_dst(pair, case, rank, src, integrity, rng) for rank in range(case.dst_tp)]
        set_up = time.monotonic()
        pages = batches = peak = nbytes = pending_polls = moving = 0
        poison = 1
        while any(d.queue or d.in_flight for d in dsts):
            for dst in dsts:
                while dst.queue and len(dst.in_flight) < IN_FLIGHT:
                    size = min(int(rng.integers(1, MAX_BATCH + 1)), len(dst.queue))
                    batch = [dst.queue.pop() + (dst.free.pop(),) for _ in range(size)]
                    pairs = np.array([[state, block] for _, state, block in batch], dtype=np.int64)
                    pending = dst.reader.start_read(pairs, [r for r, _, _ in batch], timeout_s=60)
                    moving += not pending.poll()  # its READ had not finished when posted
                    dst.in_flight.append((pending, batch))
            peak = max(peak, sum(len(d.in_flight) for d in dsts))
            for dst in dsts:
                still = []
                for pending, batch in dst.in_flight:
                    if pending.poll():
                        assert pending.status == "received"
                        nbytes += pending.stats().nbytes
                        poison = poison % 255 + 1
                        pages += check_and_free(dst, batch, poison)
                        batches += 1
                    else:
                        pending_polls += 1  # polled while its READ was still moving
                        still.append((pending, batch))
                dst.in_flight = still
            assert time.monotonic() - started < TIME_LIMIT_S, "the soak ran out of time"
        moved = time.monotonic()

        for (case, _, _), src, pair in zip(PAIRS, sources, range(len(PAIRS))):
            plans = plan_all(case.spec, case.src_tp, case.dst_tp)
            want = [sum(r in plan.src_ranks for plan in plans) for r in range(case.src_tp)]
            ids = {f"p{pair}-r{i}" for i in range(REQUESTS_PER_PAIR)}
            deadline = time.monotonic() + 30
            while True:
                counts, foreign = src.ask(("counts",), "counts")
                done = all(all(c.get(i, 0) == w for i in ids) for c, w in zip(counts, want))
                if done or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            for rank, (c, w) in enumerate(zip(counts, want)):
                assert set(c) == (ids if w else set()), f"pair {pair} src rank {rank}: unexpected ids"
                assert all(v == w for v in c.values()), f"pair {pair} src rank {rank}: counts != {w}"
            assert foreign == 0
    finally:
        for dst in dsts:
            dst.reader.close()
            dst.endpoint.close()
        for src in sources:
            src.stop()
    total = time.monotonic() - started
    requests = REQUESTS_PER_PAIR * len(PAIRS)
    print(f"\nsoak: {requests} requests ({sum(c.dst_tp for c, _, _ in PAIRS) * REQUESTS_PER_PAIR} "
          f"request-reads) in {batches} batches, {pages} pages checked, {nbytes / 1e6:.1f} MB, "
          f"up to {peak} batches in flight, {moving} still moving right after their post, {pending_polls} polls of unfinished batches; set-up {set_up - started:.1f} s, moving and checking "
          f"{moved - set_up:.1f} s, total {total:.1f} s")
    assert pages == LAYERS * REQUESTS_PER_PAIR * sum(c.dst_tp for c, _, _ in PAIRS)
    assert peak > IN_FLIGHT and moving > 0
    assert total < TIME_LIMIT_S
