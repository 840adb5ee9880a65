"""The side channel's wire format and the keys derived from a cluster secret.

Both ends speak ZeroMQ (pyzmq): the src serves a ROUTER socket, each reader connects a
DEALER. One request and one answer are multipart messages:

    request, DEALER -> ROUTER:  [b"", PROTOCOL, HEADER(ticket, timeout_ms), op, body, payload]
    answer,  ROUTER -> DEALER:  [b"", PROTOCOL, ticket, body, payload]

- `PROTOCOL` names the protocol and its version; a message without it is dropped.
- `ticket` is the client's 8-byte request number, echoed in the answer, so a client can
  keep several requests outstanding and match the answers.
- `timeout_ms` is how long the client waits: the server cancels the work after it.
- `op` is a short lower-case ASCII name (`OP_PATTERN`): the handler to run.
- `body` is one JSON object (UTF-8); an answer's body always holds `"ok"`, and when it
  is false also `"kind"` (why: "refused", "busy", "unknown-op", "cancelled", "failed",
  "stale", ...) and `"error"` (a sentence).
- `payload` is raw bytes (a handshake, digests), possibly empty.

Anything else (other frame counts, a missing empty delimiter, another protocol, a
header of another size, a bad op) is dropped without an answer: without a security
mechanism ZeroMQ parses arbitrary bytes as messages, so only exact envelopes count.

Cluster secret. `curve_keys(secret)` derives one CURVE key pair from a shared secret
(HMAC-SHA256 of a fixed label); every holder uses it as server and as client key, and
the server admits only clients presenting that public key. A peer without the secret
cannot complete ZeroMQ's CURVE handshake: it can send nothing, and reads nothing (the
traffic is encrypted). `notification_key` derives the key read-done notifications are
tagged with (`_notify.py`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
from typing import Any

from ..errors import PlanError

__all__ = ["PROTOCOL", "HEADER", "TICKET", "OP_PATTERN", "MAX_BODY_NBYTES", "MIN_SECRET_NBYTES",
           "check_secret", "curve_keys", "notification_key", "encode_body", "decode_body",
           "parse_request", "parse_answer"]

PROTOCOL = b"ssm-split/side-channel/1"
HEADER = struct.Struct(">QI")
"""ticket (uint64) and the client's timeout in milliseconds (uint32)."""
TICKET = struct.Struct(">Q")
OP_PATTERN = re.compile(rb"[a-z][a-z0-9_.-]{0,31}")
MAX_BODY_NBYTES = 16 << 20
"""Largest JSON body either side decodes (a pack order of 1M blocks is about 8 MB)."""
MIN_SECRET_NBYTES = 16
_CURVE_LABEL = b"ssm-split side channel curve v1"
_NOTIFY_LABEL = b"ssm-split read-done notification v2"

_SECRET_HINT = ("Pass the same secret (bytes, at least 16 of them, e.g. os.urandom(32) "
                "distributed to every engine) to every Endpoint of the cluster, or None.")


def check_secret(secret: object) -> bytes | None:
    """`secret` as bytes, or None.

    Raises:
        PlanError: not bytes, or shorter than `MIN_SECRET_NBYTES`.
    """
    if secret is None:
        return None
    if not isinstance(secret, (bytes, bytearray)):
        raise PlanError(f"secret must be bytes or None, got {type(secret).__name__}. {_SECRET_HINT}")
    if len(secret) < MIN_SECRET_NBYTES:
        raise PlanError(f"secret is {len(secret)} bytes; it needs at least {MIN_SECRET_NBYTES}. "
                        f"{_SECRET_HINT}")
    return bytes(secret)


def curve_keys(secret: bytes) -> tuple[bytes, bytes]:
    """The cluster's CURVE key pair `(public, secret)`, Z85-encoded, derived from `secret`."""
    import zmq
    from zmq.utils import z85

    private = z85.encode(hmac.new(secret, _CURVE_LABEL, hashlib.sha256).digest())
    return zmq.curve_public(private), private


def notification_key(secret: bytes | None, session: bytes, reader: str, src: str) -> bytes:
    """The key a reader tags its read-done notifications to `src` with, in `session`.

    Without a cluster secret the key follows from the session id alone, so the session id
    (handed out by the handshake) is what a peer must hold; with one, also the secret.
    """
    message = b"|".join((_NOTIFY_LABEL, session, reader.encode(), src.encode()))
    return hmac.new(secret or b"", message, hashlib.sha256).digest()


def encode_body(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def decode_body(data: bytes) -> dict:
    """A JSON object of at most `MAX_BODY_NBYTES`.

    Raises:
        ValueError: anything else (too long, not UTF-8, not JSON, not an object, too deep).
    """
    if len(data) > MAX_BODY_NBYTES:
        raise ValueError(f"a body of {len(data)} bytes exceeds {MAX_BODY_NBYTES}")
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ValueError(f"the body is not UTF-8 JSON: {type(error).__name__}") from None
    if not isinstance(value, dict):
        raise ValueError(f"the body must be a JSON object, got {type(value).__name__}")
    return value


def parse_request(frames: list[Any]) -> tuple[bytes, int, int, str, bytes, bytes] | None:
    """`(routing_id, ticket, timeout_ms, op, body, payload)` of a request as a ROUTER
    receives it (`zmq.Frame`s or bytes), or None when it is not an exact envelope."""
    if len(frames) != 7:
        return None
    routing, empty, protocol, header, op, body, payload = (_bytes(f) for f in frames)
    if empty != b"" or protocol != PROTOCOL or len(header) != HEADER.size:
        return None
    if OP_PATTERN.fullmatch(op) is None:
        return None
    ticket, timeout_ms = HEADER.unpack(header)
    return routing, ticket, timeout_ms, op.decode("ascii"), body, payload


def parse_answer(frames: list[Any]) -> tuple[int, bytes, bytes] | None:
    """`(ticket, body, payload)` of an answer as a DEALER receives it, or None."""
    if len(frames) != 5:
        return None
    empty, protocol, ticket, body, payload = (_bytes(f) for f in frames)
    if empty != b"" or protocol != PROTOCOL or len(ticket) != TICKET.size:
        return None
    return TICKET.unpack(ticket)[0], body, payload


def _bytes(frame: Any) -> bytes:
    return frame if isinstance(frame, bytes) else frame.bytes
