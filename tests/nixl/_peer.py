"""A src engine in its own process, for two-process tests (started with `spawn`).

It builds every src rank of a `Case` from the reference model, serves each handshake on
loopback and sends the addresses to the test over a pipe; then it answers commands:

- `("wait", request_ids, counts)`: wait until src rank r saw `counts[r]` notifications
  for each id; answers `("waited", [reads_done per rank for the first id])`;
- `("reregister", rank)`: deregister and re-register that rank's pages (generation +2);
- `("stop",)`: close and exit.

Only the pipe's small control messages and what NIXL and the side channel carry cross
the process boundary.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback


def _on_device(memory, device: str):
    if device == "cpu":
        return memory, int(memory.ctypes.data)
    import torch

    tensor = torch.from_numpy(memory).to(device)
    return tensor, int(tensor.data_ptr())


def serve_src(case, conn, device: str = "cpu", fill: str = "reference", ucx_params=None) -> None:
    """Serve every src rank of `case`. `device`: "cpu" (numpy DRAM) or "cuda" (VRAM
    tensors); `fill`: "reference" (`case.src_memory`) or "random"
    (`_cluster.random_src_memory`); `ucx_params`: passed to every `Endpoint`."""
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    if device != "cpu":
        os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")
    try:
        from ssm_split.nixl_backend import Endpoint

        from ._cluster import random_src_memory

        memories = []
        for rank in range(case.src_tp):
            host = case.src_memory(rank) if fill == "reference" else random_src_memory(case, rank)
            memories.append(_on_device(host, device))  # CUDA context before any agent
        endpoints = [Endpoint(case.spec, tp=case.src_tp, rank=r, memory=[m],
                              regions=case.regions("src", addr), ucx_params=ucx_params)
                     for r, (m, addr) in enumerate(memories)]
        conn.send(("ready", [e.serve("127.0.0.1", 0) for e in endpoints]))
        while True:
            command = conn.recv()
            if command[0] == "stop":
                break
            if command[0] == "wait":
                _, request_ids, counts = command
                for endpoint, count in zip(endpoints, counts):
                    for request_id in request_ids:
                        endpoint.wait_for_reads(request_id, count, timeout_s=20)
                conn.send(("waited", [e.reads_done(request_ids[0]) for e in endpoints]))
            elif command[0] == "reregister":
                endpoints[command[1]].deregister()
                endpoints[command[1]].register()
                conn.send(("reregistered", endpoints[command[1]].generation))
        for endpoint in endpoints:
            endpoint.close()
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    finally:
        conn.close()


class SrcEngine:
    """The test side of `serve_src`: starts the process, talks to it, stops it.

    Args: as `serve_src` (`case`, `device`, `fill`, `ucx_params`); `start_timeout_s` bounds start-up
    (building pages of large cases takes a while).
    """

    def __init__(self, case, device: str = "cpu", fill: str = "reference",
                 start_timeout_s: float = 120, ucx_params=None):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve_src, args=(case, child, device, fill, ucx_params),
                                daemon=True)
        self.proc.start()
        child.close()
        self.addresses = self.ask(None, "ready", timeout_s=start_timeout_s)

    def ask(self, command, expect: str, timeout_s: float = 60):
        """Send `command` (unless None) and return the payload of the `expect` answer."""
        if command is not None:
            self.conn.send(command)
        if not self.conn.poll(timeout_s):
            raise AssertionError(f"the src process did not answer {command!r}")
        kind, payload = self.conn.recv()
        if kind == "error":
            raise AssertionError(f"the src process failed:\n{payload}")
        assert kind == expect, (kind, expect)
        return payload

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("stop",))
            except OSError:
                pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()

    def __enter__(self) -> "SrcEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
