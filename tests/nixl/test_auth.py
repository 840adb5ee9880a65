"""Authentication with a shared cluster secret (issue 13, finding 5).

`Endpoint(..., secret=...)` on every engine: the side channel runs ZeroMQ's CURVE with a
key pair derived from the secret (authenticated and encrypted); peers without it are
refused before any request is read, and counted (`side_channel_stats`: a peer speaking
without CURVE or with other keys fails the handshake, "handshake_failed"; one with its
own client keys is refused by the authentication handler, "auth_refused").
Notifications are tagged with keys derived from the secret: a peer that learned a
session id but lacks the secret cannot make one count. Without a secret nothing
changes (every other test runs without one).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import zmq

pytest.importorskip("nixl")

from ssm_split import Mamba2Spec, PlanError, TransferError  # noqa: E402
from ssm_split.nixl_backend import Endpoint, Reader, fetch_handshake_bytes  # noqa: E402
from ssm_split.nixl_backend._notify import Notifier  # noqa: E402
from ssm_split.nixl_backend._wire import HEADER, PROTOCOL, curve_keys  # noqa: E402

from ._cluster import Case, first_difference  # noqa: E402
from ._peer import SrcEngine  # noqa: E402

pytestmark = pytest.mark.nixl

SECRET = b"cluster secret of the test suite, 32+ bytes"
CASE = Case(Mamba2Spec(num_heads=8, head_dim=4, num_groups=1, state_size=8), 1, 2, num_blocks=6,
            pairs=((5, 0), (1, 3), (2, 4)))


def dst_endpoint(**options):
    memory = CASE.dst_memory()
    return Endpoint(CASE.spec, tp=2, rank=0, memory=[memory], regions=CASE.regions("dst", memory.ctypes.data),
                    **options), memory


def refusals(src: SrcEngine) -> int:
    stats = src.ask(("stats",), "stats")[0]
    return stats.get("handshake_failed", 0) + stats.get("auth_refused", 0)


def wait_for_refusals(src: SrcEngine, more_than: int) -> int:
    deadline = time.monotonic() + 5
    while (seen := refusals(src)) <= more_than:
        assert time.monotonic() < deadline, "the refusal was not counted"
        time.sleep(0.02)
    return seen


def test_members_read_and_peers_without_the_secret_are_refused_and_counted():
    with SrcEngine(CASE, secret=SECRET) as src:
        host, port = src.addresses[0]
        member, memory = dst_endpoint(secret=SECRET)
        try:
            with Reader(member) as reader:
                reader.connect_to(host, port)
                reader.warm_up()
                reader.read(CASE.pairs_array, CASE.request_ids)
            want = CASE.expected_dst(0)
            assert np.array_equal(memory, want), first_difference(memory, want)
            assert src.ask(("wait", CASE.request_ids, [1]), "waited") == [1]
            assert fetch_handshake_bytes(host, port, secret=SECRET)
        finally:
            member.close()
        seen = refusals(src)
        for options in ({}, {"secret": b"another cluster's secret, 32 bytes"}):
            outsider, _ = dst_endpoint(**options)
            try:
                with pytest.raises(TransferError, match="Could not fetch a handshake") as info:
                    Reader(outsider).connect_to(host, port, timeout_s=1)
                assert "same cluster secret" in str(info.value)
            finally:
                outsider.close()
            seen = wait_for_refusals(src, seen)
        # the right server key but a client key pair of its own: the authentication
        # handler refuses it
        public, _ = curve_keys(SECRET)
        own_public, own_private = zmq.curve_keypair()
        context = zmq.Context(io_threads=1)
        try:
            dealer = context.socket(zmq.DEALER)
            dealer.linger = 0
            dealer.curve_serverkey, dealer.curve_publickey, dealer.curve_secretkey = public, own_public, own_private
            dealer.connect(f"tcp://{host}:{port}")
            dealer.send_multipart([b"", PROTOCOL, HEADER.pack(1, 1000), b"handshake", b"{}", b""])
            assert not dealer.poll(1000), "a peer without the secret got an answer"
            dealer.close()
        finally:
            context.destroy(linger=0)
        assert src.ask(("stats",), "stats")[0].get("auth_refused", 0) >= 1
        wait_for_refusals(src, seen)
        assert src.proc.is_alive()


def test_notifications_without_the_secret_do_not_count():
    memory = CASE.src_memory(0)
    with Endpoint(CASE.spec, tp=1, rank=0, memory=[memory], regions=CASE.regions("src", memory.ctypes.data),
                  secret=SECRET) as src, dst_endpoint(secret=SECRET)[0] as member:
        forger, _ = dst_endpoint()
        try:
            forger.agent.add_remote_agent(src.handshake().agent_metadata)
            member.agent.add_remote_agent(src.handshake().agent_metadata)
            leaked = src.open_session(forger.name)  # even holding a session id of its own
            forged = Notifier(None, leaked, forger.name, src.name).messages(["req-0"])[0]
            genuine_session = src.open_session(member.name)
            genuine = Notifier(SECRET, genuine_session, member.name, src.name).messages(["req-1"])[0]
            forger.agent.send_notif(src.name, forged)
            member.agent.send_notif(src.name, genuine)
            deadline = time.monotonic() + 5
            while src.reads_done("req-1") == 0 or src.notification_drops.get("bad_tag", 0) == 0:
                src.poll_notifications()
                assert time.monotonic() < deadline
                time.sleep(0.001)
            assert src.reads_done("req-0") == 0 and src.notification_drops == {"bad_tag": 1}
        finally:
            forger.close()


@pytest.mark.parametrize("secret, match", [
    ("a str, not bytes, of some length", "secret must be bytes or None"),
    (b"short", "needs at least 16"),
])
def test_a_malformed_secret_is_refused(secret, match):
    with pytest.raises(PlanError, match=match):
        dst_endpoint(secret=secret)
    assert os.environ.get("UCX_PROTO_EMULATION_ENABLE") is None  # nothing process-wide was set
