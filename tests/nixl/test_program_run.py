"""The dst's wave driver (`_run.ProgramRun`) and the src's pack answer (`_pack_src`), with
READs, pack orders and copies executed on host memory in this process (no NIXL).

The src's answers come from the real `answer_pack` over a real `PackArea`; READs land
one poll after they are posted; a test can make the src busy, stale or refusing. Every
strategy must leave the dst pages equal to the reference, never run more than two waves
at once, release every lease, and fail with a typed error naming the request and peer.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssm_split import GDNSpec, Mamba2Spec, RegionSet, plan_reads, reference
from ssm_split.errors import StaleHandshakeError, TransferError
from ssm_split.layout import Buffer
from ssm_split.nixl_backend._copier import HostCopier
from ssm_split.nixl_backend._pack_src import PackArea, answer_pack, answer_release, order_to_wire
from ssm_split.nixl_backend._run import ProgramRun
from ssm_split.strategies import CopyTable, direct_program, pack_plan, packed_program, staged_program

POISON = 0xEE


class _Cluster:
    """Src ranks with pages and pack areas, one dst rank, all numpy arrays here."""

    def __init__(self, spec, src_tp, dst_tp, dst_rank, *, num_layers=2, num_blocks=6, area_nbytes=1 << 20):
        self.spec, self.src_tp, self.dst_tp, self.dst_rank = spec, src_tp, dst_tp, dst_rank
        self.plan = plan_reads(spec, src_tp, dst_tp, dst_rank)
        self.num_layers, self.num_blocks = num_layers, num_blocks
        self.arrays = []
        self.src = []
        for rank in range(src_tp):
            page = self.plan.src_content_nbytes + 16
            pages = np.zeros(num_layers * num_blocks * page, np.uint8)
            regions = RegionSet.packed(pages.ctypes.data, num_layers=num_layers, num_blocks=num_blocks,
                                       page_nbytes=page)
            for layer in range(num_layers):
                for block in range(num_blocks):
                    shard = reference.shard(spec, self.state(layer, block), src_tp)[rank]
                    at = regions.page_addr(layer, block) - pages.ctypes.data
                    pages[at: at + shard.size] = shard
            area_memory = np.zeros(area_nbytes, np.uint8)
            area = PackArea(Buffer(area_memory.ctypes.data, area_nbytes, 0), area_memory)
            endpoint = SimpleNamespace(generation=1, registered=True, spec=spec, tp=src_tp, rank=rank,
                                       regions=regions)
            self.src.append(SimpleNamespace(endpoint=endpoint, area=area, copier=HostCopier([pages, area_memory]),
                                            pages=pages))
            self.arrays += [pages, area_memory]
        page = self.plan.dst_content_nbytes + 8
        self.dst_pages = np.full(num_layers * num_blocks * page, POISON, np.uint8)
        self.dst_regions = RegionSet.packed(self.dst_pages.ctypes.data, num_layers=num_layers,
                                            num_blocks=num_blocks, page_nbytes=page)
        self.staging_memory = np.zeros(1 << 20, np.uint8)
        self.staging = Buffer(self.staging_memory.ctypes.data, self.staging_memory.size, 0)
        self.arrays += [self.dst_pages, self.staging_memory]
        self.copier = HostCopier(self.arrays)
        self.answers: dict[int, object] = {}
        self.posted, self.released, self.in_flight_peak = [], [], 0
        self.busy_left = 0
        self.generation_seen = 1

    def state(self, layer, block):
        return reference.random_state(self.spec, 1000 * layer + block)

    @property
    def src_regions(self):
        return [s.endpoint.regions for s in self.src]

    # --- what the reader would do over NIXL and the side channel ---------------------------
    def post_read(self, rank):
        self.copier.launch(SimpleNamespace(src_addrs=rank.src_descs[:, 0], dst_addrs=rank.dst_descs[:, 0],
                                           nbytes=rank.dst_descs[:, 1], num_copies=rank.num_descriptors))
        handle = {"polls": 0}
        self.posted.append(handle)
        return handle

    @staticmethod
    def read_done(handle):
        handle["polls"] += 1
        return handle["polls"] > 1  # lands one poll later

    def send_order(self, order):
        return ("order", order)

    def answer(self, ticket):
        _, order = ticket
        if self.busy_left:
            self.busy_left -= 1
            return {"ok": False, "kind": "busy", "error": "full"}
        src = self.src[order.src_rank]
        request = {"generation": self.generation_seen, "dst_tp": self.dst_tp, "dst_rank": self.dst_rank,
                   "order": order_to_wire(order)}
        got = answer_pack(src.endpoint, src.area, src.copier, request)
        self.in_flight_peak = max(self.in_flight_peak, sum(s.area.num_leases for s in self.src))
        return got

    def release(self, rank, lease):
        assert answer_release(self.src[rank].area, {"lease": lease})["released"]
        self.released.append((rank, lease))

    def run(self, program, deadline=float("inf")):
        run = ProgramRun(program, label="batch", peer_names={r: f"src-{r}" for r in range(self.src_tp)},
                         post_read=self.post_read, read_done=self.read_done, send_order=self.send_order,
                         answer=self.answer, release=self.release,
                         src_areas={r: s.area.buffer for r, s in enumerate(self.src)}, copier=self.copier,
                         read_parts=3, deadline=deadline)
        give_up = time.monotonic() + 5.0
        while time.monotonic() < give_up:
            if run.poll():
                return run
        raise AssertionError("the program never finished")

    def check(self, pairs, layers=None):
        want = np.full_like(self.dst_pages, POISON)
        for layer in range(self.num_layers) if layers is None else layers:
            for src_block, dst_block in pairs:
                shard = reference.shard(self.spec, self.state(layer, src_block), self.dst_tp)[self.dst_rank]
                at = self.dst_regions.page_addr(layer, dst_block) - self.dst_pages.ctypes.data
                want[at: at + shard.size] = shard
        assert np.array_equal(self.dst_pages, want)


CASES = [(Mamba2Spec(num_heads=4, head_dim=4, num_groups=1, state_size=8), 1, 2, 1),
         (GDNSpec(num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8, conv_layout="SD"), 2, 1, 0),
         (Mamba2Spec(num_heads=6, head_dim=4, num_groups=1, state_size=8, conv_layout="SD"), 2, 3, 1)]


@settings(max_examples=20, deadline=None)
@given(case=st.sampled_from(CASES), strategy=st.sampled_from(["direct", "staged", "packed"]),
       requests_per_wave=st.integers(1, 4), busy=st.integers(0, 3))
def test_every_strategy_fills_the_dst_pages(case, strategy, requests_per_wave, busy):
    cluster = _Cluster(*case)
    pairs = np.array([[5, 0], [1, 3], [2, 1], [0, 5], [4, 2]])
    plan = cluster.plan
    if strategy == "direct":
        program = direct_program(plan, cluster.src_regions, cluster.dst_regions, pairs)
    elif strategy == "staged":
        program = staged_program(plan, cluster.src_regions, cluster.dst_regions, pairs, staging=cluster.staging)
    else:
        per_request = sum(pack_plan(plan).slot_nbytes) * cluster.num_layers
        staging = Buffer(cluster.staging.addr, 2 * per_request * requests_per_wave, 0)
        program = packed_program(plan, cluster.src_regions, cluster.dst_regions, pairs, staging=staging,
                                 src_pack_limits={r: 1 << 19 for r in plan.src_ranks})
        assert len(program.waves) == -(-5 // requests_per_wave)
    cluster.busy_left = busy
    cluster.run(program)
    cluster.check(pairs.tolist())
    if strategy == "packed":
        assert len(cluster.released) == len(program.waves) * len(plan.src_ranks)  # every lease given back
        assert all(s.area.num_leases == 0 for s in cluster.src)
        assert cluster.in_flight_peak <= 2 * len(plan.src_ranks)  # at most two waves at once


def _packed(cluster, pairs):
    return packed_program(cluster.plan, cluster.src_regions, cluster.dst_regions, pairs, staging=cluster.staging,
                          src_pack_limits={r: 1 << 19 for r in cluster.plan.src_ranks})


def test_a_src_at_another_generation_is_a_stale_handshake():
    cluster = _Cluster(*CASES[0])
    cluster.generation_seen = 3  # the reader's handshake is older than the src's pages
    with pytest.raises(StaleHandshakeError, match=r"\[request 'batch', peer 'src-0'\].*generation 3"):
        cluster.run(_packed(cluster, np.array([[0, 1]])))


def test_a_refusing_src_names_request_and_peer():
    cluster = _Cluster(*CASES[0])
    cluster.src[0].endpoint.tp = 2  # the src now plans for another TP: its fingerprint differs
    with pytest.raises(TransferError, match=r"\[request 'batch', peer 'src-0'\].*refused to pack"):
        cluster.run(_packed(cluster, np.array([[0, 1]])))


def test_a_src_that_stays_busy_misses_the_deadline():
    cluster = _Cluster(*CASES[0])
    cluster.busy_left = 10 ** 9
    with pytest.raises(TransferError, match="did not complete before the deadline"):
        cluster.run(_packed(cluster, np.array([[0, 1]])), deadline=time.monotonic() + 0.05)


def test_copies_that_cannot_start_fail_the_batch_naming_it():
    cluster = _Cluster(*CASES[1])

    reads = cluster.copier  # the cluster's READs are host copies too: they still run

    class RefusingCopier:  # as the GPU copier answers a driver that refuses a batch of copies
        def launch(self, table):
            if isinstance(table, CopyTable):
                raise TransferError("The copy engines refused the batch: CUDA_ERROR_INVALID_VALUE")
            return reads.launch(table)

    cluster.copier = RefusingCopier()
    program = staged_program(cluster.plan, cluster.src_regions, cluster.dst_regions, np.array([[0, 1]]),
                             staging=cluster.staging)
    with pytest.raises(TransferError, match=r"\[request 'batch'\].*wave 1 of 1.*could not start.*refused"):
        cluster.run(program)


def test_the_pack_area_leases_first_fit_and_expires():
    memory = np.zeros(4096, np.uint8)
    area = PackArea(Buffer(memory.ctypes.data, 4096, 0), memory)
    first, second = area.lease(1000, 60), area.lease(1000, 60)
    assert first[1] == 0 and second[1] == 1024  # aligned to 256
    assert area.lease(2100, 60) is None  # 2048 left
    assert area.release(first[0]) and not area.release(first[0])
    assert area.lease(1024, 60)[1] == 0
    short = area.lease(1000, 1e-6)
    time.sleep(0.01)
    assert short is not None and area.lease(2048, 60) is not None  # the expired lease was reclaimed
    refused = answer_pack(SimpleNamespace(generation=1, registered=True), None, None, {})
    assert refused["kind"] == "refused" and "no pack area" in refused["error"]
