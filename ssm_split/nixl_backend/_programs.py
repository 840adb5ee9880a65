"""A Reader's strategies: what each connection allows, which strategy a batch uses, the
program the core builds for it, and the `ProgramRun` that executes it.

- `direct` is always possible; `staged` needs a staging area, which the reader allocates
  (and registers) the first time a batch needs it; `packed` needs every src rank the
  plan reads from to have a pack area (its handshake says so) and a side channel client
  (`connect_to`), over which pack orders go as op "pack" (several outstanding, answers
  polled without blocking) and lease releases as op "release"; `peer` needs every such
  src rank's pages mapped into this process (same host, GPU memory on both sides, CUDA
  IPC handles that opened).
- `strategy="auto"` asks the cost model (`ssm_split.strategies.choose_strategy`) among
  the possible ones, per batch; a forced strategy that is not possible is a `PlanError`
  saying why. A peer batch's engine (kernel or copy engines) is the core's
  `peer_engine`, told whether src and dst share a GPU and whether the driver has
  batched copies.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..errors import PlanError, TransferError
from ..layout._regions import Buffer
from ..strategies._choose import choose_strategy, peer_engine
from ..strategies._cost import DEFAULT_COST_MODEL, DRAM_COST_MODEL, CostModel
from ..strategies._packing import pack_plan
from ..strategies._staging import stage_plan
from ..strategies._program import (Program, direct_program, mapped_regions, packed_program, peer_program,
                                   staged_program)
from ._batchcopy import batch_copy_available
from ._copier import make_copier
from ._ipc import IpcError, PeerMapping, host_id
from ._memory import describe_memory, zeros_like_memory
from ._pack_src import PackArea, order_to_wire
from ._pending import PendingRead, Transfer
from ._run import ProgramRun

__all__ = ["STRATEGY_CHOICES", "DEFAULT_STAGING_NBYTES", "ReaderPrograms"]

STRATEGY_CHOICES = ("auto", "direct", "staged", "packed", "peer")
DEFAULT_STAGING_NBYTES = {"VRAM": 512 << 20, "DRAM": 16 << 20}


class ReaderPrograms:
    """The strategy side of one `Reader` (module doc).

    Args:
        reader: the reader (its endpoint, peers, plan and `_post`).
        strategy: one of `STRATEGY_CHOICES`.
        staging_nbytes: the staging area's size (None: 512 MiB VRAM, 16 MiB DRAM).
        model: the cost model of "auto" (None: the H200 or DRAM default).
    """

    def __init__(self, reader: Any, strategy: str, staging_nbytes: int | None, model: CostModel | None):
        if strategy not in STRATEGY_CHOICES:
            raise PlanError(f"strategy must be one of {STRATEGY_CHOICES}, got {strategy!r}.")
        own = reader.endpoint
        if staging_nbytes is None:
            staging_nbytes = DEFAULT_STAGING_NBYTES[own.mem_type]
        if isinstance(staging_nbytes, bool) or not isinstance(staging_nbytes, int) or staging_nbytes < 512:
            raise PlanError(f"staging_nbytes must be an int >= 512, got {staging_nbytes!r}.")
        if model is not None and not isinstance(model, CostModel):
            raise PlanError(f"model must be a CostModel, got {type(model).__name__}.")
        self.reader, self.strategy, self.staging_nbytes = reader, strategy, staging_nbytes
        self.model = model or (DEFAULT_COST_MODEL if own.mem_type == "VRAM" else DRAM_COST_MODEL)
        self._mappings: dict[int, tuple[PeerMapping, Any]] = {}  # src rank -> (mapping, regions)
        self.peer_unavailable: dict[int, str] = {}
        self._staging: Any = None
        self._staging_reg = None
        self.staging_token = object()  # what the endpoint tracks READs into the staging by
        self._copier: Any = None

    # --- connections --------------------------------------------------------------------

    def on_connect(self, rank: int, handshake: Any) -> None:
        """Map a new peer's pages when the peer strategy can use them."""
        self.on_disconnect(rank)
        own = self.reader.endpoint
        if self.strategy not in ("auto", "peer"):
            self.peer_unavailable[rank] = f"this reader runs strategy {self.strategy!r}"
        elif not handshake.ipc_exports:
            self.peer_unavailable[rank] = "the src publishes no CUDA IPC handles (host memory, or not exportable)"
        elif own.mem_type != "VRAM":
            self.peer_unavailable[rank] = "this reader's pages are host memory"
        elif handshake.host_id != host_id():
            self.peer_unavailable[rank] = f"the src runs on another host ({handshake.host_id!r})"
        else:
            from ._ipc import PeerExport

            device = own.scratch.device_id
            try:
                mapping = PeerMapping([PeerExport(*e) for e in handshake.ipc_exports], device)
            except IpcError as error:
                self.peer_unavailable[rank] = f"its CUDA IPC handles did not open here ({error})"
                return
            self._mappings[rank] = (mapping, mapped_regions(handshake.regions, mapping.addrs, device))
            self.peer_unavailable.pop(rank, None)

    def on_disconnect(self, rank: int) -> None:
        entry = self._mappings.pop(rank, None)
        if entry is not None:
            if self._copier is not None and hasattr(self._copier, "synchronize"):
                self._copier.synchronize()  # no kernel may still read the mapping
            entry[0].close()

    def available(self) -> dict[str, str | None]:
        """Each strategy: None when this reader can run it now, else why not."""
        plan, peers = self.reader.plan, self.reader.peers
        out: dict[str, str | None] = {"direct": None, "staged": None}
        no_pack = [r for r in plan.src_ranks if peers[r].handshake.pack_area is None]
        no_client = [r for r in plan.src_ranks if r not in self.reader._clients]
        out["packed"] = (f"src ranks {no_pack} have no pack area" if no_pack else
                         f"src ranks {no_client} were connected without their side channel "
                         f"(use connect_to)" if no_client else None)
        unmapped = {r: self.peer_unavailable.get(r, "not mapped") for r in plan.src_ranks if r not in self._mappings}
        out["peer"] = None if not unmapped else "; ".join(f"src rank {r}: {why}" for r, why in unmapped.items())
        return out

    def choose(self, num_requests: int, num_layers: int, forced: str | None = None,
               exclude: tuple[str, ...] = ()) -> str:
        """The strategy of a batch: `forced` (or the reader's) if it is not "auto", else the
        cost model's pick among the available ones (less `exclude`)."""
        name = forced or self.strategy
        if name not in STRATEGY_CHOICES:
            raise PlanError(f"strategy must be one of {STRATEGY_CHOICES}, got {name!r}.")
        possible = self.available()
        for excluded in exclude:
            possible[excluded] = "the staging area is taken by batches in flight"
        if name != "auto":
            if possible[name] is not None:
                raise PlanError(f"strategy {name!r} cannot run on this reader: {possible[name]}. "
                                f"Use strategy=\"auto\" to pick among those that can.")
            return name
        return choose_strategy(self.reader.plan, num_requests=num_requests, num_layers=num_layers,
                               available=[s for s, why in possible.items() if why is None], model=self.model,
                               wave_nbytes=self.staging_nbytes // 2, same_device=self._same_device(),
                               copy_engines=self._copy_engines())

    def _same_device(self) -> bool:
        """Whether every src rank's pages are on this reader's GPU, by the handshakes'
        device ids. Engines that number their GPUs per process (`CUDA_VISIBLE_DEVICES`)
        all say 0 and look alike: peer batches then keep the kernel, which is correct on
        either placement. (The driver's device ordinal of an IPC mapping names the GPU
        it was opened on, not the one holding the memory: measured on two H200s.)"""
        own, peers = self.reader.endpoint.scratch.device_id, self.reader.peers
        return all(peers[r].handshake.regions.device_id(0) == own for r in self.reader.plan.src_ranks)

    def _copy_engines(self) -> bool:
        return self.reader.endpoint.mem_type == "VRAM" and batch_copy_available()

    def choose_and_lease(self, num_requests: int, num_layers: int, forced: str | None
                         ) -> tuple[str, int, Buffer | None]:
        """The batch's strategy (`choose`) and, for "staged" and "packed", its staging
        lease and range: `(name, lease, staging)`. Under "auto" a batch whose staging is
        taken falls back to another strategy; a forced one is a `PlanError`."""
        name = self.choose(num_requests, num_layers, forced)
        if name not in ("staged", "packed"):
            return name, 0, None
        got = self.lease_staging(name, num_requests, num_layers)
        if got is not None:
            return (name, *got)
        if (forced or self.strategy) != "auto":
            raise PlanError(f"The staging area ({self.staging_nbytes} bytes) is taken by batches in "
                            f"flight: wait for them, or read with a larger staging_nbytes.")
        return self.choose(num_requests, num_layers, exclude=("staged", "packed")), 0, None

    def release_finished(self, batches: list) -> list:
        """Give back the staging leases of `batches` that are over (received, or failed
        and settled: nothing writes their staging any more); returns the others."""
        kept = []
        for pending in batches:
            if pending.status == "received" or (pending.status != "in flight" and pending.settled):
                self.release_staging(pending.staging_lease)
                pending.staging_lease = 0
            else:
                kept.append(pending)
        return kept

    # --- programs -----------------------------------------------------------------------

    def _area(self) -> PackArea:
        """The registered staging area (allocated on first use), leased per batch."""
        if self._staging is None:
            own = self.reader.endpoint
            memory = zeros_like_memory(own.mem_type, own.scratch.device_id, self.staging_nbytes)
            info = describe_memory(memory)
            table = np.array([[info.addr, info.nbytes, info.device_id]], dtype=np.uint64)
            self._staging_reg = own.agent.get_reg_descs(table, own.mem_type)
            own.agent.register_memory(self._staging_reg)
            self._staging, self._copier = PackArea(Buffer(info.addr, info.nbytes, info.device_id), memory), None
        return self._staging

    def lease_staging(self, name: str, num_requests: int, num_layers: int) -> tuple[int, Buffer] | None:
        """A part of the staging area for one batch of `name` ("staged" or "packed"):
        twice what the batch needs (two waves in flight), at most half the area (so
        another batch can stage meanwhile), at least two requests' worth. None when
        that much is not free now."""
        plan = self.reader.plan
        per_request = (stage_plan(plan, model=self.model).slot_nbytes if name == "staged"
                       else sum(pack_plan(plan).slot_nbytes)) * num_layers
        if per_request == 0:
            return 0, Buffer(self._area().buffer.addr, 512, self._area().buffer.device_id)
        want = min(2 * per_request * num_requests, max(self.staging_nbytes // 2, 2 * per_request))
        want = -(-want // 512) * 512
        if want > self.staging_nbytes:
            raise PlanError(f"The {name} strategy needs {want} bytes of staging for two waves of one "
                            f"request ({num_layers} layers), more than this reader's staging area of "
                            f"{self.staging_nbytes} bytes: read with a larger staging_nbytes, or fewer "
                            f"layers per batch.")
        got = self._area().lease(want, ttl_s=1e9)
        if got is None:
            return None
        lease, offset = got
        area = self._area().buffer
        return lease, Buffer(area.addr + offset, want, area.device_id)

    def release_staging(self, lease: int) -> None:
        if lease and self._staging is not None:
            self._staging.release(lease)

    def copier(self) -> Any:
        if self._copier is None:
            own = self.reader.endpoint
            arrays = list(own.memory) + ([self._staging.memory] if self._staging is not None else [])
            self._copier = make_copier(own.mem_type, own.scratch.device_id, arrays)
        return self._copier

    def program(self, name: str, pairs: np.ndarray, layers: object, staging: Buffer | None = None, *,
                counts: tuple[int, int]) -> Program:
        """The core's program of strategy `name` for the batch; `counts` is the batch's
        `(num_requests, num_layers)` as the reader counted them for `choose`."""
        reader = self.reader
        plan, own = reader.plan, reader.endpoint
        src_regions = {r: reader.peers[r].handshake.regions for r in plan.src_ranks}
        if name == "direct":
            return direct_program(plan, src_regions, own.regions, pairs, layers=layers)
        if name == "staged":
            return staged_program(plan, src_regions, own.regions, pairs, staging=staging, layers=layers,
                                  model=self.model)
        if name == "packed":
            limits = {r: reader.peers[r].handshake.pack_wave_nbytes for r in plan.src_ranks}
            return packed_program(plan, src_regions, own.regions, pairs, staging=staging,
                                  src_pack_limits=limits, layers=layers)
        if name == "peer":
            engine = peer_engine(plan, num_requests=counts[0], num_layers=counts[1], model=self.model,
                                 same_device=self._same_device(), copy_engines=self._copy_engines())
            return peer_program(plan, {r: self._mappings[r][1] for r in plan.src_ranks}, own.regions, pairs,
                                layers=layers, engine=engine)
        raise PlanError(f"no program for strategy {name!r}")

    def run(self, program: Program, pending: PendingRead, label: str) -> ProgramRun:
        """The `ProgramRun` of `program`, posting its READs into `pending`."""
        reader, own = self.reader, self.reader.endpoint
        peers = reader.peers

        def post_read(rank):
            transfer = pending.add(Transfer(rank.src_rank, peers[rank.src_rank].agent_name))
            reader._post_now(transfer, (rank.dst_descs, rank.src_descs), label)
            return transfer

        common = {"dst_tp": own.tp, "dst_rank": own.rank}

        def send_order(order):
            peer = peers[order.src_rank]
            left = max(pending.deadline - time.monotonic(), 0.001)
            body = {**common, "generation": peer.handshake.generation, "order": order_to_wire(order),
                    "ttl_s": left + 5.0}
            return order.src_rank, reader.client(order.src_rank).send("pack", body, timeout_s=left + 1.0)

        def answer(ticket):
            rank, number = ticket
            try:
                reply = reader.client(rank).poll(number)
            except TransferError as error:  # no answer in time, or the client is gone
                return {"ok": False, "kind": "unreachable", "error": str(error)}
            if reply is None:
                return None
            return {**reply.body, "ok": reply.ok, "kind": reply.kind, "error": reply.error}

        def release(rank, lease):
            client = reader._clients.get(rank)
            if client is not None:  # fire and forget: an unanswered lease expires anyway
                client.forget(client.send("release", {"lease": lease}))

        return ProgramRun(program, label=label, peer_names={r: p.agent_name for r, p in peers.items()},
                          post_read=post_read, read_done=pending.transfer_done, send_order=send_order,
                          answer=answer, release=release,
                          src_areas={r: peers[r].handshake.pack_area for r in program.src_ranks
                                     if peers[r].handshake.pack_area is not None},
                          copier=self.copier() if any(w.scatter is not None for w in program.waves) else None,
                          dst_device_id=own.scratch.device_id, read_parts=max(1, own.num_threads),
                          deadline=pending.deadline)

    def close(self) -> None:
        for rank in list(self._mappings):
            self.on_disconnect(rank)
        own = self.reader.endpoint
        if self._staging_reg is not None and own.agent is not None:
            if own.inflight.busy(self.staging_token):  # a READ may still write it
                own.inflight.retire(self.staging_token, self._staging.memory, self._staging_reg)
            else:
                try:
                    own.agent.deregister_memory(self._staging_reg)
                except Exception:  # noqa: BLE001
                    pass
        self._staging, self._staging_reg, self._copier = None, None, None
