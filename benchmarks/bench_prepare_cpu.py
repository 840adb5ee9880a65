"""CPU benchmark: NIXL lists prepared once per peer vs per batch (DRAM, real NIXL READs).

Qwen3.5-27B (48 state layers) by default, 1 -> 2 (dst rank 0) and 2 -> 1, `--blocks`
blocks per layer on every rank (one buffer per layer, as vLLM lays out its state),
batches of scattered requests. The src engine runs in its own process. All pages are
anonymous memory mapped without reserve: the src fills the pages the batches read (and
only those take memory there), the dst's take memory once read into.

Measured per `Reader(prepare=...)` mode:

- connect (`connect_to` of every src rank, then `close`): the pure tables (`prepare_tables`) and the two NIXL lists per src rank, in
  NIXL's Nx5 strided form (what the reader uses) and, for comparison, the same
  descriptors as Nx3 lists; the bytes of the arrays handed to NIXL and the process's
  RSS growth;
- per batch, host side: from the call to a READ handle ready to post
  (`index_batch` + `make_prepped_xfer`, against `expand_plan` + two `prep_xfer_dlist` +
  `make_prepped_xfer`), median of `--repeats`;
- per batch, end to end: `Reader.read` (generation fence on), median of `--repeats`.

    python benchmarks/bench_prepare_cpu.py --out benchmarks/results/prepare-cpu.json
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import timeit

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ssm_split  # noqa: E402

_PAGE = 4096


def _align(n: int) -> int:
    return -(-n // _PAGE) * _PAGE


def _pages(spec, tp: int, layers: int, blocks: int):
    """Per layer an untouched `(blocks * page)` byte array; the RegionSet over them."""
    page = _align(ssm_split.page_layout(spec, tp, 0).content_nbytes)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    arrays = [np.frombuffer(mmap.mmap(-1, blocks * page, flags=flags), dtype=np.uint8) for _ in range(layers)]
    regions = ssm_split.RegionSet.per_layer([a.ctypes.data for a in arrays], num_blocks=blocks, page_nbytes=page)
    return arrays, regions


def _serve_src(model: str, src_tp: int, layers: int, blocks: int, filled: list[int], conn) -> None:
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    from ssm_split.nixl_backend import Endpoint

    spec = ssm_split.model(model)
    endpoints = []
    for rank in range(src_tp):
        arrays, regions = _pages(spec, src_tp, layers, blocks)
        page = regions.layers[0].page_stride_nbytes
        for layer, array in enumerate(arrays):
            for block in filled:  # real bytes, not the shared zero page
                array[block * page: (block + 1) * page] = (layer + block) % 251 + 1
        endpoints.append(Endpoint(spec, tp=src_tp, rank=rank, regions=regions, memory=arrays))
    conn.send([e.serve() for e in endpoints])
    conn.recv()  # stop
    for e in endpoints:
        e.close()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _median_s(fn, repeats: int) -> float:
    return statistics.median(timeit.repeat(fn, number=1, repeat=repeats))


def _connect(reader, addresses):
    for host, port in addresses:
        reader.connect_to(host, port)
    return reader


def _connect_costs(reader, repeats: int) -> dict:
    """Tables and lists of every src rank the reader's plan reads from, Nx5 and Nx3."""
    from ssm_split.nixl_backend._lists import LOCAL_AGENT

    agent, own, plan = reader.endpoint.agent, reader.endpoint, reader.plan
    out = {"tables_s": 0.0, "nx5_prep_s": 0.0, "nx3_prep_s": 0.0, "nx5_nbytes": 0, "nx3_nbytes": 0,
           "descriptors_per_side": 0}
    for rank in plan.src_ranks:
        peer = reader.peers[rank]
        out["tables_s"] += _median_s(lambda: ssm_split.expand.prepare_tables(plan, rank, peer.handshake.regions,
                                                                      own.regions), repeats)
        tables = ssm_split.expand.prepare_tables(plan, rank, peer.handshake.regions, own.regions)
        out["descriptors_per_side"] += tables.dst_table.num_descriptors
        for form, local, remote in (("nx5", tables.dst_table.rows.copy(), tables.src_table.rows.copy()),
                                    ("nx3", tables.dst_table.descriptors(), tables.src_table.descriptors())):
            rss = _rss()
            t0 = time.perf_counter()
            handles = [agent.prep_xfer_dlist(LOCAL_AGENT, local, own.mem_type),
                       agent.prep_xfer_dlist(peer.agent_name, remote, peer.handshake.mem_type)]
            out[f"{form}_prep_s"] += time.perf_counter() - t0
            out[f"{form}_rss_growth_nbytes"] = out.get(f"{form}_rss_growth_nbytes", 0) + _rss() - rss
            out[f"{form}_nbytes"] += local.nbytes + remote.nbytes
            for h in handles:
                h.release()
    return out


def _host_side_s(reader, pairs, repeats: int) -> tuple[float, int]:
    """Median seconds from a batch to its READ handles ready to post (not posted)."""
    from ssm_split.nixl_backend._lists import LOCAL_AGENT

    agent, own, plan = reader.endpoint.agent, reader.endpoint, reader.plan
    count = [0]

    def once():
        indexed = ssm_split.expand.index_batch([reader._lists[r].tables for r in plan.src_ranks], pairs)
        for r in indexed.ranks:
            lists = reader._lists[r.src_rank]
            agent.make_prepped_xfer("READ", lists.local, r.dst_indices, lists.remote, r.src_indices).release()
        count[0] = indexed.num_descriptors

    def per_batch():
        expansion = reader.expand(pairs)
        for r in expansion.ranks:
            peer = reader.peers[r.src_rank]
            local = agent.prep_xfer_dlist(LOCAL_AGENT, r.dst_descs, own.mem_type)
            remote = agent.prep_xfer_dlist(peer.agent_name, r.src_descs, peer.handshake.mem_type)
            index = np.arange(r.num_descriptors, dtype=np.int32)
            agent.make_prepped_xfer("READ", local, index, remote, index).release()
            local.release()
            remote.release()
        count[0] = expansion.num_descriptors

    fn = once if reader.prepare == "once" else per_batch
    fn()
    return _median_s(fn, repeats), count[0]


def run_case(model: str, src_tp: int, dst_tp: int, opts, rng) -> list[dict]:
    from ssm_split.nixl_backend import Endpoint, Reader

    spec = ssm_split.model(model)
    batches = {batch: np.stack([rng.choice(opts.blocks, batch, replace=False),
                                rng.choice(opts.blocks, batch, replace=False)], axis=1) for batch in opts.batch}
    filled = sorted({int(b) for pairs in batches.values() for b in pairs[:, 0]})
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_src, args=(model, src_tp, opts.layers, opts.blocks, filled, child),
                       daemon=True)
    proc.start()
    records = []
    try:
        addresses = parent.recv()
        arrays, regions = _pages(spec, dst_tp, opts.layers, opts.blocks)
        with Endpoint(spec, tp=dst_tp, rank=0, regions=regions, memory=arrays) as endpoint:
            connects: dict[str, list[float]] = {"once": [], "per-batch": []}
            for _ in range(3 * opts.repeats):  # alternating, so neither mode pays a first time
                for prepare, times in connects.items():
                    t0 = time.perf_counter()
                    _connect(Reader(endpoint, prepare=prepare), addresses).close()
                    times.append(time.perf_counter() - t0)
            for batch, pairs in batches.items():
                for prepare in ("once", "per-batch"):
                    connect_s = statistics.median(connects[prepare])
                    with _connect(Reader(endpoint, prepare=prepare), addresses) as reader:
                        reader.warm_up()
                        host_s, descriptors = _host_side_s(reader, pairs, opts.repeats)
                        ids = [f"b{batch}-{i}" for i in range(batch)]
                        reader.read(pairs, ids)  # first touch of the dst pages
                        stats = []
                        read_s = _median_s(lambda: stats.append(reader.read(pairs, ids, timeout_s=120)),
                                           opts.repeats)
                        rec = dict(model=model, src_tp=src_tp, dst_tp=dst_tp, dst_rank=0, layers=opts.layers,
                                   blocks=opts.blocks, batch=batch, prepare=prepare, connect_s=connect_s,
                                   host_side_s=host_s, read_s=read_s, descriptors=descriptors,
                                   nbytes=stats[-1].nbytes, gbps=stats[-1].nbytes / read_s / 1e9,
                                   cpu=f"{platform.machine()}, {os.cpu_count()} cores",
                                   python=platform.python_version())
                        if prepare == "once" and batch == opts.batch[0]:
                            rec.update(_connect_costs(reader, opts.repeats))
                        records.append(rec)
                        print(f"{model} {src_tp}->{dst_tp} b{batch:<4} {prepare:9}: connect "
                              f"{connect_s * 1e3:7.1f} ms, host side {host_s * 1e3:7.2f} ms "
                              f"({descriptors} descriptors), read {read_s * 1e3:8.1f} ms "
                              f"({rec['gbps']:.2f} GB/s)", flush=True)
                        if "nx5_prep_s" in rec:
                            print(f"    tables {rec['tables_s'] * 1e3:.2f} ms; lists of "
                                  f"{rec['descriptors_per_side']} descriptors per side: Nx5 "
                                  f"{rec['nx5_prep_s'] * 1e3:.2f} ms ({rec['nx5_nbytes']} B), Nx3 "
                                  f"{rec['nx3_prep_s'] * 1e3:.2f} ms ({rec['nx3_nbytes']} B, RSS "
                                  f"+{rec['nx3_rss_growth_nbytes'] / 2**20:.1f} MiB)", flush=True)
    finally:
        parent.send("stop")
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen3.5-27b")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--blocks", type=int, default=256)
    p.add_argument("--batch", default="8,32", help="comma-separated batch sizes (requests)")
    p.add_argument("--pairs", default="1-2,2-1", help="comma-separated src_tp-dst_tp")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    opts = p.parse_args(argv)
    opts.batch = [int(b) for b in opts.batch.split(",")]
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    rng = np.random.default_rng(0)
    records = []
    for pair in opts.pairs.split(","):
        src_tp, dst_tp = (int(x) for x in pair.split("-"))
        records += run_case(opts.model, src_tp, dst_tp, opts, rng)
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
