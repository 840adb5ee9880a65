"""Stage 3b — transfer strategies built on plans (pure, like the plans themselves).

- staged (`stage_plan`, `StagedPlan`): superset spans READ into a staging slot, then a
  gather on the dst; packed (`pack_plan`, `PackedPlan`): the src packs what each dst
  rank needs, the dst READs a few large spans and scatters;
- the stacked layout (`stack_layers`, `stacked_plan`, `layer_view`, ...): one region per
  block holding every layer unit-major, for engines that can choose their layout;
- transfer programs (`direct_program`, `staged_program`, `packed_program`,
  `peer_program`): the frozen steps each side runs for a batch;
- the cost model (`CostModel`, `fit_cost_model`, `choose_groups`, `estimate_s`,
  `choose_strategy`) that picks staged groups and whole strategies;
- `baseline_reads` / `baseline_plan`: vLLM's descriptor pattern, as a yardstick for
  benchmarks (wrong for replicated groups and key heads, as vLLM is).
"""

from ._staging import Span as Span
from ._staging import Move as Move
from ._staging import StagedPlan as StagedPlan
from ._staging import stage_plan as stage_plan
from ._staging import apply_staged as apply_staged
from ._packing import Pack as Pack
from ._packing import Unpack as Unpack
from ._packing import PackedPlan as PackedPlan
from ._packing import pack_plan as pack_plan
from ._packing import apply_packed as apply_packed
from ._packing import PackLayout as PackLayout
from ._packing import PACK_FORMAT as PACK_FORMAT
from ._packing import pack_fingerprint as pack_fingerprint
from ._program import STRATEGIES as STRATEGIES
from ._program import CopyTable as CopyTable
from ._program import PackOrder as PackOrder
from ._program import Wave as Wave
from ._program import Program as Program
from ._program import direct_program as direct_program
from ._program import staged_program as staged_program
from ._program import packed_program as packed_program
from ._program import peer_program as peer_program
from ._program import pack_copies as pack_copies
from ._program import fetch_reads as fetch_reads
from ._program import select_layers as select_layers
from ._program import mapped_regions as mapped_regions
from ._paged import PagedCopies as PagedCopies
from ._paged import paged_copies as paged_copies
from ._paged import PEER_ENGINES as PEER_ENGINES
from ._staging import SLOT_ALIGN_NBYTES as SLOT_ALIGN_NBYTES
from ._stacked import StackedSpec as StackedSpec
from ._stacked import stack_layers as stack_layers
from ._stacked import stacked_layout as stacked_layout
from ._stacked import stacked_plan as stacked_plan
from ._stacked import stack_pages as stack_pages
from ._stacked import unstack_page as unstack_page
from ._stacked import PartView as PartView
from ._stacked import layer_view as layer_view
from ._cost import CostModel as CostModel
from ._cost import DRAM_COST_MODEL as DRAM_COST_MODEL
from ._choose import STRATEGY_ORDER as STRATEGY_ORDER
from ._choose import SIMPLER_WITHIN as SIMPLER_WITHIN
from ._choose import peer_engine as peer_engine
from ._choose import pick_strategy as pick_strategy
from ._choose import estimate_s as estimate_s
from ._choose import choose_strategy as choose_strategy
from ._cost import DEFAULT_COST_MODEL as DEFAULT_COST_MODEL
from ._cost import fit_cost_model as fit_cost_model
from ._cost import choose_groups as choose_groups
from ._baseline import baseline_reads as baseline_reads
from ._baseline import baseline_plan as baseline_plan

__all__ = [
    "Span",
    "Move",
    "StagedPlan",
    "stage_plan",
    "apply_staged",
    "Pack",
    "Unpack",
    "PackedPlan",
    "pack_plan",
    "apply_packed",
    "PackLayout",
    "PACK_FORMAT",
    "pack_fingerprint",
    "STRATEGIES",
    "CopyTable",
    "PackOrder",
    "Wave",
    "Program",
    "direct_program",
    "staged_program",
    "packed_program",
    "peer_program",
    "pack_copies",
    "fetch_reads",
    "select_layers",
    "mapped_regions",
    "PagedCopies",
    "paged_copies",
    "PEER_ENGINES",
    "SLOT_ALIGN_NBYTES",
    "StackedSpec",
    "stack_layers",
    "stacked_layout",
    "stacked_plan",
    "stack_pages",
    "unstack_page",
    "PartView",
    "layer_view",
    "CostModel",
    "DRAM_COST_MODEL",
    "STRATEGY_ORDER",
    "SIMPLER_WITHIN",
    "peer_engine",
    "pick_strategy",
    "estimate_s",
    "choose_strategy",
    "DEFAULT_COST_MODEL",
    "fit_cost_model",
    "choose_groups",
    "baseline_reads",
    "baseline_plan",
]
