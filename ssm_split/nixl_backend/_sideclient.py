"""The side channel's client: one ZeroMQ DEALER connection to one src endpoint.

A reader keeps one `SideChannelClient` per src rank for the life of the connection: the
handshake fetch, integrity requests and any request the caller adds (e.g. a packing
order) go over it. Requests can be outstanding several at once:

    client = SideChannelClient("10.0.0.5", 5555, secret=None)
    reply = client.request("ping", timeout_s=2)             # blocking; raises unless ok
    ticket = client.send("pack", {"wave": 3}, payload)      # non-blocking
    ...                                                     # post READs meanwhile
    reply = client.poll(ticket)                             # None while not answered
    ticket, reply = client.recv(timeout_s=5)                # whichever answers next
    client.close()

A `Reply` is `ok`, `body` (the answer's JSON object), `payload` (bytes), and for a
refusal its `kind` and `error`. `request` and `wait` raise `TransferError(peer="host:port")`
for a refusal or a missed deadline; `poll` and `recv` return refusals as replies and
raise only at the deadline. The wire format is `_wire.py`.

`fetch_handshake_bytes(host, port)` is the one-shot form of the handshake fetch.

Not thread-safe: use a client from one thread (ZeroMQ sockets are not thread-safe).
Never built on `zmq.Context.instance()`: a client uses the context it is given (its
endpoint's) or its own.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import HandshakeError, PlanError, TransferError
from ._handshake import MAX_HANDSHAKE_NBYTES
from ._wire import HEADER, OP_PATTERN, PROTOCOL, check_secret, curve_keys, decode_body, encode_body, parse_answer

__all__ = ["Reply", "SideChannelClient", "fetch_handshake", "fetch_handshake_bytes", "MAX_OUTSTANDING"]

MAX_OUTSTANDING = 1024
"""Requests one client may have outstanding at once."""
DEFAULT_MAX_ANSWER_NBYTES = max(MAX_HANDSHAKE_NBYTES, 64 << 20) + (1 << 20)


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer: `ok`, its JSON `body` (without "ok"), its `payload`; a refusal also has
    `kind` ("refused", "busy", "stale", "unknown-op", "cancelled", "failed", ...) and
    `error`."""

    ok: bool
    body: dict = field(default_factory=dict)
    payload: bytes = b""
    kind: str | None = None
    error: str | None = None


class SideChannelClient:
    """A DEALER connected to the side channel at `(host, port)`.

    Args:
        host, port: where the src endpoint serves (`Endpoint.serve`).
        secret: the cluster secret the src was given, or None.
        timeout_s: default time to wait for an answer.
        context: a `zmq.Context` to create the socket in (an endpoint's); None: a private
            one, destroyed by `close`.
        max_answer_nbytes: larger answer frames make libzmq drop the connection.

    Raises:
        PlanError: a malformed `secret`.
    """

    def __init__(self, host: str, port: int, *, secret: bytes | None = None, timeout_s: float = 10.0,
                 context: Any = None, max_answer_nbytes: int = DEFAULT_MAX_ANSWER_NBYTES):
        import zmq

        self._zmq = zmq
        secret = check_secret(secret)
        self.host, self.port, self.timeout_s = host, int(port), timeout_s
        self._own_context = context is None
        self._context = zmq.Context(io_threads=1) if context is None else context
        socket = self._socket = self._context.socket(zmq.DEALER)
        socket.linger = 0
        socket.maxmsgsize = max_answer_nbytes
        socket.heartbeat_ivl, socket.heartbeat_timeout = 1000, 3000
        socket.rcvhwm = socket.sndhwm = MAX_OUTSTANDING
        if secret is not None:
            public, private = curve_keys(secret)
            socket.curve_serverkey, socket.curve_publickey, socket.curve_secretkey = public, public, private
        socket.connect(f"tcp://{host}:{int(port)}")
        self._tickets = itertools.count(1)
        self._deadlines: dict[int, tuple[float, str]] = {}  # outstanding: deadline, op
        self._replies: dict[int, Reply] = {}
        self.dropped = 0  # answers that matched no outstanding request, or were malformed

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def outstanding(self) -> int:
        """Requests sent and not yet collected."""
        return len(self._deadlines)

    def send(self, op: str, body: dict | None = None, payload: bytes = b"", *,
             timeout_s: float | None = None) -> int:
        """Send a request; returns its ticket at once (see `poll`, `wait`, `recv`).

        Raises:
            PlanError: a bad op, a body that is not a JSON object, too many outstanding.
            TransferError: the client is closed.
        """
        if self._socket is None:
            raise TransferError("The side channel client is closed.", peer=self.address)
        if not isinstance(op, str) or not op.isascii() or OP_PATTERN.fullmatch(op.encode()) is None:
            raise PlanError(f"op must be 1-32 characters of [a-z0-9_.-] starting with a letter, got {op!r}.")
        if body is not None and not isinstance(body, dict):
            raise PlanError(f"A request body must be a dict (a JSON object), got {type(body).__name__}.")
        if len(self._deadlines) >= MAX_OUTSTANDING:
            raise PlanError(f"{MAX_OUTSTANDING} requests to {self.address} are outstanding: collect "
                            f"answers (poll, recv, wait) before sending more.")
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        ticket = next(self._tickets)
        header = HEADER.pack(ticket, max(1, min(int(timeout_s * 1000), 0xFFFFFFFF)))
        try:
            encoded = encode_body(body or {})
        except (TypeError, ValueError) as error:
            raise PlanError(f"The {op!r} request body is not JSON: {error}.") from None
        frames = [b"", PROTOCOL, header, op.encode(), encoded, bytes(payload)]
        try:
            self._socket.send_multipart(frames, self._zmq.NOBLOCK, copy=len(payload) < 65536)
        except self._zmq.Again:
            raise TransferError(f"The side channel to {self.address} is not taking requests "
                                f"(its queue is full): is the src endpoint serving there?",
                                peer=self.address) from None
        self._deadlines[ticket] = (time.monotonic() + timeout_s, op)
        return ticket

    def poll(self, ticket: int) -> Reply | None:
        """The reply to `ticket` if it arrived (collected: a second poll raises), else
        None.

        Raises:
            TransferError: the ticket's deadline passed without an answer, or it is unknown.
        """
        self._drain(0)
        return self._collect(ticket)

    def wait(self, ticket: int, timeout_s: float | None = None) -> Reply:
        """Block until `ticket` is answered (up to its deadline, or `timeout_s`); raise
        `TransferError` for a refusal."""
        limit = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            reply = self._collect(ticket)  # raises once the ticket's own deadline passed
            if reply is not None:
                return self._checked(ticket, reply)
            deadline = self._deadlines[ticket][0] if limit is None else min(limit, self._deadlines[ticket][0])
            if limit is not None and time.monotonic() > limit:
                raise TransferError(f"No answer from the side channel at {self.address} within "
                                    f"{timeout_s} s (the request stays outstanding).", peer=self.address)
            self._drain(max(deadline - time.monotonic(), 0.0))

    def recv(self, timeout_s: float | None = None) -> tuple[int, Reply]:
        """The next reply of any outstanding request, `(ticket, reply)`, refusals included.

        Raises:
            TransferError: nothing outstanding, or no answer within `timeout_s` (default:
                until the earliest outstanding deadline, which then expires).
        """
        if not self._deadlines and not self._replies:
            raise TransferError("No request is outstanding on this side channel client.", peer=self.address)
        limit = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self._replies:
                ticket = next(iter(self._replies))
                del self._deadlines[ticket]
                return ticket, self._replies.pop(ticket)
            earliest = min(self._deadlines, key=lambda t: self._deadlines[t][0])
            deadline = self._deadlines[earliest][0] if limit is None else limit
            if time.monotonic() > deadline:
                if limit is not None:
                    raise TransferError(f"No answer from the side channel at {self.address} within "
                                        f"{timeout_s} s.", peer=self.address)
                self._expire(earliest)
            self._drain(max(deadline - time.monotonic(), 0.0))

    def request(self, op: str, body: dict | None = None, payload: bytes = b"", *,
                timeout_s: float | None = None) -> Reply:
        """`send` then `wait`: the ok reply, or `TransferError` (refused, or no answer)."""
        return self.wait(self.send(op, body, payload, timeout_s=timeout_s))

    def forget(self, ticket: int) -> None:
        """Stop waiting for `ticket` (its answer, if it comes, is dropped)."""
        self._deadlines.pop(ticket, None)
        self._replies.pop(ticket, None)

    def close(self) -> None:
        """Close the socket (and a private context); idempotent."""
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
            if self._own_context:
                self._context.destroy(linger=0)
        self._deadlines.clear()
        self._replies.clear()

    def __enter__(self) -> "SideChannelClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------------

    def _collect(self, ticket: int) -> Reply | None:
        if ticket in self._replies:
            del self._deadlines[ticket]
            return self._replies.pop(ticket)
        if ticket not in self._deadlines:
            raise TransferError(f"Ticket {ticket} is not outstanding on the side channel to "
                                f"{self.address} (already collected, expired, or never sent).",
                                peer=self.address)
        if time.monotonic() > self._deadlines[ticket][0]:
            self._expire(ticket)
        return None

    def _expire(self, ticket: int) -> None:
        deadline, op = self._deadlines.pop(ticket)
        raise TransferError(f"The side channel at {self.address} did not answer the {op!r} request "
                            f"in time. Is the src endpoint serving there (Endpoint.serve), reachable, "
                            f"and given the same cluster secret?", peer=self.address)

    def _checked(self, ticket: int, reply: Reply) -> Reply:
        if reply.ok:
            return reply
        raise TransferError(f"The side channel at {self.address} refused the request "
                            f"({reply.kind}): {reply.error}", peer=self.address)

    def _drain(self, wait_s: float) -> None:
        """Receive every answer that arrived (waiting up to `wait_s` for the first)."""
        zmq, socket = self._zmq, self._socket
        if socket is None:
            raise TransferError("The side channel client is closed.", peer=self.address)
        if not socket.poll(int(wait_s * 1000) if wait_s > 0 else 0, zmq.POLLIN):
            return
        while True:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            parsed = parse_answer(frames)
            if parsed is None or parsed[0] not in self._deadlines:
                self.dropped += 1
                continue
            ticket, body, payload = parsed
            try:
                answer = decode_body(body)
            except ValueError as error:
                self._replies[ticket] = Reply(False, {}, b"", "malformed", f"the answer is not a JSON object: {error}")
                continue
            ok = answer.pop("ok", None) is True
            kind, error = (None, None) if ok else (str(answer.get("kind", "refused")), str(answer.get("error", "")))
            self._replies[ticket] = Reply(ok, answer, payload, kind, error)


def fetch_handshake(client: SideChannelClient, reader: str = "", *, timeout_s: float | None = None
                    ) -> tuple[bytes, bytes | None]:
    """Ask for the src's handshake over `client`, as reader agent `reader`: returns the
    handshake bytes and the notification session id the src opened for `reader` (None if
    it gave none).

    Raises:
        TransferError: nobody answered (peer `"host:port"`).
        HandshakeError: the answer is not a handshake answer, or is too large.
    """
    try:
        reply = client.request("handshake", {"reader": reader}, timeout_s=timeout_s)
    except TransferError as error:
        raise TransferError(f"Could not fetch a handshake from {client.address}: {error.args[0]}",
                            peer=client.address) from None
    if len(reply.payload) > MAX_HANDSHAKE_NBYTES:
        raise HandshakeError(f"The endpoint at {client.address} sent a handshake of {len(reply.payload)} "
                             f"bytes, above the limit of {MAX_HANDSHAKE_NBYTES}.")
    session = reply.body.get("session")
    if session is not None:
        try:
            session = bytes.fromhex(session) if isinstance(session, str) and len(session) == 32 else None
        except ValueError:
            session = None
        if session is None:
            raise HandshakeError(f"The endpoint at {client.address} answered a malformed session id.")
    return reply.payload, session


def fetch_handshake_bytes(host: str, port: int, *, timeout_s: float = 10.0, secret: bytes | None = None) -> bytes:
    """Ask the endpoint serving at `(host, port)` for its handshake bytes (one request on
    a short-lived client).

    Raises:
        TransferError: nobody answers at that address within `timeout_s` (peer
            `"host:port"`).
        HandshakeError: the answer is larger than `MAX_HANDSHAKE_NBYTES`.
    """
    with SideChannelClient(host, port, secret=secret, timeout_s=timeout_s) as client:
        return fetch_handshake(client)[0]
