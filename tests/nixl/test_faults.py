"""Faults with real NIXL processes on DRAM: a src killed mid-transfer, a src that never
answers (READ or side channel), a src that deregisters (and re-uses) its pages, a
deadline that passes.

Each fault must give a `TransferError` naming the request and the peer within the
deadline, leave the dst's other requests alone (a healthy src engine read through the
same dst endpoint at the same time, and pages received before), never report the failed
batch as received (`PendingRead.status`, and no read-done notification to the src),
and the reader must work again once closed and re-created.

The victim src runs in its own process (`_peer.SrcEngine`). Where a READ must be
in flight long enough to hurt it, the victim uses UCX's tcp transport: there a READ is
served by the src process's UCX worker (about 1-2 GB/s here), while the default cma
transport copies the whole READ inside the post call, before anything can interrupt it.
"""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

pytest.importorskip("nixl")

from ssm_split.errors import HandshakeError, StaleHandshakeError
from ssm_split import PlanError, TransferError
from ssm_split.nixl_backend import Endpoint, Reader, fetch_handshake_bytes  # noqa: E402
from ssm_split.reference import shard  # noqa: E402

from ._cluster import DST_FILL, TCP, TCP_VICTIM_SPEC, Case, emulating_dst, tcp_victim_case  # noqa: E402
from ._peer import SrcEngine  # noqa: E402

pytestmark = pytest.mark.nixl

SLACK_S = 1.0
"""How far past its deadline a failure may surface (polling, a loaded CI machine)."""

SPEC = TCP_VICTIM_SPEC
VICTIM = tcp_victim_case(seed=11)
HEALTHY = Case(SPEC, 2, 1, num_layers=2, num_blocks=40, pairs=((5, 36), (0, 38)), seed=22)
BEFORE, REST = VICTIM.pairs_array[:1], VICTIM.pairs_array[1:]


@pytest.fixture(scope="module")
def healthy():
    with SrcEngine(HEALTHY) as src:
        yield src


@pytest.fixture()
def dst():
    with emulating_dst(VICTIM) as side:  # reads the tcp victims
        yield side


def reader(endpoint: Endpoint, src: SrcEngine, **options) -> Reader:
    return src.connect(Reader(endpoint, **{"strategy": "direct", **options}))


def page(memory: np.ndarray, layer: int, dst_block: int) -> np.ndarray:
    start = VICTIM.regions("dst", 0).page_addr(layer, dst_block)
    return memory[start: start + VICTIM.page_nbytes("dst")]


def assert_received(memory: np.ndarray, case: Case, requests) -> None:
    for layer in range(case.num_layers):
        for i in requests:
            want = shard(case.spec, case.state(layer, i), case.dst_tp,
                         page_nbytes=case.page_nbytes("dst"), pad_byte=DST_FILL)[0]
            assert np.array_equal(page(memory, layer, case.pairs[i][1]), want), (layer, i)


def assert_untouched(memory: np.ndarray, used_dst_blocks) -> None:
    for layer in range(VICTIM.num_layers):
        for block in set(range(VICTIM.num_blocks)) - set(used_dst_blocks):
            assert (page(memory, layer, block) == DST_FILL).all(), (layer, block)


def notified(src: SrcEngine, request_id: str, count: int, timeout_s: float = 10) -> int:
    """Poll the src until `request_id` was reported read `count` times (or time runs out);
    returns the count seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = sum(src.ask(("notified", request_id), "notified"))
        if seen >= count or time.monotonic() > deadline:
            return seen
        time.sleep(0.02)


def assert_failed(pending, error, *, request: str, peer: str, started: float, deadline_s: float) -> None:
    assert (error.request, error.peer) == (request, peer)
    assert time.monotonic() - started < deadline_s + SLACK_S
    assert pending.status == "failed"
    with pytest.raises(TransferError):
        pending.poll()  # stays failed; never turns into a success


def healthy_read(endpoint: Endpoint, src: SrcEngine):
    """Start the healthy engine's batch through the same dst endpoint."""
    r = reader(endpoint, src)
    return r, r.start_read(HEALTHY.pairs_array, HEALTHY.request_ids, timeout_s=30)


def start_big_read(ra: Reader, deadline_s: float):
    """Start the victim's large batch and return `(pending, started)` while it is still in
    flight; now and then UCX serves a whole emulated READ inside the post, then try again."""
    for _ in range(10):
        started = time.monotonic()
        big = ra.start_read(REST, "big", timeout_s=deadline_s)
        if not big.poll():
            return big, started
    pytest.fail("every READ finished inside its post: make the victim's batch larger")


def test_src_killed_mid_transfer(healthy, dst):
    endpoint, memory = dst
    with SrcEngine(VICTIM, ucx_params=TCP) as victim:
        ra = reader(endpoint, victim)
        ra.read(BEFORE, "before")
        rb, other = healthy_read(endpoint, healthy)  # posted first, checked after the kill
        deadline_s = 10.0
        big, started = start_big_read(ra, deadline_s)
        in_flight = not big.poll()
        victim.kill()
        assert in_flight, "the READ finished before the kill: make the batch larger"
        other.wait()
        with pytest.raises(TransferError) as info:
            big.wait()
        assert_failed(big, info.value, request="big", peer=victim.names[0], started=started,
                      deadline_s=deadline_s)
        assert other.status == "received"
        ra.close()
        rb.close()
    assert_received(memory, VICTIM, [0])
    assert_received(memory, HEALTHY, range(2))
    assert_untouched(memory, [p[1] for p in VICTIM.pairs + HEALTHY.pairs])
    with SrcEngine(VICTIM) as restarted:  # a new reader, a new src process
        with reader(endpoint, restarted) as again:
            again.read(VICTIM.pairs_array, "again")
    assert_received(memory, VICTIM, range(32))


def test_src_that_never_answers_a_read_misses_the_deadline(healthy, dst):
    endpoint, memory = dst
    with SrcEngine(VICTIM, ucx_params=TCP) as victim:
        ra = reader(endpoint, victim)
        ra.read(BEFORE, "before")
        victim.pause()  # alive, holds its connections, answers nothing
        try:
            deadline_s, started = 1.5, time.monotonic()
            stuck = ra.start_read(REST[:4], "stuck", timeout_s=deadline_s)
            rb, other = healthy_read(endpoint, healthy)
            other.wait()
            with pytest.raises(TransferError, match="did not complete before the deadline") as info:
                stuck.wait()
            assert time.monotonic() - started >= deadline_s
            assert_failed(stuck, info.value, request="stuck", peer=victim.names[0],
                          started=started, deadline_s=deadline_s)
        finally:
            victim.resume()
        ra.close()
        rb.close()
        assert_received(memory, VICTIM, [0])
        assert_received(memory, HEALTHY, range(2))
        with reader(endpoint, victim) as again:
            again.read(VICTIM.pairs_array, "again")
        assert_received(memory, VICTIM, range(32))
        assert notified(victim, "again", 1) == 1
        assert notified(victim, "stuck", 0, timeout_s=0) == 0


def test_deadline_passes_while_a_slow_src_is_still_sending(dst):
    endpoint, memory = dst
    with SrcEngine(VICTIM, ucx_params=TCP) as slow:
        ra = reader(endpoint, slow)
        ra.read(BEFORE, "before")
        deadline_s = 0.002  # 31 MiB rarely arrive in 2 ms over tcp (then read them again)
        for attempt in range(10):
            started = time.monotonic()
            late = ra.start_read(REST, f"late-{attempt}", timeout_s=deadline_s)
            try:
                late.wait()
            except TransferError as error:
                failure = error
                break
        assert "did not complete before the deadline" in str(failure)
        assert_failed(late, failure, request=late.request, peer=slow.names[0], started=started,
                      deadline_s=deadline_s)
        # the failed READ goes on writing its dst blocks (over tcp it does): until it is
        # settled they are not given to another request
        try:
            too_soon = ra.start_read(REST[:1], "too-soon")
        except PlanError as error:
            assert f"dst block 1 is being written by batch {late.request!r}" in str(error)
        else:  # allowed only because the late READ settled in the meantime
            assert late.settled
            too_soon.wait()
        assert late.wait_settled(timeout_s=30)
        # the same reader and src go on: other requests of the same src arrive
        ra.read(REST[:3], "after")
        assert_received(memory, VICTIM, [0, 1, 2, 3])
        assert notified(slow, "after", 1) == 1 and notified(slow, late.request, 0, timeout_s=0) == 0
        ra.close()
        with reader(endpoint, slow) as again:
            again.read(VICTIM.pairs_array, "again", timeout_s=30)
        assert_received(memory, VICTIM, range(32))


def test_side_channel_that_never_answers():
    silent = socket.create_server(("127.0.0.1", 0), backlog=4)  # accepts, never answers
    try:
        host, port = silent.getsockname()[:2]
        started = time.monotonic()
        with pytest.raises(TransferError, match="Could not fetch a handshake") as info:
            fetch_handshake_bytes(host, port, timeout_s=0.5)
        assert info.value.peer == f"{host}:{port}"
        assert time.monotonic() - started < 0.5 + SLACK_S
    finally:
        silent.close()


def test_stopped_src_in_integrity_mode_fails_before_reading(healthy, dst):
    endpoint, memory = dst
    with SrcEngine(VICTIM) as victim:
        ra = reader(endpoint, victim, integrity=True)
        ra.read(BEFORE, "before")
        victim.pause()  # its side channel stops answering too
        try:
            started = time.monotonic()
            with pytest.raises(TransferError, match="integrity digests request .* failed") as info:
                ra.start_read(REST[:2], "unanswered", timeout_s=1.0)
            assert (info.value.request, info.value.peer) == ("unanswered", victim.names[0])
            assert time.monotonic() - started < 1.0 + SLACK_S
            with pytest.raises(TransferError, match="Could not fetch a handshake"):
                Reader(endpoint).connect_to(*victim.addresses[0], timeout_s=0.5)
            rb, other = healthy_read(endpoint, healthy)
            other.wait()
            rb.close()
        finally:
            victim.resume()
        assert_untouched(memory, [0, 36, 38])  # nothing was read for "unanswered"
        ra.close()
        with reader(endpoint, victim, integrity=True) as again:
            again.read(VICTIM.pairs_array, "again")
        assert_received(memory, VICTIM, range(32))


def test_src_deregisters_and_reuses_its_pages(healthy, dst):
    endpoint, memory = dst
    with SrcEngine(VICTIM) as src:
        ra = reader(endpoint, src)
        unchecked = reader(endpoint, src, check_generation=False)
        ra.read(BEFORE, "before")
        src.ask(("deregister", 0, 0x00), "deregistered")  # freed, then re-used as zeros
        deadline_s, started = 5.0, time.monotonic()
        stale = ra.start_read(REST[:2], "stale", timeout_s=deadline_s)
        rb, other = healthy_read(endpoint, healthy)
        with pytest.raises(StaleHandshakeError, match="src rank 0 is at registration generation 2") as info:
            stale.wait()
        assert_failed(stale, info.value, request="stale", peer=src.names[0], started=started,
                      deadline_s=deadline_s)
        other.wait()
        rb.close()
        # why the check exists: NIXL itself completes a READ of deregistered memory
        unchecked.read(REST[2:3], "unchecked")
        assert (page(memory, 0, 3)[:100] == 0).all()
        unchecked.close()
        with pytest.raises(HandshakeError, match="has deregistered its pages"):
            ra.connect_to(*src.addresses[0])
        src.ask(("register", 0), "registered")
        ra.close()
        with reader(endpoint, src) as again:
            again.read(VICTIM.pairs_array, "again")
        assert_received(memory, VICTIM, range(32))
        assert_received(memory, HEALTHY, range(2))
        assert notified(src, "again", 1) == 1
        assert notified(src, "stale", 0, timeout_s=0) == 0  # the src never heard "done"


def test_src_deregisters_while_a_read_is_in_flight(dst):
    endpoint, memory = dst
    with SrcEngine(VICTIM, ucx_params=TCP) as src:
        ra = reader(endpoint, src)
        ra.read(BEFORE, "before")
        deadline_s = 10.0
        big, started = start_big_read(ra, deadline_s)
        in_flight = not big.poll()
        src.ask(("deregister", 0, 0xAB), "deregistered")
        assert in_flight, "the READ finished before the deregistration: make the batch larger"
        with pytest.raises(TransferError) as info:  # StaleHandshakeError, or a failed READ
            big.wait()
        assert_failed(big, info.value, request="big", peer=src.names[0], started=started,
                      deadline_s=deadline_s)
        src.ask(("register", 0), "registered")
        ra.close()
        with reader(endpoint, src) as again:
            again.read(VICTIM.pairs_array, "again")
        assert_received(memory, VICTIM, range(32))


def test_reads_into_blocks_still_being_written_are_refused(dst):
    endpoint, memory = dst
    with SrcEngine(VICTIM) as src:
        with reader(endpoint, src) as ra:
            first = ra.start_read(REST[:3], "first", layers=[0])  # not polled: in flight
            with pytest.raises(PlanError, match="dst block 2 is being written by batch 'first', "
                                               "which is still in flight"):
                ra.start_read(REST[1:2], "second", layers=[0])
            other_layer = ra.start_read(REST[1:2], "other-layer", layers=[1])  # other bytes
            first.wait()
            other_layer.wait()
            ra.read(REST[:3], "all")  # received batches free their blocks
        assert_received(memory, VICTIM, [1, 2, 3])
