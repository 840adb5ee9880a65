"""The dst side: load src handshakes, then read batches of requests with NIXL READs.

    reader = Reader(dst_endpoint)
    for host, port in src_addresses:          # one src engine, all of its ranks
        reader.connect_to(host, port)         # checks the handshake, prepares the lists
    reader.warm_up()                          # connects, and checks no handshake is stale
    stats = reader.read(pairs, request_ids)   # pairs: (N, 2) (src_block, dst_block)

One `make_prepped_xfer("READ", ...)` per src rank and batch, in one of two ways
(`Reader(..., prepare=...)`, docs/backend.md compares them):

- `"auto"` (default): `"per-batch"` when the dst pages of one block's layers are adjacent
  (`RegionSet.layers_adjacent`, e.g. block-major memory), where only per-batch lists merge
  across layers; `"once"` otherwise (e.g. vLLM's one region per layer).
- `"once"`, NIXL's "prepare once, make many": at connect, the local and remote
  lists of every (layer, plan read, block) descriptor of that src rank are prepared once
  (`prepare_tables`, Nx5 strided lists); a batch only computes two index arrays
  (`index_batch`), and NIXL merges runs of consecutive dense indices.
- `"per-batch"`: the batch is expanded (`expand_plan`) into descriptors merged across
  adjacent segments, blocks and layers, and both lists are prepared for that READ alone.

Completion is polled against a deadline; any NIXL exception, an "ERR" state, a lost peer
or a missed deadline raises `TransferError(request=..., peer=...)` and a failed batch is
never reported as received (`_pending.PendingRead`). Once the bytes landed, and before a
batch counts as received, `_integrity.Guard` checks that no src rank re-registered since
its handshake (`check_generation`, on by default) and, in integrity mode, every byte
(docs/reliability.md); with any check on, the read-done notification goes to the src
ranks only after the checks passed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..errors import HandshakeError, PlanError, TransferError
from ..expand._expand import Expansion, RankedBatch, expand_plan
from ..plan._plan import Plan, plan_reads
from ..expand._prepared import index_batch, prepare_tables
from ..specs._spec import check_transferable
from ..strategies._cost import CostModel
from ._endpoint import Endpoint
from ._handshake import Handshake, decode_handshake
from ._guard import Guard
from ._lists import LOCAL_AGENT, PeerLists
from ._memory import read_bytes
from ._notify import encode_notification
from ._pending import PendingRead, ReadStats, Transfer, label, request_ids_of
from ._programs import ReaderPrograms
from ._scratch import HEADER_NBYTES, WARM_UP_OFFSET, header_desc, parse_header, warm_up_desc
from ._sidechannel import fetch_handshake_bytes

__all__ = ["Peer", "Reader", "PendingRead", "ReadStats", "PREPARE_MODES"]

PREPARE_MODES = ("auto", "once", "per-batch")
_HINTS = {
    "nixlNotFoundError": " A descriptor lies outside memory registered on its side: deregistered "
                         "pages, or a stale handshake (fetch a new one).",
    "nixlRemoteDisconnectError": " The src process went away or closed its endpoint.",
}


def _nixl_error(what: str, error: BaseException, *, request: str | None, peer: str) -> TransferError:
    return TransferError(f"{what}: {type(error).__name__}: {error}.{_HINTS.get(type(error).__name__, '')}",
                         request=request, peer=peer)


@dataclass(frozen=True, slots=True)
class Peer:
    """A src rank the reader can read from: its handshake, its NIXL agent name and, when
    found through `connect_to`, its side channel address."""

    handshake: Handshake
    agent_name: str
    address: tuple[str, int] | None = None


class Reader:
    """Reads from the ranks of one src engine into a dst `Endpoint`'s pages.

    Args:
        endpoint: this dst rank's endpoint (its spec, tp, rank, regions and agent).
        strategy: how batches move (`_programs`): "direct" (the merged plan, one READ per
            src rank), "staged" (superset spans into a staging area, then one scatter),
            "packed" (src ranks pack each wave, one READ per src rank and wave, then one
            scatter), "peer" (one kernel copies from the src's pages mapped into this
            process: same host, GPU memory), or "auto" (default: the cost model picks,
            per batch, among those the connected src ranks allow).
        staging_nbytes: the staging area of staged and packed batches (None: 512 MiB on
            a GPU, 16 MiB on the host); allocated and registered on first use.
        model: the cost model "auto" uses (None: measured defaults per memory type).
        plan: run this plan instead of `plan_reads`' (benchmarks: vLLM's descriptor
            pattern, `ssm_split.strategies.baseline_plan`); direct strategy only.
        prepare: `"auto"` (the default: `"per-batch"` when the dst pages of a block's
            layers are adjacent, `"once"` otherwise), `"once"` (NIXL lists prepared per
            src rank at connect, a batch only
            builds index arrays) or `"per-batch"` (lists of the batch's descriptors,
            merged across segments, blocks and layers, prepared for each READ).
        check_generation: after each batch, check that no src rank deregistered or
            re-registered its pages since its handshake (`StaleHandshakeError`).
        integrity: integrity mode: check every byte read against the src's digest of it
            (`IntegrityError`); needs peers found with `connect_to` and DRAM pages.

    Attributes:
        before_check: None, or a function called with each `PendingRead` after its
            bytes landed and before they are checked (fault injection in tests).
    """

    def __init__(self, endpoint: Endpoint, *, strategy: str = "auto", prepare: str = "auto",
                 check_generation: bool = True, integrity: bool = False, staging_nbytes: int | None = None,
                 model: CostModel | None = None, plan: Plan | None = None):
        if not isinstance(endpoint, Endpoint):
            raise TypeError(f"Reader needs an Endpoint (the dst rank's), got {type(endpoint).__name__}.")
        if prepare not in PREPARE_MODES:
            raise PlanError(f"prepare must be one of {PREPARE_MODES}, got {prepare!r}.")
        if plan is not None and not isinstance(plan, Plan):
            raise PlanError(f"plan must be a Plan (e.g. ssm_split.strategies.baseline_plan), got "
                            f"{type(plan).__name__}.")
        if prepare == "auto":
            prepare = "per-batch" if endpoint.regions.layers_adjacent else "once"
        self.endpoint, self.prepare = endpoint, prepare
        self.peers: dict[int, Peer] = {}
        self._lists: dict[int, PeerLists] = {}
        self._plan: Plan | None = None
        self._plan_override = plan
        self._programs = ReaderPrograms(self, strategy, staging_nbytes, model)
        self._guard = Guard(endpoint, self.peers, self._read_small, check_generation=check_generation,
                            integrity=integrity)
        self.before_check = None
        # batches whose READs may still write: (pending, dst blocks, layers)
        self._batches: list[tuple[PendingRead, set[int], set[int]]] = []

    # --- peers --------------------------------------------------------------------------

    def connect(self, handshake: Handshake | bytes) -> Peer:
        """Load a src rank's handshake (decoded and checked) and its NIXL metadata; with
        `prepare="once"`, prepare its descriptor lists.

        Raises:
            HandshakeError: undecodable bytes, a src TP that differs from earlier peers,
                or metadata that NIXL rejects or that names another agent.
            SpecMismatchError: the src state is not this endpoint's (names the fields).
            ShardingError, PlanError: no plan between the two TP sizes, or regions that
                cannot be tabulated (`prepare_tables`).
            TransferError: NIXL refused the lists (regions outside the memory the src
                registered); the rank is not connected then.
        """
        hs = handshake if isinstance(handshake, Handshake) else decode_handshake(handshake)
        if hs.generation % 2 == 0:
            raise HandshakeError(f"src rank {hs.rank} ({hs.agent_name!r}) has deregistered its "
                                 f"pages (generation {hs.generation} is even): nothing can be "
                                 f"read from it until it registers them again.")
        own = self.endpoint
        check_transferable(hs.spec, own.spec)
        others = {p.handshake.tp for r, p in self.peers.items() if r != hs.rank}
        if others and others != {hs.tp}:
            raise HandshakeError(f"src rank {hs.rank} says tp={hs.tp}, but connected src ranks "
                                 f"say tp={others.pop()}: one Reader reads from one src engine.")
        plan = self._plan_for(hs)
        tables = None
        if self.prepare == "once" and hs.rank in plan.src_ranks:
            tables = prepare_tables(plan, hs.rank, hs.regions, own.regions)
        if hs.rank in self.peers:
            self.disconnect(hs.rank)
        try:
            name = own.agent.add_remote_agent(hs.agent_metadata)
        except Exception as error:
            raise HandshakeError(f"NIXL rejected the metadata of src rank {hs.rank} "
                                 f"({hs.agent_name!r}): {type(error).__name__}: {error}") from error
        name = name.decode() if isinstance(name, bytes) else str(name)
        if name != hs.agent_name:
            own.agent.remove_remote_agent(name)
            raise HandshakeError(f"The handshake of src rank {hs.rank} names agent "
                                 f"{hs.agent_name!r}, but its metadata belongs to {name!r}.")
        self.peers[hs.rank] = Peer(hs, name)
        self._plan = plan
        self._programs.on_connect(hs.rank, hs)
        if tables is not None:
            try:
                self._lists[hs.rank] = PeerLists(own.agent, tables, name, own.mem_type, hs.mem_type,
                                                 own.generation)
            except Exception as error:  # NIXL errors derive from Exception
                self.disconnect(hs.rank)
                raise _nixl_error(f"NIXL could not prepare the descriptor lists of src rank "
                                  f"{hs.rank}", error, request=None, peer=name) from error
        return self.peers[hs.rank]

    def connect_to(self, host: str, port: int, *, timeout_s: float = 10.0) -> Peer:
        """Fetch a handshake over the side channel from `(host, port)`, then `connect`."""
        peer = self.connect(fetch_handshake_bytes(host, port, timeout_s=timeout_s))
        peer = self.peers[peer.handshake.rank] = Peer(peer.handshake, peer.agent_name, (host, port))
        return peer

    def disconnect(self, src_rank: int) -> None:
        """Forget a src rank, its prepared lists and its NIXL metadata."""
        peer = self.peers.pop(src_rank, None)
        if peer is None:
            raise HandshakeError(f"src rank {src_rank} is not connected (connected: "
                                 f"{sorted(self.peers)}).")
        self._plan = None
        self._programs.on_disconnect(src_rank)
        lists = self._lists.pop(src_rank, None)
        if lists is not None:
            lists.retire()  # released once no READ in flight uses them
        try:
            self.endpoint.agent.remove_remote_agent(peer.agent_name)
        except Exception:
            pass

    @property
    def plan(self) -> Plan:
        """This dst rank's plan for the connected src engine."""
        if self._plan is None:
            if not self.peers:
                raise HandshakeError("No src rank is connected: call connect() or connect_to() first.")
            self._plan = self._plan_for(next(iter(self.peers.values())).handshake)
        return self._plan

    def _plan_for(self, hs: Handshake) -> Plan:
        own = self.endpoint
        plan = plan_reads(hs.spec, hs.tp, own.tp, own.rank, dst_spec=own.spec)
        override = self._plan_override
        if override is None:
            return plan
        if (override.src_tp, override.dst_tp, override.dst_rank) != (plan.src_tp, plan.dst_tp, plan.dst_rank):
            raise PlanError(f"The reader's plan is for {override.src_tp} -> {override.dst_tp} rank "
                            f"{override.dst_rank}, but this transfer is {plan.src_tp} -> {plan.dst_tp} "
                            f"rank {plan.dst_rank}.")
        return override

    @property
    def strategy(self) -> str:
        """The reader's strategy ("auto" or a forced one)."""
        return self._programs.strategy

    def strategies(self) -> dict[str, str | None]:
        """Each strategy: None when this reader can run it with the connected src ranks,
        else why not (e.g. `{"peer": "src rank 0: the src runs on another host ..."}`)."""
        return self._programs.available()

    def _peer(self, src_rank: int) -> Peer:
        peer = self.peers.get(src_rank)
        if peer is None:
            raise HandshakeError(f"The plan reads from src rank {src_rank}, but no handshake of "
                                 f"that rank was loaded (connected: {sorted(self.peers)}). "
                                 f"Connect to every src rank first.")
        return peer

    def warm_up(self, *, timeout_s: float = 10.0) -> None:
        """Read every peer's 16-byte scratch header: sets the connections up (the first
        READ to a peer pays it, on every UCX worker thread) and checks the peer is the generation its handshake says.

        Raises:
            HandshakeError: a peer re-registered since its handshake (stale).
            TransferError: a peer did not answer.
        """
        own = self.endpoint
        # With UCX worker threads, each thread has its own connection and UCX hands a
        # thread work only in READs of >= 1024 descriptors: repeat the header read so
        # every thread connects here rather than in the first real batch.
        count = 1024 * own.num_threads if own.num_threads else 1
        local = np.tile(warm_up_desc(own.scratch), (count, 1))
        for rank in sorted(self.peers):
            peer = self.peers[rank]
            remote = np.tile(header_desc(peer.handshake.scratch), (count, 1))
            self._read_small({rank: (local, remote)}, ("warm-up",), timeout_s)
            generation = parse_header(read_bytes(own.scratch_memory, WARM_UP_OFFSET, HEADER_NBYTES))
            if generation != peer.handshake.generation:
                raise HandshakeError(
                    f"src rank {rank} ({peer.agent_name!r}) is at registration generation "
                    f"{'?' if generation is None else generation}, but its handshake says "
                    f"{peer.handshake.generation}: the handshake is stale. Fetch a new one.")

    def _read_small(self, posts: Mapping[int, tuple[np.ndarray, np.ndarray]], ids: tuple[str, ...],
                    timeout_s: float) -> None:
        """Post `{src_rank: (dst_descs, src_descs)}` (no notification) and wait: the
        warm-up and the guard's header READs."""
        self._start(posts, ids, timeout_s, b"", (0, 0, 0)).wait()

    # --- reads --------------------------------------------------------------------------

    def expand(self, block_pairs: object, *, layers: object = None) -> Expansion:
        """The batch's descriptors per src rank (see `expand_plan`), as `prepare="per-batch"`
        posts them."""
        plan = self.plan
        regions = {r: self._peer(r).handshake.regions for r in plan.src_ranks}
        return expand_plan(plan, regions, self.endpoint.regions, block_pairs, layers=layers)

    def _batch(self, block_pairs: object, layers: object, ids: tuple[str, ...]) -> tuple[RankedBatch, dict]:
        """The batch as descriptors or indices, and what to post per src rank (`_post`)."""
        if self.prepare == "per-batch":
            expansion = self.expand(block_pairs, layers=layers)
            return expansion, {r.src_rank: (r.dst_descs, r.src_descs)
                               for r in expansion.ranks if r.num_descriptors}
        plan = self.plan
        for rank in plan.src_ranks:
            self._peer(rank)
        indexed = index_batch([self._lists[r].tables for r in plan.src_ranks], block_pairs, layers=layers)
        posted = [r for r in indexed.ranks if r.dst_indices.size]
        self._fresh_lists([r.src_rank for r in posted], ids)
        return indexed, {r.src_rank: (self._lists[r.src_rank], r.dst_indices, r.src_indices) for r in posted}

    def _fresh_lists(self, ranks, ids: tuple[str, ...]) -> None:
        """Prepare again the lists of `ranks` whose local list predates the endpoint's
        last (de)registration: NIXL lists of deregistered memory must not be used."""
        own = self.endpoint
        for rank in ranks:
            old = self._lists[rank]
            if old.generation == own.generation:
                continue
            peer = self.peers[rank]
            try:
                fresh = PeerLists(own.agent, old.tables, peer.agent_name, own.mem_type,
                                  peer.handshake.mem_type, own.generation)
            except Exception as error:
                raise _nixl_error(f"Could not prepare the lists of src rank {rank} again after "
                                  f"this endpoint re-registered", error, request=label(ids),
                                  peer=peer.agent_name) from error
            old.retire()
            self._lists[rank] = fresh

    def start_read(self, block_pairs: object, request_ids: str | Sequence[str], *,
                   layers: object = None, timeout_s: float = 30.0, strategy: str | None = None) -> PendingRead:
        """Start moving a batch; returns without waiting (poll or wait the result).

        Args:
            block_pairs: shape `(N, 2)` `(src_block, dst_block)`, one row per request.
            request_ids: one id per row, or one str naming the whole batch; sent to the
                src ranks in the completion notification.
            layers: layer ids to move (default: all).
            timeout_s: deadline for the whole batch, from now.
            strategy: this batch's strategy, overriding the reader's (see `Reader`).

        Raises:
            BlockRangeError, PlanError: bad block ids, layers or arguments, or a forced
                strategy the connection cannot run (the message says why).
            HandshakeError: a src rank the plan needs is not connected.
            TransferError: NIXL refused to prepare or post a READ.
        """
        deadline = time.monotonic() + timeout_s
        pairs = np.asarray(block_pairs)
        ids = request_ids_of(request_ids, pairs.shape[0] if pairs.ndim == 2 else -1)
        if not self.endpoint.registered:
            raise TransferError("This reader's endpoint has deregistered its pages: register them "
                                "again (Endpoint.register) before reading into them.", request=label(ids))
        plan = self.plan
        for rank in plan.src_ranks:
            self._peer(rank)
        num_layers = self.endpoint.regions.num_layers if layers is None else len(np.asarray(layers).reshape(-1))
        num_requests = max(pairs.shape[0] if pairs.ndim == 2 else 1, 1)
        self._check_free(set(), set())  # gives back the staging of batches that are over
        name = self._programs.choose(num_requests, max(num_layers, 1), strategy)
        lease, staging = 0, None
        if name in ("staged", "packed"):
            got = self._programs.lease_staging(name, num_requests, max(num_layers, 1))
            if got is None and (strategy or self.strategy) != "auto":
                raise PlanError(f"The staging area ({self._programs.staging_nbytes} bytes) is taken by "
                                f"batches in flight: wait for them, or read with a larger staging_nbytes.")
            if got is None:
                name = self._programs.choose(num_requests, max(num_layers, 1), exclude=("staged", "packed"))
            else:
                lease, staging = got
        if name == "direct" and self.prepare == "once":
            return self._start_prepared(pairs, layers, request_ids, ids, deadline)
        try:
            program = self._programs.program(name, pairs, layers, staging)
            blocks, layer_set = set(program.block_pairs[:, 1].tolist()), set(program.layers.tolist())
            self._check_free(blocks, layer_set)
        except BaseException:
            self._programs.release_staging(lease)
            raise
        check = self._guard.prepare(plan, list(program.src_ranks), program.layers, program.block_pairs,
                                    _row_ids(request_ids, program.block_pairs, pairs), ids, deadline,
                                    self.before_check, notify=True)
        pending = PendingRead(self.endpoint.agent, [], ids, deadline,
                              (program.num_reads, program.num_descriptors, program.nbytes), time.perf_counter(),
                              strategy=name)
        pending.attach(self._programs.run(program, pending, label(ids)))
        pending.check = check
        pending.staging_lease = lease
        self._batches.append((pending, blocks, layer_set))
        pending.kick()  # posts the first waves now
        return pending

    def _start_prepared(self, pairs: np.ndarray, layers: object, request_ids, ids: tuple[str, ...],
                        deadline: float) -> PendingRead:
        """The direct strategy on lists prepared once per peer: one READ per src rank."""
        batch, posts = self._batch(pairs, layers, ids)
        blocks, layer_set = set(pairs[:, 1].tolist()), set(batch.layers.tolist())
        self._check_free(blocks, layer_set)
        counts = (batch.num_reads, batch.num_descriptors, batch.nbytes)
        ranks = [r.src_rank for r in batch.ranks if r.num_descriptors]
        check = self._guard.prepare(batch.plan, ranks, batch.layers, batch.block_pairs,
                                    _row_ids(request_ids, batch.block_pairs, pairs), ids, deadline, self.before_check)
        # with checks on, the src is notified only once the bytes passed them
        notif = b"" if self._guard.defers_notification else encode_notification(ids)
        pending = self._start(posts, ids, deadline - time.monotonic(), notif, counts)
        pending.check = check
        self._batches.append((pending, blocks, layer_set))
        return pending

    def _check_free(self, blocks: set[int], layers: set[int]) -> None:
        """Refuse dst pages that an unfinished batch, or a failed one that is not
        `settled`, may still write."""
        kept = []
        for pending, used, used_layers in self._batches:
            if pending.status == "received" or (pending.status != "in flight" and pending.settled):
                self._programs.release_staging(pending.staging_lease)
                pending.staging_lease = 0
                continue
            kept.append((pending, used, used_layers))
            clash = blocks & used
            if clash and layers & used_layers:
                what = ("is still in flight" if pending.status == "in flight" else
                        f"{pending.status} while its READs were in flight, and NIXL may still be "
                        f"writing them (wait for its `settled`)")
                raise PlanError(f"dst block {min(clash)} is being written by batch "
                                f"{pending.request!r}, which {what}. Read into another block.")
        self._batches = kept

    def read(self, block_pairs: object, request_ids: str | Sequence[str], *,
             layers: object = None, timeout_s: float = 30.0) -> ReadStats:
        """`start_read(...).wait()`: read a batch and block until it is in place."""
        return self.start_read(block_pairs, request_ids, layers=layers, timeout_s=timeout_s).wait()

    def submit(self, descriptors: Mapping[int, tuple[np.ndarray, np.ndarray]],
               request_ids: str | Sequence[str], *, timeout_s: float = 30.0) -> PendingRead:
        """Post arbitrary `{src_rank: (dst_descs, src_descs)}` `(M, 3)` uint64 arrays, one
        READ per rank, with the usual notification; for strategies other than
        `expand_plan` (benchmarks)."""
        ids = request_ids_of(request_ids, None)
        total = sum(int(d[:, 1].sum()) for d, _ in descriptors.values())
        n = sum(len(d) for d, _ in descriptors.values())
        return self._start(dict(descriptors), ids, timeout_s, encode_notification(ids), (n, n, total))

    def _post_now(self, transfer: Transfer, post: tuple, request: str) -> None:
        """Post one READ of a program (no notification: it is sent after the checks)."""
        try:
            state = self._post(transfer, post, b"")
        except Exception as error:
            transfer.release()
            raise _nixl_error(f"Could not post the READ from src rank {transfer.src_rank}", error,
                              request=request, peer=transfer.peer) from error
        if state == "ERR":
            transfer.release()
            raise TransferError(f"Posting the READ from src rank {transfer.src_rank} failed.",
                                request=request, peer=transfer.peer)

    def _post(self, transfer: Transfer, post: tuple, notif: bytes) -> str:
        """Make and post one READ: `post` is `(dst_descs, src_descs)` arrays, prepared for
        this READ alone, or `(PeerLists, dst_indices, src_indices)`."""
        agent = self.endpoint.agent
        if isinstance(post[0], PeerLists):
            lists, dst_index, src_index = post
            transfer.shared = lists.acquire()
            local, remote = lists.local, lists.remote
        else:
            dst_descs, src_descs = post
            peer = self.peers[transfer.src_rank]
            local = agent.prep_xfer_dlist(LOCAL_AGENT, np.ascontiguousarray(dst_descs),
                                          self.endpoint.mem_type)
            transfer.handles.append(local)
            remote = agent.prep_xfer_dlist(peer.agent_name, np.ascontiguousarray(src_descs),
                                           peer.handshake.mem_type)
            transfer.handles.append(remote)
            dst_index = src_index = np.arange(len(dst_descs), dtype=np.int32)
        transfer.xfer = agent.make_prepped_xfer("READ", local, dst_index, remote, src_index,
                                                notif_msg=notif)
        return agent.transfer(transfer.xfer)

    def _start(self, posts: Mapping[int, tuple], ids: tuple[str, ...], timeout_s: float,
               notif: bytes, counts: tuple[int, int, int]) -> PendingRead:
        transfers: list[Transfer] = []
        started = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        for src_rank, post in sorted(posts.items()):
            peer = self._peer(src_rank)
            transfer = Transfer(src_rank, peer.agent_name)
            transfers.append(transfer)
            try:
                state = self._post(transfer, post, notif)
            except Exception as error:
                for t in transfers:
                    t.release()
                raise _nixl_error(f"Could not post the READ from src rank {src_rank}", error,
                                  request=label(ids), peer=peer.agent_name) from error
            if state == "ERR":
                for t in transfers:
                    t.release()
                raise TransferError(f"Posting the READ from src rank {src_rank} failed.",
                                    request=label(ids), peer=peer.agent_name)
        return PendingRead(self.endpoint.agent, transfers, ids, deadline, counts, started)

    def close(self, *, settle_timeout_s: float = 10.0) -> None:
        """Disconnect from every src rank; the endpoint stays open. Batches not finished
        are cancelled, and their READs given up to `settle_timeout_s` to finish before
        their handles are released (after that, keep the dst memory alive until the src
        engines are gone: NIXL may still write into it)."""
        deadline = time.monotonic() + settle_timeout_s
        for pending, _, _ in self._batches:
            if pending.status == "in flight":
                pending.cancel()
            pending.wait_settled(max(deadline - time.monotonic(), 0.0))
            pending.release()
        self._batches = []
        for rank in list(self.peers):
            self.disconnect(rank)
        self._guard.close()
        self._programs.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _row_ids(request_ids: object, sorted_pairs: np.ndarray, given_pairs: np.ndarray) -> object:
    """The request ids in the order of `sorted_pairs` (the batch's pairs sorted by dst
    block), or the single str naming the whole batch."""
    if isinstance(request_ids, str):
        return request_ids
    ids = list(request_ids)
    order = {int(d): i for i, d in enumerate(np.asarray(given_pairs)[:, 1].tolist())}
    return [ids[order[int(d)]] for d in sorted_pairs[:, 1].tolist()]
