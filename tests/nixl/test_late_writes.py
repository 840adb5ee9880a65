"""No received batch is ever changed afterwards (issue 13, finding 1).

A READ over UCX's tcp transport misses a 2 ms deadline while 31 MiB are still moving.
Then the documented recoveries run: the reader reconnects, or a second reader of the
same dst endpoint reads, or the reader is closed without waiting (`settle_timeout_s=0`)
and another one reads. Whatever the recovery, a batch received afterwards into the same
dst blocks must keep its bytes: the late READ's bytes may not land on top of it. Before
the fix, `PendingRead.settled` turned True as soon as the reconnect removed the src's
agent (NIXL then answers status checks with `nixlNotFoundError` while UCX goes on
writing), a second reader was not fenced at all, and closing released the handles
(a "cancel" that does not stop the writes): 12-30 of 31 blocks were overwritten.

The late READ reads the victim's states; the fresh batch reads another src engine's
states (default cma transport: it lands at once), so an overwrite shows as a page that
no longer equals the fresh batch's reference.
"""

from __future__ import annotations

import time
import weakref

import numpy as np
import pytest

pytest.importorskip("nixl")

from ssm_split import PlanError, TransferError  # noqa: E402
from ssm_split.nixl_backend import Endpoint, Reader  # noqa: E402
from ssm_split.reference import shard  # noqa: E402

from ._cluster import DST_FILL, TCP, TCP_VICTIM_SPEC, Case, emulating_dst, tcp_victim_case  # noqa: E402
from ._peer import SrcEngine  # noqa: E402

pytestmark = pytest.mark.nixl

SPEC = TCP_VICTIM_SPEC  # the late batch is 31 MiB, ~100 ms over tcp
VICTIM = tcp_victim_case(seed=11)
OTHER = tcp_victim_case(seed=33)  # other states in the same blocks
REST = VICTIM.pairs_array[1:]
WATCH_S = 0.5
"""How long received pages are watched for late bytes (the late READ lasts ~100 ms)."""


@pytest.fixture(scope="module")
def other():
    with SrcEngine(OTHER) as src:
        yield src


@pytest.fixture()
def dst():
    with emulating_dst(VICTIM) as side:  # reads the tcp victim
        yield side


def reader(endpoint: Endpoint, src: SrcEngine) -> Reader:
    r = src.connect(Reader(endpoint))
    r.warm_up()
    return r


def pages(memory: np.ndarray, case: Case, requests) -> dict:
    layout, nbytes = case.regions("dst", 0), case.page_nbytes("dst")
    return {(layer, i): memory[layout.page_addr(layer, case.pairs[i][1]):][:nbytes].copy()
            for layer in range(case.num_layers) for i in requests}


def expected(case: Case, requests) -> dict:
    return {(layer, i): shard(case.spec, case.state(layer, i), 1, page_nbytes=case.page_nbytes("dst"),
                              pad_byte=DST_FILL)[0]
            for layer in range(case.num_layers) for i in requests}


def miss_the_deadline(ra: Reader):
    """A batch that fails its 2 ms deadline with its READ still moving. (Now and then UCX
    serves the whole emulated READ inside the post call: then it is simply read again.)"""
    for _ in range(10):
        late = ra.start_read(REST, "late", timeout_s=0.002)
        try:
            late.wait()
        except TransferError as error:
            assert "did not complete before the deadline" in str(error)
            return late
    pytest.fail("the READ kept finishing within 2 ms: make the batch larger")


def read_when_allowed(rb: Reader, request_id: str, timeout_s: float = 30.0) -> int:
    """Read the other engine's states into the late batch's blocks as soon as the endpoint
    allows it; returns how many times it was refused first."""
    refused, deadline = 0, time.monotonic() + timeout_s
    while True:
        try:
            rb.read(REST, request_id, timeout_s=10)
            return refused
        except PlanError as error:
            assert "is being written by batch 'late'" in str(error)
            assert time.monotonic() < deadline, "the late READ never settled"
            refused += 1
            time.sleep(0.001)


@pytest.mark.parametrize("recovery", ["reconnect", "second-reader", "close"])
def test_no_received_block_changes_after_a_missed_deadline(dst, other, recovery):
    endpoint, memory = dst
    with SrcEngine(VICTIM, ucx_params=TCP) as slow:
        ra, rb = reader(endpoint, slow), reader(endpoint, other)
        late = miss_the_deadline(ra)
        if recovery == "reconnect":
            ra.connect_to(*slow.addresses[0])  # the documented recovery: a fresh handshake
        elif recovery == "close":
            ra.close(settle_timeout_s=0)
        read_when_allowed(rb, "fresh")
        received = pages(memory, OTHER, range(1, 32))
        time.sleep(WATCH_S)
        changed = sorted(key for key, page in pages(memory, OTHER, range(1, 32)).items()
                         if not np.array_equal(page, received[key]))
        assert changed == [], f"{len(changed)} received pages changed afterwards, first {changed[0]}"
        want = expected(OTHER, range(1, 32))
        assert all(np.array_equal(received[key], want[key]) for key in want)
        assert late.settled and endpoint.settle(timeout_s=0) and endpoint.unsettled == 0
        rb.close()
        ra.close()


def test_settled_means_nothing_lands_afterwards(dst):
    endpoint, memory = dst
    with SrcEngine(VICTIM, ucx_params=TCP) as slow:
        ra = reader(endpoint, slow)
        late = miss_the_deadline(ra)
        ra.connect_to(*slow.addresses[0])  # reloading the src's metadata must not end the READ
        for transfer in late._transfers:  # never a released handle kept, never one polled
            assert transfer.xfer is None or not transfer.xfer._released
        assert late.wait_settled(timeout_s=30)
        memory[:] = 0x11
        time.sleep(WATCH_S)
        assert (memory == 0x11).all(), "bytes landed after the READ was reported settled"
        ra.close()


def test_closing_the_endpoint_stops_a_read_that_never_settles():
    with emulating_dst(VICTIM) as (endpoint, memory):  # closed below; closing is idempotent
        agent = weakref.ref(endpoint.agent.agent)
        with SrcEngine(VICTIM, ucx_params=TCP) as stopped:
            ra = reader(endpoint, stopped)
            stopped.pause()  # a READ to a stopped src over tcp never settles
            try:
                stuck = ra.start_read(REST, "stuck", timeout_s=0.3)
                with pytest.raises(TransferError, match="did not complete before the deadline"):
                    stuck.wait()
                ra.close(settle_timeout_s=0.1)
                assert endpoint.unsettled == 1 and not stuck.settled
                with pytest.raises(PlanError, match="being written by batch 'stuck'"):
                    endpoint.inflight.check_free({1}, {0})  # what every reader's start_read asks
            except BaseException:
                stopped.resume()
                raise
            endpoint.close()  # destroys the agent: the memory may be freed once it returns
            assert agent() is None, "the NIXL agent outlived Endpoint.close"
            memory[:] = 0x22
            stopped.resume()  # (over tcp the src aborts now: emulated READs, see test_dying_reader)
            time.sleep(WATCH_S)
            assert (memory == 0x22).all(), "bytes landed after Endpoint.close returned"
