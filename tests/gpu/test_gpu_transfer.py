"""NIXL READs of GPU memory (VRAM) between processes, checked byte for byte on the GPU.

Skipped cleanly without torch, without a CUDA device, or without nixl. On a GPU machine:

    UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y SSM_SPLIT_RESULTS_DIR=results python -m pytest tests/gpu -s

(the variable is set here if unset; without it UCX emulates GPU READs over TCP at about
0.4 GB/s). Every src engine runs in its own process (spawned), found through its side
channel; the dst ranks run in the test process.

- `test_vram_transfer_matches_the_reference`: small specs, pages from
  `reference.shard`, several TP pairs (replication, SD layout, P > D, D > P, and pages
  that stack several layers).
- `test_vram_throughput`: real models, 64 requests with scattered block ids, random page
  bytes; checked against the plan's reads applied one by one, then timed (median of 5
  batches, all dst ranks at once) next to a `torch` copy of the same bytes. Results are
  printed and, with `SSM_SPLIT_RESULTS_DIR` set, written to `gpu_transfer.json` there.

`SSM_SPLIT_GPU_TEST_DEVICE=cpu` runs the same code on DRAM with numpy and small sizes:
only for developing this file on a machine without a GPU.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

DEVICE = os.environ.get("SSM_SPLIT_GPU_TEST_DEVICE", "cuda")
SRC_GPU = DST_GPU = 0
if DEVICE == "cuda":
    torch = pytest.importorskip("torch")  # before nixl: it picks its CUDA variant from torch
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device", allow_module_level=True)
    os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")  # before any UCX context
    DST_GPU = 1 if torch.cuda.device_count() >= 2 else 0  # engines on different GPUs when there are two
    torch.cuda.set_device(DST_GPU)
    torch.zeros(1, device=f"cuda:{DST_GPU}")  # CUDA context before any NIXL agent
SRC_DEVICE = "cpu" if DEVICE == "cpu" else f"cuda:{SRC_GPU}"
pytest.importorskip("nixl")

from ssm_split import GDNSpec, Mamba2Spec, model, plan_all  # noqa: E402
from ssm_split.nixl_backend import Endpoint, Reader  # noqa: E402
from ssm_split.specs import stack_layers  # noqa: E402
from ssm_split.strategies import DEFAULT_COST_MODEL  # noqa: E402
from tests.nixl._cluster import Case, expected_by_reads, random_src_memory  # noqa: E402
from tests.nixl._peer import SrcEngine  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.nixl]
RESULTS: list[dict] = []


# --- memory on the device under test -----------------------------------------------------

def to_device(host: np.ndarray):
    return host if DEVICE == "cpu" else torch.from_numpy(host).to(f"cuda:{DST_GPU}")


def address(memory) -> int:
    return int(memory.ctypes.data) if DEVICE == "cpu" else int(memory.data_ptr())


def mismatched_nbytes(memory, expected: np.ndarray) -> int:
    """Bytes that differ, counted on the GPU (only the count comes back)."""
    if DEVICE == "cpu":
        return int(np.count_nonzero(memory != expected))
    return int((memory != torch.from_numpy(expected).to(memory.device)).sum().item())


def synchronize() -> None:
    if DEVICE == "cuda":
        for gpu in {SRC_GPU, DST_GPU}:
            torch.cuda.synchronize(gpu)


# --- dst ranks in this process ----------------------------------------------------------

def dst_ranks(case: Case, engine: SrcEngine, strategy: str = "auto", model=None):
    """Every dst rank's (endpoint, reader, memory), connected and warmed up."""
    sides = []
    for rank in range(case.dst_tp):
        memory = to_device(case.dst_memory())
        endpoint = Endpoint(case.spec, tp=case.dst_tp, rank=rank, memory=[memory],
                            regions=case.regions("dst", address(memory), DST_GPU))
        assert endpoint.num_threads == (4 if DEVICE == "cuda" else 0)  # the default by memory type
        reader = Reader(endpoint, strategy=strategy, staging_nbytes=64 << 20, model=model)
        for host, port in engine.addresses:
            reader.connect_to(host, port)
        reader.warm_up()
        sides.append((endpoint, reader, memory))
    return sides


def close(sides) -> None:
    for endpoint, reader, _ in sides:
        reader.close()
        endpoint.close()


def read_all(sides, pairs: np.ndarray, request_id: str) -> tuple[float, list]:
    """Post every dst rank's batch at once; wall time until all are done and synced."""
    synchronize()
    started = time.perf_counter()
    pending = [reader.start_read(pairs, request_id) for _, reader, _ in sides]
    stats = [p.wait() for p in pending]
    synchronize()
    return time.perf_counter() - started, stats


# --- correctness against the reference ------------------------------------------------------

CASES = {
    "1to2_mamba2_replicated": Case(Mamba2Spec(num_heads=8, head_dim=16, num_groups=1, state_size=16,
                                              ssm_dtype="float32"), 1, 2),
    "4to2_gdn": Case(GDNSpec(num_k_heads=2, num_v_heads=8, head_k_dim=16, head_v_dim=16), 4, 2,
                     dst_order="block"),
    "2to4_mamba2_sd": Case(Mamba2Spec(num_heads=8, head_dim=8, num_groups=2, state_size=8,
                                      conv_layout="SD"), 2, 4),
    # one page holds 6 layers unit-major (`StackedSpec`); the one group replicated on the dst
    "1to2_mamba2_stacked": Case(stack_layers(Mamba2Spec(num_heads=8, head_dim=16, num_groups=1, state_size=16),
                                             6), 1, 2, num_layers=1),
}


STRATEGIES = ["direct", "staged", "packed"] + (["peer-kernel", "peer-copy-engines"] if DEVICE == "cuda" else [])
# the peer strategy's engine follows the cost model: these make one engine the cheaper
PEER_MODELS = {"peer-kernel": replace(DEFAULT_COST_MODEL, ce_copy_s=1.0),
               "peer-copy-engines": replace(DEFAULT_COST_MODEL, ce_copy_s=0.0, ce_byte_s=0.0)}


def peer_engine_expected(variant: str) -> str:
    from ssm_split.nixl_backend._batchcopy import batch_copy_available

    cross = SRC_GPU != DST_GPU and batch_copy_available()  # copy engines only between two GPUs
    return "copy-engines" if variant == "peer-copy-engines" and cross else "kernel"


@pytest.fixture(scope="module", params=sorted(CASES))
def reference_engine(request):
    """One src engine per case, shared by the strategies (each reads with its own ids)."""
    with SrcEngine(CASES[request.param], SRC_DEVICE, "reference", start_timeout_s=300) as engine:
        yield request.param, engine


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_vram_transfer_matches_the_reference(reference_engine, strategy):
    name, engine = reference_engine
    case = CASES[name]
    plans = plan_all(case.spec, case.src_tp, case.dst_tp)
    sides = dst_ranks(case, engine, strategy.split("-")[0], model=PEER_MODELS.get(strategy))
    try:
        _, stats = read_all(sides, case.pairs_array, f"{name}-{strategy}")
        for rank, (_, _, memory) in enumerate(sides):
            assert stats[rank].strategy == strategy.split("-")[0]
            if strategy.startswith("peer"):
                assert stats[rank].engine == peer_engine_expected(strategy)
            if strategy == "direct":
                assert stats[rank].num_transfers == len(plans[rank].src_ranks)
            bad = mismatched_nbytes(memory, case.expected_dst(rank))
            assert bad == 0, f"dst rank {rank}: {bad} bytes differ from reference.shard"
        counts = [sum(r in p.src_ranks for p in plans) for r in range(case.src_tp)]
        assert engine.ask(("wait", [f"{name}-{strategy}"], counts), "waited") == counts
    finally:
        close(sides)


# --- throughput ----------------------------------------------------------------------------

SMALL = DEVICE == "cpu"
THROUGHPUT = [  # model, src_tp, dst_tp, layers, layout
    ("qwen3.5-27b", 1, 2, 8, "layer"),
    ("qwen3.5-27b", 2, 1, 8, "layer"),
    ("nemotron-h-56b", 2, 4, 4, "layer"),
]


def _throughput_case(name: str, src_tp: int, dst_tp: int, layers: int, layout: str) -> Case:
    requests = 8 if SMALL else 64
    num_blocks = requests + requests // 4
    rng = np.random.default_rng(7)
    pairs = np.stack([rng.permutation(num_blocks)[:requests], rng.permutation(num_blocks)[:requests]], 1)
    return Case(model(name), src_tp, dst_tp, num_layers=2 if SMALL else layers,
                num_blocks=num_blocks, pairs=tuple(map(tuple, pairs.tolist())),
                src_order=layout, dst_order=layout, src_pad=0, dst_pad=0, seed=11)


def _copy_limit_s(nbytes: int, reps: int = 5) -> float:
    """Median time of one device-to-device copy of `nbytes` (the copy limit)."""
    if DEVICE == "cpu":
        src, dst = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            np.copyto(dst, src)
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    src = torch.ones(nbytes, dtype=torch.uint8, device=f"cuda:{SRC_GPU}")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{DST_GPU}")
    dst.copy_(src)
    times = []
    for _ in range(reps):
        synchronize()
        started = time.perf_counter()
        dst.copy_(src)
        synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _record(entry: dict) -> None:
    RESULTS.append(entry)
    print("\n" + json.dumps(entry))
    folder = os.environ.get("SSM_SPLIT_RESULTS_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "gpu_transfer.json").write_text(json.dumps(RESULTS, indent=1) + "\n")


@pytest.mark.parametrize("name, src_tp, dst_tp, layers, layout", THROUGHPUT)
def test_vram_throughput(name, src_tp, dst_tp, layers, layout):
    case = _throughput_case(name, src_tp, dst_tp, layers, layout)
    with SrcEngine(case, SRC_DEVICE, "random", start_timeout_s=300) as engine:
        sides = dst_ranks(case, engine)
        try:
            read_all(sides, case.pairs_array, "first")  # untimed: first-touch and set-up
            src_memories = [random_src_memory(case, r) for r in range(case.src_tp)]
            for rank, (_, _, memory) in enumerate(sides):
                bad = mismatched_nbytes(memory, expected_by_reads(case, rank, src_memories))
                assert bad == 0, f"dst rank {rank}: {bad} bytes differ from the plan's reads"
            del src_memories
            runs = [read_all(sides, case.pairs_array, f"rep-{k}") for k in range(5)]
        finally:
            close(sides)
    seconds = statistics.median(t for t, _ in runs)
    stats = runs[0][1]
    nbytes = sum(s.nbytes for s in stats)
    copy_s = _copy_limit_s(nbytes)
    _record({
        "test": "vram_throughput", "model": name, "src_tp": src_tp, "dst_tp": dst_tp,
        "layers": case.num_layers, "batch": len(case.pairs), "layout": layout,
        "strategy_run": sorted({s.strategy for s in stats}), "src_gpu": SRC_GPU, "dst_gpu": DST_GPU,
        "reads": sum(s.num_reads for s in stats), "descriptors": sum(s.num_descriptors for s in stats),
        "transfers": sum(s.num_transfers for s in stats), "nbytes": nbytes,
        "median_s": seconds, "gbps": nbytes / seconds / 1e9,
        "copy_limit_gbps": nbytes / copy_s / 1e9, "pct_of_copy_limit": 100 * copy_s / seconds,
        "device": "cpu (dry run)" if DEVICE == "cpu" else torch.cuda.get_device_name(),
        "torch": None if DEVICE == "cpu" else torch.__version__,
        "nixl": importlib.metadata.version("nixl"), "python": platform.python_version(),
        "UCX_CUDA_IPC_ENABLE_GET_ZCOPY": os.environ.get("UCX_CUDA_IPC_ENABLE_GET_ZCOPY"),
    })
    assert nbytes == len(case.pairs) * case.num_layers * sum(
        p.dst_content_nbytes for p in plan_all(case.spec, src_tp, dst_tp))


def test_results_were_recorded_when_asked():
    folder = os.environ.get("SSM_SPLIT_RESULTS_DIR")
    if not folder or not RESULTS:
        pytest.skip("set SSM_SPLIT_RESULTS_DIR and run the throughput tests to record results")
    assert json.loads((Path(folder) / "gpu_transfer.json").read_text()) == RESULTS


# --- the peer strategy when the src goes away or re-registers -------------------------------

@pytest.mark.skipif(DEVICE != "cuda", reason="the peer strategy maps GPU memory")
@pytest.mark.parametrize("fault", ["reregistered", "killed"])
def test_peer_reads_from_a_changed_src_are_typed_errors(fault):
    from ssm_split.errors import StaleHandshakeError, TransferError

    case = CASES["1to2_mamba2_replicated"]
    with SrcEngine(case, SRC_DEVICE, "reference", start_timeout_s=300) as engine:
        sides = dst_ranks(case, engine, "peer")
        try:
            read_all(sides, case.pairs_array, "before")  # the mapping works
            if fault == "reregistered":
                engine.ask(("reregister", 0), "reregistered")
                expected = StaleHandshakeError
            else:
                engine.kill()
                expected = TransferError
            for _, reader, _ in sides:
                with pytest.raises(expected) as info:
                    reader.read(case.pairs_array, f"after-{fault}", timeout_s=10)
                assert info.value.request == f"after-{fault}" and info.value.peer == engine.names[0]
        finally:
            close(sides)
