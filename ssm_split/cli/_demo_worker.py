"""The processes of `ssm-split demo`: one per src (prefill) rank, one per dst (decode) rank.

Each process builds its own pages from the reference model and its own NIXL endpoint.
Processes share nothing but the side channel's TCP bytes (handshakes), NIXL READs and
notifications, plus small control messages with the parent over a pipe (addresses,
"go", progress, statistics; `_demo_children` lists them). A process that fails sends
the parent one line (and its traceback, shown with `-v`) and exits 1 without printing;
one whose parent went away exits quietly.

Page contents: request `i` of layer `l` holds `reference.random_state(spec, seed(l, i))`,
so every (layer, request) page is different and a misrouted read shows.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import SsmSplitError
from ..layout._regions import RegionSet
from ..nixl_backend._nixl_hint import INSTALL_HINT
from ..specs._spec import Spec
from ._console import one_line

SRC_FILL = 0x5A
"""Src bytes outside moved content (other blocks, padding)."""
DST_FILL = 0xEE
"""Dst bytes before the transfer; outside moved content they must stay so."""


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """Everything the demo's processes need; pickled to each one at spawn."""

    spec: Spec
    src_tp: int
    dst_tp: int
    num_layers: int
    pairs: tuple[tuple[int, int], ...]
    num_blocks: int
    src_page_nbytes: int
    dst_page_nbytes: int
    order: str
    device: str
    seed: int
    batch: int
    timeout_s: float
    strategy: str = "auto"
    src_devices: tuple[int, ...] = (0,)
    dst_devices: tuple[int, ...] = (0,)

    def gpu(self, role: str, rank: int) -> int:
        """The GPU of a rank: its side's devices, round robin."""
        devices = self.src_devices if role == "src" else self.dst_devices
        return devices[rank % len(devices)]

    def state_seed(self, layer: int, request: int) -> int:
        return int(np.random.SeedSequence([self.seed, layer, request]).generate_state(1)[0])

    def request_id(self, request: int) -> str:
        return f"req-{request}"


def _prepare_process(device: str) -> None:
    """Settings of a rank process, before NIXL is imported.

    Its stdout goes to stderr (file descriptor 1 included): NIXL's Python logger, NIXL's
    C++ log and UCX all write to stdout, and the parent's stdout must hold only the
    demo's own output (a `--json` document). The process reports through its pipe.
    """
    sys.stdout.flush()
    os.dup2(2, 1)
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")  # `ssm-split -v` sets it before spawning
    if device == "cuda":  # CUDA-IPC "get" makes GPU READs zero-copy (docs/backend.md)
        os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")


def _pages(cfg: DemoConfig, tp: int, rank: int, page_nbytes: int, fill: int,
           report: Callable[[int, int], None] = lambda done, total: None) -> np.ndarray:
    """The memory of one rank: every layer's pages, with the batch's pages filled."""
    from ..reference import random_state, shard

    memory = np.full(cfg.num_layers * cfg.num_blocks * page_nbytes, fill, dtype=np.uint8)
    regions = _regions(cfg, 0, page_nbytes)
    side = 0 if fill == SRC_FILL else 1
    for layer in range(cfg.num_layers):
        for request, pair in enumerate(cfg.pairs):
            state = random_state(cfg.spec, cfg.state_seed(layer, request))
            page = shard(cfg.spec, state, tp, page_nbytes=page_nbytes, pad_byte=fill)[rank]
            start = regions.page_addr(layer, pair[side])
            memory[start: start + page_nbytes] = page
        report(layer + 1, cfg.num_layers)
    return memory


def _regions(cfg: DemoConfig, base_addr: int, page_nbytes: int, device_id: int = 0) -> RegionSet:
    return RegionSet.packed(base_addr, num_layers=cfg.num_layers, num_blocks=cfg.num_blocks,
                            page_nbytes=page_nbytes, order=cfg.order, device_id=device_id)


def _to_device(memory: np.ndarray, device: str, gpu: int = 0) -> Any:
    if device == "cpu":
        return memory
    import torch

    torch.cuda.set_device(gpu)
    return torch.from_numpy(memory).to(f"cuda:{gpu}")


def _addr(memory: Any) -> int:
    return int(memory.ctypes.data) if isinstance(memory, np.ndarray) else int(memory.data_ptr())


def _reporter(conn, role: str, rank: int, phase: str) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        conn.send(("progress", role, rank, (phase, done, total)))
    return report


def _expect(conn, word: str) -> None:
    message = conn.recv()
    if message != word:
        raise RuntimeError(f"the demo's parent sent {message!r} where {word!r} was due")


def _failure(error: BaseException) -> str:
    """One line: a missing GPU, NIXL or torch is named as such; our own errors say what
    to do; anything else is its type and message (the traceback goes along for -v)."""
    if isinstance(error, SsmSplitError):
        return one_line(error)
    if isinstance(error, ImportError):
        return one_line(f"{error} ({INSTALL_HINT})" if "nixl" in str(error).lower() else error)
    if "CUDA" in str(error) or "cuda" in type(error).__module__:
        return one_line(f"no usable CUDA device ({error}); use --device cpu")
    return one_line(f"{type(error).__name__}: {error}")


def _guard(role: str, rank: int, conn, body) -> None:
    """Run `body`; on failure tell the parent in one line, then exit 1 without a
    traceback. If the parent is gone (its pipe closed, Ctrl-C), exit quietly."""
    try:
        body()
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        raise SystemExit(1)  # the parent stopped waiting: nothing to report to
    except BaseException as error:
        try:
            conn.send(("error", role, rank, (_failure(error), traceback.format_exc())))
        except OSError:  # BrokenPipeError and the like: the parent already left
            pass
        raise SystemExit(1)
    finally:
        conn.close()


def src_main(cfg: DemoConfig, rank: int, conn) -> None:
    """A prefill rank: fill pages, serve the handshake, wait for every reader's notice."""
    _prepare_process(cfg.device)

    def body() -> None:
        from ..plan._plan import plan_all
        from ..nixl_backend._endpoint import Endpoint

        pages = _pages(cfg, cfg.src_tp, rank, cfg.src_page_nbytes, SRC_FILL,
                       _reporter(conn, "src", rank, "filling pages"))
        gpu = cfg.gpu("src", rank) if cfg.device == "cuda" else 0
        memory = _to_device(pages, cfg.device, gpu)
        regions = _regions(cfg, _addr(memory), cfg.src_page_nbytes, gpu)
        with Endpoint(cfg.spec, tp=cfg.src_tp, rank=rank, regions=regions, memory=[memory],
                      name=f"demo-prefill-{rank}-{os.getpid()}") as endpoint:
            conn.send(("ready", "src", rank, endpoint.serve("127.0.0.1", 0)))
            _expect(conn, "collect")
            readers = sum(rank in plan.src_ranks for plan in plan_all(cfg.spec, cfg.src_tp, cfg.dst_tp))
            for request in range(len(cfg.pairs)):
                endpoint.wait_for_reads(cfg.request_id(request), readers, timeout_s=cfg.timeout_s)
            conn.send(("freed", "src", rank, {"requests": len(cfg.pairs), "readers": readers}))
            _expect(conn, "stop")

    _guard("src", rank, conn, body)


def _verify(cfg: DemoConfig, memory: Any, expected: np.ndarray) -> dict:
    if isinstance(memory, np.ndarray):
        bad = np.flatnonzero(memory != expected)
    else:  # compare on the GPU; only the positions come back
        import torch

        bad = torch.nonzero(memory != torch.from_numpy(expected).to(memory.device)).flatten().cpu().numpy()
    result = {"pages": cfg.num_layers * len(cfg.pairs), "checked_nbytes": int(expected.size),
              "mismatched_nbytes": int(bad.size)}
    if bad.size:
        slot, offset = divmod(int(bad[0]), cfg.dst_page_nbytes)
        layer, block = divmod(slot, cfg.num_blocks)
        if cfg.order == "block":
            block, layer = divmod(slot, cfg.num_layers)
        result["first_mismatch"] = f"layer {layer}, dst block {block}, byte {offset} of the page"
    return result


def dst_main(cfg: DemoConfig, rank: int, conn) -> None:
    """A decode rank: receive the src addresses, connect to every src rank, read the
    batch, verify every byte."""
    _prepare_process(cfg.device)

    def body() -> None:
        from ..nixl_backend._endpoint import Endpoint
        from ..nixl_backend._reader import Reader

        initial = np.full(cfg.num_layers * cfg.num_blocks * cfg.dst_page_nbytes, DST_FILL, np.uint8)
        gpu = cfg.gpu("dst", rank) if cfg.device == "cuda" else 0
        memory = _to_device(initial, cfg.device, gpu)
        regions = _regions(cfg, _addr(memory), cfg.dst_page_nbytes, gpu)
        expected = _pages(cfg, cfg.dst_tp, rank, cfg.dst_page_nbytes, DST_FILL,
                          _reporter(conn, "dst", rank, "expected pages"))
        with Endpoint(cfg.spec, tp=cfg.dst_tp, rank=rank, regions=regions, memory=[memory],
                      name=f"demo-decode-{rank}-{os.getpid()}") as endpoint, \
                Reader(endpoint, strategy=cfg.strategy) as reader:
            addresses = conn.recv()  # [(host, port)] of every src rank, from the parent
            for host, port in addresses:
                reader.connect_to(host, port, timeout_s=cfg.timeout_s)
            needed = reader.plan.src_ranks
            for src_rank in [r for r in list(reader.peers) if r not in needed]:
                reader.disconnect(src_rank)  # this rank reads nothing from it
            reader.warm_up(timeout_s=cfg.timeout_s)
            conn.send(("ready", "dst", rank, None))
            _expect(conn, "go")
            pairs = np.array(cfg.pairs, dtype=np.int64).reshape(-1, 2)
            batches = [range(i, min(i + cfg.batch, len(pairs))) for i in range(0, len(pairs), cfg.batch)]
            totals = {"reads": 0, "descriptors": 0, "nbytes": 0, "transfers": 0, "strategies": [], "gpu": gpu}
            report = _reporter(conn, "dst", rank, "reading batches")
            started = time.perf_counter()
            for done, batch in enumerate(batches, 1):
                stats = reader.read(pairs[batch.start: batch.stop],
                                    [cfg.request_id(i) for i in batch], timeout_s=cfg.timeout_s)
                if cfg.device == "cuda":
                    import torch

                    torch.cuda.synchronize()
                if stats.strategy not in totals["strategies"]:
                    totals["strategies"].append(stats.strategy)
                for key, value in (("reads", stats.num_reads), ("descriptors", stats.num_descriptors),
                                   ("nbytes", stats.nbytes), ("transfers", stats.num_transfers)):
                    totals[key] += value
                report(done, len(batches))
            totals["elapsed_s"] = time.perf_counter() - started
            totals["src_ranks"] = list(needed)
            totals["verify"] = _verify(cfg, memory, expected)
            conn.send(("done", "dst", rank, totals))

    _guard("dst", rank, conn, body)
