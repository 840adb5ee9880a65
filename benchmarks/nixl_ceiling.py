"""NIXL's own ceiling between two GPUs: one large READ, split and threaded several ways,
next to a `torch` copy of the same bytes between the same GPUs, in one run.

A src process owns `--mib` MiB on `--src-device`; a dst process on `--dst-device` READs
all of it with fresh agents of each configuration (UCX `num_threads`, `split_batch_size`,
`num_workers`) and each split of the bytes into equal descriptors. UCX environment
settings apply per run: run the script once per setting (`env` in the JSON says which).
Needs two GPUs (or one: both devices 0). Run on the GPU machine:

    UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y python benchmarks/nixl_ceiling.py --out $OUT/ceiling.json

Every READ's bytes are checked once against the src pattern before timing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssm_split.bench._common import copy_limit_s, split_rows, time_read_s  # noqa: E402

UCX_KEYS = ("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "UCX_CUDA_IPC_MAX_STREAMS", "UCX_RNDV_FRAG_SIZE",
            "UCX_MAX_RNDV_RAILS", "UCX_CUDA_IPC_CACHE", "UCX_RNDV_THRESH", "UCX_TLS", "UCX_PROTO_ENABLE")


def _src(conn, device: int, nbytes: int) -> None:
    import torch

    torch.cuda.set_device(device)
    buf = torch.arange(nbytes // 4, dtype=torch.int32, device=f"cuda:{device}")
    from nixl._api import nixl_agent, nixl_agent_config

    agent = nixl_agent(f"ceiling-src-{os.getpid()}", nixl_agent_config(backends=["UCX"]))
    agent.register_memory(agent.get_reg_descs(buf))
    conn.send((agent.get_agent_metadata(), buf.data_ptr(), device))
    conn.recv()


def _read_gbps(agent, remote: str, local_addr: int, remote_addr: int, nbytes: int, pieces: int,
               dst_device: int, src_device: int, repeats: int) -> float:
    local = split_rows(local_addr, nbytes, dst_device, pieces)
    far = split_rows(remote_addr, nbytes, src_device, pieces)
    return nbytes / time_read_s(agent, remote, local, far, "VRAM", repeats=repeats) / 1e9


def _dst(conn, device: int, nbytes: int, metadata, remote_addr: int, src_device: int,
         configs, splits, repeats: int) -> None:
    import torch

    torch.cuda.set_device(device)
    buf = torch.zeros(nbytes // 4, dtype=torch.int32, device=f"cuda:{device}")
    from nixl._api import nixl_agent, nixl_agent_config

    rows = [{"what": "torch copy_", "gbps": nbytes / copy_limit_s("cuda", src_device, device, nbytes, repeats) / 1e9}]
    checked = False
    for n, params in enumerate(configs):
        agent = nixl_agent(f"ceiling-dst-{os.getpid()}-{n}", nixl_agent_config(backends=[]))
        agent.create_backend("UCX", {k: str(v) for k, v in params.items()})
        agent.register_memory(agent.get_reg_descs(buf))
        remote = agent.add_remote_agent(metadata)
        for pieces in splits:
            try:
                gbps = _read_gbps(agent, remote, buf.data_ptr(), remote_addr, nbytes, pieces, device,
                                  src_device, repeats)
                if not checked:
                    want = torch.arange(nbytes // 4, dtype=torch.int32, device=f"cuda:{device}")
                    checked = bool(torch.equal(buf, want))
                    del want
                rows.append({"what": "nixl READ", "params": params, "descriptors": pieces, "gbps": gbps})
            except Exception as error:  # keep the other configurations
                rows.append({"what": "nixl READ", "params": params, "descriptors": pieces,
                             "error": f"{type(error).__name__}: {error}"})
            print(rows[-1], flush=True)
        agent.remove_remote_agent(remote)
        del agent
    conn.send((rows, checked))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src-device", type=int, default=0)
    p.add_argument("--dst-device", type=int, default=1)
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="append the run's record to this JSON file")
    args = p.parse_args()
    nbytes = args.mib << 20
    configs = [{}, {"num_threads": 4}, {"num_threads": 4, "split_batch_size": 1},
               {"num_threads": 8, "split_batch_size": 1}, {"num_workers": 4}]
    splits = [1, 4, 8, 16, 64]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    src = ctx.Process(target=_src, args=(child, args.src_device, nbytes), daemon=True)
    src.start()
    metadata, remote_addr, src_device = parent.recv()
    dparent, dchild = ctx.Pipe()
    dst = ctx.Process(target=_dst, args=(dchild, args.dst_device, nbytes, metadata, remote_addr,
                                         src_device, configs, splits, args.repeats), daemon=True)
    dst.start()
    rows, checked = dparent.recv()
    parent.send(None)
    dst.join(30)
    src.join(30)
    copy = rows[0]["gbps"]
    for row in rows[1:]:
        if "gbps" in row:
            row["pct_of_copy"] = 100.0 * row["gbps"] / copy
    record = {"src_device": args.src_device, "dst_device": args.dst_device, "nbytes": nbytes,
              "verified": checked, "env": {k: os.environ[k] for k in UCX_KEYS if k in os.environ},
              "rows": rows}
    best = max((r for r in rows[1:] if "gbps" in r), key=lambda r: r["gbps"], default=None)
    print(f"torch copy {copy:.0f} GB/s; best NIXL READ {best and best['gbps']:.0f} GB/s "
          f"({best and best['pct_of_copy']:.0f}%) with {best and best['params']} x "
          f"{best and best['descriptors']} descriptors; verified={checked}")
    if args.out:
        old = json.load(open(args.out)) if os.path.exists(args.out) else []
        json.dump(old + [record], open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
