"""Transfer programs (`ssm_split.strategies`) executed on simulated memory, against the
reference model.

A `_Memory` maps address ranges to numpy byte arrays: every src rank's pages and pack
area, the dst pages and the dst staging area; peer programs see the src pages a second
time at other ("mapped") addresses. Executing a program copies bytes exactly as its
steps say (pack copies on the src with a lease offset Hypothesis draws, READs, scatters),
one wave after the other. Afterwards every dst page of the batch must equal
`reference.shard` of its src block's state, and every other byte of the dst pages
(padding, other blocks, other layers) must keep its poison — for every family, DS and
SD, P > D, D > P, non-divisible and replicated cases, and staging or pack areas small
enough to need several waves.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ssm_split import GDNSpec, Mamba2Spec, RegionSet, plan_reads, reference
from ssm_split.errors import PlanError
from ssm_split.layout import Buffer
from ssm_split.strategies import (CopyTable, PackLayout, apply_packed, direct_program, fetch_reads,
                                  mapped_regions, pack_copies, pack_plan, packed_program, peer_program,
                                  staged_program)
from ssm_split.expand._expand import merged_reads
from ssm_split.strategies import PEER_ENGINES
from tests.strategies import paddings, rank_cases, seeds

POISON, SRC_FILL = 0xE7, 0x3C


class _Memory:
    """Byte arrays at addresses; a copy resolves each end to the one array holding it."""

    def __init__(self):
        self.spans: list[tuple[int, np.ndarray]] = []

    def add(self, addr: int, array: np.ndarray) -> None:
        self.spans.append((addr, array))

    def view(self, addr: int, nbytes: int) -> np.ndarray:
        for base, array in self.spans:
            if base <= addr and addr + nbytes <= base + array.size:
                return array[addr - base: addr - base + nbytes]
        raise AssertionError(f"[{addr:#x}, +{nbytes}) is in no buffer of this side")

    def copy_from(self, other: "_Memory", src_addr: int, dst_addr: int, nbytes: int) -> None:
        self.view(dst_addr, nbytes)[:] = other.view(src_addr, nbytes)


def _run_reads(reads, src_mems, dst_mem) -> None:
    for rank in reads:
        assert rank.dst_descs.shape == rank.src_descs.shape
        for (d, n, _), (s, n2, _) in zip(rank.dst_descs.tolist(), rank.src_descs.tolist()):
            assert n == n2
            dst_mem.copy_from(src_mems[rank.src_rank], s, d, n)


def _run_copies(table: CopyTable, mem: _Memory) -> None:
    for s, d, n in zip(table.src_addrs.tolist(), table.dst_addrs.tolist(), table.nbytes.tolist()):
        mem.copy_from(mem, s, d, n)


@st.composite
def _batches(draw, *, max_tp: int = 4):
    spec, src_tp, dst_tp, dst_rank = draw(rank_cases(max_tp=max_tp))
    num_layers = draw(st.integers(1, 3))
    num_blocks = draw(st.integers(1, 6))
    count = draw(st.integers(1, num_blocks))
    src_blocks = draw(st.permutations(range(num_blocks)))[:count]
    dst_blocks = draw(st.permutations(range(num_blocks)))[:count]
    layers = draw(st.one_of(st.none(), st.lists(st.integers(0, num_layers - 1), min_size=1, unique=True)))
    return (spec, src_tp, dst_tp, dst_rank, num_layers, num_blocks, np.array(list(zip(src_blocks, dst_blocks))),
            layers, draw(paddings()), draw(paddings()), draw(st.sampled_from(["layer", "block"])), draw(seeds()))


class _World:
    """Both sides of one transfer, in simulated memory."""

    def __init__(self, batch):
        (self.spec, self.src_tp, self.dst_tp, self.dst_rank, self.num_layers, self.num_blocks, self.pairs,
         self.layers, src_pad, dst_pad, order, self.seed) = batch
        self.plan = plan_reads(self.spec, self.src_tp, self.dst_tp, self.dst_rank)
        src_page = self.plan.src_content_nbytes + src_pad
        self.dst_page = self.plan.dst_content_nbytes + dst_pad
        self.src_mems, self.src_regions = [], []
        for rank in range(self.src_tp):
            base = (rank + 1) << 36
            array = np.full(self.num_layers * self.num_blocks * src_page, SRC_FILL, np.uint8)
            regions = RegionSet.packed(base, num_layers=self.num_layers, num_blocks=self.num_blocks,
                                       page_nbytes=src_page, order=order, device_id=rank)
            for layer in range(self.num_layers):
                for block in range(self.num_blocks):
                    page = reference.shard(self.spec, self.state(layer, block), self.src_tp)[rank]
                    at = regions.page_addr(layer, block) - base
                    array[at: at + page.size] = page
            mem = _Memory()
            mem.add(base, array)
            self.src_mems.append(mem)
            self.src_regions.append(regions)
        self.dst_base = 1 << 30
        self.dst_array = np.full(self.num_layers * self.num_blocks * self.dst_page, POISON, np.uint8)
        self.dst_regions = RegionSet.packed(self.dst_base, num_layers=self.num_layers, num_blocks=self.num_blocks,
                                            page_nbytes=self.dst_page, order=order, device_id=7)
        self.dst_mem = _Memory()
        self.dst_mem.add(self.dst_base, self.dst_array)

    def state(self, layer: int, block: int) -> dict:
        return reference.random_state(self.spec, self.seed + 97 * layer + 10007 * block)

    def staging(self, nbytes: int) -> Buffer:
        base = 1 << 34
        self.dst_mem.add(base, np.zeros(nbytes, np.uint8))
        return Buffer(base, nbytes, 7)

    def check(self) -> None:
        layers = range(self.num_layers) if self.layers is None else self.layers
        want = np.full_like(self.dst_array, POISON)
        for layer in layers:
            for src_block, dst_block in self.pairs.tolist():
                page = reference.shard(self.spec, self.state(layer, src_block), self.dst_tp)[self.dst_rank]
                at = self.dst_regions.page_addr(layer, dst_block) - self.dst_base
                want[at: at + page.size] = page
        bad = np.flatnonzero(self.dst_array != want)
        assert not bad.size, f"{bad.size} dst bytes wrong, first at {int(bad[0])}"


@given(batch=_batches())
def test_direct_program_rebuilds_the_batch(batch):
    world = _World(batch)
    program = direct_program(world.plan, world.src_regions, world.dst_regions, world.pairs, layers=world.layers)
    assert len(program.waves) == 1 and program.waves[0].scatter is None
    _run_reads(program.waves[0].reads, world.src_mems, world.dst_mem)
    world.check()
    assert program.nbytes == world.plan.nbytes * world.pairs.shape[0] * program.layers.shape[0]


@given(batch=_batches(), halves=st.integers(1, 6))
def test_staged_program_rebuilds_the_batch_in_waves(batch, halves):
    world = _World(batch)
    from ssm_split.strategies import stage_plan
    from ssm_split.strategies._cost import CostModel

    always = CostModel(desc_s=1.0, byte_s=1e-15, gather_byte_s=1e-15)  # stage every group it can
    slot = stage_plan(world.plan, model=always).slot_nbytes
    num_layers = world.num_layers if world.layers is None else len(world.layers)
    staging = world.staging(2 * max(slot * num_layers * halves, 256))
    program = staged_program(world.plan, world.src_regions, world.dst_regions, world.pairs, staging=staging,
                             layers=world.layers, model=always)
    for w, wave in enumerate(program.waves):
        _run_reads(wave.reads, world.src_mems, world.dst_mem)
        half = (staging.addr + (w % 2) * (staging.nbytes // 2), staging.nbytes // 2)
        for rank in wave.reads:  # a wave lands only in its own half of the staging area
            for addr, nbytes, _ in rank.dst_descs.tolist():
                if staging.addr <= addr < staging.addr + staging.nbytes:
                    assert half[0] <= addr and addr + nbytes <= half[0] + half[1]
        if wave.scatter is not None:
            _run_copies(wave.scatter, world.dst_mem)
    world.check()
    if slot:
        assert len(program.waves) == -(-world.pairs.shape[0] // halves)


@given(batch=_batches(), halves=st.integers(1, 5), leases=st.lists(st.integers(0, 4096), min_size=8, max_size=8),
       parts=st.integers(1, 5))
@example(batch=(Mamba2Spec(num_heads=4, head_dim=4, num_groups=1, state_size=8), 1, 2, 0, 2, 4,
                np.array([[3, 0], [0, 2], [2, 3]]), None, 0, 8, "layer", 0), halves=1, leases=[0] * 8, parts=2)
def test_packed_program_rebuilds_the_batch_in_waves(batch, halves, leases, parts):
    world = _World(batch)
    packed = pack_plan(world.plan)
    num_layers = world.num_layers if world.layers is None else len(world.layers)
    per_request = sum(packed.slot_nbytes) * num_layers
    staging = world.staging(2 * per_request * halves)
    areas = {}
    for rank in world.plan.src_ranks:  # each src rank's pack area, at its own addresses
        nbytes = packed.slot_nbytes[rank] * num_layers * halves + max(leases)
        areas[rank] = Buffer(((rank + 1) << 36) + (1 << 33), nbytes, rank)
        world.src_mems[rank].add(areas[rank].addr, np.zeros(nbytes, np.uint8))
    limits = {r: areas[r].nbytes - max(leases) for r in world.plan.src_ranks}
    program = packed_program(world.plan, world.src_regions, world.dst_regions, world.pairs, staging=staging,
                             src_pack_limits=limits, layers=world.layers)
    assert len(program.waves) == -(-world.pairs.shape[0] // halves)
    for w, wave in enumerate(program.waves):
        assert sorted(o.src_rank for o in wave.packs) == list(world.plan.src_ranks)
        for i, order in enumerate(wave.packs):
            lease = leases[(w + i) % len(leases)]
            # the src builds its half from its own plan, as a real src does
            src_plan = plan_reads(world.spec, world.src_tp, world.dst_tp, world.dst_rank)
            _run_copies(pack_copies(src_plan, order.src_rank, world.src_regions[order.src_rank], order,
                                    areas[order.src_rank], lease), world.src_mems[order.src_rank])
            read = fetch_reads(order, areas[order.src_rank], lease, 7, parts=parts)
            assert int(read.dst_descs[:, 1].sum()) == order.layout.nbytes
            _run_reads([read], world.src_mems, world.dst_mem)
        _run_copies(wave.scatter, world.dst_mem)
    world.check()


@given(batch=_batches(), engine=st.sampled_from(PEER_ENGINES))
def test_peer_program_copies_from_the_mapped_pages(batch, engine):
    world = _World(batch)
    mapped, dst_mem = [], world.dst_mem
    for rank, regions in enumerate(world.src_regions):  # the dst sees each src buffer elsewhere
        buffer = regions.buffers[0]
        at = (1 << 40) + rank * (1 << 32)
        mapped.append(RegionSet(tuple(type(layer)(layer.base_addr - buffer.addr + at, layer.page_nbytes,
                                                  layer.page_stride_nbytes, layer.num_blocks, layer.buffer)
                                      for layer in regions.layers), (Buffer(at, buffer.nbytes, 7),)))
        dst_mem.add(at, world.src_mems[rank].spans[0][1])
    assert all(m == mapped_regions(r, [b.addr for b in m.buffers], 7)
               for m, r in zip(mapped, world.src_regions))  # the core's own mapping agrees
    program = peer_program(world.plan, mapped, world.dst_regions, world.pairs, layers=world.layers, engine=engine)
    assert len(program.waves) == 1 and not program.waves[0].reads
    paged = program.waves[0].scatter
    assert paged.engine == engine
    if engine == "copy-engines":  # the merged reads, whole: one copy each per (layer, request)
        assert len(paged.pieces) == sum(len(merged_reads(world.plan, r)[0]) for r in world.plan.src_ranks)
    assert paged.total_nbytes == program.nbytes and paged.expand().total_nbytes == program.nbytes
    _run_copies(paged.expand(), dst_mem)
    world.check()


@given(case=rank_cases(max_tp=6), seed=seeds(), pad=paddings())
def test_apply_packed_rebuilds_one_page(case, seed, pad):
    spec, src_tp, dst_tp, dst_rank = case
    plan = plan_reads(spec, src_tp, dst_tp, dst_rank)
    packed = pack_plan(plan)
    state = reference.random_state(spec, seed)
    want = reference.shard(spec, state, dst_tp, page_nbytes=plan.dst_content_nbytes + pad, pad_byte=POISON)[dst_rank]
    got = apply_packed(packed, reference.shard(spec, state, src_tp), np.full(want.size, POISON, np.uint8))
    assert np.array_equal(got, want)
    assert sum(p.nbytes for p in packed.packs) == plan.nbytes  # exactly the plan's bytes cross
    assert {r for r, n in enumerate(packed.slot_nbytes) if n} == set(plan.src_ranks)


def test_programs_refuse_what_they_cannot_run():
    spec = GDNSpec(num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8)
    world = _World((spec, 1, 2, 0, 2, 4, np.array([[0, 1], [2, 3]]), None, 0, 0, "layer", 0))
    tiny = world.staging(512)
    with pytest.raises(PlanError, match="needs .* bytes of dst staging"):
        packed_program(world.plan, world.src_regions, world.dst_regions, world.pairs, staging=tiny,
                       src_pack_limits={0: 1 << 30})
    big = world.staging(1 << 24)
    with pytest.raises(PlanError, match="does not say how much it packs"):
        packed_program(world.plan, world.src_regions, world.dst_regions, world.pairs, staging=big,
                       src_pack_limits={})
    with pytest.raises(PlanError, match="staging must be"):
        staged_program(world.plan, world.src_regions, world.dst_regions, world.pairs, staging=1 << 20)
    program = packed_program(world.plan, world.src_regions, world.dst_regions, world.pairs, staging=big,
                             src_pack_limits={0: 1 << 20})
    order = program.waves[0].packs[0]
    area = Buffer(1 << 44, order.layout.nbytes, 0)
    other = plan_reads(spec, 1, 2, 1)  # the plan of another dst rank packs differently
    with pytest.raises(PlanError, match="would pack this wave differently"):
        pack_copies(other, 0, world.src_regions[0], order, area, 0)
    with pytest.raises(PlanError, match="does not fit"):
        pack_copies(world.plan, 0, world.src_regions[0], order, area, 256)
    with pytest.raises(PlanError, match="outside its"):
        fetch_reads(order, area, 512, 0)
    with pytest.raises(PlanError, match="PackLayout.slot_nbytes must be a multiple"):
        PackLayout(100, 1, 1)
