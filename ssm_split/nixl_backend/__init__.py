"""Execute ssm_split plans as NIXL READs between engines (DRAM or GPU VRAM, over UCX).

The backend only executes: every address comes from `ssm_split.expand_plan`.

- `Endpoint`: one engine rank's NIXL agent with its state memory registered; a src
  endpoint `serve()`s its `Handshake` over the side channel and collects read-done
  notifications (`poll_notifications`, `wait_for_reads`); a dst endpoint keeps what
  outlives its readers (loaded src agents, READs not yet settled). `secret=` turns on
  authentication (docs/reliability.md).
- `Reader`: on a dst rank, loads src handshakes (`connect_to(host, port)`), checks them,
  and reads batches of requests (`read`, `start_read`) with one of its strategies.
- `Handshake`, `decode_handshake`, `spec_fingerprint`, `fetch_handshake_bytes`: the
  versioned handshake and its transport; these need no NIXL.
- `SideChannelServer`, `SideChannelClient`, `Reply`, `RequestContext`: the side channel
  (ZeroMQ, pyzmq): a src endpoint's server answers named requests
  (`Endpoint.server.add_handler`), a reader keeps one client per src rank
  (`Reader.client(src_rank)`); need pyzmq, not NIXL.

Names are imported lazily, so `import ssm_split.nixl_backend` works without NIXL; using
`Endpoint` or `Reader` without it raises an `ImportError` that says what to install
(`pip install --no-deps nixl==1.5.1 nixl-cu13==1.5.1`; see docs/backend.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._endpoint import Endpoint as Endpoint
    from ._memory import describe_memory as describe_memory
    from ._handshake import HANDSHAKE_VERSION as HANDSHAKE_VERSION
    from ._handshake import Handshake as Handshake
    from ._handshake import decode_handshake as decode_handshake
    from ._handshake import spec_fingerprint as spec_fingerprint
    from ._pending import PendingRead as PendingRead
    from ._reader import Peer as Peer
    from ._reader import Reader as Reader
    from ._pending import ReadStats as ReadStats
    from ._sideclient import Reply as Reply
    from ._sideclient import SideChannelClient as SideChannelClient
    from ._sideclient import fetch_handshake_bytes as fetch_handshake_bytes
    from ._sidechannel import RequestContext as RequestContext
    from ._sidechannel import SideChannelServer as SideChannelServer

_LAZY = {
    "Endpoint": "._endpoint",
    "describe_memory": "._memory",
    "HANDSHAKE_VERSION": "._handshake",
    "Handshake": "._handshake",
    "decode_handshake": "._handshake",
    "spec_fingerprint": "._handshake",
    "PendingRead": "._pending",
    "Peer": "._reader",
    "Reader": "._reader",
    "ReadStats": "._pending",
    "fetch_handshake_bytes": "._sideclient",
    "Reply": "._sideclient",
    "SideChannelClient": "._sideclient",
    "RequestContext": "._sidechannel",
    "SideChannelServer": "._sidechannel",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
