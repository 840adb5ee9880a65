"""A batch in flight (`PendingRead`), what it moved (`ReadStats`), and the NIXL handles of
each of its READs until they are settled.

A batch is one READ per src rank. `PendingRead.poll` checks every READ's state against
the batch's deadline; once all are done it runs the reader's checks (generation fence,
integrity) and only then reports the batch received. A failure of any kind fails the
whole batch for good (`TransferError` naming the request and the peer).

A READ still in flight when its batch failed (a missed deadline) may go on writing into
the batch's dst pages: NIXL accepts the release of an active transfer, yet over UCX's
tcp transport its bytes keep landing (docs/reliability.md). Such READs are kept until
NIXL reports them finished: the batch is `settled` only then.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from ..errors import PlanError, TransferError

__all__ = ["PendingRead", "ReadStats", "label", "request_ids_of"]


def label(request_ids: tuple[str, ...]) -> str:
    """The request ids as one short string, for errors (`TransferError.request`)."""
    text = ",".join(request_ids)
    return text if len(text) <= 120 else f"{text[:100]}... ({len(request_ids)} requests)"


def request_ids_of(request_ids: object, num_pairs: int | None) -> tuple[str, ...]:
    """A batch's request ids as a tuple of distinct non-empty strs: one per pair (or a
    single str for the whole batch); `num_pairs` None skips the count check."""
    if isinstance(request_ids, str):
        ids: tuple = (request_ids,)
    else:
        ids = tuple(request_ids)  # type: ignore[arg-type]
        if num_pairs is not None and len(ids) != num_pairs:
            raise PlanError(f"Got {len(ids)} request ids for {num_pairs} block pairs: pass one id "
                            f"per pair, or a single str for the whole batch.")
    if not ids or not all(isinstance(i, str) and i for i in ids):
        raise PlanError(f"request ids must be non-empty strs, got {ids[:5]!r}.")
    return tuple(dict.fromkeys(ids))


@dataclass(frozen=True, slots=True)
class ReadStats:
    """What a completed batch moved.

    Attributes:
        request_ids: the batch's request ids.
        num_reads: plan reads x layers x requests (before merging).
        num_descriptors: descriptors posted, after merging, over all src ranks.
        nbytes: bytes moved.
        num_transfers: NIXL transfers posted (one per src rank read from, and wave).
        elapsed_s: from the first post to the last completion seen, in seconds.
        strategy: the strategy that ran ("direct", "staged", "packed" or "peer").
        num_waves: waves of the batch (1 unless staged or packed in several waves).
    """

    request_ids: tuple[str, ...]
    num_reads: int
    num_descriptors: int
    nbytes: int
    num_transfers: int
    elapsed_s: float
    strategy: str = "direct"
    num_waves: int = 1

    @property
    def gbps(self) -> float:
        """Payload GB/s (1e9 bytes per second)."""
        return self.nbytes / self.elapsed_s / 1e9 if self.elapsed_s > 0 else float("inf")


class Transfer:
    """One READ of a batch: its transfer handle, the descriptor lists it owns (prepared
    for this READ alone) and the lists it shares (prepared once per peer, `PeerLists`)."""

    __slots__ = ("src_rank", "peer", "handles", "shared", "xfer", "done")

    def __init__(self, src_rank: int, peer: str):
        self.src_rank, self.peer = src_rank, peer
        self.handles: list = []  # prepped dlist handles owned by this READ
        self.shared = None  # a PeerLists this READ uses, released with `drop()`
        self.xfer = None
        self.done = False

    def release(self) -> None:
        """Release the transfer and owned lists; let go of shared ones. Idempotent."""
        for handle in ([self.xfer] if self.xfer is not None else []) + self.handles:
            try:
                handle.release()
            except Exception:  # releasing must not hide the original error
                pass
        self.xfer, self.handles = None, []
        if self.shared is not None:
            shared, self.shared = self.shared, None
            shared.drop()


class PendingRead:
    """A batch in flight: `poll()` until it returns True, or `wait()`.

    Raises `TransferError` (from `poll` / `wait`) when any src rank's transfer fails or
    the deadline passes; the batch's data is then invalid. A failed batch's READs that
    were in flight are kept until NIXL reports them finished (`settled`); its dst blocks
    must not be given to another request before (the `Reader` refuses to read into them).

    Attributes:
        request_ids: the batch's request ids.
        deadline: `time.monotonic()` after which the batch fails.
        check: None, or the reader's checks, run once when every READ is done (set by
            `Reader.start_read`); they raise `TransferError` to fail the batch.
    """

    def __init__(self, agent, transfers: list[Transfer], request_ids: tuple[str, ...],
                 deadline: float, counts: tuple[int, int, int], started: float, *,
                 strategy: str = "direct", run=None):
        self._agent, self._transfers, self.request_ids = agent, transfers, request_ids
        self.deadline, self._counts, self._started = deadline, counts, started
        self.strategy = strategy
        self.staging_lease = 0  # the reader's staging lease, given back once the batch is over
        self._run = run  # a ProgramRun posting READs over time, or None (all posted at once)
        self._finished: float | None = started if not transfers and run is None else None
        self._error: TransferError | None = None
        self._cancelled = False
        self._unsettled: list[Transfer] = []  # active when the batch failed
        self.check: Callable[[PendingRead], None] | None = None

    @property
    def status(self) -> str:
        """"in flight", "received" (bytes landed and checked), "failed" or "cancelled"."""
        if self._error is not None:
            return "cancelled" if self._cancelled else "failed"
        return "in flight" if self._finished is None else "received"

    @property
    def request(self) -> str:
        return label(self.request_ids)

    def _fail(self, message: str, peer: str | None, cause: BaseException | None = None,
              ended: Transfer | None = None) -> None:
        self._keep_active(ended)
        self._error = TransferError(message, request=self.request, peer=peer)
        self._error.request_ids = self.request_ids  # type: ignore[attr-defined]
        raise self._error from cause

    def _run_check(self) -> None:
        check, self.check = self.check, None
        if check is None:
            return
        try:
            check(self)
        except TransferError as error:
            self._error = error
            error.request_ids = self.request_ids  # type: ignore[attr-defined]
            raise

    def attach(self, run) -> None:
        """Drive a `ProgramRun` (set once, before the first poll); its READs are posted
        into this batch (`add`) and polled with `transfer_done`."""
        self._run = run
        self._finished = None

    def add(self, transfer: Transfer) -> Transfer:
        """A READ of this batch posted after it started (a later wave)."""
        self._transfers.append(transfer)
        return transfer

    def transfer_done(self, transfer: Transfer) -> bool:
        """True once `transfer` finished; raises `TransferError` (and fails the batch)
        when it failed."""
        if transfer.done:
            return True
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
        return transfer.done

    def kick(self) -> None:
        """Post what can be posted now (the first waves), without completing the batch:
        a failure to post raises here, a finished batch is completed by `poll`."""
        if self._error is None and self._finished is None:
            self._advance()

    def _advance(self) -> bool:
        if self._run is None:
            return all([self.transfer_done(t) for t in self._transfers])
        try:
            return self._run.poll()
        except TransferError as error:
            if self._error is None:  # failed by the run itself (a refusal or its deadline)
                self._keep_active()
                self._error = error
                error.request_ids = self.request_ids  # type: ignore[attr-defined]
            self._run.abandon()
            raise

    def poll(self) -> bool:
        """True once every READ (and copy) of the batch is done and checked; raises
        `TransferError` on failure."""
        if self._error is not None:
            raise self._error
        if self._finished is not None:
            return True
        if self._advance():
            self._run_check()
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
        num_reads, num_descriptors, nbytes = self._counts
        waves = len(self._run.program.waves) if self._run is not None else 1
        return ReadStats(self.request_ids, num_reads, num_descriptors, nbytes, len(self._transfers),
                         self._finished - self._started, self.strategy, waves)

    def _keep_active(self, ended: Transfer | None = None) -> None:
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
        self._cancelled = True
        self._error = TransferError("The read was cancelled.", request=self.request)
        self._error.cancelled = True  # type: ignore[attr-defined]
