"""One engine rank's NIXL agent, its registered state memory and its handshake.

An `Endpoint` is created by every rank of both engines. A src (prefill) endpoint
`serve`s its handshake over the side channel and collects the notifications readers send
when they are done with a request (`poll_notifications`, `wait_for_reads`), so the engine
knows when it may free those blocks. A dst (decode) endpoint is handed to `Reader`s.

    mem = np.zeros(layers * blocks * page_nbytes, np.uint8)
    regions = RegionSet.packed(mem.ctypes.data, num_layers=layers, num_blocks=blocks,
                               page_nbytes=page_nbytes)
    src = Endpoint(spec, tp=2, rank=0, regions=regions, memory=[mem], secret=cluster_secret)
    host, port = src.serve()            # readers: Reader(dst).connect_to(host, port)
    src.server.add_handler("op", fn)    # more side channel requests (_sidechannel.py)

`memory[i]` is the array or tensor backing `regions.buffers[i]` (same address, size and
device): numpy arrays and CPU tensors are registered as DRAM, CUDA tensors as VRAM. The
endpoint keeps references to them; the caller keeps them alive and unmoved until `close`.

A dst endpoint owns what must outlive its readers: the src agents it loaded (kept
loaded, `_remotes.py`) and every batch whose READs may still write into its pages
(`_inflight.py`; `settle`, `unsettled`). Keep its memory allocated until `unsettled` is
0 or the endpoint is closed: `close` destroys the agent, which stops READs that never
settled, before it returns.

Use an endpoint (and its readers) from one thread: NIXL agents without a listener thread
are not thread-safe. The side channel's threads never call into the agent.
"""

from __future__ import annotations

import gc
import os
import threading
import uuid
import weakref
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import PlanError, TransferError
from ..layout._regions import Buffer, RegionSet
from ..layout._layout import page_layout
from ..specs._stacked import PageSpec, check_is_page_spec
from ._handshake import Handshake
from ._inflight import InFlight
from ._integrity_src import integrity_handlers
from ._ipc import host_id, ipc_exports
from ._memory import check_memory, describe_memory, write_bytes, zeros_like_memory
from ._nixl import make_agent
from ._notify import Inbox
from ._pack_src import PackService
from ._remotes import RemoteAgents
from ._scratch import SCRATCH_NBYTES, encode_header
from ._sidechannel import RequestContext, SideChannelServer
from ._ucx import VRAM_NUM_THREADS, VRAM_SPLIT_BATCH_SIZE, agent_settings
from ._wire import check_secret

__all__ = ["Endpoint", "VRAM_NUM_THREADS", "VRAM_SPLIT_BATCH_SIZE"]


DEFAULT_PACK_AREA_NBYTES = {"VRAM": 512 << 20, "DRAM": 16 << 20}
"""The pack area an endpoint allocates unless told otherwise (`pack_area_nbytes`)."""


class Endpoint:
    """A NIXL agent (UCX) with one rank's state memory registered.

    Args:
        spec: the state one page holds (every layer region in `regions` has it): one layer's
            spec, or a `StackedSpec` when each page holds several layers (one region then).
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
        ucx_params: extra UCX backend parameters, e.g. `{"num_workers": "2"}`; VRAM
            endpoints with threads default to `split_batch_size=1` (`VRAM_SPLIT_BATCH_SIZE`).
            The agent refuses READs UCX can only emulate (`_ucx.py`) unless these or the
            environment set `PROTO_EMULATION_ENABLE`.
        secret: the cluster secret (bytes, >= 16, the same on every endpoint), or None.
            With it the side channel admits only peers holding it (CURVE, encrypted) and
            notifications are tagged with keys derived from it.
        pack_area_nbytes: bytes of the area this endpoint packs waves into for readers
            of the packed strategy (registered with the pages); None: 512 MiB for VRAM,
            16 MiB for DRAM; 0: no packing (readers use other strategies).
        peer_access: publish CUDA IPC handles of VRAM pages so readers on this host can
            map them (the peer strategy); skipped, with `ipc_unavailable` saying why,
            when the memory cannot be exported (e.g. torch's expandable segments).

    Raises:
        PlanError: memory does not match `regions`, mixes memory types, pages are
            smaller than this rank's content, or a malformed `secret`.
        TransferError: NIXL could not create the agent or register the memory.

    Attributes:
        spec, tp, rank, regions, name: as given (`name` filled in when None).
        mem_type: "DRAM" or "VRAM", the NIXL memory type of `memory`.
        agent: the NIXL agent (None once closed).
        remotes: the src agents loaded into `agent` (`_remotes.RemoteAgents`).
        inflight: the batches that may still write into this endpoint's memory
            (`_inflight.InFlight`): readers track their batches there.
        lists: every `PeerLists` prepared on `agent` (let go of at `close`).
        scratch: the registered scratch `Buffer` (`SCRATCH_NBYTES` bytes).
        generation: registration generation: odd while the pages are registered.
        emulated_reads: whether this agent may post READs UCX emulates in software.
        pack: the `PackService` (pack area and its handlers), or None.
        ipc_unavailable: why peers cannot map this endpoint's pages, or None when they can.
    """

    def __init__(self, spec: PageSpec, *, tp: int, rank: int, regions: RegionSet,
                 memory: Sequence[Any], name: str | None = None, num_threads: int | None = None,
                 progress_delay_us: int = 100, ucx_params: Mapping[str, str] | None = None,
                 secret: bytes | None = None, pack_area_nbytes: int | None = None, peer_access: bool = True):
        check_is_page_spec(spec)
        content_nbytes = page_layout(spec, tp, rank).content_nbytes
        if not isinstance(regions, RegionSet):
            raise PlanError(f"regions must be a RegionSet, got {type(regions).__name__}.")
        small = [i for i, r in enumerate(regions.layers) if r.page_nbytes < content_nbytes]
        if small:
            raise PlanError(f"Layer {small[0]}'s pages are {regions.layers[small[0]].page_nbytes} "
                            f"bytes, smaller than the {content_nbytes} bytes rank {rank} of "
                            f"tp={tp} holds. Allocate larger pages.")
        self._secret = check_secret(secret)
        infos = [describe_memory(m) for m in memory]
        self.mem_type = check_memory(regions, infos)
        self.spec, self.tp, self.rank, self.regions = spec, tp, rank, regions
        self.name = name or f"ssm-split-tp{tp}-r{rank}-{uuid.uuid4().hex[:12]}"
        self._memory = list(memory)
        self._scratch = zeros_like_memory(infos[0].mem_type, infos[0].device_id, SCRATCH_NBYTES)
        scratch = describe_memory(self._scratch)
        self.scratch = Buffer(scratch.addr, scratch.nbytes, scratch.device_id)
        self.generation = 0
        self._server: SideChannelServer | None = None
        self._client_context: Any = None
        self._inbox = Inbox(self._secret, self.name)
        self._integrity_requests = 0
        self._integrity_lock = threading.Lock()  # counted on the side channel's workers
        self.inflight = InFlight(self._deregister_quietly)
        self.lists: weakref.WeakSet = weakref.WeakSet()  # every PeerLists made on this agent
        self.num_threads, params, self.emulated_reads = agent_settings(self.mem_type, num_threads, ucx_params)
        self.pack = _pack_service(self, pack_area_nbytes)
        self.ipc_exports, self.ipc_unavailable = ipc_exports(self.mem_type, regions.buffers, peer_access)
        try:
            self.agent = make_agent(self.name, num_threads=self.num_threads,
                                    progress_delay_us=progress_delay_us, ucx_params=params)
            self._scratch_reg = self._register([self.scratch] + ([self.pack.area.buffer] if self.pack else []))
        except Exception as error:  # NIXL errors derive from Exception
            self.agent = None
            raise TransferError(f"NIXL could not create agent {self.name!r} with UCX or register "
                                f"its scratch buffer and pack area: {type(error).__name__}: {error}") from error
        self.remotes = RemoteAgents(self.agent, self.inflight.uses_remote)
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

    def register_buffer(self, memory: Any) -> tuple[Buffer, Any]:
        """Register extra memory (a reader's landing buffer); returns its `Buffer` and
        the registration to pass to `deregister_buffer`."""
        info = describe_memory(memory)
        buffer = Buffer(info.addr, info.nbytes, info.device_id)
        return buffer, self._register([buffer])

    def _deregister_quietly(self, registration: Any) -> None:
        if self.agent is not None:
            try:
                self.agent.deregister_memory(registration)
            except Exception:  # noqa: BLE001 - nothing left to do about it
                pass

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

    @property
    def secret(self) -> bytes | None:
        """The cluster secret this endpoint was given (its readers use it too)."""
        return self._secret

    # --- handshake and side channel -----------------------------------------------------

    def handshake(self) -> Handshake:
        """This endpoint's handshake, with the NIXL metadata snapshot taken at the last
        (de)registration."""
        return self._handshake

    def serve(self, host: str = "127.0.0.1", port: int = 0, **server_options: Any) -> tuple[str, int]:
        """Serve the handshake, integrity requests and pack orders on the side channel;
        returns the bound `(host, port)`. `server_options` go to `SideChannelServer`
        (caps, workers, max_request_nbytes)."""
        if self._server is None:
            server = SideChannelServer(host, port, secret=self._secret, **server_options)
            server.add_handler("handshake", self._answer_handshake, inline=True)
            handlers = integrity_handlers(self, self._count_integrity)
            handlers.update(self.pack.handlers() if self.pack is not None else {})
            for op, handler in handlers.items():
                server.add_handler(op, handler)
            self._server = server
        return self._server.address

    @property
    def server(self) -> SideChannelServer:
        """The side channel server (after `serve`): `add_handler` registers more requests."""
        if self._server is None:
            raise TransferError(f"Endpoint {self.name!r} does not serve a side channel: call serve() first.")
        return self._server

    def _answer_handshake(self, request: dict, payload: bytes, context: RequestContext) -> tuple[dict, bytes]:
        reader = request.get("reader", "")
        if not isinstance(reader, str) or len(reader) > 256:
            raise ValueError("`reader` must be the reader's NIXL agent name (a str of at most 256 characters)")
        answer = {"session": self._inbox.open_session(reader).hex()} if reader else {}
        return answer, self._handshake_bytes

    def open_session(self, reader: str) -> bytes:
        """A notification session for the reader agent named `reader`, for handshakes
        handed over without the side channel: pass it to `Reader.connect(..., session=)`.
        A reader's notifications count only within a session (`_notify.py`)."""
        return self._inbox.open_session(reader)

    def _count_integrity(self) -> None:
        with self._integrity_lock:
            self._integrity_requests += 1

    @property
    def integrity_requests(self) -> int:
        """Integrity requests received on the side channel so far, answered or refused."""
        return self._integrity_requests

    @property
    def address(self) -> tuple[str, int] | None:
        """Where the side channel serves, or None before `serve`."""
        return None if self._server is None else self._server.address

    @property
    def side_channel_stats(self) -> dict[str, int]:
        """The server's counters (`SideChannelServer.stats`): with a secret,
        `auth_refused` and `handshake_failed` count peers refused for not holding it."""
        return {} if self._server is None else self._server.stats

    def client_context(self) -> Any:
        """This endpoint's private ZeroMQ context for its readers' side channel clients."""
        if self._client_context is None:
            import zmq

            self._client_context = zmq.Context(io_threads=1)
        return self._client_context

    # --- notifications (src side) -------------------------------------------------------

    def poll_notifications(self) -> list[tuple[str, tuple[str, ...]]]:
        """New read-done notifications: `[(reader agent name, request ids)]`.

        Each counts once toward `reads_done(request_id)` for each of its ids. Only
        messages of a reader's session with the right tag count (`_notify.py`); the rest
        is dropped and counted in `notification_drops`.
        """
        return self._inbox.poll(self.agent)

    @property
    def notification_drops(self) -> dict[str, int]:
        """Notifications dropped so far, by reason (a copy): "foreign", "oversized",
        "malformed", "unknown_session", "bad_tag", "wrong_sender", "replay"."""
        return dict(self._inbox.drops)

    def reads_done(self, request_id: str) -> int:
        """How many reader notifications named `request_id` so far (after polling)."""
        return self._inbox.reads_done[request_id]

    @property
    def reads_done_counts(self) -> dict[str, int]:
        """`reads_done` of every request id named so far (a copy)."""
        return dict(self._inbox.reads_done)

    def wait_for_reads(self, request_id: str, count: int = 1, *, timeout_s: float = 30.0) -> None:
        """Poll until `count` readers have reported `request_id` as read.

        Raises:
            TransferError: the deadline passed first.
        """
        self._inbox.wait(self.agent, request_id, count, timeout_s)

    # --- READs that may still write (dst side) ------------------------------------------

    @property
    def unsettled(self) -> int:
        """Batches posted through this endpoint that may still write into its memory:
        in flight, or failed and not settled."""
        return 0 if self.agent is None else self.inflight.poll()

    def settle(self, timeout_s: float = 30.0) -> bool:
        """Wait up to `timeout_s` for every failed batch's READs to settle; True when
        `unsettled` is 0 (batches still in flight must be polled by their owner)."""
        return self.agent is None or self.inflight.settle(timeout_s)

    # --- life cycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving, deregister everything and destroy the agent; idempotent. READs
        that never settled are stopped by the agent's destruction, which is done when
        this returns: the memory may be freed then."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._client_context is not None:
            self._client_context.destroy(linger=0)
            self._client_context = None
        if getattr(self, "agent", None) is None:
            return
        unsettled, keep_alive = self.inflight.abandon()
        for lists in list(self.lists):
            lists.abandon()
        if not unsettled:
            try:
                self.deregister()
                self.agent.deregister_memory(self._scratch_reg)
            except Exception:  # noqa: BLE001
                pass
        self.remotes = None  # type: ignore[assignment]
        self._scratch_reg = self._pages_reg = None
        self.agent = None
        if unsettled:
            gc.collect()  # nothing may keep the agent alive: it must stop writing now
        del keep_alive

    def __enter__(self) -> "Endpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Endpoint({self.name!r}, tp={self.tp}, rank={self.rank}, {self.mem_type}, "
                f"layers={self.regions.num_layers}, generation={self.generation})")


def _pack_service(endpoint: Endpoint, nbytes: int | None) -> PackService | None:
    if nbytes is None:
        nbytes = DEFAULT_PACK_AREA_NBYTES[endpoint.mem_type]
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise PlanError(f"pack_area_nbytes must be an int >= 0 (0: no packing), got {nbytes!r}.")
    return PackService(endpoint, nbytes) if nbytes else None
