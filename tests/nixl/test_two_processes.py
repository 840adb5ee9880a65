"""Real NIXL READs between processes: the src engine runs in a child process and is found
through its side channel's TCP address only; the dst ranks run in the test process."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("nixl")

from ssm_split import GDNSpec, Mamba2Spec, TransferError, plan_all
from ssm_split.errors import HandshakeError
from ssm_split.nixl_backend import Endpoint, Reader  # noqa: E402

from ._cluster import EMULATING, TCP, Case, first_difference  # noqa: E402
from ._peer import SrcEngine  # noqa: E402

pytestmark = pytest.mark.nixl

# 2 key heads: replicated on 4 dst ranks; float32 temporal state
SRC = Case(GDNSpec(num_k_heads=2, num_v_heads=4, head_k_dim=4, head_v_dim=2, ssm_dtype="float32"),
           src_tp=2, dst_tp=1, num_blocks=10, pairs=((9, 1), (2, 8), (5, 3), (0, 4), (6, 5)))


@pytest.fixture(scope="module")
def src_engine():
    engine = SrcEngine(SRC)
    yield engine
    engine.stop()


def dst_side(case: Case, rank: int, prepare: str = "once", **options):
    """A dst rank's endpoint (with `options`), its reader (`prepare`) and memory."""
    memory = case.dst_memory()
    endpoint = Endpoint(case.spec, tp=case.dst_tp, rank=rank, memory=[memory],
                        regions=case.regions("dst", memory.ctypes.data), **options)
    return endpoint, Reader(endpoint, strategy="direct", prepare=prepare), memory


@pytest.mark.parametrize("prepare", ["once", "per-batch"])
@pytest.mark.parametrize("dst_tp", [1, 2, 4])  # src TP > dst TP, equal, dst TP > src TP
def test_read_from_another_process(src_engine, dst_tp, prepare):
    case = dataclasses.replace(SRC, dst_tp=dst_tp)
    request_ids = [f"d{dst_tp}-{prepare}-{i}" for i in range(len(case.pairs))]
    plans = plan_all(case.spec, case.src_tp, dst_tp)
    sides = [dst_side(case, rank, prepare=prepare) for rank in range(dst_tp)]
    try:
        for _, reader, _ in sides:
            for host, port in src_engine.addresses:
                reader.connect_to(host, port)
            reader.warm_up()
        pending = [reader.start_read(case.pairs_array, request_ids) for _, reader, _ in sides]
        for rank, ((_, _, memory), read) in enumerate(zip(sides, pending)):
            stats = read.wait()
            assert stats.num_transfers == len(plans[rank].src_ranks)
            want = case.expected_dst(rank)
            assert np.array_equal(memory, want), first_difference(memory, want)
        counts = [sum(r in plan.src_ranks for plan in plans) for r in range(case.src_tp)]
        assert src_engine.ask(("wait", request_ids, counts), "waited") == counts
    finally:
        for endpoint, reader, _ in sides:
            reader.close()
            endpoint.close()


def test_stale_handshake_is_caught_after_the_src_reregisters(src_engine):
    endpoint, reader, memory = dst_side(SRC, 0)
    try:
        for host, port in src_engine.addresses:
            reader.connect_to(host, port)
        reader.warm_up()
        generation = src_engine.ask(("reregister", 1), "reregistered")
        assert generation == reader.peers[1].handshake.generation + 2
        with pytest.raises(HandshakeError, match="src rank 1 .* handshake is stale"):
            reader.warm_up()
        reader.connect_to(*src_engine.addresses[1])  # a fresh handshake
        assert reader.peers[1].handshake.generation == generation
        reader.warm_up()
        reader.read(SRC.pairs_array, "after-reregister")
        assert np.array_equal(memory, SRC.expected_dst(0))
    finally:
        reader.close()
        endpoint.close()


def test_a_dead_src_process_is_a_transfer_error_not_a_success():
    case = dataclasses.replace(SRC, src_tp=1)
    engine = SrcEngine(case)
    endpoint, reader, memory = dst_side(case, 0)
    try:
        reader.connect_to(*engine.addresses[0])
        reader.warm_up()
        peer = reader.peers[0].agent_name
        engine.proc.kill()
        engine.proc.join()
        with pytest.raises(TransferError) as info:
            reader.read(case.pairs_array, "orphan", timeout_s=10)
        assert info.value.peer == peer and info.value.request == "orphan"
    finally:
        engine.stop()
        reader.close()
        endpoint.close()


def test_a_src_that_never_answers_misses_the_deadline_and_the_reader_recovers():
    # over UCX's tcp transport a READ needs the src process to answer; a stopped process
    # never does (the default cma transport would read its memory without it)
    case = Case(Mamba2Spec(num_heads=16, head_dim=16, num_groups=1, state_size=16,
                           ssm_dtype="float32"), 1, 1)
    with SrcEngine(case, ucx_params=TCP) as engine:
        endpoint, reader, memory = dst_side(case, 0, ucx_params=EMULATING)
        try:
            reader.connect_to(*engine.addresses[0])
            reader.warm_up()
            engine.pause()  # every thread stopped before the READ is posted
            try:
                stuck = reader.start_read(case.pairs_array, "stuck", timeout_s=1.0)
                with pytest.raises(TransferError, match="did not complete before the deadline") as info:
                    stuck.wait()
                assert info.value.peer == reader.peers[0].agent_name
                assert stuck.status == "failed"
            finally:
                engine.resume()
            # the abandoned READ is served once the src runs again: its dst blocks are
            # refused until NIXL reports it finished
            assert stuck.wait_settled(timeout_s=20)
            memory[:] = case.dst_memory()
            reader.read(case.pairs_array, "retry", timeout_s=20)
            assert np.array_equal(memory, case.expected_dst(0))
        finally:
            reader.close()
            endpoint.close()


@pytest.mark.parametrize("strategy", ["direct", "staged", "packed"])
def test_every_strategy_from_another_process_in_many_waves(strategy):
    # the src's pack area holds two waves of one request (its limit per wave is half the
    # area), the reader's staging four; a cost model where descriptors are dear makes
    # staged batches stage every group: packed and staged batches need several waves
    from ssm_split.strategies import CostModel, pack_plan, stage_plan

    case = dataclasses.replace(SRC, dst_tp=1)  # 2 -> 1: several reads per src rank and page
    plans = plan_all(case.spec, case.src_tp, case.dst_tp)
    dear = CostModel(desc_s=1.0, byte_s=1e-15, gather_byte_s=1e-15)
    slot = max(max(pack_plan(p).slot_nbytes) for p in plans) * case.num_layers
    staged_slot = max(stage_plan(p, model=dear).slot_nbytes for p in plans) * case.num_layers
    assert staged_slot > 0
    with SrcEngine(case, pack_area_nbytes=2 * slot) as engine:
        sides = []
        for rank in range(case.dst_tp):
            memory = case.dst_memory()
            endpoint = Endpoint(case.spec, tp=case.dst_tp, rank=rank, memory=[memory],
                                regions=case.regions("dst", memory.ctypes.data))
            reader = Reader(endpoint, strategy=strategy, staging_nbytes=max(4 * max(slot, staged_slot), 512),
                            model=dear)
            for address in engine.addresses:
                reader.connect_to(*address)
            sides.append((endpoint, reader, memory))
        try:
            for rank, (_, reader, memory) in enumerate(sides):
                stats = reader.read(case.pairs_array, [f"{strategy}-{rank}-{i}" for i in range(len(case.pairs))])
                assert stats.strategy == strategy
                if strategy != "direct":
                    assert stats.num_waves > 1
                want = case.expected_dst(rank)
                assert np.array_equal(memory, want), first_difference(memory, want)
        finally:
            for endpoint, reader, _ in sides:
                reader.close()
                endpoint.close()


def test_a_src_that_refuses_to_pack_fails_the_batch_with_request_and_peer():
    from ssm_split.errors import PlanError, StaleHandshakeError

    case = dataclasses.replace(SRC, dst_tp=1)
    with SrcEngine(case, pack_area_nbytes=0) as without:  # no pack area: packed is not offered
        endpoint, _, _ = dst_side(case, 0)
        reader = Reader(endpoint, strategy="packed")
        try:
            for address in without.addresses:
                reader.connect_to(*address)
            assert "no pack area" in reader.strategies()["packed"]
            with pytest.raises(PlanError, match="cannot run on this reader: src ranks .* have no pack area"):
                reader.read(case.pairs_array, "no-area")
        finally:
            reader.close()
            endpoint.close()
    with SrcEngine(case) as engine:  # the src re-registered since the handshake: it refuses
        endpoint, _, memory = dst_side(case, 0)
        reader = Reader(endpoint, strategy="packed")
        try:
            for address in engine.addresses:
                reader.connect_to(*address)
            engine.ask(("reregister", 0), "reregistered")
            with pytest.raises(StaleHandshakeError, match="refused to pack") as info:
                reader.read(case.pairs_array, "refused")
            assert info.value.request == "refused" and info.value.peer == engine.names[0]
            assert (memory == case.dst_memory()).all()  # nothing was scattered
        finally:
            reader.close()
            endpoint.close()
