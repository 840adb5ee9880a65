"""Real NIXL READs over UCX on DRAM, every rank an endpoint in this one process.

Each case builds src and dst memories from the reference model (`_cluster.Case`), serves
the src handshakes on loopback, connects readers through the side channel, reads the
batch, and requires every dst byte to equal the reference (untouched outside the batch's
content) and every src rank to receive one notification per reader naming each request.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest

pytest.importorskip("nixl")

from ssm_split import GDNSpec, Mamba1Spec, Mamba2Spec, plan_all  # noqa: E402
from ssm_split.specs import stack_layers  # noqa: E402
from ssm_split.errors import PlanError, SpecMismatchError  # noqa: E402
from ssm_split.nixl_backend import Endpoint, Reader  # noqa: E402

from ._cluster import Case, first_difference  # noqa: E402

pytestmark = pytest.mark.nixl

MAMBA2_ONE_GROUP = Mamba2Spec(num_heads=4, head_dim=4, num_groups=1, state_size=4, ssm_dtype="float32")

CASES = {
    # dst TP > src TP, B/C replicated on the dst side
    "1to2_replicated": Case(MAMBA2_ONE_GROUP, 1, 2),
    # src TP > dst TP, GDN, key heads replicated on the src side, block-major dst
    "4to2_gdn": Case(GDNSpec(num_k_heads=2, num_v_heads=4, head_k_dim=4, head_v_dim=2), 4, 2,
                     dst_order="block"),
    # 2 -> 3 does not divide; the one group is replicated on both sides
    "2to3_non_divisible": Case(Mamba2Spec(num_heads=6, head_dim=2, num_groups=1, state_size=4), 2, 3),
    # SD conv layout, 2 groups on 4 dst ranks (replicated), layer-major src, block-major dst
    "2to4_sd": Case(Mamba2Spec(num_heads=4, head_dim=2, num_groups=2, state_size=4, conv_layout="SD",
                               spec_tokens=1), 2, 4, dst_order="block", src_pad=0),
    # Mamba1, src TP > dst TP
    "2to1_mamba1": Case(Mamba1Spec(intermediate_size=8, state_size=4), 2, 1),
}


PREPARE = ["once", "per-batch"]
"""Both ways a Reader prepares NIXL lists (once per peer, or per batch)."""


@contextlib.contextmanager
def cluster(case: Case, prepare: str = "once", num_threads: int | None = None, strategy: str = "direct"):
    """Served src endpoints and connected dst readers (their endpoints with `num_threads`
    UCX worker threads; None: the default), closed afterwards."""
    stack = contextlib.ExitStack()
    with stack:
        src_memory = [case.src_memory(r) for r in range(case.src_tp)]
        sources = []
        for rank, memory in enumerate(src_memory):
            endpoint = stack.enter_context(Endpoint(
                case.spec, tp=case.src_tp, rank=rank, memory=[memory],
                regions=case.regions("src", memory.ctypes.data)))
            endpoint.serve("127.0.0.1", 0)
            sources.append(endpoint)
        readers, dst_memory = [], [case.dst_memory() for _ in range(case.dst_tp)]
        for rank, memory in enumerate(dst_memory):
            endpoint = stack.enter_context(Endpoint(
                case.spec, tp=case.dst_tp, rank=rank, memory=[memory],
                regions=case.regions("dst", memory.ctypes.data), num_threads=num_threads))
            # DRAM: NIXL's default (0) unless told otherwise
            assert endpoint.num_threads == (0 if num_threads is None else num_threads)
            reader = stack.enter_context(Reader(endpoint, strategy=strategy, prepare=prepare))
            for source in sources:
                reader.connect_to(*source.address)
            readers.append(reader)
        yield sources, readers, dst_memory


@pytest.mark.parametrize("prepare", PREPARE)
@pytest.mark.parametrize("name", sorted(CASES))
def test_batch_lands_byte_for_byte_and_src_ranks_are_notified(name, prepare):
    case = CASES[name]
    plans = plan_all(case.spec, case.src_tp, case.dst_tp)
    with cluster(case, prepare) as (sources, readers, dst_memory):
        pending = []
        for reader in readers:
            reader.warm_up()
            pending.append(reader.start_read(case.pairs_array, case.request_ids))  # all in flight
        for rank, (reader, read) in enumerate(zip(readers, pending)):
            stats = read.wait()
            assert stats.num_transfers == len(plans[rank].src_ranks)
            assert stats.nbytes == case.num_layers * len(case.pairs) * plans[rank].dst_content_nbytes
            assert stats.request_ids == tuple(case.request_ids)
            want = case.expected_dst(rank)
            assert np.array_equal(dst_memory[rank], want), first_difference(dst_memory[rank], want)
        for src_rank, source in enumerate(sources):
            readers_of_rank = sum(src_rank in plan.src_ranks for plan in plans)
            for request_id in case.request_ids:
                source.wait_for_reads(request_id, readers_of_rank, timeout_s=10)
                assert source.reads_done(request_id) == readers_of_rank
            assert source.notification_drops == {}


def test_equal_tp_block_major_batch_is_one_descriptor_per_rank_and_moves_right():
    # no padding, block-major on both sides, consecutive blocks on both sides: all
    # layers of the three requests form one range; only per-batch lists merge across
    # layers, so prepared-once lists keep one descriptor per (layer, request)
    case = Case(Mamba2Spec(num_heads=4, head_dim=2, num_groups=2, state_size=4), 2, 2,
                pairs=((3, 5), (4, 6), (5, 7)), src_order="block", dst_order="block",
                src_pad=0, dst_pad=0)
    for prepare, descriptors in (("per-batch", 1), ("once", case.num_layers * 3)):
        with cluster(case, prepare) as (_, readers, dst_memory):
            for rank, reader in enumerate(readers):
                stats = reader.read(case.pairs_array, "batch-0")
                assert (stats.num_reads, stats.num_descriptors) == (case.num_layers * 3, descriptors)
                assert np.array_equal(dst_memory[rank], case.expected_dst(rank))


def test_auto_prepares_per_batch_only_where_layers_of_a_block_are_adjacent():
    # block-major dst pages merge across layers only with per-batch lists; the default
    # picks them there, and prepared-once lists for vLLM-style layer-major memory
    spec = Mamba2Spec(num_heads=4, head_dim=2, num_groups=2, state_size=4)
    for order, expected in (("block", "per-batch"), ("layer", "once")):
        case = Case(spec, 2, 2, pairs=((3, 5), (4, 6), (5, 7)), src_order=order,
                    dst_order=order, src_pad=0, dst_pad=0)
        with cluster(case, "auto") as (_, readers, dst_memory):
            for rank, reader in enumerate(readers):
                assert reader.prepare == expected
                stats = reader.read(case.pairs_array, "batch-0")
                if order == "block":
                    assert stats.num_descriptors == 1
                assert np.array_equal(dst_memory[rank], case.expected_dst(rank))


def test_equal_tp_layer_major_consecutive_blocks_merge_per_layer_when_prepared_once():
    # whole-page reads of blocks consecutive on both sides, pages without padding: NIXL
    # merges each layer's run of dense consecutive indices
    case = Case(Mamba2Spec(num_heads=4, head_dim=2, num_groups=2, state_size=4), 2, 2,
                pairs=((3, 5), (4, 6), (5, 7), (0, 1)), src_pad=0, dst_pad=0)
    with cluster(case, "once") as (_, readers, dst_memory):
        for rank, reader in enumerate(readers):
            stats = reader.read(case.pairs_array, "batch-0")
            assert (stats.num_reads, stats.num_descriptors) == (case.num_layers * 4, case.num_layers * 2)
            assert np.array_equal(dst_memory[rank], case.expected_dst(rank))


@pytest.mark.parametrize("prepare", PREPARE)
def test_batches_by_layer_and_repeated_reads(prepare):
    # moving layers one call at a time gives the same memory as one call for all
    case = CASES["1to2_replicated"]
    with cluster(case, prepare) as (sources, readers, dst_memory):
        for layer in (2, 0, 1):
            for reader in readers:
                reader.read(case.pairs_array, [f"{r}-l{layer}" for r in case.request_ids],
                            layers=[layer])
        for rank in range(case.dst_tp):
            assert np.array_equal(dst_memory[rank], case.expected_dst(rank))
        sources[0].wait_for_reads("req-0-l1", 2, timeout_s=10)
        # reading the same batch again is harmless
        stats = readers[0].read(case.pairs_array, case.request_ids)
        assert stats.num_descriptors > 0
        assert np.array_equal(dst_memory[0], case.expected_dst(0))


@pytest.mark.parametrize("prepare", PREPARE)
def test_empty_batch_moves_nothing(prepare):
    case = CASES["1to2_replicated"]
    with cluster(case, prepare) as (_, readers, dst_memory):
        stats = readers[0].read(np.zeros((0, 2), np.int64), "nothing")
        assert (stats.num_descriptors, stats.nbytes, stats.num_transfers) == (0, 0, 0)
        assert np.array_equal(dst_memory[0], case.dst_memory())


def test_warm_up_and_reads_with_ucx_worker_threads():
    # with worker threads the warm-up posts >= 1024 header reads so every thread
    # connects; the batch after it still lands byte for byte
    case = CASES[sorted(CASES)[0]]
    with cluster(case, num_threads=2) as (_, readers, dst_memory):
        for rank, reader in enumerate(readers):
            reader.warm_up()
            reader.read(case.pairs_array, case.request_ids)
            assert np.array_equal(dst_memory[rank], case.expected_dst(rank))


def read_and_check(case: Case, readers, dst_memory, strategy: str) -> None:
    """Every reader reads the whole batch with `strategy`; its memory equals the reference."""
    for rank, reader in enumerate(readers):
        stats = reader.read(case.pairs_array, case.request_ids)
        assert stats.strategy == strategy
        want = case.expected_dst(rank)
        assert np.array_equal(dst_memory[rank], want), first_difference(dst_memory[rank], want)


@pytest.mark.parametrize("strategy", ["staged", "packed"])
def test_staged_and_packed_batches_land_and_notify(strategy):
    # packed: the src packs each wave on a pack order sent over its side channel (op
    # "pack", answers polled while READs run) and frees the lease (op "release")
    case = CASES["2to3_non_divisible"]
    with cluster(case, strategy=strategy) as (sources, readers, dst_memory):
        read_and_check(case, readers, dst_memory, strategy)
        plans = plan_all(case.spec, case.src_tp, case.dst_tp)
        for src_rank, source in enumerate(sources):
            readers_of_rank = sum(src_rank in plan.src_ranks for plan in plans)
            source.wait_for_reads(case.request_ids[0], readers_of_rank, timeout_s=10)
            assert source.notification_drops == {}
            if strategy == "packed" and readers_of_rank:
                assert source.pack.requests > 0 and _leases_released(source)


STACKED_CASES = {
    # every page holds 5 layers unit-major; the one group replicated on the dst side
    "1to2_stacked": Case(stack_layers(MAMBA2_ONE_GROUP, 5), 1, 2, num_layers=1),
    # GDN 4 -> 2 (key heads replicated on the src side), SD conv rows, two regions of 3 layers
    "4to2_gdn_stacked": Case(stack_layers(GDNSpec(num_k_heads=2, num_v_heads=4, head_k_dim=4, head_v_dim=2,
                                                  conv_layout="SD"), 3), 4, 2, num_layers=2),
}


@pytest.mark.parametrize("strategy", ["direct", "staged", "packed"])
@pytest.mark.parametrize("name", sorted(STACKED_CASES))
def test_stacked_pages_move_with_every_strategy(name, strategy):
    """Endpoints and readers take a StackedSpec like any spec: one region's page holds
    several layers unit-major, and each strategy rebuilds the dst's stacked pages exactly
    with as many pieces per page as one layer needs."""
    case = STACKED_CASES[name]
    with cluster(case, strategy=strategy) as (sources, readers, dst_memory):
        read_and_check(case, readers, dst_memory, strategy)
        for rank, reader in enumerate(readers):
            base_plan = plan_all(case.spec.base, case.src_tp, case.dst_tp)[rank]
            assert reader.plan.spec == case.spec and len(reader.plan.reads) == len(base_plan.reads)
            assert reader.plan.nbytes == case.spec.num_layers * base_plan.nbytes


def test_stacked_and_per_layer_engines_refuse_each_other():
    stacked = STACKED_CASES["1to2_stacked"]
    per_layer = Case(MAMBA2_ONE_GROUP, 1, 2, num_layers=5)
    memory = stacked.src_memory(0)
    with Endpoint(stacked.spec, tp=1, rank=0, memory=[memory], regions=stacked.regions("src", memory.ctypes.data)) as src:
        src.serve("127.0.0.1", 0)
        dst_memory = per_layer.dst_memory()
        with Endpoint(per_layer.spec, tp=2, rank=0, memory=[dst_memory],
                      regions=per_layer.regions("dst", dst_memory.ctypes.data)) as dst, Reader(dst) as reader:
            with pytest.raises(SpecMismatchError, match="stacked on both"):
                reader.connect_to(*src.address)
        assert (dst_memory == per_layer.dst_memory()).all()


def _leases_released(source, timeout_s: float = 5.0) -> bool:
    """Releases are sent without waiting for their answer: give them a moment."""
    deadline = time.monotonic() + timeout_s
    while source.pack.area.num_leases and time.monotonic() < deadline:
        time.sleep(0.01)
    return source.pack.area.num_leases == 0


def test_auto_on_host_memory_never_offers_peer_and_says_why():
    # the peer strategy maps GPU memory; on DRAM the handshake publishes no CUDA IPC
    # handle, `auto` picks among the NIXL strategies, and forcing peer is refused
    case = CASES[sorted(CASES)[0]]
    with cluster(case, strategy="auto") as (sources, readers, dst_memory):
        assert all(not s.handshake().ipc_exports and s.ipc_unavailable for s in sources)
        for rank, reader in enumerate(readers):
            why = reader.strategies()
            assert "publishes no CUDA IPC handles" in why["peer"] and why["direct"] is None
            stats = reader.read(case.pairs_array, case.request_ids)
            assert stats.strategy in ("direct", "staged", "packed")
            assert np.array_equal(dst_memory[rank], case.expected_dst(rank))
            with pytest.raises(PlanError, match="strategy 'peer' cannot run on this reader"):
                reader.read(case.pairs_array, case.request_ids, strategy="peer")
