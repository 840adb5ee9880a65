"""A side channel request as its handler sees it, and how a handler's outcome becomes an
answer (`_sidechannel.py` describes the protocol).

A handler is `handler(request: dict, payload: bytes, context: RequestContext) ->
(answer: dict, payload: bytes)`. What it returns is sent as `{"ok": true, **answer}`
unless the answer itself says `"ok": false`. What it raises is answered, never
propagated: `ValueError`, `TypeError`, `LookupError` (bad input) and `SsmSplitError` as
kind "refused", `TimeoutError` (`RequestContext.check`) as "cancelled", anything else as
"failed"; the error text is `"<exception type>: <message>"`.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from ..errors import SsmSplitError

__all__ = ["RequestContext", "Handler", "refusal", "run_handler"]

_REFUSALS = (ValueError, TypeError, LookupError, SsmSplitError)


class RequestContext:
    """What a handler knows about the request it answers.

    Attributes:
        op: the request's op.
        peer_address: the client's IP address as libzmq reports it (e.g. "127.0.0.1").
        deadline: `time.monotonic()` after which the client no longer waits.
        cancelled: a `threading.Event` set when the client disconnected, its deadline
            passed, or the server closes; long handlers check it (`check()`).
        connection: an opaque id of the client's connection.
    """

    __slots__ = ("op", "peer_address", "deadline", "cancelled", "connection")

    def __init__(self, op: str, peer_address: str, deadline: float, connection: tuple):
        self.op, self.peer_address, self.deadline = op, peer_address, deadline
        self.cancelled = threading.Event()
        self.connection = connection

    def check(self) -> None:
        """Raise `TimeoutError` if the work is no longer wanted."""
        if self.cancelled.is_set() or time.monotonic() > self.deadline:
            self.cancelled.set()
            raise TimeoutError(f"the {self.op!r} request was cancelled: its client left or stopped waiting")


Handler = Callable[[dict, bytes, RequestContext], "tuple[dict, bytes]"]


def refusal(kind: str, error: str) -> dict:
    return {"ok": False, "kind": kind, "error": error}


def run_handler(handler: Handler, request: dict, payload: bytes, context: RequestContext) -> tuple[dict, bytes]:
    """Call a handler; every exception becomes a refusal, never a crash."""
    try:
        context.check()
        result = handler(request, payload, context)
        if (not isinstance(result, tuple) or len(result) != 2 or not isinstance(result[0], dict)
                or not isinstance(result[1], (bytes, bytearray, memoryview))):
            return refusal("failed", f"the {context.op!r} handler returned {type(result).__name__}, "
                                      f"not (dict, bytes)"), b""
        answer, payload = result
        if answer.get("ok", True) is not False:
            answer = {**answer, "ok": True}
        return answer, bytes(payload) if isinstance(payload, memoryview) else payload
    except TimeoutError as error:
        return refusal("cancelled", str(error)), b""
    except _REFUSALS as error:
        return refusal("refused", f"{type(error).__name__}: {error}"), b""
    except Exception as error:  # noqa: BLE001 - a handler's bug must not stop the server
        return refusal("failed", f"{type(error).__name__}: {error}"), b""
