"""The side channel (pyzmq ROUTER server, DEALER client), without NIXL except where an
endpoint serves integrity requests.

- Named handlers answer blocking requests and several outstanding ones; a handler's
  errors are answers (`{"ok": false, "kind", "error"}`), never the server's end.
- Caps: requests beyond the per-connection cap are answered "busy" at once.
- Work is cancelled when its client leaves or stops waiting (integrity digests too).
- Envelopes are validated strictly (Hypothesis): junk frames and raw bytes are dropped
  and the server keeps answering real requests.
Floods and descriptor exhaustion are in test_flood.py.
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ssm_split import Mamba2Spec, PlanError, TransferError
from ssm_split.nixl_backend import RequestContext, SideChannelClient, SideChannelServer
from ssm_split.nixl_backend._wire import HEADER, PROTOCOL

from ._cluster import Case

SLOW = threading.Event()  # set: the "slow" handler returns


def echo(request: dict, payload: bytes, context: RequestContext) -> tuple[dict, bytes]:
    return {"echo": request, "peer": context.peer_address}, payload[::-1]


def slow(request: dict, payload: bytes, context: RequestContext) -> tuple[dict, bytes]:
    while not SLOW.wait(0.005):
        context.check()  # TimeoutError once the client left or stopped waiting
    return {}, b""


@pytest.fixture(scope="module")
def server():
    server = SideChannelServer("127.0.0.1", 0, max_per_connection=2)
    server.add_handler("echo", echo)
    server.add_handler("inline-echo", echo, inline=True)
    server.add_handler("slow", slow)
    server.add_handler("value-error", lambda r, p, c: int("nope"))
    server.add_handler("bug", lambda r, p, c: 1 / 0)
    server.add_handler("junk-answer", lambda r, p, c: "not a tuple")
    server.add_handler("stale", lambda r, p, c: ({"ok": False, "kind": "stale", "error": "old"}, b""))
    yield server
    SLOW.set()
    server.close()


def test_blocking_and_outstanding_requests(server):
    with SideChannelClient(*server.address, timeout_s=5) as client:
        reply = client.request("echo", {"n": 1}, b"abc")
        assert reply.ok and reply.body == {"echo": {"n": 1}, "peer": "127.0.0.1"} and reply.payload == b"cba"
        assert client.request("inline-echo", {"n": 2}).body["echo"] == {"n": 2}
        tickets = [client.send("echo", {"n": i}, bytes([i]) * 1000) for i in range(6)]
        assert client.outstanding == 6
        first = client.wait(tickets[0])
        assert first.body["echo"] == {"n": 0} and first.payload == bytes([0]) * 1000
        seen = {}
        while client.outstanding:
            ticket, reply = client.recv(timeout_s=5)
            seen[ticket] = reply
        assert set(seen) == set(tickets[1:])
        for i, ticket in enumerate(tickets[1:], 1):  # at most 2 in flight per connection
            reply = seen[ticket]
            assert (reply.ok and reply.body["echo"] == {"n": i}) or reply.kind == "busy"
        assert seen[tickets[1]].ok
        ticket = client.send("echo", {})
        deadline = time.monotonic() + 5
        while (reply := client.poll(ticket)) is None:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert reply.ok
        with pytest.raises(TransferError, match="not outstanding"):
            client.poll(ticket)  # collected already


@pytest.mark.parametrize("op, kind, error", [
    ("value-error", "refused", "ValueError: invalid literal"),
    ("bug", "failed", "ZeroDivisionError"),
    ("junk-answer", "failed", "not \\(dict, bytes\\)"),
    ("stale", "stale", "old"),
    ("no-such-op", "unknown-op", "no op 'no-such-op'"),
])
def test_handler_errors_are_answers_and_the_server_keeps_serving(server, op, kind, error):
    with SideChannelClient(*server.address, timeout_s=5) as client:
        ticket = client.send(op, {})
        _, reply = client.recv()
        assert not reply.ok and reply.kind == kind
        assert __import__("re").search(error, reply.error)
        with pytest.raises(TransferError, match=f"refused the request \\({kind}\\)") as info:
            client.request(op)
        assert info.value.peer == client.address
        assert client.request("echo", {}).ok


def test_work_is_cancelled_when_the_client_leaves_or_stops_waiting(server):
    before = server.stats.get("cancelled_peer_left", 0)
    SLOW.clear()
    client = SideChannelClient(*server.address, timeout_s=30)
    client.send("slow", {})
    time.sleep(0.2)
    client.close()  # the requester leaves: its work stops
    deadline = time.monotonic() + 5
    while server.stats.get("cancelled_peer_left", 0) == before:
        assert time.monotonic() < deadline, "the server did not cancel the work of a departed client"
        time.sleep(0.01)
    with SideChannelClient(*server.address) as client:
        with pytest.raises(TransferError, match="did not answer the 'slow' request in time"):
            client.request("slow", timeout_s=0.3)  # stops waiting: the handler's check() raises
        SLOW.set()
        assert client.request("echo", {}).ok


def test_bad_ops_and_bodies_are_refused_on_both_sides(server):
    with pytest.raises(PlanError, match="side channel op must be"):
        server.add_handler("Pack!", echo)
    with pytest.raises(PlanError, match="must be callable"):
        server.add_handler("pack", "not callable")
    with SideChannelClient(*server.address) as client:
        with pytest.raises(PlanError, match="op must be"):
            client.send("x" * 40)
        with pytest.raises(PlanError, match="must be a dict"):
            client.send("echo", [1, 2])
        with pytest.raises(PlanError, match="not JSON"):
            client.send("echo", {"x": object()})
    with pytest.raises(PlanError, match="secret must be bytes"):
        SideChannelClient(*server.address, secret="text")


def test_contexts_are_private():
    assert zmq.Context._instance is None  # nobody here used the process-wide instance


# --- strict envelopes ---------------------------------------------------------------------

def _good_frames(ticket: int) -> list[bytes]:
    return [b"", PROTOCOL, HEADER.pack(ticket, 5000), b"echo", b"{}", b"payload"]


@st.composite
def junk_frames(draw):
    """Frame lists a DEALER may send: random, or a real envelope with one frame changed,
    one added or one removed."""
    frames = _good_frames(draw(st.integers(0, 2**64 - 1)))
    how = draw(st.sampled_from(["random", "change", "add", "drop"]))
    if how == "random":
        return draw(st.lists(st.binary(max_size=64), min_size=1, max_size=9))
    index = draw(st.integers(0, len(frames) - 1))
    if how == "change":
        frames[index] = draw(st.binary(max_size=64).filter(lambda b: b != frames[index]))
    elif how == "add":
        frames.insert(index, draw(st.binary(max_size=64)))
    else:
        del frames[index]
    return frames


@pytest.fixture(scope="module")
def raw(server):
    context = zmq.Context(io_threads=1)
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(f"tcp://{server.address[0]}:{server.address[1]}")
    yield dealer
    context.destroy(linger=0)


_tickets = iter(range(1, 1 << 62))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(junk_frames())
def test_junk_envelopes_are_dropped_and_real_requests_still_answered(server, raw, frames):
    raw.send_multipart(frames)
    ticket = next(_tickets)
    raw.send_multipart(_good_frames(ticket))
    deadline = time.monotonic() + 5
    while True:  # answers to junk that happens to be an envelope are skipped
        assert raw.poll(int(max(deadline - time.monotonic(), 0) * 1000)), "the server stopped answering"
        answer = raw.recv_multipart()
        if len(answer) == 5 and answer[2] == HEADER.pack(ticket, 0)[:8]:
            assert answer[1] == PROTOCOL and answer[4] == b"daolyap"
            return


@settings(deadline=None, max_examples=20)
@given(st.binary(min_size=1, max_size=4096))
def test_raw_bytes_never_stop_the_server(server, data):
    with socket.create_connection(server.address, timeout=5) as conn:
        try:
            conn.sendall(data)
        except OSError:
            pass  # the server may drop the connection first
    with SideChannelClient(*server.address, timeout_s=5) as client:
        assert client.request("echo", {}).ok


# --- integrity work is bounded --------------------------------------------------------------

BIG = Case(Mamba2Spec(num_heads=32, head_dim=64, num_groups=1, state_size=64, ssm_dtype="float32"), 1, 1,
           num_layers=2, num_blocks=8, pairs=((0, 0),))


@pytest.fixture(scope="module")
def big_src():
    pytest.importorskip("nixl")
    from ssm_split.nixl_backend import Endpoint, spec_fingerprint

    memory = np.frombuffer(np.random.default_rng(1).bytes(BIG.memory_nbytes("src")), np.uint8).copy()
    with Endpoint(BIG.spec, tp=1, rank=0, memory=[memory], regions=BIG.regions("src", memory.ctypes.data)) as src:
        src.serve()
        body = {"generation": src.generation, "fingerprint": spec_fingerprint(BIG.spec), "dst_tp": 1,
                "dst_rank": 0, "layers": [0, 1]}
        yield src, body


def test_integrity_requests_over_the_bounds_are_refused(big_src):
    src, body = big_src  # pages of 537 KB: 1000 of them are over 512 MiB
    with SideChannelClient(*src.address, timeout_s=10) as client:
        with pytest.raises(TransferError, match="split the batch"):
            client.request("digests", {**body, "src_blocks": [0] * 500})  # 1000 pages, 550 MB
        reply = client.request("digests", {**body, "src_blocks": [0, 7]})
        assert reply.body["shape"][:2] == [2, 2]


def test_integrity_work_stops_when_the_requester_leaves(big_src):
    src, body = big_src
    body = {**body, "src_blocks": list(range(8)) * 60}  # 960 pages of 537 KB: within the bounds
    with SideChannelClient(*src.address, timeout_s=30) as client:
        cpu = time.process_time()
        assert client.request("digests", body).body["shape"] == [2, 480, 4]
        whole = time.process_time() - cpu
    before, asked = src.side_channel_stats.get("cancelled", 0), src.integrity_requests
    cpu = time.process_time()
    client = SideChannelClient(*src.address, timeout_s=30)
    client.send("digests", body)
    deadline = time.monotonic() + 10
    while src.integrity_requests == asked:  # the src started on it
        assert time.monotonic() < deadline
        time.sleep(0.001)
    client.close()  # and leaves
    while src.side_channel_stats.get("cancelled", 0) == before:
        assert time.monotonic() < deadline, "the src did not give up the work of a departed requester"
        time.sleep(0.005)
    used = time.process_time() - cpu
    assert used < whole / 2, f"the src hashed for {used:.2f} CPU-s of {whole:.2f} after its requester left"
