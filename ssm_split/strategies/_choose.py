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
    peer     B * m.peer_byte_s + m.gather_launch_s

`choose_strategy` returns the cheapest of the strategies the caller says are possible
(`packed` needs src ranks that pack, `peer` a src whose memory the dst has mapped,
`staged` and `packed` a staging area). The estimates are coarse, so the pick is the
simplest strategy (the order of `STRATEGY_ORDER`) whose estimate is within
`SIMPLER_WITHIN` of the cheapest: a strategy with more machinery (a kernel, a staging
lease, pack orders) must promise a clear gain. On stacked pages, where the direct READs
are few and long, that keeps `direct` (measured 28.0 ms against peer's 28.2-30.9 ms for
Qwen3.5-27B on two H200s, `benchmarks/results/stacked-gpu.json`); on vLLM's per-layer
pages, where descriptors dominate, `peer` wins by 3-4x.
"""

from __future__ import annotations

from typing import Sequence

from ..errors import PlanError
from ..expand._expand import merged_reads
from ..plan._plan import Plan
from ._cost import DEFAULT_COST_MODEL, CostModel
from ._packing import pack_plan
from ._staging import stage_plan

__all__ = ["STRATEGY_ORDER", "SIMPLER_WITHIN", "estimate_s", "choose_strategy"]

STRATEGY_ORDER = ("direct", "peer", "staged", "packed")
"""Simplest first: the pick among estimates within `SIMPLER_WITHIN` of each other."""

SIMPLER_WITHIN = 0.05
"""A simpler strategy is kept while its estimate is at most this fraction above the
cheapest one's."""


def _count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PlanError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return value


def estimate_s(strategy: str, plan: Plan, *, num_requests: int, num_layers: int,
               model: CostModel = DEFAULT_COST_MODEL, wave_nbytes: int | None = None,
               same_device: bool = False) -> float:
    """The model's seconds for `strategy` to move `num_requests` requests of
    `num_layers` layers with `plan`.

    Args:
        wave_nbytes: staging bytes one wave may use (half the staging area); None: one wave.
        same_device: src and dst share a device, so packing, READs and the scatter
            share its memory bandwidth instead of overlapping.

    Raises:
        PlanError: an unknown strategy, or counts < 1.
    """
    pages = _count("num_requests", num_requests, 1) * _count("num_layers", num_layers, 1)
    total = plan.nbytes * pages
    if strategy == "direct":
        per_page = sum(len(merged_reads(plan, r)[0]) for r in plan.src_ranks)
        return model.read_s(pages * per_page, total)
    if strategy == "peer":
        return total * model.peer_byte_s + model.gather_launch_s
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
                    same_device: bool = False) -> str:
    """The simplest strategy of `available` whose `estimate_s` is within `SIMPLER_WITHIN`
    of the smallest.

    Raises:
        PlanError: `available` is empty or names an unknown strategy.
    """
    names = [s for s in STRATEGY_ORDER if s in available]
    unknown = sorted(set(available) - set(STRATEGY_ORDER))
    if unknown or not names:
        raise PlanError(f"available strategies must be a non-empty subset of {STRATEGY_ORDER}, "
                        f"got {list(available)!r}.")
    costs = {s: estimate_s(s, plan, num_requests=num_requests, num_layers=num_layers, model=model,
                           wave_nbytes=wave_nbytes, same_device=same_device) for s in names}
    cheapest_s = min(costs.values())
    return next(s for s in names if costs[s] <= cheapest_s * (1 + SIMPLER_WITHIN))
