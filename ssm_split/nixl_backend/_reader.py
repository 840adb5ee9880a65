"""The dst side: load src handshakes, then read batches of requests with NIXL READs.

    reader = Reader(dst_endpoint)
    for host, port in src_addresses:          # one src engine, all of its ranks
        reader.connect_to(host, port)         # checks the handshake, prepares the lists
    reader.warm_up()                          # connects, and checks no handshake is stale
    stats = reader.read(pairs, request_ids)   # pairs: (N, 2) (src_block, dst_block)

Each batch runs one strategy (`Reader(strategy=...)`, `_programs.py`; docs/backend.md
compares them). Completion is polled against a deadline; any failure raises
`TransferError(request=..., peer=...)` and a failed batch is never reported as received
(`_pending.PendingRead`). Before a batch counts as received, `_guard.Guard` checks that
no src rank re-registered since its handshake (`check_generation`) and, in integrity
mode, every byte; with a check on, the read-done notification goes out only after it.

What outlives a reader belongs to its endpoint: the src agents it loaded (`_remotes.py`)
and every batch that may still write into the dst pages (`_inflight.py`), whose blocks
stay refused to every reader of the endpoint, also after `close`, until it settles. Per
src rank the reader keeps one side channel client (`_sideclient.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..errors import HandshakeError, PlanError, TransferError
from ..expand._expand import Expansion, expand_plan
from ..plan._plan import Plan, plan_reads
from ..expand._prepared import index_batch
from ..strategies._cost import CostModel
from ._connect import admit
from ._endpoint import Endpoint
from ._handshake import Handshake
from ._guard import Guard
from ._lists import PeerLists, refresh_lists
from ._memory import read_bytes
from ._notify import Notifier
from ._pending import PendingRead, ReadStats, label, request_ids_of, row_ids as _row_ids
from ._post import post_one, start_reads
from ._transfer import nixl_error as _nixl_error
from ._programs import ReaderPrograms
from ._scratch import HEADER_NBYTES, header_desc, parse_header
from ._sideclient import SideChannelClient, fetch_handshake
from ._ucx import explain_refused_read

__all__ = ["Peer", "Reader", "PendingRead", "ReadStats", "PREPARE_MODES"]

PREPARE_MODES = ("auto", "once", "per-batch")


@dataclass(frozen=True, slots=True)
class Peer:
    """A src rank the reader can read from: its handshake, its NIXL agent name, when found
    through `connect_to` its side channel address, and the notification session the src
    opened for this reader (None: its notifications are not sent)."""

    handshake: Handshake
    agent_name: str
    address: tuple[str, int] | None = None
    session: bytes | None = None


class Reader:
    """Reads from the ranks of one src engine into a dst `Endpoint`'s pages.

    Args:
        endpoint: this dst rank's endpoint (its spec, tp, rank, regions, agent, secret).
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
        self._clients: dict[int, SideChannelClient] = {}
        self._notifiers: dict[int, Notifier] = {}
        self._plan: Plan | None = None
        self._plan_override = plan
        self._programs = ReaderPrograms(self, strategy, staging_nbytes, model)
        self._guard = Guard(endpoint, self.peers, self._read_small, clients=self._clients,
                            notifiers=self._notifiers, check_generation=check_generation,
                            integrity=integrity)
        self.before_check = None
        self._batches: list[PendingRead] = []  # this reader's batches not yet finished

    # --- peers --------------------------------------------------------------------------

    def connect(self, handshake: Handshake | bytes, *, session: bytes | None = None) -> Peer:
        """Load a src rank's handshake (decoded and checked) and its NIXL metadata; with
        `prepare="once"`, prepare its descriptor lists. `session`: the notification session
        the src opened for this reader (`Endpoint.open_session`; `connect_to` gets one).

        Raises:
            HandshakeError: undecodable bytes, a src TP that differs from earlier peers,
                or metadata that NIXL rejects or that names another agent.
            SpecMismatchError: the src state is not this endpoint's (names the fields).
            ShardingError, PlanError: no plan between the two TP sizes, or regions that
                cannot be tabulated (`prepare_tables`).
            TransferError: NIXL refused the lists (regions outside the memory the src
                registered); the rank is not connected then.
        """
        own = self.endpoint
        hs, plan, tables, name = admit(own, self.peers, handshake, self._plan_for, self.prepare == "once")
        if hs.rank in self.peers:
            self.disconnect(hs.rank)
        own.remotes.acquire(name)
        self.peers[hs.rank] = Peer(hs, name, None, session)
        if session is not None:
            self._notifiers[hs.rank] = Notifier(own.secret, session, own.name, name)
        self._plan = plan
        self._programs.on_connect(hs.rank, hs)
        if tables is not None:
            try:
                lists = PeerLists(own.agent, tables, name, own.mem_type, hs.mem_type, own.generation)
            except Exception as error:  # NIXL errors derive from Exception
                self.disconnect(hs.rank)
                raise _nixl_error(f"NIXL could not prepare the descriptor lists of src rank "
                                  f"{hs.rank}", error, request=None, peer=name) from error
            own.lists.add(lists)
            self._lists[hs.rank] = lists
        return self.peers[hs.rank]

    def connect_to(self, host: str, port: int, *, timeout_s: float = 10.0) -> Peer:
        """Fetch a handshake over the side channel from `(host, port)`, then `connect`.
        The side channel client stays open for integrity requests (`client`)."""
        own = self.endpoint
        client = SideChannelClient(host, port, secret=own.secret, timeout_s=timeout_s,
                                   context=own.client_context())
        try:
            data, session = fetch_handshake(client, own.name)
            peer = self.connect(data, session=session)
        except BaseException:
            client.close()
            raise
        rank = peer.handshake.rank
        old = self._clients.pop(rank, None)
        if old is not None:
            old.close()
        self._clients[rank] = client
        peer = self.peers[rank] = Peer(peer.handshake, peer.agent_name, (host, port), session)
        return peer

    def client(self, src_rank: int) -> SideChannelClient:
        """The side channel client of a src rank found with `connect_to` (requests of
        one's own, e.g. `client.send("pack", ...)`).

        Raises:
            HandshakeError: the rank is not connected through its side channel.
        """
        client = self._clients.get(src_rank)
        if client is None:
            raise HandshakeError(f"src rank {src_rank} has no side channel client: connect to it "
                                 f"with connect_to(host, port) (connected: {sorted(self.peers)}).")
        return client

    def disconnect(self, src_rank: int) -> None:
        """Forget a src rank and its prepared lists (released once no READ uses them);
        its NIXL agent stays loaded in the endpoint, for other readers and reconnects."""
        peer = self.peers.pop(src_rank, None)
        if peer is None:
            raise HandshakeError(f"src rank {src_rank} is not connected (connected: "
                                 f"{sorted(self.peers)}).")
        self._plan = None
        self._programs.on_disconnect(src_rank)
        lists = self._lists.pop(src_rank, None)
        if lists is not None:
            lists.retire()  # released once no READ in flight uses them
        self._notifiers.pop(src_rank, None)
        client = self._clients.pop(src_rank, None)
        if client is not None:
            client.close()
        if self.endpoint.remotes is not None:
            self.endpoint.remotes.release(peer.agent_name)

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
        READ to a peer pays it, on every UCX worker thread) and checks the peer is the
        generation its handshake says.

        Raises:
            HandshakeError: a peer re-registered since its handshake (stale).
            TransferError: a peer did not answer, or UCX has no zero-copy READ path to it
                (emulated READs are refused: the message says why and what to do).
        """
        own = self.endpoint
        # With UCX worker threads, each thread has its own connection and UCX hands a
        # thread work only in READs of >= 1024 descriptors: repeat the header read so
        # every thread connects here rather than in the first real batch.
        count = 1024 * own.num_threads if own.num_threads else 1
        for rank in sorted(self.peers):
            peer = self.peers[rank]
            landing, slot, token = self._guard.landing(1)
            local, remote = np.tile(slot, (count, 1)), np.tile(header_desc(peer.handshake.scratch), (count, 1))
            try:
                self._read_small({rank: (local, remote)}, ("warm-up",), timeout_s, token)
            except TransferError as error:
                if not own.emulated_reads and rank in self._clients:
                    explain_refused_read(self._clients[rank], rank, peer.agent_name, error)
                raise
            generation = parse_header(read_bytes(landing, 0, HEADER_NBYTES))
            if generation != peer.handshake.generation:
                raise HandshakeError(
                    f"src rank {rank} ({peer.agent_name!r}) is at registration generation "
                    f"{'?' if generation is None else generation}, but its handshake says "
                    f"{peer.handshake.generation}: the handshake is stale. Fetch a new one.")

    def _read_small(self, posts: Mapping[int, tuple[np.ndarray, np.ndarray]], ids: tuple[str, ...],
                    timeout_s: float, token: object) -> None:
        """Post `{src_rank: (dst_descs, src_descs)}` into the landing buffer `token` (no
        notification) and wait: the warm-up and the guard's header READs."""
        self._start(posts, ids, timeout_s, {}, (0, 0, 0), token=token).wait()

    # --- reads --------------------------------------------------------------------------

    def expand(self, block_pairs: object, *, layers: object = None) -> Expansion:
        """The batch's descriptors per src rank (see `expand_plan`), as `prepare="per-batch"`
        posts them."""
        plan = self.plan
        regions = {r: self._peer(r).handshake.regions for r in plan.src_ranks}
        return expand_plan(plan, regions, self.endpoint.regions, block_pairs, layers=layers)

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
            BlockRangeError, PlanError: bad block ids, layers or arguments, a forced
                strategy the connection cannot run (the message says why), or dst pages
                that a batch of any reader of this endpoint may still write.
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
        counts = (max(pairs.shape[0] if pairs.ndim == 2 else 1, 1), max(num_layers, 1))  # requests, layers
        self._batches = self._programs.release_finished(self._batches)  # staging of batches over
        name, lease, staging = self._programs.choose_and_lease(*counts, strategy)
        if name == "direct" and self.prepare == "once":
            return self._start_prepared(pairs, layers, request_ids, ids, deadline)
        try:
            program = self._programs.program(name, pairs, layers, staging, counts=counts)
            blocks, layer_set = set(program.block_pairs[:, 1].tolist()), set(program.layers.tolist())
            self.endpoint.inflight.check_free(blocks, layer_set)
            check = self._guard.prepare(plan, list(program.src_ranks), program.layers, program.block_pairs,
                                        _row_ids(request_ids, program.block_pairs, pairs), ids, deadline,
                                        self.before_check, notify=True)
        except BaseException:
            self._programs.release_staging(lease)
            raise
        pending = PendingRead(self.endpoint, [], ids, deadline,
                              (program.num_reads, program.num_descriptors, program.nbytes), time.perf_counter(),
                              strategy=name)
        pending.attach(self._programs.run(program, pending, label(ids)))
        pending.check = check
        pending.staging_lease = lease
        token = self._programs.staging_token if staging is not None else None
        self.endpoint.inflight.add(pending, blocks=blocks, layers=layer_set, token=token)
        self._batches = [p for p in self._batches if p.status == "in flight" or p.staging_lease] + [pending]
        pending.kick()  # posts the first waves now
        return pending

    def _start_prepared(self, pairs: np.ndarray, layers: object, request_ids, ids: tuple[str, ...],
                        deadline: float) -> PendingRead:
        """The direct strategy on lists prepared once per peer: one READ per src rank."""
        batch = index_batch([self._lists[r].tables for r in self.plan.src_ranks], pairs, layers=layers)
        posted = [r for r in batch.ranks if r.dst_indices.size]
        refresh_lists(self._lists, [r.src_rank for r in posted], self.endpoint, self.peers, label(ids))
        posts = {r.src_rank: (self._lists[r.src_rank], r.dst_indices, r.src_indices) for r in posted}
        blocks, layer_set = set(pairs[:, 1].tolist()), set(batch.layers.tolist())
        self.endpoint.inflight.check_free(blocks, layer_set)
        counts = (batch.num_reads, batch.num_descriptors, batch.nbytes)
        ranks = [r.src_rank for r in batch.ranks if r.num_descriptors]
        notes = {} if self._guard.defers_notification else self._guard.notes(posts, ids)
        check = self._guard.prepare(batch.plan, ranks, batch.layers, batch.block_pairs,
                                    _row_ids(request_ids, batch.block_pairs, pairs), ids, deadline,
                                    self.before_check, notify=notes is None)
        pending = self._start(posts, ids, deadline - time.monotonic(), notes or {}, counts,
                              blocks=blocks, layers=layer_set)
        pending.check = check
        return pending

    def read(self, block_pairs: object, request_ids: str | Sequence[str], *,
             layers: object = None, timeout_s: float = 30.0, strategy: str | None = None) -> ReadStats:
        """`start_read(...).wait()`: read a batch and block until it is in place."""
        return self.start_read(block_pairs, request_ids, layers=layers, timeout_s=timeout_s,
                               strategy=strategy).wait()

    def _start(self, posts: Mapping[int, tuple], ids: tuple[str, ...], timeout_s: float,
               notes: Mapping[int, bytes], counts: tuple[int, int, int], *, blocks=(), layers=(),
               token: object = None) -> PendingRead:
        """Post one READ per src rank (`_post.start_reads`); the endpoint tracks the batch."""
        for src_rank in posts:
            self._peer(src_rank)
        pending = start_reads(self.endpoint, self.peers, posts, ids, timeout_s, notes, counts,
                              blocks=blocks, layers=layers, token=token)
        self._batches = [p for p in self._batches if p.status == "in flight" or p.staging_lease] + [pending]
        return pending

    def _post_now(self, transfer, post: tuple, request: str) -> None:
        """Post one READ of a program (no notification: it is sent after the checks)."""
        post_one(self.endpoint, self.peers[transfer.src_rank], transfer, post, b"", request)

    def close(self, *, settle_timeout_s: float = 10.0) -> None:
        """Disconnect from every src rank; the endpoint stays open. Batches not finished
        are cancelled and given up to `settle_timeout_s` to settle; READs that did not
        settle by then stay tracked by the endpoint, which refuses their dst blocks to
        every reader until they settle or it is closed (keep the dst memory allocated
        until then: NIXL may still write into it)."""
        deadline = time.monotonic() + settle_timeout_s
        for pending in self._batches:
            pending.cancel()  # no-op for batches received or failed
            pending.wait_settled(max(deadline - time.monotonic(), 0.0))
        self._programs.release_finished(self._batches)
        self._batches = []
        for rank in list(self.peers):
            self.disconnect(rank)
        self._guard.close()
        self._programs.close()  # a staging area still written is retired to the endpoint

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
