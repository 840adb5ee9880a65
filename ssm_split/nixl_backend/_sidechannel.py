"""The side channel's server: a ZeroMQ ROUTER socket that answers named requests.

A src endpoint serves its handshake here (op `"handshake"`), integrity digests
(`"digests"`, `"pieces"`, see `_integrity_src.py`), and whatever other handlers are
registered. The wire format is in `_wire.py`; the client is `_sideclient.py`.

    server = SideChannelServer("127.0.0.1", 0, secret=None)
    server.add_handler("pack", pack)           # pack(request, payload, context) -> (answer, payload)
    host, port = server.address
    ...
    server.close()

A handler is called with the request's JSON object, its payload bytes and a
`RequestContext`, and returns `(answer: dict, payload: bytes)`; the client receives
`{"ok": true, **answer}` and the payload. A handler refuses by returning an answer with
`"ok": false, "kind": ..., "error": ...`, or by raising: `ValueError`, `TypeError`,
`LookupError` (`KeyError`, `IndexError`) and `SsmSplitError` are answered `{"ok": false, "kind":
"refused", "error": "<type>: <message>"}`; `TimeoutError` (see `RequestContext.check`)
`"cancelled"`; any other exception `"failed"`. Nothing a handler does stops the server.

How it stays up and bounded, whatever peers do:

- one libzmq I/O thread and one Python thread own the socket; handlers registered with
  `inline=True` (the handshake) run on that thread and must be quick; others run on a
  pool of `workers` threads;
- at most `max_pending` requests are queued or running at once, `max_per_connection`
  per client connection and `max_per_host` per client IP address; beyond that a request
  is answered `"busy"` at once (the client may retry);
- a request's work is cancelled (`RequestContext.cancelled`) when its client
  disconnects and when the client's timeout (at most `max_work_s`) passed;
- frames above `max_request_nbytes` make libzmq drop the connection before buffering
  them; connections that do not finish the ZeroMQ greeting within 2 s are dropped;
  heartbeats drop dead peers; inexact envelopes are dropped (`stats["malformed"]`);
- when the process runs out of file descriptors, libzmq keeps retrying accepts and
  serves again as soon as descriptors are free (connections dropped by the greeting
  timeout free them);
- with a cluster `secret`, CURVE authenticates and encrypts every connection; peers
  without the secret are refused before any message is read (`stats["auth_refused"]`,
  `stats["handshake_failed"]`).

Each server owns its ZeroMQ context (never `zmq.Context.instance()`): the authentication
handler is bound per context, so any number of servers can live in one process.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from ..errors import PlanError, TransferError
from ._request import Handler, RequestContext, refusal as _refusal, run_handler as _run
from ._wire import OP_PATTERN, PROTOCOL, TICKET, check_secret, curve_keys, decode_body, encode_body, parse_request

__all__ = ["SideChannelServer", "RequestContext", "Handler"]

_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_MAX_FRAMES = 7


class SideChannelServer:
    """A ROUTER socket serving registered handlers (see the module docstring).

    Args:
        host: address to bind (`"127.0.0.1"` for one machine, `"0.0.0.0"` for all).
        port: TCP port; 0 picks a free one (`address`).
        secret: the cluster secret (bytes, >= 16), or None for no authentication.
        workers: threads running non-inline handlers.
        max_pending, max_per_connection, max_per_host: caps on requests queued or running
            (all, per client connection, per client IP address).
        max_request_nbytes: largest frame accepted from a client.
        max_work_s: longest a request may run, whatever the client's timeout.

    Raises:
        TransferError: the address cannot be bound.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, secret: bytes | None = None,
                 workers: int = 2, max_pending: int = 32, max_per_connection: int = 4,
                 max_per_host: int = 16, max_request_nbytes: int = 16 << 20, max_work_s: float = 30.0):
        import zmq

        self._zmq = zmq
        secret = check_secret(secret)
        self._caps = (max_pending, max_per_connection, max_per_host)
        self.max_work_s = max_work_s
        self._handlers: dict[str, tuple[Handler, bool]] = {}
        self._stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self._context = zmq.Context(io_threads=1)
        self._closing = threading.Event()
        self._zap = self._allowed_key = None
        try:
            self._router = self._bind(host, port, secret, max_request_nbytes)
        except zmq.ZMQError as error:
            self._context.destroy(linger=0)
            raise TransferError(f"The side channel could not bind {host}:{port}: {error}. Pick a "
                                f"free port (0 picks one) and an address of this host.", peer=f"{host}:{port}") from None
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="ssm-split-sc-work")
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._jobs: dict[int, tuple[bytes, int, str, RequestContext]] = {}
        self._count_connection: Counter[tuple] = Counter()
        self._count_host: Counter[str] = Counter()
        self._epochs: Counter[int] = Counter()  # fd -> accepts seen (fds are reused)
        self._next_job = 0
        self._thread = threading.Thread(target=self._loop, name=f"ssm-split-sc-{self.address[1]}", daemon=True)
        self._thread.start()

    def _bind(self, host: str, port: int, secret: bytes | None, max_request_nbytes: int):
        zmq = self._zmq
        router = self._context.socket(zmq.ROUTER)
        router.linger = 0
        router.maxmsgsize = max_request_nbytes
        router.handshake_ivl = 2000  # a connection silent in the greeting is dropped
        router.heartbeat_ivl, router.heartbeat_timeout = 1000, 3000
        router.sndhwm = router.rcvhwm = 1000
        router.backlog = 256
        router.setsockopt(zmq.TCP_KEEPALIVE, 1)
        if secret is not None:
            self._allowed_key, private = curve_keys(secret)
            self._zap = self._context.socket(zmq.REP)
            self._zap.linger = 0
            self._zap.bind(_ZAP_ENDPOINT)  # before the ROUTER accepts anyone
            router.curve_server = True
            router.curve_secretkey = private
            router.zap_domain = b"ssm-split"
            router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        # not ACCEPT_FAILED: millions of them while the process is out of descriptors
        self._monitor = router.get_monitor_socket(
            zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        if port == 0:
            port = router.bind_to_random_port(f"tcp://{host}")
        else:
            router.bind(f"tcp://{host}:{port}")
        self.address: tuple[str, int] = (host, port)
        return router

    # --- public -------------------------------------------------------------------------

    def add_handler(self, op: str, handler: Handler, *, inline: bool = False) -> None:
        """Answer requests named `op` with `handler(request, payload, context)`.

        `inline=True` runs it on the server's own thread: only for quick work that must
        not wait for a worker (the handshake). Registering an op again replaces it. Long
        handlers call `context.check()` often: it stops them once their client left or
        gave up, and `close()` waits for running handlers.

        Raises:
            PlanError: `op` is not 1-32 lower-case ASCII letters, digits, `_`, `.` or `-`
                starting with a letter.
        """
        if not isinstance(op, str) or not op.isascii() or OP_PATTERN.fullmatch(op.encode()) is None:
            raise PlanError(f"A side channel op must be 1-32 characters of [a-z0-9_.-] starting "
                            f"with a letter, e.g. 'pack'; got {op!r}.")
        if not callable(handler):
            raise PlanError(f"The handler of op {op!r} must be callable, got {type(handler).__name__}.")
        self._handlers[op] = (handler, inline)

    @property
    def stats(self) -> dict[str, int]:
        """Counters: requests, answered, malformed, busy, unknown_op, refused, failed,
        cancelled, accepted, disconnected, auth_ok, auth_refused, handshake_failed, ..."""
        with self._stats_lock:
            return dict(self._stats)

    def close(self) -> None:
        """Stop serving, cancel running work; idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._wake()
        self._thread.join(timeout=5.0)
        for *_, context in list(self._jobs.values()):
            context.cancelled.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        try:
            self._router.disable_monitor()
        except self._zmq.ZMQError:
            pass
        self._context.destroy(linger=0)
        os.close(self._wake_r)
        os.close(self._wake_w)

    # --- the server's thread ------------------------------------------------------------

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[key] += n

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or closing

    def _loop(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        for item in (self._router, self._monitor, self._wake_r) + ((self._zap,) if self._zap else ()):
            poller.register(item, zmq.POLLIN)
        while not self._closing.is_set():
            try:
                ready = dict(poller.poll(100))
                self._drain_monitor()  # an ACCEPTED event arrives before that peer's messages
                if self._zap is not None and self._zap in ready:
                    self._serve_zap()
                if self._wake_r in ready:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                self._send_finished()
                if self._router in ready:
                    for _ in range(256):  # then look at the other sockets again
                        frames = self._recv()
                        if frames is None:
                            break
                        self._handle(frames)
                self._expire()
            except zmq.ZMQError:
                if self._closing.is_set():
                    return
                self._count("loop_errors")
                time.sleep(0.01)
            except Exception:  # never let the thread die  # noqa: BLE001
                self._count("loop_errors")
                time.sleep(0.01)

    def _recv(self) -> list | None:
        """One message, keeping at most `_MAX_FRAMES` frames (the rest is read and dropped)."""
        zmq, router = self._zmq, self._router
        try:
            frames = [router.recv(zmq.NOBLOCK, copy=False)]
        except zmq.Again:
            return None
        while router.getsockopt(zmq.RCVMORE):
            frame = router.recv(copy=False)
            if len(frames) <= _MAX_FRAMES:
                frames.append(frame)
        return frames

    def _drain_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        zmq = self._zmq
        for _ in range(10000):
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, fd = event["event"], event["value"]
            if kind == zmq.EVENT_ACCEPTED:
                self._epochs[fd] += 1
                self._count("accepted")
            elif kind == zmq.EVENT_DISCONNECTED:
                self._count("disconnected")
                for *_, context in self._jobs.values():
                    if context.connection == (fd, self._epochs[fd]):
                        context.cancelled.set()
                        self._count("cancelled_peer_left")
            else:
                self._count("handshake_failed")

    def _serve_zap(self) -> None:
        from zmq.utils import z85

        zmq = self._zmq
        for _ in range(1000):
            try:
                request = self._zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(request) < 6:
                continue
            version, request_id, mechanism = request[0], request[1], request[5]
            ok = mechanism == b"CURVE" and len(request) > 6 and z85.encode(request[6]) == self._allowed_key
            self._count("auth_ok" if ok else "auth_refused")
            self._zap.send_multipart([version, request_id, b"200" if ok else b"400",
                                      b"OK" if ok else b"not a member of this cluster", b"", b""])

    def _answer(self, routing: bytes, ticket: int, answer: dict, payload: bytes = b"") -> None:
        try:
            body = encode_body(answer)
        except (TypeError, ValueError) as error:
            answer, payload = _refusal("failed", f"the answer is not JSON: {error}"), b""
            body = encode_body(answer)
        self._count("answered" if answer.get("ok") else str(answer.get("kind", "refused")).replace("-", "_"))
        try:
            self._router.send_multipart([routing, b"", PROTOCOL, TICKET.pack(ticket), body, payload],
                                        self._zmq.NOBLOCK, copy=len(payload) < 65536)
        except self._zmq.ZMQError:
            self._count("send_dropped")  # the client's queue is full, or it left

    def _handle(self, frames: list) -> None:
        self._count("requests")
        parsed = parse_request(frames)
        if parsed is None:
            self._count("malformed")
            return
        routing, ticket, timeout_ms, op, body, payload = parsed
        entry = self._handlers.get(op)
        if entry is None:
            self._answer(routing, ticket, _refusal("unknown-op", f"this server has no op {op!r} "
                                                   f"(it has {sorted(self._handlers)})"))
            return
        try:
            request = decode_body(body)
        except ValueError as error:
            self._answer(routing, ticket, _refusal("refused", str(error)))
            return
        last = frames[-1]
        host = _meta(last, "Peer-Address")
        fd = _meta(last, self._zmq.SRCFD)
        deadline = time.monotonic() + min(timeout_ms / 1000.0, self.max_work_s)
        context = RequestContext(op, str(host), deadline, (fd, self._epochs[fd]))
        handler, inline = entry
        if inline:
            self._answer(routing, ticket, *_run(handler, request, payload, context))
            return
        max_pending, max_per_connection, max_per_host = self._caps
        connection = context.connection
        if (len(self._jobs) >= max_pending or self._count_connection[connection] >= max_per_connection
                or self._count_host[context.peer_address] >= max_per_host):
            self._answer(routing, ticket, _refusal("busy", f"too many requests in flight (at most "
                                                   f"{max_per_connection} per connection, "
                                                   f"{max_per_host} per host, {max_pending} in all); "
                                                   f"retry later"))
            return
        self._next_job += 1
        job = self._next_job
        self._jobs[job] = (routing, ticket, context.peer_address, context)
        self._count_connection[connection] += 1
        self._count_host[context.peer_address] += 1
        self._pool.submit(self._work, job, handler, request, payload, context)

    def _work(self, job: int, handler: Handler, request: dict, payload: bytes,
              context: RequestContext) -> None:
        self._done.put((job, *_run(handler, request, payload, context)))
        self._wake()

    def _send_finished(self) -> None:
        while True:
            try:
                job, answer, payload = self._done.get_nowait()
            except queue.Empty:
                return
            routing, ticket, host, context = self._jobs.pop(job)
            self._count_connection[context.connection] -= 1
            if not self._count_connection[context.connection]:
                del self._count_connection[context.connection]
            self._count_host[host] -= 1
            if not self._count_host[host]:
                del self._count_host[host]
            if context.cancelled.is_set() and time.monotonic() <= context.deadline:
                self._count("cancelled")  # the client left: nobody to answer
                continue
            self._answer(routing, ticket, answer, payload)

    def _expire(self) -> None:
        now = time.monotonic()
        for *_, context in self._jobs.values():
            if now > context.deadline:
                context.cancelled.set()


def _meta(frame, key):
    try:
        return frame.get(key)
    except Exception:  # noqa: BLE001 - a frame without that property
        return None
