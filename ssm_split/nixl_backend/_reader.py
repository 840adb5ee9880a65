"""The dst side: load src handshakes, then read batches of requests with NIXL READs.

    reader = Reader(dst_endpoint)
    for host, port in src_addresses:          # one src engine, all of its ranks
        reader.connect_to(host, port)
    reader.warm_up()                          # connects, and checks no handshake is stale
    stats = reader.read(pairs, request_ids)   # pairs: (N, 2) (src_block, dst_block)

A batch is expanded once (`expand_plan`): per src rank, the merged dst and src descriptor
arrays. Each rank's arrays are prepared as one local and one remote NIXL list and read
with one `make_prepped_xfer("READ", ...)` over consecutive indices, carrying a
notification that names the batch's request ids, so the src can free those blocks.
Completion is polled against a deadline. Any NIXL exception, an "ERR" state, a lost peer
or a missed deadline raises `TransferError(request=..., peer=...)`; a failed read is
never reported as done, and every NIXL handle is released either way.

Once the bytes landed, and before a batch counts as received, `_integrity.Guard` checks
that no src rank re-registered since its handshake (`check_generation`, on by default:
one 16-byte READ per src rank) and, in integrity mode (`integrity=True`, off by
default), that every byte read equals the src's digest of it (docs/reliability.md).

The lists are prepared per batch rather than once per peer: merged descriptors depend on
the batch's block ids, and preparing costs about 0.3 us per descriptor against 5-11 us
to move one (docs/backend.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .._errors import HandshakeError, PlanError, TransferError
from .._expand import Expansion, expand_plan
from .._plan import Plan, plan_reads
from .._spec import check_transferable
from ._endpoint import SCRATCH_MAGIC, Endpoint, encode_notification, read_bytes
from ._handshake import Handshake, decode_handshake
from ._integrity import Guard
from ._sidechannel import fetch_handshake_bytes

__all__ = ["Peer", "Reader", "PendingRead", "ReadStats"]

_LOCAL = "NIXL_INIT_AGENT"
_HINTS = {
    "nixlNotFoundError": " A descriptor lies outside memory registered on its side: deregistered "
                         "pages, or a stale handshake (fetch a new one).",
    "nixlRemoteDisconnectError": " The src process went away or closed its endpoint.",
}


@dataclass(frozen=True, slots=True)
class Peer:
    """A src rank the reader can read from: its handshake, its NIXL agent name and, when
    found through `connect_to`, its side channel address."""

    handshake: Handshake
    agent_name: str
    address: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class ReadStats:
    """What a completed batch moved.

    Attributes:
        request_ids: the batch's request ids.
        n_reads: plan reads x layers x requests (before merging).
        n_descriptors: descriptors posted, after merging, over all src ranks.
        nbytes: bytes moved.
        n_transfers: NIXL transfers posted (one per src rank read from).
        elapsed_s: from the first post to the last completion seen, in seconds.
    """

    request_ids: tuple[str, ...]
    n_reads: int
    n_descriptors: int
    nbytes: int
    n_transfers: int
    elapsed_s: float

    @property
    def gbps(self) -> float:
        """Payload GB/s (1e9 bytes per second)."""
        return self.nbytes / self.elapsed_s / 1e9 if self.elapsed_s > 0 else float("inf")


class _Transfer:
    __slots__ = ("src_rank", "peer", "handles", "xfer", "done")

    def __init__(self, src_rank: int, peer: str):
        self.src_rank, self.peer = src_rank, peer
        self.handles: list = []  # prepped dlist handles
        self.xfer = None
        self.done = False

    def release(self) -> None:
        for handle in ([self.xfer] if self.xfer is not None else []) + self.handles:
            try:
                handle.release()
            except Exception:  # releasing must not hide the original error
                pass
        self.xfer, self.handles = None, []


def _label(request_ids: tuple[str, ...]) -> str:
    text = ",".join(request_ids)
    return text if len(text) <= 120 else f"{text[:100]}... ({len(request_ids)} requests)"


class PendingRead:
    """A batch in flight: `poll()` until it returns True, or `wait()`.

    Raises `TransferError` (from `poll` / `wait`) when any src rank's transfer fails or
    the deadline passes; the batch's data is then invalid. A READ still in flight when
    its batch failed (a missed deadline) may go on writing into the batch's dst pages:
    NIXL accepts the release of an active transfer, yet over UCX's tcp transport its
    bytes keep landing (docs/reliability.md). Such transfers are kept until NIXL reports
    them finished: the batch is `settled` only then, and its dst blocks must not be
    given to another request before (the `Reader` refuses to read into them).
    """

    def __init__(self, agent, transfers: list[_Transfer], request_ids: tuple[str, ...],
                 deadline: float, counts: tuple[int, int, int], started: float):
        self._agent, self._transfers, self.request_ids = agent, transfers, request_ids
        self.deadline, self._counts, self._started = deadline, counts, started
        self._finished: float | None = started if not transfers else None
        self._error: TransferError | None = None
        self._unsettled: list[_Transfer] = []  # active when the batch failed
        self.check = None  # run once the bytes landed (set by Reader.start_read)

    @property
    def status(self) -> str:
        """"in flight", "received" (bytes landed and checked), "failed" or "cancelled"."""
        if self._error is not None:
            return "cancelled" if getattr(self._error, "cancelled", False) else "failed"
        return "in flight" if self._finished is None else "received"

    @property
    def request(self) -> str:
        return _label(self.request_ids)

    def _fail(self, message: str, peer: str | None, cause: BaseException | None = None,
              ended: _Transfer | None = None) -> None:
        self._keep_active(ended)
        self._error = TransferError(message, request=self.request, peer=peer)
        self._error.request_ids = self.request_ids  # type: ignore[attr-defined]
        raise self._error from cause

    def poll(self) -> bool:
        """True once every src rank's READ is done; raises `TransferError` on failure."""
        if self._error is not None:
            raise self._error
        if self._finished is not None:
            return True
        for transfer in self._transfers:
            if transfer.done:
                continue
            try:
                state = self._agent.check_xfer_state(transfer.xfer)
            except Exception as error:  # NIXL exceptions derive from Exception
                self._fail(f"READ from src rank {transfer.src_rank} failed: "
                           f"{type(error).__name__}: {error}", transfer.peer, error, transfer)
            if state == "DONE":
                transfer.done = True
                transfer.release()
            elif state != "PROC":
                self._fail(f"READ from src rank {transfer.src_rank} ended in state {state!r}.",
                           transfer.peer, ended=transfer)
        if all(t.done for t in self._transfers):
            check, self.check = self.check, None
            if check is not None:
                try:
                    check(self)
                except TransferError as error:
                    self._error = error
                    error.request_ids = self.request_ids  # type: ignore[attr-defined]
                    raise
            self._finished = time.perf_counter()
            return True
        if time.monotonic() > self.deadline:
            late = next(t for t in self._transfers if not t.done)
            self._fail(f"READ from src rank {late.src_rank} did not complete before the "
                       f"deadline.", late.peer)
        return False

    def wait(self) -> ReadStats:
        """Poll until done (or failed); returns the batch's statistics."""
        spins = 0
        while not self.poll():
            spins += 1
            if spins > 200:  # give the cores to NIXL's progress thread
                time.sleep(0.00005)
        return self.stats()

    def stats(self) -> ReadStats:
        if self._finished is None:
            raise PlanError("stats() is only known once the read completed (poll() or wait()).")
        n_reads, n_descriptors, nbytes = self._counts
        return ReadStats(self.request_ids, n_reads, n_descriptors, nbytes, len(self._transfers),
                         self._finished - self._started)

    def _keep_active(self, ended: _Transfer | None = None) -> None:
        """The batch failed: release finished transfers, keep the others until settled."""
        for transfer in self._transfers:
            if transfer.done or transfer is ended or transfer.xfer is None:
                transfer.release()
            elif transfer not in self._unsettled:
                self._unsettled.append(transfer)
            transfer.done = True

    @property
    def settled(self) -> bool:
        """True once no READ of this batch can still write into its dst pages: the batch
        was received, or it failed and NIXL reported every READ that was in flight then
        as finished (polls them; releases those that are)."""
        if self._error is None:
            return self._finished is not None
        still = []
        for transfer in self._unsettled:
            try:
                state = self._agent.check_xfer_state(transfer.xfer)
            except Exception:  # failed: it writes no more
                state = "ERR"
            if state == "PROC":
                still.append(transfer)
            else:
                transfer.release()
        self._unsettled = still
        return not still

    def wait_settled(self, timeout_s: float = 30.0) -> bool:
        """Poll `settled` for up to `timeout_s`; returns it."""
        deadline = time.monotonic() + timeout_s
        while not self.settled:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)
        return True

    def release(self) -> None:
        """Release every handle now, settled or not (NIXL tries to cancel active ones)."""
        for transfer in self._transfers:
            transfer.release()
        self._unsettled = []

    def cancel(self) -> None:
        """Give up on the batch: it fails; READs in flight are kept until `settled`."""
        self._keep_active()
        self._error = TransferError("The read was cancelled.", request=self.request)
        self._error.cancelled = True  # type: ignore[attr-defined]


def _request_ids(request_ids: object, n_pairs: int | None) -> tuple[str, ...]:
    if isinstance(request_ids, str):
        ids: tuple = (request_ids,)
    else:
        ids = tuple(request_ids)  # type: ignore[arg-type]
        if n_pairs is not None and len(ids) != n_pairs:
            raise PlanError(f"Got {len(ids)} request ids for {n_pairs} block pairs: pass one id "
                            f"per pair, or a single str for the whole batch.")
    if not ids or not all(isinstance(i, str) and i for i in ids):
        raise PlanError(f"request ids must be non-empty strs, got {ids[:5]!r}.")
    return tuple(dict.fromkeys(ids))


class Reader:
    """Reads from the ranks of one src engine into a dst `Endpoint`'s pages.

    Args:
        endpoint: this dst rank's endpoint (its spec, tp, rank, regions and agent).
        check_generation: after each batch, check that no src rank deregistered or
            re-registered its pages since its handshake (`StaleHandshakeError`).
        integrity: integrity mode: check every byte read against the src's digest of it
            (`IntegrityError`); needs peers found with `connect_to` and DRAM pages.

    Attributes:
        before_check: None, or a function called with each `PendingRead` after its
            bytes landed and before they are checked (fault injection in tests).
    """

    def __init__(self, endpoint: Endpoint, *, check_generation: bool = True, integrity: bool = False):
        if not isinstance(endpoint, Endpoint):
            raise PlanError(f"Reader needs an Endpoint, got {type(endpoint).__name__}.")
        self.endpoint = endpoint
        self.peers: dict[int, Peer] = {}
        self._plan: Plan | None = None
        self._guard = Guard(self, check_generation=check_generation, integrity=integrity)
        self.before_check = None
        # batches whose READs may still write: (pending, dst blocks, layers)
        self._batches: list[tuple[PendingRead, set[int], set[int]]] = []

    # --- peers --------------------------------------------------------------------------

    def connect(self, handshake: Handshake | bytes) -> Peer:
        """Load a src rank's handshake (decoded and checked) and its NIXL metadata.

        Raises:
            HandshakeError: undecodable bytes, a src TP that differs from earlier peers,
                or metadata that NIXL rejects or that names another agent.
            SpecMismatchError: the src state is not this endpoint's (names the fields).
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
        self._plan = None
        return self.peers[hs.rank]

    def connect_to(self, host: str, port: int, *, timeout_s: float = 10.0) -> Peer:
        """Fetch a handshake over the side channel from `(host, port)`, then `connect`."""
        peer = self.connect(fetch_handshake_bytes(host, port, timeout_s=timeout_s))
        peer = self.peers[peer.handshake.rank] = Peer(peer.handshake, peer.agent_name, (host, port))
        return peer

    def disconnect(self, src_rank: int) -> None:
        """Forget a src rank and drop its NIXL metadata."""
        peer = self.peers.pop(src_rank, None)
        if peer is None:
            raise HandshakeError(f"src rank {src_rank} is not connected (connected: "
                                 f"{sorted(self.peers)}).")
        self._plan = None
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
            src = next(iter(self.peers.values())).handshake
            own = self.endpoint
            self._plan = plan_reads(src.spec, src.tp, own.tp, own.rank, dst_spec=own.spec)
        return self._plan

    def _peer(self, src_rank: int) -> Peer:
        peer = self.peers.get(src_rank)
        if peer is None:
            raise HandshakeError(f"The plan reads from src rank {src_rank}, but no handshake of "
                                 f"that rank was loaded (connected: {sorted(self.peers)}). "
                                 f"Connect to every src rank first.")
        return peer

    def warm_up(self, *, timeout_s: float = 10.0) -> None:
        """Read every peer's 16-byte scratch header: sets the connection up (the first
        READ to a peer pays it) and checks the peer is the generation its handshake says.

        Raises:
            HandshakeError: a peer re-registered since its handshake (stale).
            TransferError: a peer did not answer.
        """
        own = self.endpoint
        local = np.array([[own.scratch.addr + 16, 16, own.scratch.device_id]], dtype=np.uint64)
        for rank in sorted(self.peers):
            peer = self.peers[rank]
            s = peer.handshake.scratch
            remote = np.array([[s.addr, 16, s.device_id]], dtype=np.uint64)
            self._start({rank: (local, remote)}, ("warm-up",), timeout_s, b"", (0, 0, 0)).wait()
            header = read_bytes(own._scratch, 16, 16)
            generation = int.from_bytes(header[8:], "little")
            if header[:8] != SCRATCH_MAGIC or generation != peer.handshake.generation:
                raise HandshakeError(
                    f"src rank {rank} ({peer.agent_name!r}) is at registration generation "
                    f"{generation if header[:8] == SCRATCH_MAGIC else '?'}, but its handshake says "
                    f"{peer.handshake.generation}: the handshake is stale. Fetch a new one.")

    # --- reads --------------------------------------------------------------------------

    def expand(self, block_pairs: object, *, layers: object = None) -> Expansion:
        """The batch's descriptors per src rank (see `expand_plan`)."""
        plan = self.plan
        regions = {r: self._peer(r).handshake.regions for r in plan.src_ranks}
        return expand_plan(plan, regions, self.endpoint.regions, block_pairs, layers=layers)

    def start_read(self, block_pairs: object, request_ids: str | Sequence[str], *,
                   layers: object = None, timeout_s: float = 30.0) -> PendingRead:
        """Post a batch: one READ per src rank; returns without waiting.

        Args:
            block_pairs: shape `(N, 2)` `(src_block, dst_block)`, one row per request.
            request_ids: one id per row, or one str naming the whole batch; sent to the
                src ranks in the completion notification.
            layers: layer ids to move (default: all).
            timeout_s: deadline for the whole batch, from now.

        Raises:
            BlockRangeError, PlanError: bad block ids, layers or arguments.
            HandshakeError: a src rank the plan needs is not connected.
            TransferError: NIXL refused to prepare or post a READ.
        """
        deadline = time.monotonic() + timeout_s
        pairs = np.asarray(block_pairs)
        ids = _request_ids(request_ids, pairs.shape[0] if pairs.ndim == 2 else -1)
        expansion = self.expand(pairs, layers=layers)
        blocks, layer_set = set(pairs[:, 1].tolist()), set(expansion.layers.tolist())
        self._check_free(blocks, layer_set)
        arrays = {r.src_rank: (r.dst_descs, r.src_descs) for r in expansion.ranks if r.n_descriptors}
        counts = (expansion.n_reads, expansion.n_descriptors, expansion.nbytes)
        check = self._guard.prepare(expansion, pairs, request_ids, ids, deadline)
        # with checks on, the src is notified only once the bytes passed them
        notif = b"" if self._guard.defers_notification else encode_notification(ids)
        pending = self._start(arrays, ids, deadline - time.monotonic(), notif, counts)
        pending.check = check
        self._batches.append((pending, blocks, layer_set))
        return pending

    def _check_free(self, blocks: set[int], layers: set[int]) -> None:
        """Refuse dst pages that an unfinished batch, or a failed one that is not
        `settled`, may still write."""
        kept = []
        for pending, used, used_layers in self._batches:
            if pending.status == "received" or (pending.status != "in flight" and pending.settled):
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
        ids = _request_ids(request_ids, None)
        total = sum(int(d[:, 1].sum()) for d, _ in descriptors.values())
        n = sum(len(d) for d, _ in descriptors.values())
        return self._start(dict(descriptors), ids, timeout_s, encode_notification(ids), (n, n, total))

    def _start(self, arrays: Mapping[int, tuple[np.ndarray, np.ndarray]], ids: tuple[str, ...],
               timeout_s: float, notif: bytes, counts: tuple[int, int, int]) -> PendingRead:
        agent, mem_type = self.endpoint.agent, self.endpoint.mem_type
        transfers: list[_Transfer] = []
        started = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        for src_rank, (dst_descs, src_descs) in sorted(arrays.items()):
            peer = self._peer(src_rank)
            transfer = _Transfer(src_rank, peer.agent_name)
            transfers.append(transfer)
            try:
                local = agent.prep_xfer_dlist(_LOCAL, np.ascontiguousarray(dst_descs), mem_type)
                transfer.handles.append(local)
                remote = agent.prep_xfer_dlist(peer.agent_name, np.ascontiguousarray(src_descs),
                                               peer.handshake.mem_type)
                transfer.handles.append(remote)
                index = np.arange(len(dst_descs), dtype=np.int32)
                transfer.xfer = agent.make_prepped_xfer("READ", local, index, remote, index,
                                                        notif_msg=notif)
                state = agent.transfer(transfer.xfer)
            except Exception as error:
                for t in transfers:
                    t.release()
                raise TransferError(
                    f"Could not post the READ from src rank {src_rank}: {type(error).__name__}: "
                    f"{error}.{_HINTS.get(type(error).__name__, '')}",
                    request=_label(ids), peer=peer.agent_name) from error
            if state == "ERR":
                for t in transfers:
                    t.release()
                raise TransferError(f"Posting the READ from src rank {src_rank} failed.",
                                    request=_label(ids), peer=peer.agent_name)
        return PendingRead(agent, transfers, ids, deadline, counts, started)

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

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
