"""Drive one transfer program's waves on the dst: pack orders, READs, scatters.

A `ProgramRun` owns no I/O of its own: the reader gives it functions that post a READ,
send a pack order, poll an answer and release a lease, and a copier for the scatter.
`poll()` moves every wave as far as it can without blocking and returns True once the
last wave's bytes are in the dst pages.

Waves alternate the halves of the staging area, so at most two are in flight: wave
`w + 1` is packed by the src and READ while wave `w` is scattered, and wave `w + 2`
starts once wave `w` is done. A wave goes through

    packed:  order sent -> answer (lease) -> READ posted -> READ done -> lease released,
             scatter launched -> scatter done
    staged:  READ posted -> READ done -> scatter launched -> scatter done
    direct:  READ posted -> READ done
    peer:    scatter launched -> scatter done

A "busy" answer (the src's pack area is full) is retried until the deadline; any other
refusal, a failed READ or a missed deadline raises `TransferError` naming the request
and the src rank's agent.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

from ..errors import StaleHandshakeError, TransferError
from ..layout._regions import Buffer
from ..strategies._program import PackOrder, Program, fetch_reads

__all__ = ["ProgramRun", "MAX_WAVES_IN_FLIGHT"]

MAX_WAVES_IN_FLIGHT = 2
_BUSY_RETRY_S = 0.0005


class _WaveState:
    __slots__ = ("index", "tickets", "answers", "reads", "scatter", "stage", "retry_at")

    def __init__(self, index: int):
        self.index = index
        self.tickets: dict[int, Any] = {}  # src rank -> ticket of its pack order
        self.answers: dict[int, dict] = {}  # src rank -> the src's "ok" answer
        self.reads: list[Any] = []  # posted READs
        self.scatter: Any = None  # launched copies
        self.stage = "new"
        self.retry_at: dict[int, float] = {}


class ProgramRun:
    """One program in progress (module doc).

    Args:
        program: what to run.
        label: the batch's request ids as one string, for errors.
        peer_names: src rank -> its NIXL agent name, for errors.
        post_read: `post_read(rank_descriptors) -> handle`: posts one READ.
        read_done: `read_done(handle) -> bool`: True once it finished; raises
            `TransferError` when it failed.
        send_order: `send_order(order) -> ticket`: sends a pack order (packed only).
        answer: `answer(ticket) -> dict | None`: the src's answer once it came.
        release: `release(src_rank, lease)`: gives a lease back (fire and forget).
        src_areas: src rank -> its pack area (packed only).
        copier: runs scatters (`launch(table)` -> an object with `done()`).
        dst_device_id: the dst's device, for fetch descriptors.
        read_parts: descriptors per packed fetch (spread over UCX worker threads).
        deadline: `time.monotonic()` after which the batch fails.
    """

    def __init__(self, program: Program, *, label: str, peer_names: Mapping[int, str],
                 post_read: Callable[[Any], Any], read_done: Callable[[Any], bool],
                 send_order: Callable[[PackOrder], Any] | None = None,
                 answer: Callable[[Any], dict | None] | None = None,
                 release: Callable[[int, int], None] | None = None,
                 src_areas: Mapping[int, Buffer] | None = None, copier: Any = None,
                 dst_device_id: int = 0, read_parts: int = 1, deadline: float = float("inf")):
        self.program, self.label, self.peer_names = program, label, peer_names
        self._post_read, self._read_done = post_read, read_done
        self._send_order, self._answer, self._release = send_order, answer, release
        self._areas, self._copier = src_areas or {}, copier
        self._dst_device_id, self._read_parts, self.deadline = dst_device_id, read_parts, deadline
        self._waves = [_WaveState(i) for i in range(len(program.waves))]
        self._next = 0  # first wave not done

    @property
    def handles(self) -> list[Any]:
        """Every READ posted so far (the reader keeps them until they are settled)."""
        return [h for w in self._waves for h in w.reads]

    def _fail(self, message: str, src_rank: int | None, cls: type = TransferError) -> None:
        peer = self.peer_names.get(src_rank) if src_rank is not None else None
        raise cls(message, request=self.label, peer=peer)

    def poll(self) -> bool:
        """Advance every wave that can move; True once all are done."""
        while self._next < len(self._waves) and self._waves[self._next].stage == "done":
            self._next += 1
        if self._next == len(self._waves):
            return True
        for state in self._waves[self._next: self._next + MAX_WAVES_IN_FLIGHT]:
            self._advance(state)
        if self._waves[-1].stage == "done" and all(w.stage == "done" for w in self._waves):
            self._next = len(self._waves)
            return True
        if time.monotonic() > self.deadline:
            late = self._waves[self._next]
            rank = next(iter(sorted(set(late.tickets) - set(late.answers))), None)
            self._fail(f"wave {late.index + 1} of {len(self._waves)} ({late.stage}) did not complete "
                       f"before the deadline.", rank)
        return False

    def _advance(self, state: _WaveState) -> None:
        wave = self.program.waves[state.index]
        if state.stage == "new":
            if wave.packs:
                for order in wave.packs:
                    state.tickets[order.src_rank] = self._send_order(order)
                state.stage = "packing"
            else:
                state.reads = [self._post_read(r) for r in wave.reads]
                state.stage = "reading"
        if state.stage == "packing":
            self._collect_answers(state, wave.packs)
            if len(state.answers) == len(wave.packs):
                for order in wave.packs:
                    area = self._areas[order.src_rank]
                    reads = fetch_reads(order, area, state.answers[order.src_rank]["offset"],
                                        self._dst_device_id, parts=self._read_parts)
                    state.reads.append(self._post_read(reads))
                state.stage = "reading"
        if state.stage == "reading":
            if not all(self._read_done(h) for h in state.reads):
                return
            for rank, ok in state.answers.items():
                self._release(rank, ok["lease"])
            if wave.scatter is not None and wave.scatter.num_copies:
                try:
                    state.scatter = self._copier.launch(wave.scatter)
                except Exception as error:  # the copies could not start (a driver or kernel refusal)
                    self._fail(f"the copies of wave {state.index + 1} of {len(self._waves)} could not "
                               f"start: {type(error).__name__}: {error}", None)
            state.stage = "scattering"
        if state.stage == "scattering" and (state.scatter is None or state.scatter.done()):
            state.stage = "done"

    def _collect_answers(self, state: _WaveState, orders) -> None:
        now = time.monotonic()
        for order in orders:
            rank = order.src_rank
            if rank in state.answers:
                continue
            if rank in state.retry_at:
                if now < state.retry_at[rank]:
                    continue
                del state.retry_at[rank]
                state.tickets[rank] = self._send_order(order)
            got = self._answer(state.tickets[rank])
            if got is None:
                continue
            if got.get("ok") is True and type(got.get("offset")) is int and type(got.get("lease")) is int:
                state.answers[rank] = got
            elif got.get("kind") == "busy":
                state.retry_at[rank] = now + _BUSY_RETRY_S
            elif got.get("kind") == "stale":
                self._fail(f"src rank {rank} refused to pack: {got.get('error')}. Fetch a new "
                           f"handshake (connect_to) and read again.", rank, StaleHandshakeError)
            else:
                self._fail(f"src rank {rank} refused to pack wave {state.index + 1}: "
                           f"{got.get('error', got)}", rank)

    def copies_done(self) -> bool:
        """True once no copy this run launched is still running (a failed batch's scatter
        may still be writing dst pages: the batch is not settled before)."""
        return all(w.scatter is None or w.scatter.done() for w in self._waves)

    def abandon(self) -> None:
        """The batch failed: give back every lease the src granted (READs in flight stay
        with the reader until settled)."""
        for state in self._waves:
            for rank, ok in state.answers.items():
                if state.stage in ("packing", "reading"):
                    try:
                        self._release(rank, ok["lease"])
                    except Exception:  # best effort: the lease expires anyway
                        pass
