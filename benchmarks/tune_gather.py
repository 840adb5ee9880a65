"""Tune the gather kernel (`ssm_split.nixl_backend._gather`) on shapes like the pack and
scatter of Qwen3.5-27B pages: 1 GiB of moves of 6 KiB, 18 KiB and 1.5 MiB pieces from
scattered places into a dense buffer, for several chunk sizes, block sizes and warps.

    python benchmarks/tune_gather.py $OUT/tune_gather.json
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from ssm_split.nixl_backend._gather import GatherTable, run_gather  # noqa: E402

GIB = 1 << 30


def main(out: str) -> None:
    src = torch.randint(-(1 << 31), (1 << 31) - 1, (GIB // 2,), dtype=torch.int32, device="cuda")  # 2 GiB
    dst = torch.empty(GIB // 4, dtype=torch.int32, device="cuda")
    piece = np.array([6144, 6144, 18432, 1572864], dtype=np.int64)  # one Qwen 1->2 dst page
    pages = GIB // int(piece.sum())
    rng = np.random.default_rng(0)
    page_at = rng.permutation(2 * pages)[:pages].astype(np.int64) * int(piece.sum())  # scattered src pages
    offs = np.concatenate([[0], np.cumsum(piece)[:-1]])
    s = (src.data_ptr() + page_at[:, None] + offs[None, :] * 1).ravel()
    d = (dst.data_ptr() + np.arange(pages, dtype=np.int64)[:, None] * int(piece.sum()) + offs[None, :]).ravel()
    n = np.tile(piece, pages)
    nbytes = int(n.sum())
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        ts = []
        for _ in range(10):
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            ts.append(e0.elapsed_time(e1) / 1e3)
        return float(np.median(ts))

    a, b = src[: nbytes // 4], dst[: nbytes // 4]
    rows = [dict(what="copy_", gbps=nbytes / timed(lambda: b.copy_(a)) / 1e9)]
    print(rows[-1], flush=True)
    for chunk in (32 << 10, 64 << 10, 128 << 10, 256 << 10):
        table = GatherTable.build(s, d, n, anchor=src, chunk_nbytes=chunk)
        for block in (1024, 2048, 4096):
            for warps in (4, 8, 16):
                t = timed(lambda: run_gather(table, block=block, num_warps=warps))
                rows.append(dict(what="gather", chunk=chunk, block=block, warps=warps, gbps=nbytes / t / 1e9))
                print(rows[-1], flush=True)
    best = max((r for r in rows if r["what"] == "gather"), key=lambda r: r["gbps"])
    print("best", best, flush=True)
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tune_gather.json")
