"""A batch in flight (`PendingRead`) and what it moved (`ReadStats`).

A batch is one READ per src rank (`_transfer.Transfer`). `PendingRead.poll` checks every
READ's state against the batch's deadline; once all are done it runs the reader's checks
(generation fence, integrity) and only then reports the batch received. A failure of any
kind fails the whole batch for good (`TransferError` naming the request and the peer).

A READ still moving when its batch failed (a missed deadline, a cancel, a sibling READ's
error) may go on writing into the batch's dst pages. It is kept, handles and all, until
it is settled (`_transfer.py` says when); the batch is `settled` only then. Its dst
endpoint tracks the batch meanwhile and refuses those pages to every reader
(`_inflight.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import PlanError, TransferError
from ._transfer import Transfer

__all__ = ["PendingRead", "ReadStats", "Transfer", "label", "request_ids_of", "row_ids", "MAX_REQUEST_ID_NBYTES"]

MAX_REQUEST_ID_NBYTES = 1024
"""Longest request id (UTF-8 bytes): ids travel in read-done notifications."""


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
    long = [i for i in ids if len(i.encode("utf-8", "surrogatepass")) > MAX_REQUEST_ID_NBYTES]
    if long:
        raise PlanError(f"request id {long[0][:40]!r}... is {len(long[0].encode('utf-8', 'surrogatepass'))} "
                        f"bytes; ids travel in read-done notifications and may be at most "
                        f"{MAX_REQUEST_ID_NBYTES} bytes of UTF-8. Use shorter ids.")
    return tuple(dict.fromkeys(ids))


def row_ids(request_ids: object, sorted_pairs: np.ndarray, given_pairs: np.ndarray) -> object:
    """The request ids in the order of `sorted_pairs` (the batch's pairs sorted by dst
    block), or the single str naming the whole batch."""
    if isinstance(request_ids, str):
        return request_ids
    ids = list(request_ids)
    order = {int(d): i for i, d in enumerate(np.asarray(given_pairs)[:, 1].tolist())}
    return [ids[order[int(d)]] for d in sorted_pairs[:, 1].tolist()]


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
        engine: what ran a peer batch's copies ("kernel" or "copy-engines"); "" for
            the other strategies.
    """

    request_ids: tuple[str, ...]
    num_reads: int
    num_descriptors: int
    nbytes: int
    num_transfers: int
    elapsed_s: float
    strategy: str = "direct"
    num_waves: int = 1
    engine: str = ""

    @property
    def gbps(self) -> float:
        """Payload GB/s (1e9 bytes per second)."""
        return self.nbytes / self.elapsed_s / 1e9 if self.elapsed_s > 0 else float("inf")


class PendingRead:
    """A batch in flight: `poll()` until it returns True, or `wait()`.

    Raises `TransferError` (from `poll` / `wait`) when any src rank's transfer fails or
    the deadline passes; the batch's data is then invalid. A failed batch's READs that
    were still moving are kept until they are `settled`; until then its dst endpoint
    refuses its dst blocks to every reader.

    Args:
        endpoint: the dst endpoint (its `agent` and `remotes`), read at each poll.
        transfers: one per src rank, posted or about to be.
        strategy: the batch's strategy (for `stats`).
        run: a `ProgramRun` posting READs wave by wave (`attach`), or None (all posted at
            once).

    Attributes:
        request_ids: the batch's request ids.
        deadline: `time.monotonic()` after which the batch fails.
        check: None, or the reader's checks, run once when every READ is done (set by
            `Reader.start_read`); they raise `TransferError` to fail the batch.
    """

    def __init__(self, endpoint, transfers: list[Transfer], request_ids: tuple[str, ...],
                 deadline: float, counts: tuple[int, int, int], started: float, *,
                 strategy: str = "direct", run=None):
        self._endpoint, self._transfers, self.request_ids = endpoint, transfers, request_ids
        self.deadline, self._counts, self._started = deadline, counts, started
        self.strategy = strategy
        self.staging_lease = 0  # the reader's staging lease, given back once the batch is over
        self._run = run  # a ProgramRun posting READs over time, or None (all posted at once)
        self._finished: float | None = None
        self._error: TransferError | None = None
        self._cancelled = False
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

    @property
    def peers(self) -> frozenset[str]:
        """The src agents of the READs not settled yet."""
        return frozenset(t.peer for t in self._transfers if t.state == "active")

    def _fail(self, error: TransferError, cause: BaseException | None = None) -> None:
        self._error = error
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

    def add(self, transfer: Transfer) -> Transfer:
        """A READ of this batch posted after it started (a later wave)."""
        self._transfers.append(transfer)
        return transfer

    def transfer_done(self, transfer: Transfer) -> bool:
        """True once `transfer` finished; raises `TransferError` (and fails the batch)
        when it failed."""
        if transfer.state == "done":
            return True
        if transfer.state != "active":
            return False  # not posted (yet)
        if self._endpoint.agent is None:
            self._fail(TransferError("The dst endpoint was closed: its READs were abandoned.",
                                     request=self.request))
        # no local names for the agent: a traceback kept with the error must not keep
        # the agent alive after Endpoint.close
        state, error = transfer.check(self._endpoint.agent, self._endpoint.remotes)
        if state in ("ERR", "LOST"):
            what = f"{type(error).__name__}: {error}" if error is not None else "state 'ERR'"
            kept = "" if state == "ERR" else (" NIXL lost track of the READ; its dst blocks stay "
                                              "refused until it is settled.")
            self._fail(TransferError(f"READ from src rank {transfer.src_rank} failed: {what}.{kept}",
                                     request=self.request, peer=transfer.peer), error)
        return state == "DONE"

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
            late = next((t for t in self._transfers if t.state == "active"), None)
            self._fail(TransferError(f"READ from src rank {late.src_rank} did not complete before the "
                                     f"deadline." if late is not None else "The batch did not complete "
                                     f"before the deadline.", request=self.request,
                                     peer=None if late is None else late.peer))
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
        scatter = self._run.program.waves[0].scatter if self._run is not None else None
        engine = getattr(scatter, "engine", "") if self.strategy == "peer" else ""
        return ReadStats(self.request_ids, num_reads, num_descriptors, nbytes, len(self._transfers),
                         self._finished - self._started, self.strategy, waves, engine)

    @property
    def settled(self) -> bool:
        """True once nothing of this batch can still write into its dst pages (or its
        staging): every READ was reported finished by NIXL (`_transfer.py`), or its agent
        was destroyed, and every copy it launched is done. Polls what is not yet."""
        for transfer in self._transfers:
            if transfer.state == "active" and self._endpoint.agent is not None:
                transfer.check(self._endpoint.agent, self._endpoint.remotes)
        return (all(t.state != "active" for t in self._transfers)
                and (self._run is None or self._run.copies_done()))

    def wait_settled(self, timeout_s: float = 30.0) -> bool:
        """Poll `settled` for up to `timeout_s`; returns it."""
        deadline = time.monotonic() + timeout_s
        while not self.settled:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)
        return True

    def cancel(self) -> None:
        """Give up on the batch: it fails; READs still moving are kept until `settled`."""
        if self._error is not None or self._finished is not None:
            return
        self._cancelled = True
        self._error = TransferError("The read was cancelled.", request=self.request)
        self._error.cancelled = True  # type: ignore[attr-defined]
        self._error.request_ids = self.request_ids  # type: ignore[attr-defined]

    def abandon(self) -> None:
        """The dst endpoint is closing and destroys its agent: drop every handle."""
        for transfer in self._transfers:
            if transfer.state == "active":
                transfer.abandon()
        if self._error is None and self._finished is None:
            self._error = TransferError("The dst endpoint was closed while the read was in flight.",
                                        request=self.request)
