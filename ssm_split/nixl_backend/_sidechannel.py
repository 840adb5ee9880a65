"""A small TCP side channel over which a src endpoint hands out its handshake.

NIXL's own metadata exchange moves NIXL agent metadata only; readers also need the spec,
TP, rank and page regions, so the src serves its whole handshake (which embeds the agent
metadata) here. It works the same on loopback and across hosts: bind to the address the
readers can reach (`127.0.0.1` when every engine runs on one machine).

Protocol, one exchange per connection::

    reader -> src : b"SSMSPLIT HANDSHAKE 1\\n"
    src -> reader : 8-byte big-endian length, then that many bytes of handshake

Other 21-byte request lines go to the `handlers` the server was given (integrity mode
adds `b"SSMSPLIT INTEGRITY 1\\n"`, see `_guard.py`); anything else is closed
without an answer. Each connection is served on its own thread, so a reader that
connects and stays silent delays nobody else.

Nothing is shared between processes but these bytes.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Callable, Mapping

from ..errors import HandshakeError, TransferError
from ._handshake import MAX_HANDSHAKE_NBYTES

__all__ = ["REQUEST", "SideChannelServer", "fetch_handshake_bytes", "recv_exact"]

REQUEST = b"SSMSPLIT HANDSHAKE 1\n"
_LENGTH = struct.Struct(">Q")


class SideChannelServer:
    """Serves `provider()` (the current handshake bytes) to every reader that asks.

    Args:
        provider: returns the bytes to send; called once per request, so a re-registered
            endpoint serves its new handshake.
        host: address to bind (`"127.0.0.1"` for one machine, `"0.0.0.0"` for all
            interfaces).
        port: TCP port; 0 picks a free one (see `address`).
        handlers: other request lines (`len(REQUEST)` bytes each) and the function that
            answers them, called with the connected socket (after the request line).
    """

    def __init__(self, provider: Callable[[], bytes], host: str = "127.0.0.1", port: int = 0,
                 handlers: Mapping[bytes, Callable[[socket.socket], None]] | None = None):
        self._provider = provider
        self._handlers = dict(handlers or {})
        self._closed = threading.Event()
        self._sock = socket.create_server((host, port), backlog=64)
        self._sock.settimeout(0.1)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._thread = threading.Thread(target=self._serve, name=f"ssm-split-sidechannel-{self.address[1]}",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return  # closed
            threading.Thread(target=self._answer, args=(conn,), daemon=True,
                             name=f"ssm-split-sidechannel-{self.address[1]}-conn").start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(5.0)
                request = recv_exact(conn, len(REQUEST))
                if request == REQUEST:
                    payload = self._provider()
                    conn.sendall(_LENGTH.pack(len(payload)) + payload)
                elif request in self._handlers:
                    self._handlers[request](conn)
            except (OSError, ConnectionError, EOFError):
                pass

    def close(self) -> None:
        """Stop serving; idempotent."""
        if not self._closed.is_set():
            self._closed.set()
            self._sock.close()
            self._thread.join(timeout=2.0)


def recv_exact(conn: socket.socket, nbytes: int) -> bytes:
    chunks, left = [], nbytes
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed with {left} of {nbytes} bytes missing")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def fetch_handshake_bytes(host: str, port: int, *, timeout_s: float = 10.0) -> bytes:
    """Ask the endpoint serving at `(host, port)` for its handshake bytes.

    Raises:
        TransferError: nobody answers at that address within `timeout_s` (peer
            `"host:port"`).
        HandshakeError: the answer is cut short or longer than `MAX_HANDSHAKE_NBYTES`.
    """
    peer = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            conn.settimeout(timeout_s)
            conn.sendall(REQUEST)
            (length,) = _LENGTH.unpack(recv_exact(conn, _LENGTH.size))
            if length > MAX_HANDSHAKE_NBYTES:
                raise HandshakeError(f"The endpoint at {peer} announced a handshake of {length} "
                                     f"bytes, above the limit of {MAX_HANDSHAKE_NBYTES}.")
            return recv_exact(conn, length)
    except EOFError as error:
        raise HandshakeError(f"The endpoint at {peer} sent a truncated handshake: {error}.") from None
    except OSError as error:
        raise TransferError(f"Could not fetch a handshake from {peer}: {error}. Is the src "
                            f"endpoint serving there (Endpoint.serve), and reachable?",
                            peer=peer) from None
