"""A reader that dies at any moment never takes down or corrupts a src (issue 13,
finding 2).

Over UCX's tcp transport a READ is emulated in software: the src's UCX worker answers
the reader's GET requests itself, and when the reader died meanwhile UCX aborts the src
process ("Endpoint timeout", SIGABRT; 9 of 9 runs died after 1-7 reader kills, whatever
UCX setting). The src cannot prevent it: the reader decides to emulate. So every
endpoint refuses emulated READs (UCX `PROTO_EMULATION_ENABLE=n`) and a tcp-only reader
gets a clear error at `warm_up`, before it can post a READ that could hurt a src. Over
the zero-copy transport CI has (cma, the default with tcp for control messages) the src
stays passive: readers killed mid-READ again and again leave it serving, byte-exact.
"""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

pytest.importorskip("nixl")

from ssm_split import Mamba2Spec, TransferError  # noqa: E402
from ssm_split.nixl_backend import Endpoint, Reader  # noqa: E402
from ssm_split.nixl_backend._ucx import ucx_params_with_guard  # noqa: E402

from ._cluster import TCP, Case, first_difference  # noqa: E402
from ._peer import SrcEngine, start_reader  # noqa: E402

pytestmark = pytest.mark.nixl

SPEC = Mamba2Spec(num_heads=32, head_dim=64, num_groups=1, state_size=64, ssm_dtype="float32")
# 16 requests x 2 layers of 512 KiB: a 16 MiB READ, a few ms over cma
CASE = Case(SPEC, 1, 1, num_layers=2, num_blocks=20, pairs=tuple((i, 19 - i) for i in range(16)), seed=5)
KILLS = 6


def endpoint(case: Case, **options):
    memory = case.dst_memory()
    return Endpoint(case.spec, tp=case.dst_tp, rank=0, memory=[memory],
                    regions=case.regions("dst", memory.ctypes.data), **options), memory


def test_readers_killed_mid_read_leave_the_src_serving_byte_exact():
    rng = random.Random(13)
    with SrcEngine(CASE) as src:  # default transports: cma READs, tcp control messages
        for kill in range(KILLS):
            proc, conn = start_reader(CASE, src.addresses)
            time.sleep(rng.uniform(0.0, 0.03))  # somewhere in its loop of READs
            proc.kill()
            proc.join()
            conn.close()
            time.sleep(0.05)
            assert src.proc.is_alive(), f"the src died after reader kill {kill + 1} (exit code {src.proc.exitcode})"
        dst, memory = endpoint(CASE)
        try:
            with Reader(dst) as reader:
                reader.connect_to(*src.addresses[0])
                reader.warm_up()
                reader.read(CASE.pairs_array, CASE.request_ids)
            want = CASE.expected_dst(0)
            assert np.array_equal(memory, want), first_difference(memory, want)
            assert src.proc.is_alive()
        finally:
            dst.close()


@pytest.mark.parametrize("tcp_side", ["reader", "src"])
def test_a_tcp_only_path_is_refused_at_warm_up_with_the_reason(tcp_side):
    with SrcEngine(CASE, ucx_params=TCP if tcp_side == "src" else None) as src:
        dst, memory = endpoint(CASE, ucx_params=TCP if tcp_side == "reader" else None)
        try:
            assert not dst.emulated_reads
            with Reader(dst) as reader:
                reader.connect_to(*src.addresses[0])
                with pytest.raises(TransferError, match="no zero-copy READ path") as info:
                    reader.warm_up()
                message = str(info.value)
                assert "a reader that dies mid-READ makes UCX abort the src process" in message
                assert "UCX_PROTO_EMULATION_ENABLE=y" in message and info.value.peer == src.names[0]
            assert (memory == CASE.dst_memory()).all()
            assert src.proc.is_alive()
        finally:
            dst.close()


def test_emulated_reads_are_refused_unless_the_user_asks(monkeypatch):
    monkeypatch.delenv("UCX_PROTO_EMULATION_ENABLE", raising=False)
    assert ucx_params_with_guard(None) == ({"engine_config": "PROTO_EMULATION_ENABLE=n"}, False)
    assert ucx_params_with_guard({"engine_config": "TLS=tcp", "num_workers": "2"}) == (
        {"engine_config": "PROTO_EMULATION_ENABLE=n,TLS=tcp", "num_workers": "2"}, False)
    assert ucx_params_with_guard(TCP | {"engine_config": "TLS=tcp,PROTO_EMULATION_ENABLE=y"})[1] is True
    monkeypatch.setenv("UCX_PROTO_EMULATION_ENABLE", "y")  # the environment wins (NIXL's rule)
    assert ucx_params_with_guard(None) == ({}, True)
    monkeypatch.setenv("UCX_PROTO_EMULATION_ENABLE", "n")
    assert ucx_params_with_guard({"engine_config": "PROTO_EMULATION_ENABLE=y"})[1] is False
