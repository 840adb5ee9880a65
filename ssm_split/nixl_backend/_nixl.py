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

import importlib
import importlib.util
import re
import sys
import threading
from pathlib import Path
from typing import Mapping

from ._nixl_hint import INSTALL_HINT

_CUDA_LINE = re.compile(r"^(cuda|hip)\s*(?::[^=\n]*)?=\s*(.+?)\s*$", re.MULTILINE)


def torch_build_is_cpu_only(version_py_text: str) -> bool:
    """True when torch's `version.py` text says it was built without CUDA and ROCm."""
    found = dict((m.group(1), m.group(2)) for m in _CUDA_LINE.finditer(version_py_text))
    return found.get("cuda") == "None" and found.get("hip", "None") == "None"


def _installed_torch_is_cpu_only() -> bool:
    if "torch" in sys.modules:
        return False
    try:
        spec = importlib.util.find_spec("torch")
        text = Path(spec.origin).with_name("version.py").read_text() if spec and spec.origin else ""
    except (ImportError, ValueError, OSError):
        return False
    return torch_build_is_cpu_only(text)


def _import_api():
    """NIXL's `_api` module. The `nixl` meta package picks its CUDA variant from torch,
    and with a CPU-only torch it imports all of torch to find out (seconds, in every
    process); then any installed variant will do, so import one directly."""
    if _installed_torch_is_cpu_only():
        for name in ("nixl_cu13", "nixl_cu12"):
            try:
                found = importlib.util.find_spec(name) is not None
            except (ImportError, ValueError):
                found = False
            if found:
                return importlib.import_module(f"{name}._api")
    return importlib.import_module("nixl._api")


try:
    _api = _import_api()
except ImportError as error:  # pragma: no cover - exercised only without nixl
    raise ImportError(f"{INSTALL_HINT} (import failed: {error})") from error
nixl_agent, nixl_agent_config = _api.nixl_agent, _api.nixl_agent_config

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
