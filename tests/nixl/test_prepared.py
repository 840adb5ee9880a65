"""Prepared-once lists on real NIXL agents (DRAM, one process).

- The descriptor counts `index_batch` predicts (NIXL merges consecutive indices inside
  one dense Nx5 row) are what NIXL itself posts: its telemetry's `descCount`.
- The bytes are the reference model's.
- Lists replaced while a READ still uses them are released only once it is settled.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nixl")

from ssm_split import GDNSpec, Mamba2Spec, TransferError, plan_reads
from ssm_split.expand import index_batch, prepare_tables
from ssm_split.nixl_backend import Endpoint, Reader  # noqa: E402
from ssm_split.nixl_backend._lists import PeerLists  # noqa: E402

from ._cluster import Case, first_difference  # noqa: E402

pytestmark = pytest.mark.nixl

MAMBA2 = Mamba2Spec(num_heads=4, head_dim=2, num_groups=2, state_size=4)
RUNS = ((3, 5), (4, 6), (5, 7), (0, 1), (8, 2))  # a run of three, then scattered
CASES = {
    # one whole-page read per page, no padding: each layer's run of three merges
    "2to2_layer_major": Case(MAMBA2, 2, 2, pairs=RUNS, src_pad=0, dst_pad=0),
    # the same pages block-major: rows stride over all layers, nothing merges
    "2to2_block_major": Case(MAMBA2, 2, 2, pairs=RUNS, src_pad=0, dst_pad=0,
                             src_order="block", dst_order="block"),
    # several reads per page (a replicated group): never dense, nothing merges
    "1to4_replicated": Case(MAMBA2, 1, 4, pairs=RUNS, dst_pad=0),
    # GDN with the SD layout, src TP > dst TP
    "4to2_gdn_sd": Case(GDNSpec(num_k_heads=2, num_v_heads=4, head_k_dim=4, head_v_dim=2,
                                conv_layout="SD", spec_tokens=1), 4, 2, pairs=RUNS),
}


def endpoints(case: Case, side: str):
    tp = case.src_tp if side == "src" else case.dst_tp
    out = []
    for rank in range(tp):
        memory = case.src_memory(rank) if side == "src" else case.dst_memory()
        out.append((Endpoint(case.spec, tp=tp, rank=rank, memory=[memory],
                             regions=case.regions(side, memory.ctypes.data)), memory))
    return out


def read_with_telemetry(dst: Endpoint, lists: PeerLists, ranked) -> int:
    """Post one READ over prepared lists; returns NIXL's descriptor count after merging."""
    agent = dst.agent
    handle = agent.make_prepped_xfer("READ", lists.local, ranked.dst_indices, lists.remote,
                                     ranked.src_indices)
    try:
        state = agent.transfer(handle)
        while state != "DONE":
            assert state == "PROC", state
            state = agent.check_xfer_state(handle)
        return agent.get_xfer_telemetry(handle).descCount
    finally:
        handle.release()


@pytest.mark.parametrize("name", sorted(CASES))
def test_predicted_descriptor_counts_are_what_nixl_posts(name, monkeypatch):
    monkeypatch.setenv("NIXL_TELEMETRY_ENABLE", "y")  # read when an agent is created
    case = CASES[name]
    sources, targets = endpoints(case, "src"), endpoints(case, "dst")
    try:
        for dst_rank, (dst, memory) in enumerate(targets):
            plan = plan_reads(case.spec, case.src_tp, case.dst_tp, dst_rank)
            tables, lists = [], []
            for src_rank in plan.src_ranks:
                src = sources[src_rank][0]
                dst.agent.add_remote_agent(src.handshake().agent_metadata)
                tables.append(prepare_tables(plan, src_rank, src.regions, dst.regions))
                lists.append(PeerLists(dst.agent, tables[-1], src.name, "DRAM", "DRAM", dst.generation))
            indexed = index_batch(tables, case.pairs_array)
            for ranked, prepared in zip(indexed.ranks, lists):
                assert read_with_telemetry(dst, prepared, ranked) == ranked.num_descriptors
                prepared.retire()
                assert prepared.released
            want = case.expected_dst(dst_rank)
            assert np.array_equal(memory, want), first_difference(memory, want)
            if name == "2to2_layer_major":
                assert indexed.num_descriptors == case.num_layers * 3  # 5 pairs, one run of 3
            elif name != "4to2_gdn_sd":
                assert indexed.num_descriptors == sum(r.dst_indices.size for r in indexed.ranks)
    finally:
        for endpoint, _ in sources + targets:
            endpoint.close()


def test_lists_replaced_under_a_read_in_flight_are_released_once_it_settled():
    case = CASES["1to4_replicated"]
    (src, _), = endpoints(case, "src")
    (dst, memory), = endpoints(case, "dst")[:1]
    src.serve()
    try:
        with Reader(dst, strategy="direct") as reader:
            reader.connect_to(*src.address)
            before = reader._lists[0]
            pending = reader.start_read(case.pairs_array, "first")  # not polled yet
            reader.connect_to(*src.address)  # new lists; the READ still holds the old ones
            assert reader._lists[0] is not before and not before.released
            # reconnecting reloads the src's metadata: NIXL may fail the READ posted
            # before ("invalidated during transfer"), or report it done if it was
            try:
                pending.wait()
                assert np.array_equal(memory, case.expected_dst(0))
            except TransferError as error:
                assert error.request == "first" and pending.status == "failed"
            assert pending.wait_settled(timeout_s=10)
            assert before.released and not reader._lists[0].released
            memory[:] = case.dst_memory()
            reader.read(case.pairs_array, "second")
            assert np.array_equal(memory, case.expected_dst(0))
    finally:
        dst.close()
        src.close()
