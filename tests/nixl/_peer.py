"""A src engine in its own process (started with `spawn`), which tests can also hurt:
stop, continue, kill, or make it deregister and re-use its pages.

It builds every src rank of a `_cluster.Case`, serves each handshake on loopback and
sends the addresses and agent names to the test over a pipe; then it answers commands:

- `("wait", request_ids, counts)`: wait until src rank r saw `counts[r]` notifications
  for each id; answers `("waited", [reads_done per rank for the first id])`;
- `("reregister", rank)`: deregister and re-register that rank's pages (generation +2);
  answers `("reregistered", generation)`;
- `("deregister", rank, reuse_byte)`: deregister that rank's pages; if `reuse_byte` is
  not None, then overwrite them with it, as an engine re-using freed memory would;
  answers `("deregistered", generation)`;
- `("register", rank)`: put the rank's pages back, register them again; answers
  `("registered", generation)`;
- `("notified", request_id)`: poll notifications; answers `("notified", [count per rank])`;
- `("counts",)`: poll notifications; answers `("counts", ([{request_id: count} per rank],
  notifications dropped))`;
- `("fds",)`: answers `("fds", open file descriptors of the process)`;
- `("nofile", n)`: lower the process's soft limit of open files to `n`; answers
  `("nofile", previous soft limit)`;
- `("stats",)`: answers `("stats", [side channel counters per rank])`;
- `("stop",)`: close and exit.

Only the pipe's small control messages and what NIXL and the side channel carry cross
the process boundary.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback

import numpy as np


def _on_device(memory, device: str):
    """`(memory, address, device id)` of host bytes placed on `device` ("cpu", "cuda",
    "cuda:N")."""
    if device == "cpu":
        return memory, int(memory.ctypes.data), 0
    import torch

    tensor = torch.from_numpy(memory).to(device)
    return tensor, int(tensor.data_ptr()), int(tensor.device.index or 0)


def _overwrite(memory, host) -> None:
    """Copy host bytes (a numpy array) or one byte value into numpy or torch memory."""
    if isinstance(host, int) or isinstance(memory, np.ndarray):
        memory[:] = host
    else:
        import torch

        memory.copy_(torch.from_numpy(host))


def _answer(command, endpoints, memories, host_pages) -> tuple:
    """The reply to one command (see the module docstring)."""
    kind = command[0]
    if kind == "fds":
        return "fds", len(os.listdir("/proc/self/fd"))
    if kind == "nofile":
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (command[1], hard))
        return "nofile", soft
    if kind == "stats":
        return "stats", [e.side_channel_stats for e in endpoints]
    if kind == "wait":
        _, request_ids, counts = command
        for endpoint, count in zip(endpoints, counts):
            for request_id in request_ids:
                endpoint.wait_for_reads(request_id, count, timeout_s=20)
        return "waited", [e.reads_done(request_ids[0]) for e in endpoints]
    if kind == "reregister":
        endpoints[command[1]].deregister()
        endpoints[command[1]].register()
        return "reregistered", endpoints[command[1]].generation
    if kind == "deregister":
        _, rank, reuse = command
        endpoints[rank].deregister()
        if reuse is not None:
            _overwrite(memories[rank], reuse)
        return "deregistered", endpoints[rank].generation
    if kind == "register":
        _overwrite(memories[command[1]], host_pages(command[1]))
        endpoints[command[1]].register()
        return "registered", endpoints[command[1]].generation
    for endpoint in endpoints:
        endpoint.poll_notifications()
    if kind == "notified":
        return "notified", [e.reads_done(command[1]) for e in endpoints]
    if kind == "counts":
        return "counts", ([e.reads_done_counts for e in endpoints],
                          sum(sum(e.notification_drops.values()) for e in endpoints))
    raise ValueError(f"unknown command {command!r}")


def serve_src(case, conn, device: str = "cpu", fill: str = "reference", ucx_params=None,
              secret: bytes | None = None, agent_prefix: str | None = None,
              pack_area_nbytes: int | None = None) -> None:
    """Serve every src rank of `case`. `device`: "cpu" (numpy DRAM) or "cuda" (VRAM
    tensors); `fill`: "reference" (`case.src_memory`) or "random"
    (`_cluster.random_src_memory`); `ucx_params` and `secret`: passed to every `Endpoint`;
    `agent_prefix`: agent names `{agent_prefix}-r{rank}` (default: random names);
    `pack_area_nbytes`: each endpoint's pack area (default: the Endpoint's)."""
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    if device != "cpu":
        os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")
    try:
        from ssm_split.nixl_backend import Endpoint

        from ._cluster import random_src_memory

        def host_pages(rank: int):
            return case.src_memory(rank) if fill == "reference" else random_src_memory(case, rank)

        # memory first: on a GPU the CUDA context must exist before any agent
        placed = [_on_device(host_pages(rank), device) for rank in range(case.src_tp)]
        memories = [memory for memory, _, _ in placed]
        options = {"secret": secret} if secret is not None else {}
        if pack_area_nbytes is not None:
            options["pack_area_nbytes"] = pack_area_nbytes
        endpoints = [Endpoint(case.spec, tp=case.src_tp, rank=r, memory=[m],
                              regions=case.regions("src", addr, device), ucx_params=ucx_params,
                              name=f"{agent_prefix}-r{r}" if agent_prefix else None, **options)
                     for r, (m, addr, device) in enumerate(placed)]
        conn.send(("ready", ([e.serve("127.0.0.1", 0) for e in endpoints], [e.name for e in endpoints])))
        while True:
            command = conn.recv()
            if command[0] == "stop":
                break
            conn.send(_answer(command, endpoints, memories, host_pages))
        for endpoint in endpoints:
            endpoint.close()
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    finally:
        conn.close()


def stop_process(pid: int, *, timeout_s: float = 10.0) -> None:
    """SIGSTOP `pid` and wait until every thread of it is stopped (state T in
    `/proc/<pid>/task/*/stat`). A signal is delivered asynchronously: right after `kill`
    returns, threads of the process may still serve a READ for a while."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout_s
    while not all(_thread_state(pid, task) in "Tt" for task in os.listdir(f"/proc/{pid}/task")):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} did not stop within {timeout_s} s")
        time.sleep(0.001)


def _thread_state(pid: int, task: str) -> str:
    try:
        with open(f"/proc/{pid}/task/{task}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:  # the thread exited
        return "T"


class SrcEngine:
    """The test side of `serve_src`: starts the process, talks to it, hurts it, stops it.

    Args: as `serve_src` (`case`, `device`, `fill`, `ucx_params`, `secret`, `agent_prefix`);
    `start_timeout_s` bounds start-up (building pages of large cases takes a while).

    Attributes:
        addresses: each src rank's side channel `(host, port)`.
        names: each src rank's NIXL agent name.
        proc: the process.
    """

    def __init__(self, case, device: str = "cpu", fill: str = "reference",
                 start_timeout_s: float = 120, ucx_params=None, secret: bytes | None = None,
                 agent_prefix: str | None = None, pack_area_nbytes: int | None = None):
        ctx = mp.get_context("spawn")
        self.ucx_params = ucx_params
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve_src, args=(case, child, device, fill, ucx_params, secret, agent_prefix,
                                                         pack_area_nbytes), daemon=True)
        self.proc.start()
        child.close()
        addresses, self.names = self.ask(None, "ready", timeout_s=start_timeout_s)
        self.addresses = [tuple(a) for a in addresses]

    def connect(self, reader):
        """Connect `reader` to every src rank of this engine; returns it."""
        for address in self.addresses:
            reader.connect_to(*address)
        return reader

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

    def pause(self, timeout_s: float = 10.0) -> None:
        """Stop the process (`stop_process`): alive, holding its connections, answering
        nothing."""
        stop_process(self.proc.pid, timeout_s=timeout_s)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                self.conn.send(("stop",))
            except OSError:
                pass
            self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.kill()

    def __enter__(self) -> "SrcEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def read_until_killed(case, addresses, conn, ucx_params=None) -> None:
    """A dst rank 0 of `case` in its own process: connects to the src ranks at
    `addresses`, warms up, says ("ready", None), then reads the whole batch again and
    again until it is killed. A failure is sent as ("error", traceback)."""
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    try:
        from ssm_split.nixl_backend import Endpoint, Reader

        memory = case.dst_memory()
        endpoint = Endpoint(case.spec, tp=case.dst_tp, rank=0, memory=[memory],
                            regions=case.regions("dst", memory.ctypes.data), ucx_params=ucx_params)
        reader = Reader(endpoint)
        for address in addresses:
            reader.connect_to(*address)
        reader.warm_up()
        conn.send(("ready", None))
        for count in range(1 << 30):
            reader.read(case.pairs_array, f"loop-{count}", timeout_s=30)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


def start_reader(case, addresses, ucx_params=None, timeout_s: float = 60.0):
    """`read_until_killed` in a spawned process, once it is ready: `(process, pipe)`."""
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=read_until_killed, args=(case, addresses, child, ucx_params), daemon=True)
    proc.start()
    child.close()
    if not conn.poll(timeout_s):
        proc.kill()
        raise AssertionError("the reader process did not get ready")
    kind, payload = conn.recv()
    if kind != "ready":
        proc.join(10)
        raise AssertionError(f"the reader process failed:\n{payload}")
    return proc, conn
