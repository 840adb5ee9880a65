"""Second NIXL probe: how per-descriptor cost scales with UCX threads, descriptor size and
several dst processes reading at once (each its own process, as decode ranks are).

One src process owns a 4 GiB VRAM buffer; K dst processes (K = 1, 2, 4) each READ
`count` descriptors of `size` bytes, spaced `2 * size` apart in their own quarter of the
src buffer (so NIXL cannot merge them), into a dense dst buffer. All K start together
(a barrier); the wall time is from the first post to the last completion. Then dst
process 0 times the gather kernel of `ssm_split.nixl_backend._gather` against `copy_`.

    UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y python benchmarks/probe_streams.py $OUT/probe2.json
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import sys
import time

MIB = 1 << 20
GIB = 1 << 30
SRC_NBYTES = 4 * GIB
DST_NBYTES = 512 * MIB
CONFIGS = {
    "t0": {},
    "t4": {"num_threads": "4"},
    "t8": {"num_threads": "8"},
    "t16": {"num_threads": "16"},
    "t8s64": {"num_threads": "8", "split_batch_size": "64"},
}
SIZES = (8 << 10, 64 << 10, 512 << 10, 2 * MIB, 8 * MIB)
REPEATS = 5


def _src(conn) -> None:
    import torch
    from nixl._api import nixl_agent, nixl_agent_config

    torch.cuda.init()
    buf = torch.randint(0, 1 << 30, (SRC_NBYTES // 4,), dtype=torch.int32, device="cuda")
    agent = nixl_agent("probe2-src", nixl_agent_config(backends=["UCX"]))
    agent.register_memory(agent.get_reg_descs(buf))
    conn.send((agent.get_agent_metadata(), buf.data_ptr(), buf.device.index))
    conn.recv()


def _descs(addrs, size: int, dev: int):
    import numpy as np

    arr = np.empty((len(addrs), 3), dtype=np.uint64)
    arr[:, 0] = addrs
    arr[:, 1] = size
    arr[:, 2] = dev
    return arr


def _dst(rank: int, conn, barrier, md, src_base: int, src_dev: int) -> None:
    import numpy as np
    import torch
    from nixl._api import nixl_agent, nixl_agent_config

    torch.cuda.init()
    dst = torch.zeros(DST_NBYTES // 4, dtype=torch.int32, device="cuda")
    agents = {}
    for name, params in CONFIGS.items():
        agent = nixl_agent(f"probe2-dst{rank}-{name}", nixl_agent_config(backends=[]))
        agent.create_backend("UCX", params)
        agent.register_memory(agent.get_reg_descs(dst))
        remote = agent.add_remote_agent(md)
        agents[name] = (agent, remote)
    region = rank * (SRC_NBYTES // 4)
    while True:
        msg = conn.recv()
        if msg is None:
            break
        if msg[0] == "gather":
            conn.send(_gather_probe())
            continue
        _, cfg, size, count = msg
        agent, remote = agents[cfg]
        src_addrs = src_base + region + np.arange(count, dtype=np.uint64) * np.uint64(2 * size)
        dst_addrs = dst.data_ptr() + np.arange(count, dtype=np.uint64) * np.uint64(size)
        local_h = agent.prep_xfer_dlist("NIXL_INIT_AGENT",
                                        agent.get_xfer_descs(_descs(dst_addrs, size, dst.device.index), "VRAM"), "VRAM")
        remote_h = agent.prep_xfer_dlist(remote, agent.get_xfer_descs(_descs(src_addrs, size, src_dev), "VRAM"), "VRAM")
        idx = np.arange(count, dtype=np.int32)
        spans = []
        for it in range(REPEATS + 1):
            handle = agent.make_prepped_xfer("READ", local_h, idx, remote_h, idx)
            torch.cuda.synchronize()
            barrier.wait()
            t0 = time.perf_counter()
            state = agent.transfer(handle)
            while state != "DONE":
                if state == "ERR":
                    raise RuntimeError("transfer failed")
                state = agent.check_xfer_state(handle)
            t1 = time.perf_counter()
            agent.release_xfer_handle(handle)
            if it:
                spans.append((t0, t1))
        agent.release_dlist_handle(local_h)
        agent.release_dlist_handle(remote_h)
        conn.send(spans)


def _gather_probe() -> list[dict]:
    """Correctness and speed of the Triton gather against torch copy_."""
    import torch

    from nixl_probe import time_copy  # benchmarks/ is on sys.path when run as a script
    from ssm_split.nixl_backend import _gather

    out = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randint(-(1 << 31), (1 << 31) - 1, (GIB // 4,), dtype=torch.int32, device="cuda", generator=gen)
    b = torch.empty_like(a)
    t = time_copy(a)
    out.append(dict(what="copy_", piece_nbytes=GIB, median_s=t, gbps=GIB / t / 1e9))
    import numpy as np

    for piece in (6144, 61440, 1572864, 16 * MIB):
        n = GIB // (2 * piece)
        rng = np.random.default_rng(piece)
        src_off = a.data_ptr() + (rng.permutation(n).astype(np.int64) * piece)
        dst_off = b.data_ptr() + np.arange(n, dtype=np.int64) * piece
        lengths = np.full(n, piece, dtype=np.int64)
        b.fill_(0)
        table = _gather.GatherTable.build(src_off, dst_off, lengths, anchor=a)
        _gather.run_gather(table)
        torch.cuda.synchronize()
        ok = True
        # check a sample of moves
        av = a.view(torch.uint8)
        bv = b.view(torch.uint8)
        for i in rng.integers(0, n, 16):
            s = int(src_off[i] - a.data_ptr())
            d = int(dst_off[i] - b.data_ptr())
            ok &= bool(torch.equal(av[s:s + piece], bv[d:d + piece]))
        times = []
        for _ in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            _gather.run_gather(table)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times[1:])
        out.append(dict(what="gather", piece_nbytes=piece, pieces=int(n), ok=ok, median_s=t,
                        gbps=n * piece / t / 1e9))
    return out


def main(out_path: str) -> None:
    os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    src = ctx.Process(target=_src, args=(child,))
    src.start()
    md, src_base, src_dev = parent.recv()
    kmax = 4
    barriers = {k: ctx.Barrier(k) for k in (1, 2, 4)}
    pipes, procs = [], []
    # one barrier object per K value, shared by the first K ranks
    for rank in range(kmax):
        p, c = ctx.Pipe()
        proc = ctx.Process(target=_dst_entry, args=(rank, c, barriers, md, src_base, src_dev))
        proc.start()
        pipes.append(p)
        procs.append(proc)
    for p in pipes:
        assert p.recv() == "ready"
    records = []
    for cfg in CONFIGS:
        for size in SIZES:
            count = min(4096, (SRC_NBYTES // kmax) // (2 * size), DST_NBYTES // size)
            for k in (1, 2, 4):
                for p in pipes[:k]:
                    p.send(("read", cfg, size, count, k))
                spans = [p.recv() for p in pipes[:k]]
                walls = [max(s[i][1] for s in spans) - min(s[i][0] for s in spans) for i in range(REPEATS)]
                t = statistics.median(walls)
                rec = dict(config=cfg, desc_nbytes=size, descriptors_per_rank=count, dst_procs=k,
                           median_s=t, gbps=k * count * size / t / 1e9,
                           us_per_desc=t / (k * count) * 1e6,
                           us_per_desc_per_rank=t / count * 1e6)
                records.append(rec)
                print(f"{cfg:6} {size:>9} B x {count:>5} x {k} procs: {t * 1e3:8.3f} ms "
                      f"{rec['gbps']:8.1f} GB/s  {rec['us_per_desc_per_rank']:7.2f} us/desc/rank", flush=True)
    pipes[0].send(("gather",))
    gather = pipes[0].recv()
    for g in gather:
        print("gather", g, flush=True)
    for p in pipes:
        p.send(None)
    for proc in procs:
        proc.join(60)
    parent.send("done")
    src.join(60)
    import torch

    meta = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "?",
                torch=torch.__version__, ucx_get_zcopy=os.environ.get("UCX_CUDA_IPC_ENABLE_GET_ZCOPY"))
    with open(out_path, "w") as f:
        json.dump(dict(meta=meta, records=records, gather=gather), f, indent=1)


def _dst_entry(rank, conn, barriers, md, src_base, src_dev):
    class _B:
        def __init__(self):
            self.k = 1

        def wait(self):
            barriers[self.k].wait()

    barrier = _B()
    conn_wrap = _Conn(conn, barrier)
    conn.send("ready")
    _dst(rank, conn_wrap, barrier, md, src_base, src_dev)


class _Conn:
    """Pipe wrapper: a read message carries K, which picks the barrier."""

    def __init__(self, conn, barrier):
        self._conn, self._barrier = conn, barrier

    def recv(self):
        msg = self._conn.recv()
        if msg is not None and msg[0] == "read":
            self._barrier.k = msg[4]
            return msg[:4]
        return msg

    def send(self, value):
        self._conn.send(value)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("OUT", "."), "probe2.json"))
