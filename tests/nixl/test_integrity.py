"""Integrity mode with real NIXL READs on DRAM (src and dst endpoints in this process).

- A byte flipped anywhere in the content of a received page (Hypothesis over requests,
  layers, offsets and bit masks; injected through `Reader.before_check`, after the bytes
  landed and before they are checked) is reported with its request, layer, segment and
  offset, and nothing else is; the batch is not received and the src is not notified;
  reading it again succeeds.
- Reads whose src offsets are wrong but stay inside the pages (a shifted handshake)
  pass silently without integrity mode and are caught with it.
- With integrity mode off nothing changes: same bytes, same statistics, same
  notifications, and no integrity request reaches the src.
- The src's integrity handlers answer hostile requests with a refusal, never a crash,
  and bound their work (test_side_channel.py floods them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("nixl")

from ssm_split import Buffer, LayerRegion, Mamba2Spec, RegionSet, page_layout, plan_reads
from ssm_split.errors import IntegrityError, StaleHandshakeError
from ssm_split.specs import stack_layers
from ssm_split.nixl_backend import Endpoint, Reader, fetch_handshake_bytes  # noqa: E402
from ssm_split.integrity._digests import plan_pieces  # noqa: E402
from ssm_split.nixl_backend._handshake import spec_fingerprint  # noqa: E402
from ssm_split.nixl_backend._integrity_src import MAX_PIECES_PER_REQUEST, integrity_handlers  # noqa: E402
from ssm_split.nixl_backend._sidechannel import SideChannelServer  # noqa: E402
from ssm_split.nixl_backend._sideclient import SideChannelClient  # noqa: E402

from ._cluster import DST_FILL, Case, first_difference  # noqa: E402

pytestmark = pytest.mark.nixl

# 2 -> 3 does not divide; one B/C group replicated on both sides; SD conv layout with a
# speculative token, so a page has many segments (conv parts per row, temporal)
CASE = Case(Mamba2Spec(num_heads=6, head_dim=2, num_groups=1, state_size=4, conv_layout="SD",
                       spec_tokens=1, ssm_dtype="float32"), 2, 3)
DST_RANK = 1
LAYOUT = page_layout(CASE.spec, CASE.dst_tp, DST_RANK)


@contextlib.contextmanager
def cluster(case: Case, dst_rank: int, **reader_options):
    with contextlib.ExitStack() as stack:
        src_memory = [case.src_memory(r) for r in range(case.src_tp)]
        sources = []
        for rank, memory in enumerate(src_memory):
            source = stack.enter_context(Endpoint(case.spec, tp=case.src_tp, rank=rank, memory=[memory],
                                                  regions=case.regions("src", memory.ctypes.data)))
            source.serve()
            sources.append(source)
        memory = case.dst_memory()
        endpoint = stack.enter_context(Endpoint(case.spec, tp=case.dst_tp, rank=dst_rank, memory=[memory],
                                                regions=case.regions("dst", memory.ctypes.data)))
        yield sources, src_memory, endpoint, memory


@pytest.fixture(scope="module")
def setup():
    with cluster(CASE, DST_RANK) as (sources, src_memory, endpoint, memory):
        reader = Reader(endpoint, integrity=True)
        for source in sources:
            reader.connect_to(*source.address)
        yield sources, src_memory, reader, memory
        reader.close()


def offset_of(layer: int, dst_block: int, page_offset: int) -> int:
    return CASE.regions("dst", 0).page_addr(layer, dst_block) + page_offset


@st.composite
def flips(draw):
    """Distinct (request index, layer, page offset inside the content) and xor masks."""
    one = st.tuples(st.integers(0, len(CASE.pairs) - 1), st.integers(0, CASE.num_layers - 1),
                    st.integers(0, LAYOUT.content_nbytes - 1))
    chosen = draw(st.lists(one, min_size=1, max_size=4, unique=True))
    return [(*c, draw(st.integers(1, 255))) for c in chosen]


_batches = iter(range(1 << 30))


@given(flips())
def test_every_flipped_byte_is_reported_with_layer_segment_and_offset(setup, flipped):
    sources, _, reader, memory = setup
    memory[:] = DST_FILL
    ids = [f"b{next(_batches)}-{i}" for i in range(len(CASE.pairs))]

    def corrupt(pending):
        for i, layer, offset, mask in flipped:
            memory[offset_of(layer, CASE.pairs[i][1], offset)] ^= mask

    reader.before_check = corrupt
    try:
        pending = reader.start_read(CASE.pairs_array, ids)
        with pytest.raises(IntegrityError, match="arrived corrupted") as info:
            pending.wait()
    finally:
        reader.before_check = None
    assert pending.status == "failed"
    reported = {(c.request, c.layer, c.page_offset): c for c in info.value.corruptions}
    assert set(reported) == {(ids[i], layer, offset) for i, layer, offset, _ in flipped}
    for i, layer, offset, mask in flipped:
        c = reported[(ids[i], layer, offset)]
        segment = LAYOUT.segments_overlapping(offset, 1)[0]
        assert (c.segment, c.segment_offset, c.nbytes) == (segment.label, offset - segment.offset, 1)
        assert (c.src_block, c.dst_block) == CASE.pairs[i]
        assert c.expected ^ c.received == mask
    assert info.value.peer in {s.name for s in sources}
    # nothing was reported read to the src ranks; the batch reads fine once uncorrupted
    for source in sources:
        source.poll_notifications()
        assert source.reads_done(ids[0]) == 0
    reader.read(CASE.pairs_array, ids)
    want = CASE.expected_dst(DST_RANK)
    assert np.array_equal(memory, want), first_difference(memory, want)


def test_flipped_padding_is_not_a_corruption(setup):
    _, _, reader, memory = setup
    memory[:] = DST_FILL
    reader.before_check = lambda pending: memory.__setitem__(
        offset_of(0, CASE.pairs[0][1], LAYOUT.content_nbytes + 3), 0)
    try:
        stats = reader.read(CASE.pairs_array, "padding")
    finally:
        reader.before_check = None
    assert stats.nbytes == CASE.num_layers * len(CASE.pairs) * LAYOUT.content_nbytes


def test_a_src_that_changed_its_bytes_is_reported_without_a_byte_offset(setup):
    _, src_memory, reader, memory = setup
    layer, (src_block, dst_block) = 2, CASE.pairs[1]
    piece = plan_pieces(reader.plan)[0]
    src_byte = CASE.regions("src", 0).page_addr(layer, src_block) + piece.src_offset

    def corrupt(pending):  # the src changed its copy after digesting it, and the dst's differs
        src_memory[piece.src_rank][src_byte] ^= 0xFF
        memory[offset_of(layer, dst_block, 0):offset_of(layer, dst_block, LAYOUT.content_nbytes)] ^= 0x01

    reader.before_check = corrupt
    try:
        with pytest.raises(IntegrityError) as info:
            reader.read(CASE.pairs_array, "changed")
    finally:
        reader.before_check = None
        src_memory[piece.src_rank][src_byte] ^= 0xFF
    unlocated = [c for c in info.value.corruptions if not c.located]
    assert [(c.layer, c.dst_block, c.page_offset, c.nbytes) for c in unlocated] == [
        (layer, dst_block, piece.dst_offset, piece.nbytes)]
    assert "not located" in str(unlocated[0])
    located = [c for c in info.value.corruptions if c.located]  # the other pieces of the page
    assert located and all(c.expected ^ c.received == 0x01 for c in located)


@pytest.mark.parametrize("strategy", ["direct", "staged", "packed"])
def test_integrity_mode_checks_every_strategy(setup, strategy):
    """A flipped byte is caught whatever moved the batch (a READ per range, a superset READ
    and a gather, a src-side pack and a scatter); the clean batch then lands exactly."""
    _, _, reader, memory = setup
    memory[:] = DST_FILL
    layer, (_, dst_block) = 1, CASE.pairs[2]
    offset = offset_of(layer, dst_block, LAYOUT.content_nbytes // 2)
    reader.before_check = lambda pending: memory.__setitem__(offset, memory[offset] ^ 0x40)
    try:
        with pytest.raises(IntegrityError) as info:
            reader.read(CASE.pairs_array, [f"{strategy}-bad-{i}" for i in range(len(CASE.pairs))],
                        strategy=strategy)
    finally:
        reader.before_check = None
    assert [(c.layer, c.dst_block, c.page_offset) for c in info.value.corruptions] == [
        (layer, dst_block, LAYOUT.content_nbytes // 2)]
    stats = reader.read(CASE.pairs_array, [f"{strategy}-ok-{i}" for i in range(len(CASE.pairs))],
                        strategy=strategy)
    assert stats.strategy == strategy
    want = CASE.expected_dst(DST_RANK)
    assert np.array_equal(memory, want), first_difference(memory, want)


def test_integrity_mode_checks_stacked_pages():
    """Pages that hold three layers each: the digests follow the stacked page's segments."""
    case = Case(stack_layers(CASE.spec, 3), CASE.src_tp, CASE.dst_tp, num_layers=1)
    layout = page_layout(case.spec, case.dst_tp, DST_RANK)
    with cluster(case, DST_RANK) as (sources, _, endpoint, memory), Reader(endpoint, integrity=True) as reader:
        for source in sources:
            reader.connect_to(*source.address)
        offset = layout.content_nbytes - 5  # in the temporal state of the last layer
        at = case.regions("dst", 0).page_addr(0, case.pairs[1][1]) + offset
        reader.before_check = lambda pending: memory.__setitem__(at, memory[at] ^ 0x01)
        with pytest.raises(IntegrityError) as info:
            reader.read(case.pairs_array, [f"bad-{i}" for i in range(len(case.pairs))])
        reader.before_check = None
        assert [(c.request, c.page_offset, c.segment) for c in info.value.corruptions] == [
            ("bad-1", offset, "temporal")]
        reader.read(case.pairs_array, case.request_ids)
        want = case.expected_dst(DST_RANK)
        assert np.array_equal(memory, want), first_difference(memory, want)


def shifted(source: Endpoint, case: Case):
    """`source`'s handshake with every page described 4 bytes later than it is (and the
    last block left out, so every described page stays in registered memory)."""
    hs = source.handshake()
    regions = RegionSet(tuple(LayerRegion(r.base_addr + 4, r.page_nbytes, r.page_stride_nbytes,
                                          r.num_blocks - 1) for r in hs.regions.layers),
                        (Buffer(hs.regions.buffers[0].addr + 4, hs.regions.buffers[0].nbytes - 4),))
    return dataclasses.replace(hs, regions=regions)


@contextlib.contextmanager
def lying_side_channel(source: Endpoint, handshake):
    """A side channel that serves `handshake` for `source` and answers integrity requests
    with `source`'s true pages: a src whose handshake lies about its offsets."""
    server = SideChannelServer("127.0.0.1", 0)
    server.add_handler("handshake", lambda request, payload, context: ({}, handshake.encode()), inline=True)
    for op, handler in integrity_handlers(source, lambda: None).items():
        server.add_handler(op, handler)
    try:
        yield server.address
    finally:
        server.close()


@pytest.mark.parametrize("prepare", ["once", "per-batch"])
def test_wrong_offsets_inside_the_pages_are_caught_only_with_integrity(prepare):
    case = dataclasses.replace(CASE, pairs=CASE.pairs[:3])  # keep away from the last block
    with cluster(case, DST_RANK) as (sources, _, endpoint, memory):
        with Reader(endpoint, prepare=prepare) as plain:
            for source in sources:
                plain.connect(shifted(source, case))
            plain.read(case.pairs_array, "silent")  # NIXL moves the wrong bytes happily
        want = case.expected_dst(DST_RANK)
        assert not np.array_equal(memory, want)

        memory[:] = DST_FILL
        with contextlib.ExitStack() as stack, Reader(endpoint, prepare=prepare, integrity=True) as checked:
            for source in sources:
                checked.connect_to(*stack.enter_context(lying_side_channel(source, shifted(source, case))))
            with pytest.raises(IntegrityError) as info:
                checked.read(case.pairs_array, case.request_ids)
        assert info.value.corruptions and all(c.located for c in info.value.corruptions)
        for c in info.value.corruptions:
            i = case.request_ids.index(c.request)
            assert c.expected == want[offset_of(c.layer, case.pairs[i][1], c.page_offset)]
            assert c.received != c.expected


def test_integrity_off_changes_nothing():
    results = {}
    for integrity in (False, True):
        with cluster(CASE, DST_RANK) as (sources, _, endpoint, memory):
            with Reader(endpoint, integrity=integrity) as reader:
                for source in sources:
                    reader.connect_to(*source.address)
                stats = reader.read(CASE.pairs_array, CASE.request_ids)
            plan = plan_reads(CASE.spec, CASE.src_tp, CASE.dst_tp, DST_RANK)
            for source, count in zip(sources, [int(s.rank in plan.src_ranks) for s in sources]):
                for request_id in CASE.request_ids:
                    source.wait_for_reads(request_id, count, timeout_s=10)
            results[integrity] = (memory.copy(), dataclasses.replace(stats, elapsed_s=0),
                                  [s.reads_done(CASE.request_ids[0]) for s in sources],
                                  [s.integrity_requests for s in sources])
    (off_bytes, off_stats, off_notes, off_asked), (on_bytes, on_stats, on_notes, on_asked) = \
        results[False], results[True]
    assert np.array_equal(off_bytes, CASE.expected_dst(DST_RANK)) and np.array_equal(off_bytes, on_bytes)
    assert off_stats == on_stats and off_notes == on_notes
    assert off_asked == [0, 0] and on_asked == [1, 1]


def test_a_stale_handshake_is_refused_before_anything_is_read():
    with cluster(CASE, DST_RANK) as (sources, _, endpoint, memory):
        with Reader(endpoint, integrity=True) as reader:
            for source in sources:
                reader.connect_to(*source.address)
            sources[1].deregister()
            sources[1].register()
            with pytest.raises(StaleHandshakeError, match="generation 1, this endpoint is at generation 3"):
                reader.start_read(CASE.pairs_array, "stale")
        assert (memory == DST_FILL).all()


# --- hostile integrity requests -----------------------------------------------------------


def ask(address, op: str, body) -> dict:
    """One request; the answer's body with its "ok" (and "kind", "error")."""
    with SideChannelClient(*address, timeout_s=10) as client:
        ticket = client.send(op, body)
        answered, reply = client.recv()
        assert answered == ticket
    return {"ok": reply.ok, "kind": reply.kind, "error": reply.error, **reply.body}


@pytest.fixture(scope="module")
def served():
    with cluster(CASE, 0) as (sources, _, _, _):
        yield sources[0]


def _good(source, **changes) -> dict:
    request = {"op": "digests", "generation": source.generation, "fingerprint": spec_fingerprint(CASE.spec),
               "dst_tp": CASE.dst_tp, "dst_rank": 0, "layers": [0, 1], "src_blocks": [7, 0]}
    return {**request, **changes}


@pytest.mark.parametrize("build, kind", [
    (lambda s: ("digests", _good(s)), None),
    (lambda s: ("pieces", _good(s, items=[[0, 7, 0]])), None),
    (lambda s: ("delete", _good(s)), "unknown-op"),
    (lambda s: ("digests", _good(s, generation=s.generation + 1)), "stale"),
    (lambda s: ("digests", _good(s, generation=True)), "stale"),
    (lambda s: ("digests", _good(s, fingerprint="0" * 64)), "refused"),
    (lambda s: ("digests", _good(s, dst_tp=0)), "refused"),
    (lambda s: ("digests", _good(s, dst_tp=True, dst_rank=False)), "refused"),
    (lambda s: ("digests", _good(s, dst_tp=5)), "refused"),  # 6 heads cannot be sharded on 5
    (lambda s: ("digests", _good(s, src_blocks=[9])), "refused"),
    (lambda s: ("digests", _good(s, src_blocks=[-1])), "refused"),
    (lambda s: ("digests", _good(s, layers=[3])), "refused"),
    (lambda s: ("digests", _good(s, layers=[0] * 70000)), "refused"),
    (lambda s: ("digests", _good(s, layers=[0] * 4096, src_blocks=[0] * 4096)), "refused"),
    (lambda s: ("digests", _good(s, src_blocks="0")), "refused"),
    (lambda s: ("digests", _good(s, src_blocks=[2 ** 70])), "refused"),
    (lambda s: ("digests", _good(s, layers=[0.0])), "refused"),
    (lambda s: ("pieces", _good(s, items=[[0, 7, 99]])), "refused"),
    (lambda s: ("pieces", _good(s, items=[[0, 7]])), "refused"),
    (lambda s: ("pieces", _good(s, items=[[0, 70, 0]])), "refused"),
    (lambda s: ("pieces", _good(s, items=7)), "refused"),
    (lambda s: ("pieces", _good(s, items=[[0, 7, 0]] * (MAX_PIECES_PER_REQUEST + 1))), "refused"),
    (lambda s: ("pieces", _good(s, items=[])), "refused"),
    (lambda s: ("bytes", _good(s, items=[[0, 7, 0]])), "unknown-op"),  # the old raw-bytes op is gone
])
def test_hostile_integrity_requests_are_refused_and_the_src_keeps_serving(served, build, kind):
    op, body = build(served)
    answer = ask(served.address, op, body)
    if kind is None:
        assert answer["ok"] is True
    else:
        assert answer["ok"] is False and answer["kind"] == kind and answer["error"]
    assert fetch_handshake_bytes(*served.address, timeout_s=5) == served.handshake().encode()


def test_a_silent_side_channel_client_delays_nobody(served):
    with socket.create_connection(served.address, timeout=5):  # connects, never says a word
        started = time.monotonic()
        assert fetch_handshake_bytes(*served.address, timeout_s=2) == served.handshake().encode()
        assert time.monotonic() - started < 1.0
