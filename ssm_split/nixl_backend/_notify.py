"""The read-done notification a reader sends each src rank it read a batch from.

Wire form: `NOTIF_PREFIX` followed by a JSON list of request ids (UTF-8). A src endpoint
counts each id toward `Endpoint.reads_done`; messages that do not parse are kept aside as
foreign notifications, never counted.
"""

from __future__ import annotations

import json
from typing import Sequence

__all__ = ["NOTIF_PREFIX", "encode_notification", "parse_notification"]

NOTIF_PREFIX = b"ssm-split/1 "


def encode_notification(request_ids: Sequence[str]) -> bytes:
    """The notification a reader sends when it has read `request_ids`."""
    return NOTIF_PREFIX + json.dumps(list(request_ids), separators=(",", ":")).encode()


def parse_notification(message: bytes) -> tuple[str, ...] | None:
    """The request ids of a read-done notification, or None if `message` is not one."""
    if not message.startswith(NOTIF_PREFIX):
        return None
    try:
        ids = json.loads(message[len(NOTIF_PREFIX):].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        return None
    return tuple(ids)
