"""Read-done notifications count only from readers that did the handshake, and forged or
excess ones cost no memory (issue 13, finding 6).

Anyone holding a src's published handshake holds its NIXL metadata and can send it
notifications. Before the fix every `ssm-split/1 [...]` message counted (a src would
free blocks nobody had read) and every other one was kept in a list (+141 MB for
20,000). Now a message counts only within a session the src opened at a handshake, with
the session's tag, from the agent the session was opened for, once; everything else is
dropped and counted by reason.
"""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("nixl")

from ssm_split import Mamba2Spec  # noqa: E402
from ssm_split.nixl_backend import Endpoint, Reader  # noqa: E402
from ssm_split.nixl_backend._notify import MAX_SESSIONS, REPLAY_WINDOW, Inbox, Notifier  # noqa: E402

from ._cluster import Case  # noqa: E402

pytestmark = pytest.mark.nixl

CASE = Case(Mamba2Spec(num_heads=8, head_dim=4, num_groups=1, state_size=8), 1, 1, num_blocks=6,
            pairs=((5, 0), (1, 3)))
FORGED = 20000


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def endpoint(side: str) -> tuple[Endpoint, object]:
    memory = CASE.src_memory(0) if side == "src" else CASE.dst_memory()
    return Endpoint(CASE.spec, tp=1, rank=0, memory=[memory], regions=CASE.regions(side, memory.ctypes.data)), memory


def test_20000_forged_notifications_count_nothing_and_memory_stays_flat():
    (src, _), (dst, _), (forger, _) = endpoint("src"), endpoint("dst"), endpoint("dst")
    with src, dst, forger:
        src.serve()
        with Reader(dst) as reader:  # a real reader: it did the handshake
            reader.connect_to(*src.address)
            reader.read(CASE.pairs_array, ["req-0", "req-1"])
        src.wait_for_reads("req-1", 1, timeout_s=10)
        forger.agent.add_remote_agent(src.handshake().agent_metadata)  # what a published handshake gives
        sniffed = Notifier(None, src.open_session(dst.name), dst.name, src.name).messages(["req-0"])[0]
        kinds = [b'ssm-split/1 ["req-0"]',  # the old format, which counted before
                 Notifier(None, os.urandom(16), forger.name, src.name).messages(["req-0"])[0],  # no session
                 sniffed,  # a genuine message of another agent's session
                 b"ssm-split/2 " + b"x" * (64 << 10),  # oversized
                 b"ssm-split/2 00 1 [] 00",  # malformed
                 b"\x00\xff" * 20]  # not ours at all
        def forge(count: int) -> float:
            """Send `count` forged messages; the process's RSS once all were dropped."""
            dropped = sum(src.notification_drops.values())
            for i in range(count):
                forger.agent.send_notif(src.name, kinds[i % len(kinds)])
                if i % 500 == 499:
                    src.poll_notifications()
            deadline = time.monotonic() + 30
            while sum(src.notification_drops.values()) < dropped + count:
                src.poll_notifications()
                assert time.monotonic() < deadline, f"only {src.notification_drops} arrived"
                time.sleep(0.005)
            return rss_mb()

        # the first messages grow NIXL's and the allocator's buffers once; then memory
        # must stay flat, whatever else arrives (before: +248 MB for 20,000, all kept)
        start = rss_mb()
        first = forge(FORGED // 4)
        last = forge(FORGED - FORGED // 4)
        print(f"\n{FORGED} forged notifications: drops {src.notification_drops}, RSS +{first - start:.1f} MB "
              f"for the first {FORGED // 4}, +{last - first:.1f} MB for the other {FORGED - FORGED // 4}")
        assert src.reads_done_counts == {"req-0": 1, "req-1": 1}
        assert sum(src.notification_drops.values()) == FORGED
        assert last - first < 24, f"memory grew by {last - first:.1f} MB with the forged notifications"


# --- the session rules, without NIXL ---------------------------------------------------------


def test_only_the_session_s_agent_counts_each_message_once_in_any_order():
    inbox = Inbox(None, "src")
    notifier = Notifier(None, inbox.open_session("reader"), "reader", "src")
    messages = [notifier.messages([f"r{i}"])[0] for i in range(50)]
    assert inbox.accept("someone-else", messages[0]) is None
    for message in messages[::-1] + messages:  # out of order, then replayed
        inbox.accept("reader", message)
    assert dict(inbox.drops) == {"wrong_sender": 1, "replay": 50}
    too_old = Notifier(None, inbox.open_session("old"), "old", "src")
    old = [too_old.messages(["x"])[0] for _ in range(REPLAY_WINDOW + 2)]
    assert inbox.accept("old", old[-1]) == ("x",)
    assert inbox.accept("old", old[0]) is None and inbox.drops["replay"] == 51  # beyond the window


def test_a_batch_whose_ids_do_not_fit_one_message_is_split():
    inbox = Inbox(b"s" * 16, "src")
    notifier = Notifier(b"s" * 16, inbox.open_session("reader"), "reader", "src")
    ids = [f"request-{i:06d}-" + "x" * 40 for i in range(4000)]  # ~220 KB of ids
    messages = notifier.messages(ids)
    assert len(messages) > 1 and all(len(m) <= 64 << 10 for m in messages)
    got = [i for m in messages for i in inbox.accept("reader", m)]
    assert got == ids and not inbox.drops


def test_sessions_are_bounded():
    inbox = Inbox(None, "src")
    first = inbox.open_session("first")
    for i in range(MAX_SESSIONS):
        inbox.open_session(f"r{i}")
    assert inbox.num_sessions == MAX_SESSIONS
    assert inbox.accept("first", Notifier(None, first, "first", "src").messages(["x"])[0]) is None
    assert inbox.drops == {"unknown_session": 1}


@given(st.binary(max_size=300), st.text(max_size=20))
def test_arbitrary_messages_never_count(message, sender):
    inbox = Inbox(None, "src")
    inbox.open_session("reader")
    assert inbox.accept(sender, message) is None and sum(inbox.drops.values()) == 1
