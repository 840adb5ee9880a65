"""Packed plans: the src packs exactly the bytes a dst rank needs; the dst fetches them
with one descriptor per src rank and wave, then scatters them into its pages.

Per src rank, the plan's reads from it are laid back to back in a *slot* (each at a
`SLOT_ALIGN_NBYTES`-aligned offset, in dst order)::

    src page of rank s   | x0 x1 | B | C | T0 T1 |        dst rank 0 of 1 -> 2 reads x0, B|C|T0
    slot of rank s       [x0][B|C|T0]                   packs: page -> slot
    dst page             | x0 | B | C | T0 |            unpacks: landed slot -> page

A wave of `n` requests over `m` layers packs `m * n` slots of rank s contiguously,
layer-major (`PackLayout`), so the dst READs the wave from rank s as one range. Both
sides build their copies from the same `PackedPlan` and `PackLayout`: the src its pack
copies (`ssm_split.strategies.pack_copies`), the dst its fetch and scatter
(`packed_program`). `pack_fingerprint` names what a src rank packs, so a src can refuse
a request it would pack differently.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from ..errors import PlanError
from ..layout._regions import RegionSet
from ..plan._plan import Plan, Read
from ._staging import SLOT_ALIGN_NBYTES, align

__all__ = ["Pack", "Unpack", "PackedPlan", "pack_plan", "apply_packed", "PackLayout", "PACK_FORMAT",
           "pack_fingerprint"]

PACK_FORMAT = "ssm-split/pack-1"
"""Names the packing rule (slot order, alignment, wave layout); part of every fingerprint."""


@dataclass(frozen=True, slots=True)
class Pack:
    """Copy `nbytes` from `src_offset` of `src_rank`'s page to `slot_offset` of its slot."""

    src_rank: int
    src_offset: int
    slot_offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Unpack:
    """Copy `nbytes` from `slot_offset` of `src_rank`'s landed slot to `dst_offset` of
    the dst page."""

    src_rank: int
    slot_offset: int
    dst_offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class PackedPlan:
    """A plan executed by packing on the src side (`pack_plan`).

    Attributes:
        plan: the plain plan.
        slot_nbytes: indexed by src rank, the slot one page needs from that rank (a
            multiple of `SLOT_ALIGN_NBYTES`; 0 for a rank not read from).
        packs: page -> slot copies, by src rank then slot offset.
        unpacks: landed slot -> dst page copies, by src rank then dst offset.
    """

    plan: Plan
    slot_nbytes: tuple[int, ...]
    packs: tuple[Pack, ...]
    unpacks: tuple[Unpack, ...]

    def _plan(self, reads: tuple[Read, ...], src_nbytes: int, dst_nbytes: int) -> Plan:
        p = self.plan
        return Plan(p.spec, p.src_tp, p.dst_tp, p.dst_rank, reads, max(src_nbytes, 1), max(dst_nbytes, 1))

    def pack_plan_for(self, src_rank: int) -> Plan:
        """`src_rank`'s packs as a `Plan` whose dst "page" is its slot."""
        reads = tuple(Read(r.src_rank, r.src_offset, r.slot_offset, r.nbytes)
                      for r in self.packs if r.src_rank == src_rank)
        return self._plan(reads, self.plan.src_content_nbytes, self.slot_nbytes[src_rank])

    def unpack_plan_for(self, src_rank: int) -> Plan:
        """`src_rank`'s unpacks as a `Plan` whose src "page" is its landed slot."""
        reads = tuple(Read(u.src_rank, u.slot_offset, u.dst_offset, u.nbytes)
                      for u in self.unpacks if u.src_rank == src_rank)
        return self._plan(reads, self.slot_nbytes[src_rank], self.plan.dst_content_nbytes)


@lru_cache(maxsize=1024)
def pack_plan(plan: Plan) -> PackedPlan:
    """Pack, per src rank, exactly the bytes the dst page needs from it (module doc).

    Bytes over the wire equal the plan's; the price is one copy pass on each side.

    Raises:
        PlanError: `plan` is not a `Plan`.
    """
    if not isinstance(plan, Plan):
        raise PlanError(f"pack_plan takes a Plan (from plan_reads), got {type(plan).__name__}.")
    sizes = [0] * plan.src_tp
    packs: list[Pack] = []
    unpacks: list[Unpack] = []
    for src_rank in plan.src_ranks:
        at = 0
        for read in sorted(plan.reads_from(src_rank), key=lambda r: r.dst_offset):
            packs.append(Pack(src_rank, read.src_offset, at, read.nbytes))
            unpacks.append(Unpack(src_rank, at, read.dst_offset, read.nbytes))
            at = align(at + read.nbytes)
        sizes[src_rank] = at
    return PackedPlan(plan, tuple(sizes), tuple(packs), tuple(unpacks))


def apply_packed(packed: PackedPlan, src_pages: Sequence[np.ndarray], dst_page: np.ndarray) -> np.ndarray:
    """Execute `packed` on numpy pages: pack each src rank's slot, then unpack into a copy
    of `dst_page` (1-D uint8 arrays; the reference for the executors)."""
    plan = packed.plan
    if len(src_pages) != plan.src_tp:
        raise PlanError(f"apply_packed needs {plan.src_tp} src pages, got {len(src_pages)}.")
    slots = [np.zeros(n, dtype=np.uint8) for n in packed.slot_nbytes]
    for p in packed.packs:
        slots[p.src_rank][p.slot_offset:p.slot_offset + p.nbytes] = src_pages[p.src_rank][p.src_offset:p.src_offset + p.nbytes]
    out = np.array(dst_page, dtype=np.uint8, copy=True)
    for u in packed.unpacks:
        out[u.dst_offset:u.dst_offset + u.nbytes] = slots[u.src_rank][u.slot_offset:u.slot_offset + u.nbytes]
    return out


def pack_fingerprint(packed: PackedPlan, src_rank: int) -> str:
    """A short hex digest of what `src_rank` packs for this plan (format, slot size and
    every pack): equal on both sides exactly when they would lay a wave out alike."""
    parts = [PACK_FORMAT, str(src_rank), str(packed.slot_nbytes[src_rank])]
    parts += [f"{p.src_offset}:{p.slot_offset}:{p.nbytes}" for p in packed.packs if p.src_rank == src_rank]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class PackLayout:
    """Where one wave's packed bytes from one src rank sit, from the wave's first byte.

    The slot of (layer index `i`, request `n`) starts at
    `(i * num_requests + n) * slot_nbytes`: layer-major, `nbytes` in all. The same
    layout describes the src's pack area and the dst's staging for that wave.
    """

    slot_nbytes: int
    num_layers: int
    num_requests: int

    def __post_init__(self) -> None:
        for name in ("slot_nbytes", "num_layers", "num_requests"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(f"PackLayout.{name} must be an int >= 1, got {value!r}.")
        if self.slot_nbytes % SLOT_ALIGN_NBYTES:
            raise PlanError(f"PackLayout.slot_nbytes must be a multiple of {SLOT_ALIGN_NBYTES}, "
                            f"got {self.slot_nbytes}.")

    @property
    def nbytes(self) -> int:
        return self.slot_nbytes * self.num_layers * self.num_requests

    def regions(self, base_addr: int, device_id: int = 0) -> RegionSet:
        """The wave as a `RegionSet`: layer `i`'s "pages" are its requests' slots."""
        return RegionSet.packed(base_addr, num_layers=self.num_layers, num_blocks=self.num_requests,
                                page_nbytes=self.slot_nbytes, device_id=device_id)
