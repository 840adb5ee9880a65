"""UCX settings every endpoint applies, and the error a refused transport gives.

Emulated READs. UCX's tcp transport has no zero-copy GET, so a READ over it is emulated
in software: the reader sends GET requests and the src's UCX worker answers each one
(`ucp_get_req_handler`). If the reader dies meanwhile, the src's reply fails with
"Endpoint timeout" and UCX aborts the whole src process (`ucs_fatal`, SIGABRT): measured
in 9 of 9 runs, after 1-7 reader kills, whatever the error-handling mode, keepalive or
rendezvous setting; the reader alone decides to emulate, so a src cannot protect itself.
Zero-copy transports (cma between processes of one host, rc/dc over InfiniBand,
cuda_ipc between GPUs) leave the src passive: 60 of 60 reader kills over cma left it
serving.

So every endpoint's agent is created with UCX's `PROTO_EMULATION_ENABLE=n` (through the
backend's `engine_config`, which a `UCX_PROTO_EMULATION_ENABLE` environment variable
overrides, as does a `PROTO_EMULATION_ENABLE=` in the caller's own `engine_config`). A
READ without a zero-copy path then fails when posted (NIXL reports it as a remote
disconnect, UCX logs "No zero-copy protocol found"), and `Reader.warm_up` says why
(`emulation_refused_message`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from ..errors import HandshakeError, TransferError
from ._sideclient import fetch_handshake

__all__ = ["EMULATION_KEY", "VRAM_NUM_THREADS", "VRAM_SPLIT_BATCH_SIZE", "agent_settings",
           "ucx_params_with_guard", "emulation_refused_message", "explain_refused_read"]

EMULATION_KEY = "PROTO_EMULATION_ENABLE"
VRAM_NUM_THREADS = 4
"""UCX worker threads an endpoint of VRAM pages gets unless told otherwise."""
VRAM_SPLIT_BATCH_SIZE = 1
"""UCX `split_batch_size` of VRAM endpoints with worker threads: every READ is spread over
the threads, however few descriptors it has. One 1 GiB READ between two H200s: 382-388
GB/s (99-100% of torch's copy) against 267 GB/s with UCX's default of 1024
(benchmarks/results/nixl-ceiling-h200x2.json)."""

_TRUE = ("y", "yes", "on", "1", "true")


def ucx_params_with_guard(ucx_params: Mapping[str, str] | None) -> tuple[dict[str, str], bool]:
    """The UCX backend parameters to create an agent with, and whether that agent may
    emulate READs (True only where the user asked for it)."""
    params = {str(k): str(v) for k, v in (ucx_params or {}).items()}
    config = params.get("engine_config", "")
    user = [item.split("=", 1)[1].strip().lower() for item in config.split(",")
            if item.split("=", 1)[0].strip() == EMULATION_KEY and "=" in item]
    env = os.environ.get(f"UCX_{EMULATION_KEY}")
    if env is not None:  # NIXL lets the environment win over engine_config
        return params, env.strip().lower() in _TRUE
    if user:
        return params, user[-1] in _TRUE
    params["engine_config"] = f"{EMULATION_KEY}=n" + (f",{config}" if config else "")
    return params, False


def emulation_refused_message(rank: int, peer: str, error: BaseException) -> str:
    """Why a first READ to src rank `rank` failed when the endpoint refuses emulated READs."""
    return (f"Could not READ from src rank {rank} ({peer!r}): {type(error).__name__}: {error}. The src "
            f"answers on its side channel, so it is alive: UCX has no zero-copy READ path to it. "
            f"ssm_split refuses READs that UCX can only emulate in software (UCX_TLS or "
            f"engine_config 'TLS=tcp' on either side, or cma not allowed between the two processes): "
            f"with an emulated READ, a reader that dies mid-READ makes UCX abort the src process "
            f"('Endpoint timeout'). Fix: give both engines a zero-copy transport (leave UCX_TLS "
            f"unset, or include cma on one host; rc/dc over InfiniBand, cuda_ipc for GPUs across "
            f"processes), or accept the risk by setting UCX_PROTO_EMULATION_ENABLE=y in the "
            f"reader's environment (docs/reliability.md).")


def explain_refused_read(client: Any, rank: int, peer: str, error: TransferError) -> None:
    """After a READ to src rank `rank` failed: if it failed as a refused emulated READ does
    (a remote disconnect when posted) while the src still answers its side channel
    (`client`), raise the `TransferError` that says so; else return."""
    cause = error.__cause__
    if type(cause).__name__ != "nixlRemoteDisconnectError" or "Could not post" not in str(error):
        return
    try:
        fetch_handshake(client, timeout_s=1.0)
    except (TransferError, HandshakeError):
        return  # the src is gone indeed
    raise TransferError(emulation_refused_message(rank, peer, cause), request=error.request,
                        peer=peer) from cause


def agent_settings(mem_type: str, num_threads: int | None, ucx_params: Mapping[str, str] | None
                   ) -> tuple[int, dict[str, str], bool]:
    """`(num_threads, UCX backend parameters, emulated READs allowed)` of a new agent."""
    if mem_type == "VRAM":
        # Without it UCX emulates VRAM READs over TCP (~0.4 GB/s instead of ~1 TB/s), which
        # the guard refuses; UCX reads it when the agent's backend starts. A value the user
        # set wins.
        os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")
    if num_threads is None:
        num_threads = VRAM_NUM_THREADS if mem_type == "VRAM" else 0
    params, emulated = ucx_params_with_guard(ucx_params)
    if mem_type == "VRAM" and num_threads:
        params.setdefault("split_batch_size", str(VRAM_SPLIT_BATCH_SIZE))
    return num_threads, params, emulated

