"""A src engine in its own process that tests can hurt: stop, kill, or make it
deregister and re-use its pages (started with `spawn`).

It serves every src rank of a `_cluster.Case` (reference pages) on loopback and answers
commands over a pipe:

- `("deregister", rank, reuse_byte)`: deregister that rank's pages; if `reuse_byte` is
  not None, then overwrite them with it, as an engine re-using freed memory would;
  answers `("deregistered", generation)`;
- `("register", rank)`: put the reference pages back, register them again; answers
  `("registered", generation)`;
- `("notified", request_id)`: poll notifications; answers `("notified", [count per rank])`;
- `("counts",)`: poll notifications; answers `("counts", [{request_id: count} per rank,
  foreign notifications])`;
- `("stop",)`: close and exit.

Only the pipe's control messages, NIXL and the side channel cross the process boundary.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback


def serve_faulty(case, conn, ucx_params=None) -> None:
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    try:
        from ssm_split.nixl_backend import Endpoint

        memories = [case.src_memory(rank) for rank in range(case.src_tp)]
        endpoints = [Endpoint(case.spec, tp=case.src_tp, rank=rank, memory=[memory],
                              regions=case.regions("src", memory.ctypes.data), ucx_params=ucx_params)
                     for rank, memory in enumerate(memories)]
        conn.send(("ready", ([e.serve("127.0.0.1", 0) for e in endpoints], [e.name for e in endpoints])))
        while True:
            command = conn.recv()
            if command[0] == "stop":
                break
            if command[0] == "deregister":
                _, rank, reuse = command
                endpoints[rank].deregister()
                if reuse is not None:
                    memories[rank][:] = reuse
                conn.send(("deregistered", endpoints[rank].generation))
            elif command[0] == "register":
                memories[command[1]][:] = case.src_memory(command[1])
                endpoints[command[1]].register()
                conn.send(("registered", endpoints[command[1]].generation))
            elif command[0] == "notified":
                for endpoint in endpoints:
                    endpoint.poll_notifications()
                conn.send(("notified", [e.reads_done(command[1]) for e in endpoints]))
            elif command[0] == "counts":
                for endpoint in endpoints:
                    endpoint.poll_notifications()
                conn.send(("counts", ([dict(e._reads_done) for e in endpoints],
                                      sum(len(e.foreign_notifications) for e in endpoints))))
        for endpoint in endpoints:
            endpoint.close()
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    finally:
        conn.close()


class FaultySrc:
    """The test side: start the process, send commands, stop / continue / kill it.

    Attributes:
        addresses: each src rank's side channel `(host, port)`.
        names: each src rank's NIXL agent name.
    """

    def __init__(self, case, *, ucx_params=None, start_timeout_s: float = 120):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve_faulty, args=(case, child, ucx_params), daemon=True)
        self.proc.start()
        child.close()
        self.addresses, self.names = self.ask(None, "ready", timeout_s=start_timeout_s)
        self.addresses = [tuple(a) for a in self.addresses]

    def ask(self, command, expect: str, timeout_s: float = 60):
        if command is not None:
            self.conn.send(command)
        if not self.conn.poll(timeout_s):
            raise AssertionError(f"the src process did not answer {command!r}")
        kind, payload = self.conn.recv()
        if kind == "error":
            raise AssertionError(f"the src process failed:\n{payload}")
        assert kind == expect, (kind, expect)
        return payload

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def pause(self, timeout_s: float = 10.0) -> None:
        """SIGSTOP the process and wait until every thread of it has stopped (a signal is
        delivered asynchronously: right after `kill`, threads may still serve a READ)."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + timeout_s
        while not all(_thread_state(self.proc.pid, task) in "Tt"
                      for task in os.listdir(f"/proc/{self.proc.pid}/task")):
            if time.monotonic() > deadline:
                raise AssertionError("the src process did not stop")
            time.sleep(0.001)

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

    def __enter__(self) -> "FaultySrc":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _thread_state(pid: int, task: str) -> str:
    try:
        with open(f"/proc/{pid}/task/{task}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:  # the thread exited
        return "T"
