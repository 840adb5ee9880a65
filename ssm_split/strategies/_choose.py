"""Which strategy moves a batch fastest: the cost model's estimate of each, and the pick.

Estimates, for `pages = requests x layers` and `B` bytes of state (the plan's bytes per
page times pages), with a `CostModel` `m`:

    direct   pages * k * m.desc_s + B * m.byte_s            k: merged reads per page
    staged   pages * (direct + spans) * m.desc_s + read bytes * m.byte_s
             + gathered bytes * m.gather_byte_s + waves * m.gather_launch_s
    packed   waves * src ranks * m.request_s + B * m.byte_s + 2 * B * m.gather_byte_s
             (the src's pack and the dst's scatter; when src and dst are on different
             devices they overlap the READs of other waves, so only one wave's copies
             and the largest per-byte term count)
    peer     kernel:       B * m.peer_byte_s + m.gather_launch_s
             copy engines: pages * k * m.ce_copy_s + B * m.ce_byte_s   (k as for direct)

`peer_engine` picks the peer strategy's engine: the copy engines where the caller allows
them (`copy_engines=True`: a dst GPU whose driver has batched copies), src and dst are on
different GPUs and the model prices them below the kernel; else the kernel. On
one GPU the copy engines lose to the kernel by far on short copies
(`benchmarks/results/batch-copy-probe-h200x2.json`), so they are not offered there.

`choose_strategy` returns the cheapest of the strategies the caller says are possible
(`packed` needs src ranks that pack, `peer` a src whose memory the dst has mapped,
`staged` and `packed` a staging area). `direct` and `peer` need nothing but the
connection and compete on their estimates (ties: `direct`); `staged` and `packed` lease
staging and run more steps, and the estimates are coarse, so they must be estimated at
least `SIMPLER_WITHIN` cheaper than the best of the other two to be picked
(`pick_strategy`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from ..errors import PlanError
from ..expand._expand import merged_reads
from ..plan._plan import Plan
from ._cost import DEFAULT_COST_MODEL, CostModel
from ._packing import pack_plan
from ._paged import PEER_ENGINES
from ._staging import stage_plan

__all__ = ["STRATEGY_ORDER", "SIMPLER_WITHIN", "estimate_s", "choose_strategy", "pick_strategy", "peer_engine"]

STRATEGY_ORDER = ("direct", "peer", "staged", "packed")
"""Simplest first: the pick among equal estimates."""

_PLAIN = ("direct", "peer")

SIMPLER_WITHIN = 0.05
"""`staged` or `packed` is picked only when its estimate is at least this fraction below
the best of `direct` and `peer` (when one of those can run)."""


def _count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PlanError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return value


_KERNEL, _COPY_ENGINES = PEER_ENGINES


def _peer_engine_s(plan: Plan, pages: int, model: CostModel) -> dict[str, float]:
    total = plan.nbytes * pages
    copies = pages * sum(len(merged_reads(plan, r)[0]) for r in plan.src_ranks)
    return {_KERNEL: total * model.peer_byte_s + model.gather_launch_s,
            _COPY_ENGINES: copies * model.ce_copy_s + total * model.ce_byte_s}


def peer_engine(plan: Plan, *, num_requests: int, num_layers: int, model: CostModel = DEFAULT_COST_MODEL,
                same_device: bool = False, copy_engines: bool = False) -> str:
    """The peer strategy's engine for a batch: `"copy-engines"` when `copy_engines` (the
    dst can hand batches of copies to the copy engines), src and dst are on different
    devices and the model prices it below the kernel; else `"kernel"`.

    Raises:
        PlanError: counts < 1.
    """
    pages = _count("num_requests", num_requests, 1) * _count("num_layers", num_layers, 1)
    if same_device or not copy_engines:
        return _KERNEL
    costs = _peer_engine_s(plan, pages, model)
    return _COPY_ENGINES if costs[_COPY_ENGINES] < costs[_KERNEL] else _KERNEL


def estimate_s(strategy: str, plan: Plan, *, num_requests: int, num_layers: int,
               model: CostModel = DEFAULT_COST_MODEL, wave_nbytes: int | None = None,
               same_device: bool = False, copy_engines: bool = False) -> float:
    """The model's seconds for `strategy` to move `num_requests` requests of
    `num_layers` layers with `plan`.

    Args:
        wave_nbytes: staging bytes one wave may use (half the staging area); None: one wave.
        same_device: src and dst share a device, so packing, READs and the scatter
            share its memory bandwidth instead of overlapping (and peer copies run on
            the kernel).
        copy_engines: the peer strategy may use the copy engines (`peer_engine`).

    Raises:
        PlanError: an unknown strategy, or counts < 1.
    """
    pages = _count("num_requests", num_requests, 1) * _count("num_layers", num_layers, 1)
    total = plan.nbytes * pages
    if strategy == "direct":
        per_page = sum(len(merged_reads(plan, r)[0]) for r in plan.src_ranks)
        return model.read_s(pages * per_page, total)
    if strategy == "peer":
        engine = peer_engine(plan, num_requests=num_requests, num_layers=num_layers, model=model,
                             same_device=same_device, copy_engines=copy_engines)
        return _peer_engine_s(plan, pages, model)[engine]
    if strategy == "staged":
        staged = stage_plan(plan, model=model)
        waves = 1 if not wave_nbytes or not staged.slot_nbytes else \
            -(-staged.slot_nbytes * pages // max(wave_nbytes, staged.slot_nbytes * num_layers))
        return (model.read_s(pages * staged.descriptors_per_page, pages * staged.read_nbytes_per_page)
                + pages * staged.gathered_nbytes_per_page * model.gather_byte_s + waves * model.gather_launch_s)
    if strategy == "packed":
        packed = pack_plan(plan)
        per_request = sum(packed.slot_nbytes) * num_layers
        waves = 1 if not wave_nbytes else -(-per_request * num_requests // max(wave_nbytes, per_request))
        requests_s = waves * len(plan.src_ranks) * (model.request_s + model.desc_s + model.gather_launch_s)
        copy_s = 2 * total * model.gather_byte_s
        if same_device:
            return requests_s + total * model.byte_s + copy_s
        return requests_s + max(total * model.byte_s, copy_s / 2) + copy_s / waves
    raise PlanError(f"Unknown strategy {strategy!r}: one of {STRATEGY_ORDER}.")


def choose_strategy(plan: Plan, *, num_requests: int, num_layers: int, available: Sequence[str],
                    model: CostModel = DEFAULT_COST_MODEL, wave_nbytes: int | None = None,
                    same_device: bool = False, copy_engines: bool = False) -> str:
    """The strategy of `available` to run (module doc): the cheaper of `direct` and `peer`,
    unless `staged` or `packed` is estimated `SIMPLER_WITHIN` cheaper still.

    Raises:
        PlanError: `available` is empty or names an unknown strategy.
    """
    names = [s for s in STRATEGY_ORDER if s in available]
    unknown = sorted(set(available) - set(STRATEGY_ORDER))
    if unknown or not names:
        raise PlanError(f"available strategies must be a non-empty subset of {STRATEGY_ORDER}, "
                        f"got {list(available)!r}.")
    costs = {s: estimate_s(s, plan, num_requests=num_requests, num_layers=num_layers, model=model,
                           wave_nbytes=wave_nbytes, same_device=same_device, copy_engines=copy_engines)
             for s in names}
    return pick_strategy(costs)


def pick_strategy(costs_s: Mapping[str, float]) -> str:
    """The pick among estimated strategies (`costs_s`: strategy -> seconds, a non-empty
    subset of `STRATEGY_ORDER`): the cheaper of `direct` and `peer` (ties: `direct`),
    unless `staged` or `packed` costs at most `1 - SIMPLER_WITHIN` of it; with neither
    `direct` nor `peer`, the cheaper of the others."""
    names = [s for s in STRATEGY_ORDER if s in costs_s]
    if not names or len(names) != len(costs_s):
        raise PlanError(f"costs must name a non-empty subset of {STRATEGY_ORDER}, got {sorted(costs_s)!r}.")
    cheapest = lambda group: min(group, key=lambda s: (costs_s[s], names.index(s)))  # noqa: E731
    plain = [s for s in names if s in _PLAIN]
    others = [s for s in names if s not in _PLAIN]
    if not plain:
        return cheapest(others)
    pick = cheapest(plain)
    if others and costs_s[cheapest(others)] <= costs_s[pick] * (1 - SIMPLER_WITHIN):
        return cheapest(others)
    return pick
