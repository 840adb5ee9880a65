"""One engine rank's NIXL agent, its registered state memory and its handshake.

An `Endpoint` is created by every rank of both engines. A src (prefill) endpoint
`serve`s its handshake over the side channel and collects the notifications readers send
when they are done with a request (`poll_notifications`, `wait_for_reads`), so the engine
knows when it may free those blocks. A dst (decode) endpoint is handed to a `Reader`.

    mem = np.zeros(layers * blocks * page_nbytes, np.uint8)
    regions = RegionSet.packed(mem.ctypes.data, num_layers=layers, num_blocks=blocks,
                               page_nbytes=page_nbytes)
    src = Endpoint(spec, tp=2, rank=0, regions=regions, memory=[mem])
    host, port = src.serve()            # readers: Reader(dst).connect_to(host, port)

`memory[i]` is the array or tensor backing `regions.buffers[i]` (same address, size and
device): numpy arrays and CPU tensors are registered as DRAM, CUDA tensors as VRAM. The
endpoint keeps references to them; the caller keeps them alive and unmoved until `close`.

Use an endpoint (and its readers) from one thread: NIXL agents without a listener thread
are not thread-safe. The side channel's own thread only serves bytes snapshotted by the
owning thread at each (de)registration.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import PlanError, TransferError
from ..layout._regions import Buffer, RegionSet
from ..layout._layout import page_layout
from ..specs._spec import Spec, check_is_spec
from ._handshake import Handshake
from ._integrity_src import INTEGRITY_REQUEST, answer_integrity
from ._memory import MemoryInfo, describe_memory, write_bytes, zeros_like_memory
from ._ipc import IpcError, export_buffers, host_id
from ._nixl import make_agent
from ._pack_src import PACK_REQUEST, PackService
from ._notify import parse_notification
from ._scratch import SCRATCH_NBYTES, encode_header
from ._sidechannel import SideChannelServer

__all__ = ["Endpoint", "VRAM_NUM_THREADS"]


VRAM_NUM_THREADS = 4
"""UCX worker threads an endpoint of VRAM pages gets unless told otherwise."""
VRAM_SPLIT_BATCH_SIZE = 1
"""UCX `split_batch_size` of VRAM endpoints with worker threads: every READ is spread over
the threads, however few descriptors it has. One 1 GiB READ between two H200s: 382-388
GB/s (99-100% of torch's copy) against 267 GB/s with UCX's default of 1024
(benchmarks/results/nixl-ceiling-h200x2.json)."""
DEFAULT_PACK_AREA_NBYTES = {"VRAM": 512 << 20, "DRAM": 16 << 20}
"""The pack area an endpoint allocates unless told otherwise (`pack_area_nbytes`)."""


class Endpoint:
    """A NIXL agent (UCX) with one rank's state memory registered.

    Args:
        spec: the layer state this rank holds (every layer in `regions` has this spec).
        tp, rank: the engine's TP size and this rank.
        regions: where the pages are; every page must hold this rank's content.
        memory: `memory[i]` backs `regions.buffers[i]`: numpy arrays or torch tensors.
        name: NIXL agent name, unique among all endpoints (default: a random one).
        num_threads: UCX worker threads (NIXL's `num_threads`). None (default): 4 for
            VRAM, where UCX splits a READ of >= 1024 descriptors over the threads and an
            unmerged descriptor costs ~3-4 us instead of ~11 us on an H100
            (docs/performance.md); 0 (NIXL's own default) for DRAM.
        progress_delay_us: pause of NIXL's progress thread between polls; NIXL's own 0
            busy-loops a core per agent (see `_nixl.make_agent`).
        ucx_params: extra UCX backend parameters, e.g. `{"engine_config": "TLS=tcp"}`;
            VRAM endpoints with threads default to `split_batch_size=1`
            (`VRAM_SPLIT_BATCH_SIZE`).
        pack_area_nbytes: bytes of the area this endpoint packs waves into for readers
            of the packed strategy (registered with the pages); None: 512 MiB for VRAM,
            16 MiB for DRAM; 0: no packing (readers use other strategies).
        peer_access: publish CUDA IPC handles of VRAM pages so readers on this host can
            map them (the peer strategy); skipped, with `ipc_unavailable` saying why,
            when the memory cannot be exported (e.g. torch's expandable segments).

    Raises:
        PlanError: memory does not match `regions`, mixes memory types, or pages are
            smaller than this rank's content.
        TransferError: NIXL could not create the agent or register the memory.

    Attributes:
        spec, tp, rank, regions, name: as given (`name` filled in when None).
        mem_type: "DRAM" or "VRAM", the NIXL memory type of `memory`.
        agent: the NIXL agent (None once closed).
        scratch: the registered scratch `Buffer` (`SCRATCH_NBYTES` bytes).
        generation: registration generation: odd while the pages are registered.
        foreign_notifications: `(peer, message)` of notifications not from a reader.
        pack: the `PackService` (pack area and its handler), or None.
        ipc_unavailable: why peers cannot map this endpoint's pages, or None when they can.
    """

    def __init__(self, spec: Spec, *, tp: int, rank: int, regions: RegionSet,
                 memory: Sequence[Any], name: str | None = None, num_threads: int | None = None,
                 progress_delay_us: int = 100, ucx_params: Mapping[str, str] | None = None,
                 pack_area_nbytes: int | None = None, peer_access: bool = True):
        check_is_spec(spec)
        content_nbytes = page_layout(spec, tp, rank).content_nbytes
        if not isinstance(regions, RegionSet):
            raise PlanError(f"regions must be a RegionSet, got {type(regions).__name__}.")
        small = [i for i, r in enumerate(regions.layers) if r.page_nbytes < content_nbytes]
        if small:
            raise PlanError(f"Layer {small[0]}'s pages are {regions.layers[small[0]].page_nbytes} "
                            f"bytes, smaller than the {content_nbytes} bytes rank {rank} of "
                            f"tp={tp} holds. Allocate larger pages.")
        infos = [describe_memory(m) for m in memory]
        self.mem_type = _check_memory(regions, infos)
        self.spec, self.tp, self.rank, self.regions = spec, tp, rank, regions
        self.name = name or f"ssm-split-tp{tp}-r{rank}-{uuid.uuid4().hex[:12]}"
        self._memory = list(memory)
        self._scratch = zeros_like_memory(infos[0].mem_type, infos[0].device_id, SCRATCH_NBYTES)
        scratch = describe_memory(self._scratch)
        self.scratch = Buffer(scratch.addr, scratch.nbytes, scratch.device_id)
        self.generation = 0
        self._server: SideChannelServer | None = None
        self._reads_done: Counter[str] = Counter()
        self.foreign_notifications: list[tuple[str, bytes]] = []
        self._integrity_requests = 0
        self._integrity_lock = threading.Lock()  # side channel connections have their own threads
        if self.mem_type == "VRAM":
            # Without it UCX emulates VRAM READs over TCP (~0.4 GB/s instead of ~1 TB/s);
            # UCX reads it when the agent's backend starts. A value the user set wins.
            os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")
        if num_threads is None:
            num_threads = VRAM_NUM_THREADS if self.mem_type == "VRAM" else 0
        self.num_threads = num_threads
        params = dict(ucx_params or {})
        if self.mem_type == "VRAM" and num_threads:
            params.setdefault("split_batch_size", str(VRAM_SPLIT_BATCH_SIZE))
        if pack_area_nbytes is None:
            pack_area_nbytes = DEFAULT_PACK_AREA_NBYTES[self.mem_type]
        if isinstance(pack_area_nbytes, bool) or not isinstance(pack_area_nbytes, int) or pack_area_nbytes < 0:
            raise PlanError(f"pack_area_nbytes must be an int >= 0 (0: no packing), got {pack_area_nbytes!r}.")
        self.pack = PackService(self, pack_area_nbytes) if pack_area_nbytes else None
        self.ipc_exports, self.ipc_unavailable = _ipc_exports(self, peer_access)
        try:
            self.agent = make_agent(self.name, num_threads=num_threads,
                                    progress_delay_us=progress_delay_us, ucx_params=params)
            self._scratch_reg = self._register([self.scratch] + ([self.pack.area.buffer] if self.pack else []))
        except Exception as error:  # NIXL errors derive from Exception
            raise TransferError(f"NIXL could not create agent {self.name!r} with UCX or register "
                                f"its scratch buffer and pack area: {type(error).__name__}: {error}") from error
        self._pages_reg = None
        self.register()

    # --- registration -------------------------------------------------------------------

    def _register(self, buffers: Sequence[Buffer]):
        table = np.array([[b.addr, b.nbytes, b.device_id] for b in buffers], dtype=np.uint64)
        try:
            descs = self.agent.get_reg_descs(table, self.mem_type)
            if descs is None:  # NIXL logs the reason and returns None
                raise TransferError(f"NIXL rejected the registration list of {self.name!r}.")
            self.agent.register_memory(descs)
        except TransferError:
            raise
        except Exception as error:  # NIXL errors derive from Exception
            raise TransferError(f"NIXL could not register memory of {self.name!r}: "
                                f"{type(error).__name__}: {error}") from error
        return descs

    def register(self) -> None:
        """Register the pages with NIXL (done by the constructor), bump `generation` and
        take a new metadata snapshot for `handshake()`."""
        if self._pages_reg is None:
            self._pages_reg = self._register(self.regions.buffers)
            self._bump_generation()

    def deregister(self) -> None:
        """Deregister the pages and bump `generation`, so handshakes taken before are
        stale. The new generation is written to the scratch header *before* the pages
        go: a reader's generation check after its READ sees it whenever a byte it read
        came from deregistered memory. NIXL itself does not tell readers. Generations are
        odd while the pages are registered, even while they are not."""
        if self._pages_reg is None:
            return
        write_bytes(self._scratch, 0, encode_header(self.generation + 1))
        try:
            self.agent.deregister_memory(self._pages_reg)
        except Exception as error:
            raise TransferError(f"NIXL could not deregister the pages of {self.name!r}: "
                                f"{type(error).__name__}: {error}") from error
        self._pages_reg = None
        self._bump_generation()

    def _bump_generation(self) -> None:
        self.generation += 1
        write_bytes(self._scratch, 0, encode_header(self.generation))
        # Snapshot here, on the caller's thread: the side channel's thread then serves
        # these bytes and never calls into the agent (NIXL agents are not thread-safe
        # without a listener thread).
        self._handshake = Handshake(
            spec=self.spec, tp=self.tp, rank=self.rank, agent_name=self.name,
            mem_type=self.mem_type, regions=self.regions, scratch=self.scratch,
            agent_metadata=self.agent.get_agent_metadata(), generation=self.generation,
            host_id=host_id(), pack_area=self.pack.area.buffer if self.pack else None,
            pack_wave_nbytes=self.pack.area.max_wave_nbytes if self.pack else 0,
            ipc_exports=self.ipc_exports)
        self._handshake_bytes = self._handshake.encode()

    @property
    def registered(self) -> bool:
        return self._pages_reg is not None

    @property
    def memory(self) -> tuple[Any, ...]:
        """The arrays or tensors backing `regions.buffers`, in order."""
        return tuple(self._memory)

    @property
    def scratch_memory(self) -> Any:
        """The array or tensor behind `scratch` (its layout: `_scratch`)."""
        return self._scratch

    # --- handshake ----------------------------------------------------------------------

    def handshake(self) -> Handshake:
        """This endpoint's handshake, with the NIXL metadata snapshot taken at the last
        (de)registration."""
        return self._handshake

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Serve the handshake over the side channel; returns the bound `(host, port)`."""
        if self._server is None:
            handlers = {INTEGRITY_REQUEST: self._answer_integrity}
            if self.pack is not None:
                handlers[PACK_REQUEST] = self.pack.handle
            self._server = SideChannelServer(lambda: self._handshake_bytes, host, port, handlers)
        return self._server.address

    def _answer_integrity(self, conn) -> None:
        with self._integrity_lock:
            self._integrity_requests += 1
        answer_integrity(self, conn)

    @property
    def integrity_requests(self) -> int:
        """Integrity requests (`_integrity.INTEGRITY_REQUEST`) received on the side
        channel so far, answered or refused."""
        return self._integrity_requests

    @property
    def address(self) -> tuple[str, int] | None:
        """Where the side channel serves, or None before `serve`."""
        return None if self._server is None else self._server.address

    # --- notifications (src side) -------------------------------------------------------

    def poll_notifications(self) -> list[tuple[str, tuple[str, ...]]]:
        """New read-done notifications: `[(reader agent name, request ids)]`.

        Each counts once toward `reads_done(request_id)` for each of its ids. Messages not
        from an ssm_split reader are kept in `foreign_notifications`.
        """
        news = []
        for peer, messages in self.agent.get_new_notifs().items():
            peer = peer.decode() if isinstance(peer, bytes) else str(peer)
            for message in messages:
                ids = parse_notification(message)
                if ids is None:
                    self.foreign_notifications.append((peer, message))
                    continue
                self._reads_done.update(ids)
                news.append((peer, ids))
        return news

    def reads_done(self, request_id: str) -> int:
        """How many reader notifications named `request_id` so far (after polling)."""
        return self._reads_done[request_id]

    @property
    def reads_done_counts(self) -> dict[str, int]:
        """`reads_done` of every request id named so far (a copy)."""
        return dict(self._reads_done)

    def wait_for_reads(self, request_id: str, count: int = 1, *, timeout_s: float = 30.0) -> None:
        """Poll until `count` readers have reported `request_id` as read.

        Raises:
            TransferError: the deadline passed first.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            self.poll_notifications()
            if self._reads_done[request_id] >= count:
                return
            if time.monotonic() > deadline:
                raise TransferError(f"Only {self._reads_done[request_id]} of {count} readers "
                                    f"reported the request read within {timeout_s} s.",
                                    request=request_id, peer=None)
            time.sleep(0.0005)

    # --- life cycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving and deregister everything; idempotent."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if getattr(self, "agent", None) is not None:
            try:
                self.deregister()
                self.agent.deregister_memory(self._scratch_reg)
            except Exception:
                pass
            self.agent = None

    def __enter__(self) -> "Endpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Endpoint({self.name!r}, tp={self.tp}, rank={self.rank}, {self.mem_type}, "
                f"layers={self.regions.num_layers}, generation={self.generation})")


def _check_memory(regions: RegionSet, infos: Sequence[MemoryInfo]) -> str:
    if len(infos) != len(regions.buffers):
        raise PlanError(f"Got {len(infos)} memory objects for {len(regions.buffers)} buffers: "
                        f"pass one array or tensor per RegionSet buffer, in order.")
    for i, (info, buffer) in enumerate(zip(infos, regions.buffers)):
        if (info.addr, info.nbytes, info.device_id) != (buffer.addr, buffer.nbytes, buffer.device_id):
            raise PlanError(
                f"memory[{i}] is {info.nbytes} bytes at {info.addr:#x} on device "
                f"{info.device_id}, but regions.buffers[{i}] describes {buffer.nbytes} bytes at "
                f"{buffer.addr:#x} on device {buffer.device_id}. Build the RegionSet from the "
                f"memory you pass (e.g. RegionSet.packed(array.ctypes.data, ...))."
            )
    types = {info.mem_type for info in infos}
    if len(types) != 1:
        raise PlanError(f"All memory of one endpoint must be of one type, got {sorted(types)}.")
    return types.pop()


def _ipc_exports(endpoint: "Endpoint", wanted: bool) -> tuple[tuple, str | None]:
    """The CUDA IPC exports of a VRAM endpoint's buffers, or `((), why not)`."""
    if not wanted:
        return (), "peer_access=False"
    if endpoint.mem_type != "VRAM":
        return (), "the pages are host memory (peer mapping is for GPU memory)"
    buffers = endpoint.regions.buffers
    devices = {b.device_id for b in buffers}
    if len(devices) != 1:
        return (), f"the pages span devices {sorted(devices)}"
    try:
        exports = export_buffers([(b.addr, b.nbytes) for b in buffers], devices.pop())
    except IpcError as error:
        return (), f"CUDA IPC export failed ({error}); plain cudaMalloc memory is needed"
    return tuple((e.handle, e.offset, e.nbytes) for e in exports), None
