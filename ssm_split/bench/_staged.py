"""`ssm-split bench`, staged strategy, dst rank side: spans READ into a bounded staging
buffer in waves, then one gather per wave moves them into the pages; and the timed READs
that fit its cost model (`calibrate`).

Functions take the `Rank` (`bench/_rank.py`) they run in.
"""

from __future__ import annotations

import time

import numpy as np

from ..strategies._cost import fit_cost_model
from ..layout._regions import RegionSet
from ..expand._expand import expand_plan


def stage_waves(rank, plan, pairs: np.ndarray, prep, src_regions, dst_regions, num_layers: int,
                staging_cap: int) -> tuple[int, int, int]:
    """Append the READs (`prep.waves`) and gather tables (`prep.tables`) of a staged
    plan's spans, in waves that fit `staging_cap` bytes (two halves when it takes more
    than one wave). Returns `(descriptors, requests, staging bytes used)`."""
    slot = plan.slot_nbytes
    per_pair = slot * num_layers
    if per_pair * len(pairs) <= staging_cap:
        wave_pairs, halves = len(pairs), 1
    else:
        wave_pairs, halves = max(staging_cap // 2 // per_pair, 0), 2
        if wave_pairs == 0:
            raise ValueError(f"staging of {staging_cap} bytes cannot hold one request ({per_pair} bytes)")
    mem, base = rank.mem, rank.mem.addr(rank.staging)
    descriptors = requests = staging_used = 0
    for w, start in enumerate(range(0, len(pairs), wave_pairs)):
        chunk = pairs[start:start + wave_pairs]
        at = base + (w % halves) * wave_pairs * per_pair
        stage_regions = RegionSet.packed(at, num_layers=num_layers, num_blocks=len(chunk), page_nbytes=slot,
                                         device_id=mem.dev_id)
        slots = np.arange(len(chunk), dtype=np.int64)
        spans = expand_plan(plan.spans_plan(), src_regions, stage_regions, np.stack([chunk[:, 0], slots], axis=1))
        prep.waves.append([rank.prep_lists(r) for r in spans.ranks])
        descriptors += spans.num_descriptors
        requests += len(spans.ranks)
        moves = expand_plan(plan.moves_plan(), [stage_regions], dst_regions, np.stack([slots, chunk[:, 1]], axis=1))
        rd = moves.ranks[0]
        prep.tables.append(mem.gather_table(rd.src_descs[:, 0], rd.dst_descs[:, 0], rd.dst_descs[:, 1],
                                            rank.staging))
        staging_used = max(staging_used, (w % halves + 1) * len(chunk) * per_pair)
    prep.stats["slot_nbytes"] = slot
    return descriptors, requests, staging_used


class _Descriptors:
    """The shape `Rank.prep_lists` takes: one src rank's `(M, 3)` arrays."""

    __slots__ = ("src_rank", "dst_descs", "src_descs", "num_descriptors")

    def __init__(self, src_rank: int, dst_descs: np.ndarray, src_descs: np.ndarray):
        self.src_rank, self.dst_descs, self.src_descs = src_rank, dst_descs, src_descs
        self.num_descriptors = len(dst_descs)


_SAMPLES = ((512, 4096), (2048, 4096), (512, 256 << 10), (2048, 256 << 10),
            (256, 2 << 20), (1024, 2 << 20), (64, 16 << 20), (256, 16 << 20))
"""(descriptors, bytes each) of the calibration READs."""


def calibrate(rank, threads: int) -> dict:
    """Fit a `CostModel` from timed READs shaped like the transfer's: `count` descriptors
    of `size` bytes, each at the start of a different (layer, block) page of src rank 0,
    into distinct dst pages."""
    rank.use_threads(threads)
    cfg, mem = rank.cfg, rank.mem
    src_addrs, src_dev = rank.src_info[0][1], rank.src_info[0][2]
    num_regions = len(rank.addrs)
    pages = num_regions * cfg["num_blocks"]
    largest = min(cfg["src_page_nbytes"], cfg["dst_page_nbytes"])
    samples = []
    for count, size in _SAMPLES:
        count, size = min(count, pages), min(size, largest)
        i = np.arange(count, dtype=np.int64)
        layer, block = i % num_regions, i // num_regions
        src = np.zeros((count, 3), np.uint64)
        dst = np.zeros((count, 3), np.uint64)
        src[:, 0] = np.asarray(src_addrs, np.uint64)[layer] + (block * cfg["src_page_nbytes"]).astype(np.uint64)
        dst[:, 0] = np.asarray(rank.addrs, np.uint64)[layer] + (block * cfg["dst_page_nbytes"]).astype(np.uint64)
        src[:, 1] = dst[:, 1] = size
        src[:, 2], dst[:, 2] = src_dev, mem.dev_id
        item = rank.prep_lists(_Descriptors(0, dst, src))
        times = []
        for it in range(4):
            handles: list = []
            mem.sync()
            t0 = time.perf_counter()
            rank.post([item], handles)
            rank.wait(handles, t0 + 60)
            if it:
                times.append(time.perf_counter() - t0)
        rank.agent.release_dlist_handle(item[1])
        rank.agent.release_dlist_handle(item[2])
        samples.append((count, count * size, float(np.median(times))))
    rank.poison_all()  # calibration wrote over pages
    model = fit_cost_model([s[0] for s in samples], [s[1] for s in samples], [s[2] for s in samples])
    return dict(desc_s=model.desc_s, byte_s=model.byte_s, gather_byte_s=model.gather_byte_s,
                gather_launch_s=model.gather_launch_s, samples=samples)
