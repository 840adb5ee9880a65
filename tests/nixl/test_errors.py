"""Bad inputs to the NIXL backend raise the typed errors, never a silent success."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("nixl")

from ssm_split.errors import BlockRangeError, HandshakeError, SpecMismatchError
from ssm_split import Mamba2Spec, PlanError, RegionSet, TransferError
from ssm_split.nixl_backend import Endpoint, Reader, decode_handshake  # noqa: E402

from ._cluster import Case  # noqa: E402

pytestmark = pytest.mark.nixl

CASE = Case(Mamba2Spec(num_heads=4, head_dim=2, num_groups=1, state_size=4), 1, 2)


def endpoint(case: Case, side: str, rank: int, **options) -> tuple[Endpoint, np.ndarray]:
    memory = case.src_memory(rank) if side == "src" else case.dst_memory()
    tp = case.src_tp if side == "src" else case.dst_tp
    ep = Endpoint(case.spec, tp=tp, rank=rank, memory=[memory],
                  regions=case.regions(side, memory.ctypes.data), **options)
    return ep, memory


@pytest.fixture(scope="module")
def pair():
    """One served src rank and one dst rank, shared by the tests below (each restores
    what it changes)."""
    src, src_memory = endpoint(CASE, "src", 0)
    src.serve()
    dst, dst_memory = endpoint(CASE, "dst", 0)
    yield src, dst, dst_memory
    dst.close()
    src.close()
    del src_memory


@pytest.fixture(params=["once", "per-batch"])
def reader(pair, request):
    _, dst, _ = pair
    with Reader(dst, strategy="direct", prepare=request.param) as r:
        yield r


def test_a_different_spec_is_a_mismatch_naming_the_field(pair):
    src, _, _ = pair
    other = dataclasses.replace(CASE, spec=dataclasses.replace(CASE.spec, ssm_dtype="float32"))
    dst, _ = endpoint(other, "dst", 0)
    try:
        with pytest.raises(SpecMismatchError, match="ssm_dtype: src='bfloat16', dst='float32'"):
            Reader(dst).connect_to(*src.address)
    finally:
        dst.close()


def test_src_ranks_of_different_engines_are_refused(pair, reader):
    src, _, _ = pair
    reader.connect(src.handshake())
    forged = dataclasses.replace(src.handshake(), tp=2, rank=1)
    with pytest.raises(HandshakeError, match="one Reader reads from one src engine"):
        reader.connect(forged)


def test_corrupted_handshake_bytes(pair, reader):
    src, _, _ = pair
    data = bytearray(src.handshake().encode())
    data[len(data) // 2] ^= 0x01
    with pytest.raises(HandshakeError):
        reader.connect(bytes(data))


def test_metadata_that_nixl_rejects_or_that_names_another_agent(pair, reader):
    src, dst, _ = pair
    own = dataclasses.replace(src.handshake(), agent_metadata=dst.agent.get_agent_metadata())
    with pytest.raises(HandshakeError, match="NIXL rejected the metadata|belongs to"):
        reader.connect(own)
    other, _ = endpoint(CASE, "src", 0)
    try:
        swapped = dataclasses.replace(src.handshake(), agent_metadata=other.handshake().agent_metadata)
        with pytest.raises(HandshakeError, match=f"belongs to '{other.name}'"):
            reader.connect(swapped)
    finally:
        other.close()


def test_regions_outside_registered_memory_are_refused(pair, reader):
    src, _, _ = pair
    hs = src.handshake()
    shifted = RegionSet.packed(hs.regions.buffers[0].addr + (1 << 30), num_layers=CASE.num_layers,
                               num_blocks=CASE.num_blocks, page_nbytes=CASE.page_nbytes("src"))
    lying = decode_handshake(dataclasses.replace(hs, regions=shifted).encode())
    if reader.prepare == "once":  # the lists are prepared at connect: NIXL refuses them there
        with pytest.raises(TransferError, match="outside memory registered") as info:
            reader.connect(lying)
        assert info.value.peer == src.name and info.value.request is None
        assert reader.peers == {}
        return
    reader.connect(lying)
    with pytest.raises(TransferError, match="outside memory registered") as info:
        reader.read(CASE.pairs_array, "lost")
    assert info.value.peer == src.name and info.value.request == "lost"


def test_deregistered_src_pages_make_the_handshake_stale(pair, reader):
    src, _, dst_memory = pair
    reader.connect_to(*src.address)
    reader.warm_up()
    src.deregister()
    try:
        with pytest.raises(HandshakeError, match="handshake is stale"):
            reader.warm_up()
    finally:
        src.register()
    reader.connect_to(*src.address)
    reader.warm_up()
    reader.read(CASE.pairs_array, CASE.request_ids)
    assert np.array_equal(dst_memory, CASE.expected_dst(0))


def test_deregistered_dst_pages_fail_the_read(pair, reader):
    src, dst, _ = pair
    reader.connect_to(*src.address)
    dst.deregister()
    try:
        with pytest.raises(TransferError, match="deregistered its pages") as info:
            reader.read(CASE.pairs_array, "nowhere")
        assert info.value.request == "nowhere"
    finally:
        dst.register()
    reader.read(CASE.pairs_array, "registered-again")  # lists made for the new registration


def test_unknown_peers(pair, reader):
    src, _, _ = pair
    with pytest.raises(HandshakeError, match="No src rank is connected"):
        reader.read(CASE.pairs_array, "x")
    with pytest.raises(HandshakeError, match="src rank 3 is not connected"):
        reader.disconnect(3)
    # a src engine of TP 2 whose rank 0, the one dst rank 0 reads from, never connected
    reader.connect(dataclasses.replace(src.handshake(), tp=2, rank=1))
    with pytest.raises(HandshakeError, match="reads from src rank 0, but no handshake"):
        reader.read(CASE.pairs_array, "x")


def test_out_of_range_blocks_and_layers(pair, reader):
    src, _, _ = pair
    reader.connect_to(*src.address)
    with pytest.raises(BlockRangeError, match="src rank 0 block id 9 is out of range"):
        reader.read(np.array([[9, 0]]), "x")
    with pytest.raises(BlockRangeError, match="dst block id -1"):
        reader.read(np.array([[0, -1]]), "x")
    with pytest.raises(BlockRangeError, match="Layer 3 is out of range"):
        reader.read(np.array([[0, 0]]), "x", layers=[3])
    with pytest.raises(PlanError, match="2 request ids for 1 block pairs"):
        reader.read(np.array([[0, 0]]), ["a", "b"])


def test_memory_that_does_not_match_the_regions():
    memory = CASE.dst_memory()
    regions = CASE.regions("dst", memory.ctypes.data + 1)
    with pytest.raises(PlanError, match="memory\\[0\\] is .* but regions.buffers\\[0\\] describes"):
        Endpoint(CASE.spec, tp=2, rank=0, regions=regions, memory=[memory])
    small = RegionSet.packed(memory.ctypes.data, num_layers=1, num_blocks=1, page_nbytes=memory.nbytes)
    with pytest.raises(PlanError, match="smaller than the"):
        Endpoint(CASE.spec, tp=1, rank=0, regions=RegionSet.packed(
            memory.ctypes.data, num_layers=1, num_blocks=memory.nbytes // 8, page_nbytes=8),
            memory=[memory])
    with pytest.raises(PlanError, match="numpy array or a torch tensor"):
        Endpoint(CASE.spec, tp=2, rank=0, regions=small, memory=[memory.tolist()])
