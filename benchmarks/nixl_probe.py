"""Measure what a NIXL READ costs on this GPU: per descriptor, per byte, with threads.

Two processes on one GPU (a target that owns the src buffer, an initiator that reads
into its dst buffer), as two engines on one host would be. Prints a table and writes
JSON to $OUT (or the path given). Run on a GPU machine:

    UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y python benchmarks/nixl_probe.py out.json

The numbers feed the cost model of the transfer strategies (see benchmarks/README.md).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import sys
import time

GIB = 1 << 30


def _target(conn, nbytes: int) -> None:
    import torch
    from nixl._api import nixl_agent, nixl_agent_config

    torch.cuda.init()
    buf = torch.arange(nbytes // 4, dtype=torch.int32, device="cuda")
    agent = nixl_agent("probe-src", nixl_agent_config(backends=["UCX"]))
    agent.register_memory(agent.get_reg_descs(buf))
    conn.send((agent.get_agent_metadata(), buf.data_ptr(), buf.device.index))
    conn.recv()  # wait until the initiator is done
    conn.close()


def time_copy(src, repeats: int = 10, warmups: int = 3) -> float:
    """Mean seconds of `torch` device-to-device `copy_` of the CUDA tensor `src` into a
    tensor like it, after `warmups` untimed copies."""
    import torch

    dst = torch.empty_like(src)
    for _ in range(warmups):
        dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def _descs(base: int, offsets, nbytes, dev: int):
    import numpy as np

    arr = np.empty((len(offsets), 3), dtype=np.uint64)
    arr[:, 0] = base + np.asarray(offsets, dtype=np.uint64)
    arr[:, 1] = np.asarray(nbytes, dtype=np.uint64)
    arr[:, 2] = dev
    return arr


def _time_reads(agent, remote, src_arr, dst_arr, *, requests: int, repeats: int):
    """Median seconds to READ all descriptors, split into `requests` concurrent xfers."""
    import numpy as np
    import torch

    local_h = agent.prep_xfer_dlist("NIXL_INIT_AGENT", agent.get_xfer_descs(dst_arr, "VRAM"), "VRAM")
    remote_h = agent.prep_xfer_dlist(remote, agent.get_xfer_descs(src_arr, "VRAM"), "VRAM")
    n = len(src_arr)
    chunks = np.array_split(np.arange(n, dtype=np.int32), requests)
    times = []
    for it in range(repeats + 1):
        handles = [agent.make_prepped_xfer("READ", local_h, c, remote_h, c) for c in chunks]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for h in handles:
            state = agent.transfer(h)
            if state == "ERR":
                raise RuntimeError("transfer failed")
        pending = list(handles)
        while pending:
            pending = [h for h in pending if agent.check_xfer_state(h) != "DONE"]
        torch.cuda.synchronize()
        if it:
            times.append(time.perf_counter() - t0)
        for h in handles:
            agent.release_xfer_handle(h)
    agent.release_dlist_handle(local_h)
    agent.release_dlist_handle(remote_h)
    return statistics.median(times)


def main(out_path: str) -> None:
    import torch
    from nixl._api import nixl_agent, nixl_agent_config

    os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")
    nbytes = 4 * GIB
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_target, args=(child, nbytes))
    proc.start()
    md, src_base, src_dev = parent.recv()

    torch.cuda.init()
    dst = torch.zeros(nbytes // 4, dtype=torch.int32, device="cuda")
    dst_base, dst_dev = dst.data_ptr(), dst.device.index
    records = []
    configs = [("threads0", {}), ("threads4", {"num_threads": "4"}), ("workers4", {"num_workers": "4"})]
    for cfg_name, params in configs:
        agent = nixl_agent(f"probe-dst-{cfg_name}", nixl_agent_config(backends=[]))
        agent.create_backend("UCX", params)
        agent.register_memory(agent.get_reg_descs(dst))
        remote = agent.add_remote_agent(md)
        # warm-up: one tiny read to set up the connection
        _time_reads(agent, remote, _descs(src_base, [0], [4096], src_dev),
                    _descs(dst_base, [0], [4096], dst_dev), requests=1, repeats=1)
        cases = [("contiguous", GIB, 1, 1)]
        for size in (16 << 10, 256 << 10, 4 << 20):
            count = min(4096, (2 * GIB) // (2 * size))
            for requests in (1, 8):
                cases.append(("strided", size, count, requests))
        for kind, size, count, requests in cases:
            offsets = [i * 2 * size for i in range(count)]
            t = _time_reads(agent, remote, _descs(src_base, offsets, [size] * count, src_dev),
                            _descs(dst_base, offsets, [size] * count, dst_dev),
                            requests=requests, repeats=5)
            rec = dict(config=cfg_name, pattern=kind, desc_nbytes=size, descriptors=count,
                       requests=requests, median_s=t, gbps=size * count / t / 1e9,
                       us_per_desc=t / count * 1e6)
            records.append(rec)
            print(f"{cfg_name:9} {kind:10} {size:>9} B x {count:>5} in {requests:>2} req: "
                  f"{t * 1e3:8.3f} ms  {rec['gbps']:8.1f} GB/s  {rec['us_per_desc']:7.2f} us/desc",
                  flush=True)
        agent.remove_remote_agent(remote)
        del agent
    # torch reference: a plain copy of 1 GiB
    t_copy = time_copy(torch.empty(GIB // 4, dtype=torch.int32, device="cuda"))
    records.append(dict(config="torch", pattern="copy_", desc_nbytes=GIB, descriptors=1,
                        requests=1, median_s=t_copy, gbps=GIB / t_copy / 1e9, us_per_desc=None))
    print(f"torch copy_ 1 GiB: {t_copy * 1e3:.3f} ms, {GIB / t_copy / 1e9:.1f} GB/s")
    parent.send("done")
    proc.join(30)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                ucx_get_zcopy=os.environ.get("UCX_CUDA_IPC_ENABLE_GET_ZCOPY"))
    with open(out_path, "w") as f:
        json.dump(dict(meta=meta, records=records), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("OUT", "."), "probe.json"))
