"""Floods, junk and descriptor exhaustion never stop the side channel from serving real
readers (issue 13, finding 4). The src engine runs in its own process; /proc tells its
threads and memory.

Before the fix the side channel was one thread per connection: 2000 silent clients made
2002 threads and +154 MB, and running out of file descriptors ended its accept loop for
good (every later handshake fetch timed out, even after the flood). Now one ROUTER
socket serves everyone on one libzmq I/O thread and one Python thread: silent
connections are dropped after the 2 s greeting timeout, oversized frames drop their
connection, junk envelopes are dropped, and accepts resume once descriptors are free.
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest
import zmq

pytest.importorskip("nixl")

from ssm_split import Mamba2Spec  # noqa: E402
from ssm_split.nixl_backend import Endpoint, Reader, fetch_handshake_bytes  # noqa: E402
from ssm_split.nixl_backend._wire import HEADER, PROTOCOL  # noqa: E402

from ._cluster import Case, first_difference  # noqa: E402
from ._peer import SrcEngine  # noqa: E402

pytestmark = pytest.mark.nixl

CASE = Case(Mamba2Spec(num_heads=8, head_dim=4, num_groups=1, state_size=8), 1, 1, num_blocks=6,
            pairs=((5, 0), (1, 3), (2, 4)))
SILENT, JUNK, OVERSIZED, BAD_ENVELOPES = 1500, 300, 4, 200


def status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


@pytest.fixture()
def dst():
    memory = CASE.dst_memory()
    endpoint = Endpoint(CASE.spec, tp=1, rank=0, memory=[memory], regions=CASE.regions("dst", memory.ctypes.data))
    yield endpoint, memory
    endpoint.close()


def read_everything(endpoint: Endpoint, memory: np.ndarray, src: SrcEngine, request_id: str) -> float:
    """A real reader's whole life (handshake, warm-up, batch, checked); returns seconds."""
    started = time.monotonic()
    memory[:] = CASE.dst_memory()
    with Reader(endpoint) as reader:
        reader.connect_to(*src.addresses[0], timeout_s=15)
        reader.warm_up()
        reader.read(CASE.pairs_array, request_id)
    want = CASE.expected_dst(0)
    assert np.array_equal(memory, want), first_difference(memory, want)
    return time.monotonic() - started


def test_a_flood_of_connections_and_junk_never_stops_real_readers(dst):
    endpoint, memory = dst
    with SrcEngine(CASE) as src:
        host, port = src.addresses[0]
        pid = src.proc.pid
        read_everything(endpoint, memory, src, "before")
        threads, rss_kb = status(pid, "Threads"), status(pid, "VmRSS")
        sockets, dealers, context = [], [], zmq.Context(io_threads=1)
        rng = np.random.default_rng(3)
        try:
            for _ in range(SILENT):  # connect and say nothing
                sockets.append(socket.create_connection((host, port), timeout=5))
            for _ in range(JUNK):  # random bytes instead of ZeroMQ
                conn = socket.create_connection((host, port), timeout=5)
                conn.sendall(rng.bytes(4096))
                sockets.append(conn)
            for i in range(OVERSIZED + BAD_ENVELOPES):
                dealer = context.socket(zmq.DEALER)
                dealer.linger = 0
                dealers.append(dealer)
                dealer.connect(f"tcp://{host}:{port}")
                if i < OVERSIZED:  # a frame over the server's limit: the connection is dropped
                    dealer.send_multipart([b"", PROTOCOL, HEADER.pack(i, 1000), b"handshake", b"{}",
                                           b"x" * (17 << 20)])
                else:  # envelopes that are almost right
                    dealer.send_multipart([b"", PROTOCOL, HEADER.pack(i, 1000)[:-1], b"handshake", b"{}", b""])
            during = read_everything(endpoint, memory, src, "during")
            peak_threads, peak_rss_kb = status(pid, "Threads"), status(pid, "VmRSS")
        finally:
            for conn in sockets + dealers:
                conn.close()
            context.destroy(linger=0)
        after = read_everything(endpoint, memory, src, "after")
        print(f"\nflood of {SILENT + JUNK + OVERSIZED + BAD_ENVELOPES} connections: src threads {threads} -> "
              f"{peak_threads}, RSS {rss_kb / 1024:.0f} -> {peak_rss_kb / 1024:.0f} MB; a real reader "
              f"took {during:.2f} s during, {after:.2f} s after")
        assert peak_threads <= threads + 2, "the side channel spawned threads per connection"
        assert peak_rss_kb - rss_kb < 100 << 10
        assert during < 10 and after < 10
        stats = src.ask(("stats",), "stats")[0]
        assert stats.get("malformed", 0) >= 1 and src.proc.is_alive()


def test_running_out_of_descriptors_stops_the_side_channel_only_while_it_lasts(dst):
    endpoint, memory = dst
    with SrcEngine(CASE) as src:
        host, port = src.addresses[0]
        read_everything(endpoint, memory, src, "before")  # the UCX connection exists already
        open_now = src.ask(("fds",), "fds")
        limit = src.ask(("nofile", open_now + 48), "nofile")
        sockets = []
        try:
            for _ in range(120):  # more than the src may still open
                sockets.append(socket.create_connection((host, port), timeout=5))
            time.sleep(0.3)
            assert len(os.listdir(f"/proc/{src.proc.pid}/fd")) >= open_now + 46  # out of descriptors
            started = time.monotonic()
            fetch_handshake_bytes(host, port, timeout_s=20)  # served once silent peers are dropped
            during = time.monotonic() - started
        finally:
            for conn in sockets:
                conn.close()
        after = read_everything(endpoint, memory, src, "after")
        src.ask(("nofile", limit), "nofile")
        print(f"\nout of descriptors: handshake fetched in {during:.2f} s during, a whole read {after:.2f} s after")
        assert during < 15 and after < 10 and src.proc.is_alive()
        assert os.path.exists(f"/proc/{src.proc.pid}")
