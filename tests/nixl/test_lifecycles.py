"""Reader lifecycles leak nothing (issue 13, finding 3).

NIXL's `remove_remote_agent` leaks a socket on both sides per call: before the fix every
`Reader` removed its src agents when it closed, so 200 short-lived readers on one dst
endpoint left +200 sockets in the dst and +200 in the src process, until the src ran
out of descriptors. Now the endpoint keeps each src agent loaded (keyed by agent name
and metadata) and shares it between its readers and reconnects; the side channel
clients close their sockets. Both sides are measured from /proc (the src in its own
process).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

pytest.importorskip("nixl")

from ssm_split import Mamba2Spec  # noqa: E402
from ssm_split.nixl_backend import Endpoint, Reader  # noqa: E402

from ._cluster import Case, first_difference  # noqa: E402
from ._peer import SrcEngine  # noqa: E402

pytestmark = pytest.mark.nixl

CASE = Case(Mamba2Spec(num_heads=8, head_dim=4, num_groups=1, state_size=8), 2, 1, num_blocks=6,
            pairs=((5, 0), (1, 3), (2, 4)))
CYCLES = 200
ALLOWED = 4
"""Descriptors either side may gain over all cycles (a few: lazily opened resources)."""


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_200_reader_lifecycles_grow_neither_side_s_open_files():
    with SrcEngine(CASE) as src:
        memory = CASE.dst_memory()
        dst = Endpoint(CASE.spec, tp=1, rank=0, memory=[memory], regions=CASE.regions("dst", memory.ctypes.data))
        try:
            def lifecycle(i: int) -> None:
                with Reader(dst) as reader:
                    for address in src.addresses:
                        reader.connect_to(*address)
                    reader.warm_up()
                    if i % 10 == 0:
                        reader.read(CASE.pairs_array, f"cycle-{i}")

            for i in range(3):  # first connections, lazily made buffers and threads
                lifecycle(-1 - i)
            time.sleep(0.3)
            before = fds(), src.ask(("fds",), "fds")
            started = time.monotonic()
            for i in range(CYCLES):
                lifecycle(i)
            elapsed = time.monotonic() - started
            time.sleep(0.3)  # the src's side channel closes departed connections
            after = fds(), src.ask(("fds",), "fds")
            grown = after[0] - before[0], after[1] - before[1]
            print(f"\n{CYCLES} reader lifecycles in {elapsed:.1f} s: open files dst {before[0]} -> "
                  f"{after[0]}, src {before[1]} -> {after[1]}")
            assert grown[0] <= ALLOWED and grown[1] <= ALLOWED, f"open files grew by {grown} (dst, src)"
            assert dst.remotes.num_loads == CASE.src_tp  # each src agent loaded once, then reused
            want = CASE.expected_dst(0)
            assert np.array_equal(memory, want), first_difference(memory, want)
            assert src.proc.is_alive()
        finally:
            dst.close()


def test_a_src_restarted_under_the_same_agent_name_is_read_again():
    # kept loaded, the old agent's connection information is stale: NIXL refuses the new
    # one over it (nixlNotAllowedError), so the endpoint replaces the agent
    memory = CASE.dst_memory()
    dst = Endpoint(CASE.spec, tp=1, rank=0, memory=[memory], regions=CASE.regions("dst", memory.ctypes.data))
    try:
        for seed in (1, 2):
            case = Case(CASE.spec, CASE.src_tp, 1, num_blocks=CASE.num_blocks, pairs=CASE.pairs, seed=seed)
            with SrcEngine(case, agent_prefix="restarted-src") as src:
                with Reader(dst) as reader:
                    for address in src.addresses:
                        reader.connect_to(*address)
                    reader.warm_up()
                    reader.read(case.pairs_array, f"seed-{seed}")
                want = case.expected_dst(0)
                assert np.array_equal(memory, want), first_difference(memory, want)
                src.kill()
    finally:
        dst.close()
