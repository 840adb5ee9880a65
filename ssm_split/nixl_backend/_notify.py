"""Read-done notifications: a reader tells a src rank which requests it has read, so the
src may free those blocks. Only readers that did the handshake can be counted.

Sessions. When a reader fetches a src rank's handshake it names its own NIXL agent, and
the src opens a session for it: a random 16-byte id (`Inbox.open_session`), returned
with the handshake. Both sides derive the session's key from the id, the two agent
names and the cluster secret (`_wire.notification_key`; without a secret, from the id
alone, which then acts as a bearer token only handshaken peers hold).

Wire form (UTF-8, at most `MAX_NOTIFICATION_NBYTES`)::

    b"ssm-split/2 " <session id, 32 hex> b" " <counter> b" " <JSON list of ids> b" " <tag, 32 hex>

where `tag = HMAC-SHA256(key, src name | counter | ids)[:16]` and the counter grows by
one per message of the session. A batch whose ids do not fit one message is sent as
several. The src counts a message's ids only if it is well formed, names an open
session, carries the right tag, comes from the agent the session was opened for, and
its counter was not seen before (a window of `REPLAY_WINDOW` counters, since messages
sent over several UCX workers may arrive out of order). Everything else is dropped and
counted by reason (`Inbox.drops`): memory does not grow with what peers send.
Sessions are kept for the `MAX_SESSIONS` most recently used.
"""

from __future__ import annotations

import hmac
import hashlib
import json
import os
import threading
import time
from collections import Counter, OrderedDict
from typing import Any, Sequence

from ..errors import TransferError

from ._wire import notification_key

__all__ = ["NOTIF_PREFIX", "MAX_NOTIFICATION_NBYTES", "MAX_SESSIONS", "REPLAY_WINDOW", "Notifier", "Inbox"]

NOTIF_PREFIX = b"ssm-split/2 "
MAX_NOTIFICATION_NBYTES = 64 << 10
MAX_SESSIONS = 16384
REPLAY_WINDOW = 1024
_TAG_NBYTES = 16
_SPLIT_NBYTES = MAX_NOTIFICATION_NBYTES - 256  # room for prefix, session, counter, tag


def _tag(key: bytes, src: str, counter: int, ids_json: bytes) -> bytes:
    message = b"|".join((src.encode(), str(counter).encode(), ids_json))
    return hmac.new(key, message, hashlib.sha256).digest()[:_TAG_NBYTES]


class Notifier:
    """A reader's side of one session with one src rank: builds tagged messages.

    Args:
        secret: the cluster secret, or None.
        session: the session id the src handed out with its handshake.
        reader, src: the reader's and the src rank's NIXL agent names.
    """

    def __init__(self, secret: bytes | None, session: bytes, reader: str, src: str):
        self.session, self.src = session, src
        self._key = notification_key(secret, session, reader, src)
        self._counter = 0

    def messages(self, request_ids: Sequence[str]) -> list[bytes]:
        """The messages announcing `request_ids` (one, unless they do not fit)."""
        chunks, current, size = [], [], 2
        for request_id in request_ids:
            cost = len(json.dumps(request_id).encode()) + 1
            if current and size + cost > _SPLIT_NBYTES:
                chunks.append(current)
                current, size = [], 2
            current.append(request_id)
            size += cost
        if current:
            chunks.append(current)
        return [self._message(chunk) for chunk in chunks]

    def _message(self, request_ids: list[str]) -> bytes:
        self._counter += 1
        ids_json = json.dumps(request_ids, separators=(",", ":")).encode()
        tag = _tag(self._key, self.src, self._counter, ids_json)
        return b" ".join((NOTIF_PREFIX + self.session.hex().encode(), str(self._counter).encode(),
                          ids_json, tag.hex().encode()))


class _Session:
    __slots__ = ("reader", "key", "last", "seen")

    def __init__(self, reader: str, key: bytes):
        self.reader, self.key, self.last, self.seen = reader, key, 0, 0  # seen: bitmap below last

    def fresh(self, counter: int) -> bool:
        """Record `counter`; False if it was seen or is too old."""
        if counter > self.last:
            shift = counter - self.last
            self.seen = ((self.seen << shift) | (1 << (shift - 1))) & ((1 << REPLAY_WINDOW) - 1) \
                if shift <= REPLAY_WINDOW else 0
            self.last = counter
            return True
        back = self.last - counter
        if counter <= 0 or back > REPLAY_WINDOW or back == 0:
            return False
        bit = 1 << (back - 1)
        if self.seen & bit:
            return False
        self.seen |= bit
        return True


class Inbox:
    """A src endpoint's sessions and the verdicts on what arrives (thread-safe: sessions
    are opened on the side channel's thread, messages checked on the owner's).

    Args:
        secret: the cluster secret, or None.
        src: this endpoint's NIXL agent name.

    Attributes:
        drops: `Counter` of dropped messages by reason ("foreign", "oversized",
            "malformed", "unknown_session", "bad_tag", "wrong_sender", "replay").
        reads_done: `Counter` of request ids announced by valid messages.
    """

    def __init__(self, secret: bytes | None, src: str):
        self._secret, self.src = secret, src
        self._sessions: OrderedDict[bytes, _Session] = OrderedDict()
        self._lock = threading.Lock()
        self.drops: Counter[str] = Counter()
        self.reads_done: Counter[str] = Counter()

    def poll(self, agent: Any) -> list[tuple[str, tuple[str, ...]]]:
        """Check every notification `agent` received since the last poll; count the ids
        of valid ones. Returns `[(reader agent name, request ids)]` of the valid ones."""
        news = []
        for peer, messages in agent.get_new_notifs().items():
            peer = peer.decode(errors="replace") if isinstance(peer, bytes) else str(peer)
            for message in messages:
                ids = self.accept(peer, message)
                if ids is not None:
                    self.reads_done.update(ids)
                    news.append((peer, ids))
        return news

    def wait(self, agent: Any, request_id: str, count: int, timeout_s: float) -> None:
        """Poll until `request_id` was announced `count` times; `TransferError` at the deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.poll(agent)
            if self.reads_done[request_id] >= count:
                return
            if time.monotonic() > deadline:
                raise TransferError(f"Only {self.reads_done[request_id]} of {count} readers reported the "
                                    f"request read within {timeout_s} s (a reader connected without "
                                    f"a session is never counted).", request=request_id, peer=None)
            time.sleep(0.0005)

    def open_session(self, reader: str) -> bytes:
        """A new session for the reader agent named `reader`; returns its id."""
        session = os.urandom(16)
        key = notification_key(self._secret, session, reader, self.src)
        with self._lock:
            self._sessions[session] = _Session(reader, key)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return session

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    def accept(self, sender: str, message: bytes) -> tuple[str, ...] | None:
        """The request ids of a valid message from `sender`, or None (counted in `drops`)."""
        reason, ids = self._verdict(sender, message)
        if reason is not None:
            self.drops[reason] += 1
        return ids

    def _verdict(self, sender: str, message: bytes) -> tuple[str | None, tuple[str, ...] | None]:
        if not isinstance(message, bytes) or not message.startswith(NOTIF_PREFIX):
            return "foreign", None
        if len(message) > MAX_NOTIFICATION_NBYTES:
            return "oversized", None
        parts = message[len(NOTIF_PREFIX):].split(b" ")
        if len(parts) != 4 or len(parts[0]) != 32 or len(parts[3]) != 2 * _TAG_NBYTES or not parts[1].isdigit():
            return "malformed", None
        try:
            session_id, tag = bytes.fromhex(parts[0].decode()), bytes.fromhex(parts[3].decode())
        except ValueError:
            return "malformed", None
        counter, ids_json = int(parts[1]), parts[2]
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return "unknown_session", None
            if not hmac.compare_digest(_tag(session.key, self.src, counter, ids_json), tag):
                return "bad_tag", None
            if sender != session.reader:  # NIXL's sender name is the peer's own claim
                return "wrong_sender", None
            if not session.fresh(counter):
                return "replay", None
            self._sessions.move_to_end(session_id)
        try:
            ids = json.loads(ids_json.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return "malformed", None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            return "malformed", None
        return None, tuple(ids)
