"""`ssm-split bench`, packed strategy: every src rank gathers what the dst ranks need into
a registered pack buffer, each dst rank fetches one range per src rank and wave, then
scatters it into its pages. Waves alternate halves of the buffers, so src ranks can pack
wave w+1 while the dst ranks fetch and scatter wave w.

The coordinator half (`run_packed`) drives the rank halves (`pack_prepare`, `pack_run`
on src ranks; `prepare_packed`, `run_wave` on dst ranks), which take the `Rank`
(`bench/_rank.py`) they run in.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from ..layout._regions import RegionSet
from ..expand._expand import expand_plan
from ..strategies._packing import pack_plan  # (harness to be replaced by Reader-timed runs)
from ._common import num_regions, plan_for, regions


def packed_plan(cfg: dict, dst_rank: int):
    return pack_plan(plan_for("ssm_split", cfg, dst_rank, None))


# --- coordinator ------------------------------------------------------------------------


def wave_pairs(cfg: dict) -> int:
    """Requests per wave so that every src pack buffer and dst staging buffer holds a wave."""
    plans = [packed_plan(cfg, r) for r in range(cfg["dst_tp"])]
    per_dst = max(sum(p.slot_nbytes) for p in plans)
    per_src = max(sum(p.slot_nbytes[s] for p in plans) for s in range(cfg["src_tp"]))
    wave = cfg["staging_nbytes"] // 2 // (num_regions(cfg) * max(per_dst, per_src))  # two halves
    if wave < 1:
        raise ValueError("--staging-mib is too small to pack one request; raise it")
    return wave


def replies(pipes) -> list:
    """One reply from each rank's pipe, in order; a rank's error is raised here."""
    out = []
    for pipe in pipes:
        status, value = pipe.recv()
        if status != "ok":
            raise RuntimeError(f"rank failed:\n{value}")
        out.append(value)
    return out


def send_all(pipes, command: str, **args) -> None:
    for pipe in pipes:
        pipe.send((command, args))


def run_packed(cfg: dict, threads: int, pairs, src_pipes, dst_pipes, args) -> tuple[dict, dict, bool]:
    """Verify, then time the packed strategy: `serial` adds up every pack and every
    fetch-and-scatter; `concurrent` runs the waves pipelined. Returns the summed
    statistics, the times and whether every dst page was right."""
    per_wave = wave_pairs(cfg)
    send_all(src_pipes, "pack_prepare", pairs=pairs, wave_pairs=per_wave)
    waves = replies(src_pipes)[0]
    send_all(dst_pipes, "prepare_packed", threads=threads, pairs=pairs, wave_pairs=per_wave)
    stats = replies(dst_pipes)

    def once() -> float:
        total = 0.0
        for w in range(waves):
            for pipes, command in ((src_pipes, "pack_run"), (dst_pipes, "run_wave")):
                for pipe in pipes:  # one at a time
                    pipe.send((command, {"wave": w}))
                    t0, t1 = replies([pipe])[0]
                    total += t1 - t0
        return total

    def pipelined() -> float:
        """All processes live: src ranks pack wave w+1 while the dst ranks fetch and
        scatter wave w (halves of the buffers alternate); first pack to last scatter."""
        send_all(src_pipes, "pack_run", wave=0)
        spans = replies(src_pipes)
        for w in range(waves):
            send_all(dst_pipes, "run_wave", wave=w)
            if w + 1 < waves:
                send_all(src_pipes, "pack_run", wave=w + 1)
                spans += replies(src_pipes)
            spans += replies(dst_pipes)
        return max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans)

    ok = True
    for run in (once, pipelined):
        send_all(dst_pipes, "poison")
        replies(dst_pipes)
        run()
        send_all(dst_pipes, "check")
        ok &= all(replies(dst_pipes))
    times: dict = {}
    if ok:
        samples = [once() for _ in range(args.warmup + args.repeats)][args.warmup:]
        times = {"serial": statistics.median(samples), "serial_samples": samples}
        if args.mode != "serial":
            samples = [pipelined() for _ in range(args.warmup + args.repeats)][args.warmup:]
            times.update(concurrent=statistics.median(samples), concurrent_samples=samples)
    total = {k: sum(s[k] for s in stats) for k in ("descriptors", "requests", "read_nbytes", "gathered_nbytes")}
    total["staging_nbytes"] = max(s["staging_nbytes"] for s in stats)
    total["waves"] = waves
    return total, times, ok


# --- src rank ---------------------------------------------------------------------------


def pack_prepare(rank, pairs: np.ndarray, per_wave: int) -> int:
    """Src side: one gather table per wave, packing what every dst rank needs."""
    cfg, mem, layers = rank.cfg, rank.mem, num_regions(rank.cfg)
    mine = {rank.rank: regions(rank.addrs, cfg["num_blocks"], cfg["src_page_nbytes"], mem.dev_id)}
    plans = [packed_plan(cfg, r) for r in range(cfg["dst_tp"])]
    rank.pack_tables = []
    half = cfg["pack_nbytes"] // 2  # waves alternate halves: pack w+1 while w is read
    for w, start in enumerate(range(0, len(pairs), per_wave)):
        chunk = pairs[start:start + per_wave]
        at, src_cols, dst_cols, len_cols = mem.addr(rank.pack) + (w % 2) * half, [], [], []
        for packed in plans:
            slot = packed.slot_nbytes[rank.rank]
            if not slot:
                continue
            region = RegionSet.packed(at, num_layers=layers, num_blocks=len(chunk), page_nbytes=slot,
                                      device_id=mem.dev_id)
            exp = expand_plan(packed.pack_plan_for(rank.rank), mine, region,
                              np.stack([chunk[:, 0], np.arange(len(chunk))], axis=1))
            rd = exp.ranks[0]
            src_cols.append(rd.src_descs[:, 0])
            dst_cols.append(rd.dst_descs[:, 0])
            len_cols.append(rd.dst_descs[:, 1])
            at += layers * per_wave * slot
        rank.pack_tables.append(mem.gather_table(np.concatenate(src_cols), np.concatenate(dst_cols),
                                                 np.concatenate(len_cols), rank.pack))
    return len(rank.pack_tables)


def pack_run(rank, wave: int) -> tuple[float, float]:
    rank.mem.sync()
    t0 = time.perf_counter()
    rank.mem.gather(rank.pack_tables[wave])
    rank.mem.sync()
    return t0, time.perf_counter()


# --- dst rank ---------------------------------------------------------------------------


def prepare_packed(rank, threads: int, pairs: np.ndarray, per_wave: int) -> dict:
    """Dst side: per wave, one READ per src rank of its packed range, and the scatter."""
    t_start = time.perf_counter()
    rank.use_threads(threads)
    rank.release()
    cfg, mem, layers = rank.cfg, rank.mem, num_regions(rank.cfg)
    packed = packed_plan(cfg, rank.rank)
    before = [packed_plan(cfg, r) for r in range(rank.rank)]  # dst ranks packed ahead of us
    dst_regions = rank.dst_regions()
    prep = rank.new_prepared()
    descriptors = 0
    half = cfg["staging_nbytes"] // 2  # the same halves as the src pack buffers
    for w, start in enumerate(range(0, len(pairs), per_wave)):
        chunk = pairs[start:start + per_wave]
        slots = np.arange(len(chunk), dtype=np.int64)
        local_at = mem.addr(rank.staging) + (w % 2) * half
        items, landed = [], {}
        for s in packed.plan.src_ranks:
            slot = packed.slot_nbytes[s]
            remote_at = (rank.src_info[s][3] + (w % 2) * (cfg["pack_nbytes"] // 2)
                         + sum(layers * per_wave * p.slot_nbytes[s] for p in before))
            remote = RegionSet.packed(remote_at, num_layers=layers, num_blocks=len(chunk), page_nbytes=slot,
                                      device_id=rank.src_info[s][2])
            local = RegionSet.packed(local_at, num_layers=layers, num_blocks=len(chunk), page_nbytes=slot,
                                     device_id=mem.dev_id)
            exp = expand_plan(packed.fetch_plan(s), {s: remote}, local, np.stack([slots, slots], axis=1))
            items += [rank.prep_lists(r) for r in exp.ranks]
            descriptors += exp.num_descriptors
            landed[s] = local
            local_at += layers * per_wave * slot
        prep.waves.append(items)
        moves = expand_plan(packed.unpack_plan(), landed, dst_regions, np.stack([slots, chunk[:, 1]], axis=1))
        prep.tables.append(mem.gather_table(
            np.concatenate([r.src_descs[:, 0] for r in moves.ranks]),
            np.concatenate([r.dst_descs[:, 0] for r in moves.ranks]),
            np.concatenate([r.dst_descs[:, 1] for r in moves.ranks]), rank.staging))
    nbytes = packed.plan.nbytes * layers * len(pairs)
    prep.stats.update(descriptors=descriptors, requests=descriptors, read_nbytes=nbytes, nbytes=nbytes,
                      gathered_nbytes=nbytes,
                      staging_nbytes=layers * min(per_wave, len(pairs)) * sum(packed.slot_nbytes),
                      waves=len(prep.waves), prep_s=time.perf_counter() - t_start)
    rank.prepared = prep
    return prep.stats


def run_wave(rank, wave: int) -> tuple[float, float]:
    """Dst side: fetch wave `wave` (one descriptor per src rank) and scatter it."""
    prep = rank.prepared
    rank.mem.sync()
    t0 = time.perf_counter()
    handles: list = []
    rank.post(prep.waves[wave], handles)
    rank.wait(handles, t0 + 60.0)
    rank.mem.gather(prep.tables[wave])
    rank.mem.sync()
    return t0, time.perf_counter()
