"""The one place that imports NIXL, with an actionable error when it is missing, and
builds agents.

NIXL 1.5.1's `nixl_agent` always starts its progress thread with a delay of 0 us
between polls: an idle agent then keeps about 2/3 of a core busy (measured on a 2-core
VM), which slows everything else on small machines, transfers included. `make_agent`
keeps the progress thread (it serves remote requests while this process is busy
elsewhere) but lets it sleep `progress_delay_us` between polls. Our own polling
(`check_xfer_state`, `get_new_notifs`) progresses the worker too, so completions are
seen without waiting for the thread.
"""

from __future__ import annotations

import threading
from typing import Mapping

from ._nixl_hint import INSTALL_HINT

try:
    import nixl._api as _api
    from nixl._api import nixl_agent, nixl_agent_config
except ImportError as error:  # pragma: no cover - exercised only without nixl
    raise ImportError(f"{INSTALL_HINT} (import failed: {error})") from error

__all__ = ["nixl_agent", "nixl_agent_config", "make_agent", "INSTALL_HINT"]

_LOCK = threading.Lock()


def _config_class(progress_delay_us: int):
    base = _api.nixlBind.nixlAgentConfig
    field = base.pthrDelay

    class _Config(base):  # nixl_agent sets pthrDelay = 0; store ours instead
        pthrDelay = property(field.__get__, lambda self, _value: field.__set__(self, progress_delay_us))

    return _Config


def make_agent(name: str, *, num_threads: int = 0, progress_delay_us: int = 100,
               ucx_params: Mapping[str, str] | None = None):
    """A NIXL agent with a UCX backend and a progress thread polling every
    `progress_delay_us` microseconds (0: NIXL's busy loop). `ucx_params` are extra UCX
    backend parameters, e.g. `{"engine_config": "TLS=tcp"}` or `{"num_workers": "2"}`.

    Raises:
        Exception: NIXL's own errors (they derive from Exception) if UCX cannot start.
    """
    config = nixl_agent_config(enable_prog_thread=True, backends=[])
    with _LOCK:  # nixl_agent reads the config class from its bindings module
        original = _api.nixlBind.nixlAgentConfig
        if progress_delay_us:
            _api.nixlBind.nixlAgentConfig = _config_class(progress_delay_us)
        try:
            agent = nixl_agent(name, config)
        finally:
            _api.nixlBind.nixlAgentConfig = original
    params = dict(ucx_params or {})
    if num_threads:
        params["num_threads"] = str(num_threads)
    agent.create_backend("UCX", params)
    return agent
