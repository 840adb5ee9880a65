"""The src half of the packed strategy: a bounded, registered pack area and the answer
to a reader's pack order.

A reader sends, per wave and src rank, a `PackOrder` (which blocks and layers, the pack
layout and its fingerprint) with the generation of the handshake it holds. The src
checks the generation and the fingerprint, leases a range of its pack area, copies its
pages into it (`ssm_split.strategies.pack_copies`: one kernel on a GPU, numpy on host
memory), waits for the copy, and answers with the lease; the reader READs the range
and releases the lease. A lease not released within its time to live is reclaimed, so
a reader that died never pins the area.

Requests arrive on the src's side channel as op "pack" (body: `generation`, `dst_tp`,
`dst_rank`, `order`, `ttl_s`) and op "release" (body: `lease`), both on its worker pool
with the side channel's caps (`PackService.handlers`). Answers:

    {"ok": true, "lease": <id>, "offset": <bytes from the area's start>}
    {"ok": false, "kind": "busy" | "stale" | "refused", "error": "..."}

"busy" means the area has no room now (retry until the deadline); "stale" a generation
other than the src's current one (fetch a new handshake); "refused" anything else (a
fingerprint the src would lay out differently, blocks out of range, no pack area).
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from ..errors import PlanError
from ..layout._regions import Buffer
from ..plan._plan import plan_reads
from ..strategies._packing import PackLayout
from ..strategies._program import PackOrder, pack_copies

__all__ = ["PackArea", "order_to_wire", "order_from_wire", "answer_pack", "answer_release",
           "DEFAULT_LEASE_TTL_S", "PackService"]

DEFAULT_LEASE_TTL_S = 30.0
_MAX_BLOCKS = 1 << 20


class PackArea:
    """A pack area of `buffer.nbytes` bytes and its leases (thread-safe).

    Args:
        buffer: the registered area (address, size, device).
        memory: the array or tensor behind it (kept alive here).
    """

    def __init__(self, buffer: Buffer, memory: Any):
        self.buffer, self.memory = buffer, memory
        self._lock = threading.Lock()
        self._leases: dict[int, tuple[int, int, float]] = {}  # id -> (offset, nbytes, expiry)
        self._ids = itertools.count(1)

    @property
    def max_wave_nbytes(self) -> int:
        """The most one wave may ask for: half the area, so two waves fit at once."""
        return self.buffer.nbytes // 2

    def lease(self, nbytes: int, ttl_s: float) -> tuple[int, int] | None:
        """`(lease id, offset)` of a free range of `nbytes`, or None when none is free."""
        now = time.monotonic()
        with self._lock:
            self._leases = {k: v for k, v in self._leases.items() if v[2] > now}
            taken = sorted((off, off + n) for off, n, _ in self._leases.values())
            at = 0
            for start, end in taken + [(self.buffer.nbytes, self.buffer.nbytes)]:
                if start - at >= nbytes:
                    lease = next(self._ids)
                    self._leases[lease] = (at, nbytes, now + ttl_s)
                    return lease, at
                at = max(at, -(-end // 256) * 256)
            return None

    def release(self, lease: int) -> bool:
        """Free a lease; False when it is unknown (already released or expired)."""
        with self._lock:
            return self._leases.pop(lease, None) is not None

    @property
    def num_leases(self) -> int:
        with self._lock:
            return len(self._leases)


def order_to_wire(order: PackOrder) -> dict:
    """A pack order as JSON-ready values (what the reader sends)."""
    layout = order.layout
    return {"src_rank": order.src_rank, "slot_nbytes": layout.slot_nbytes, "num_layers": layout.num_layers,
            "num_requests": layout.num_requests, "src_blocks": list(order.src_blocks),
            "layers": list(order.layers), "fingerprint": order.fingerprint}


def _ints(value: object, name: str, limit: int) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > limit or not all(type(v) is int and 0 <= v < 1 << 40
                                                                   for v in value):
        raise PlanError(f"`{name}` must be a list of at most {limit} ints in [0, 2**40)")
    return tuple(value)


def order_from_wire(data: object) -> PackOrder:
    """The pack order a reader sent, validated (`PlanError` naming the bad field)."""
    if not isinstance(data, dict):
        raise PlanError("the pack order must be a JSON object")
    for name in ("src_rank", "slot_nbytes", "num_layers", "num_requests"):
        if type(data.get(name)) is not int:
            raise PlanError(f"the pack order's `{name}` must be an int")
    if not isinstance(data.get("fingerprint"), str) or len(data["fingerprint"]) > 128:
        raise PlanError("the pack order's `fingerprint` must be a short string")
    layout = PackLayout(data["slot_nbytes"], data["num_layers"], data["num_requests"])
    return PackOrder(data["src_rank"], layout, _ints(data.get("src_blocks"), "src_blocks", _MAX_BLOCKS),
                     _ints(data.get("layers"), "layers", 1 << 16), data["fingerprint"], 0)


def answer_pack(endpoint: Any, area: PackArea | None, copier: Any, request: dict) -> dict:
    """Pack one wave for a reader (module doc). Never raises: every failure is an answer."""
    try:
        if area is None:
            return {"ok": False, "kind": "refused", "error": "this endpoint has no pack area "
                    "(Endpoint(pack_area_nbytes=...) > 0); read with another strategy"}
        generation = request.get("generation")
        if type(generation) is not int or generation != endpoint.generation or not endpoint.registered:
            return {"ok": False, "kind": "stale", "error": f"the reader's handshake says generation "
                    f"{generation!r}, this endpoint is at {endpoint.generation}"}
        dst_tp, dst_rank = request.get("dst_tp"), request.get("dst_rank")
        if type(dst_tp) is not int or type(dst_rank) is not int or not 0 <= dst_rank < dst_tp <= 4096:
            raise PlanError("`dst_tp` and `dst_rank` must be ints with 0 <= dst_rank < dst_tp <= 4096")
        order = order_from_wire(request.get("order"))
        if order.src_rank != endpoint.rank:
            raise PlanError(f"the order is for src rank {order.src_rank}, this is rank {endpoint.rank}")
        nbytes = order.layout.nbytes
        if nbytes > area.max_wave_nbytes:
            raise PlanError(f"a wave of {nbytes} bytes exceeds this src's limit of {area.max_wave_nbytes}")
        plan = plan_reads(endpoint.spec, endpoint.tp, dst_tp, dst_rank)
        ttl = request.get("ttl_s", DEFAULT_LEASE_TTL_S)
        ttl = float(ttl) if isinstance(ttl, (int, float)) and 0 < ttl <= 600 else DEFAULT_LEASE_TTL_S
        got = area.lease(nbytes, ttl)
        if got is None:
            return {"ok": False, "kind": "busy", "error": f"no {nbytes} free bytes in the pack area now"}
        lease, offset = got
        try:
            copier.launch(pack_copies(plan, endpoint.rank, endpoint.regions, order, area.buffer, offset)).wait()
        except BaseException:
            area.release(lease)
            raise
        return {"ok": True, "lease": lease, "offset": offset}
    except Exception as error:  # a peer's request must never take the server down
        return {"ok": False, "kind": "refused", "error": f"{type(error).__name__}: {error}"}


def answer_release(area: PackArea | None, request: dict) -> dict:
    """Free a lease a reader no longer needs."""
    lease = request.get("lease")
    if area is None or type(lease) is not int:
        return {"ok": False, "kind": "refused", "error": "`lease` must be an int of this endpoint's area"}
    return {"ok": True, "released": area.release(lease)}


class PackService:
    """An endpoint's pack area, the copier that fills it, and its side channel handlers.

    Args:
        endpoint: the src endpoint (its spec, tp, rank, regions, memory, generation).
        nbytes: the pack area's size; it is allocated here like the endpoint's memory
            (host array or CUDA tensor on its device) and must then be registered.
    """

    def __init__(self, endpoint: Any, nbytes: int):
        from ._copier import make_copier
        from ._memory import describe_memory, zeros_like_memory

        device = endpoint.scratch.device_id
        memory = zeros_like_memory(endpoint.mem_type, device, nbytes)
        info = describe_memory(memory)
        self.endpoint = endpoint
        self.area = PackArea(Buffer(info.addr, info.nbytes, info.device_id), memory)
        self.copier = make_copier(endpoint.mem_type, device, list(endpoint.memory) + [memory])
        self.requests = 0
        self._lock = threading.Lock()  # one pack at a time: copies of one area share a stream

    def handlers(self) -> dict:
        """The side channel handlers: `{"pack": ..., "release": ...}`."""

        def pack(request: dict, payload: bytes, context: Any) -> tuple[dict, bytes]:
            self.requests += 1
            with self._lock:
                context.check()  # the reader gave up while another pack ran
                return answer_pack(self.endpoint, self.area, self.copier, request), b""

        def release(request: dict, payload: bytes, context: Any) -> tuple[dict, bytes]:
            self.requests += 1
            return answer_release(self.area, request), b""

        return {"pack": pack, "release": release}
