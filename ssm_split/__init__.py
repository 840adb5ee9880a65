"""ssm_split: move a request's recurrent (Mamba / GDN / linear-attention) state between
engines of different tensor-parallel sizes.

The pipeline, one subpackage per stage (docs/architecture.md):

    specs      what state a model has         Mamba2Spec, GDNSpec, ..., model("qwen3.5-27b")
    layout     where its bytes sit per rank   page_layout(spec, tp, rank), RegionSet
    plan       what to move                   plan_reads(spec, src_tp, dst_tp, dst_rank)
    strategies how to move it (staged, packed, stacked layout, cost model)
    expand     NIXL descriptors for a batch   expand_plan(plan, src_regions, dst_regions, pairs)
    nixl_backend   execution: Endpoint, Reader (imports NIXL; only executes)

The core is pure: frozen specs in, frozen plans out, no I/O. `ssm_split.reference` is an
independent numpy model used to check every plan; `ssm_split.errors` holds every error
class. This module re-exports the names most callers need:

    spec = ssm_split.model("granite-4.0-h-tiny")
    ssm_split.page_layout(spec, tp=2, rank=0)              # where each segment lives
    plan = ssm_split.plan_reads(spec, src_tp=1, dst_tp=2, dst_rank=0)
    print(plan.format_table())
"""

from . import reference as reference
from .errors import PlanError as PlanError
from .errors import SpecError as SpecError
from .errors import SsmSplitError as SsmSplitError
from .errors import TransferError as TransferError
from .expand import expand_plan as expand_plan
from .layout import Buffer as Buffer
from .layout import LayerRegion as LayerRegion
from .layout import PageLayout as PageLayout
from .layout import RegionSet as RegionSet
from .layout import Segment as Segment
from .layout import page_layout as page_layout
from .layout import rank_units as rank_units
from .plan import Plan as Plan
from .plan import Read as Read
from .plan import plan_all as plan_all
from .plan import plan_reads as plan_reads
from .specs import GDNSpec as GDNSpec
from .specs import LinearAttentionSpec as LinearAttentionSpec
from .specs import Mamba1Spec as Mamba1Spec
from .specs import Mamba2Spec as Mamba2Spec
from .specs import ShortConvSpec as ShortConvSpec
from .specs import Spec as Spec
from .specs import from_hf_config as from_hf_config
from .specs import model as model
from .specs import models as models

__version__ = "0.1.0"

__all__ = [
    "reference",
    # errors (all of them: ssm_split.errors)
    "SsmSplitError", "SpecError", "PlanError", "TransferError",
    # specs
    "Spec", "Mamba2Spec", "GDNSpec", "Mamba1Spec", "ShortConvSpec", "LinearAttentionSpec",
    "model", "models", "from_hf_config",
    # layout
    "page_layout", "rank_units", "PageLayout", "Segment", "RegionSet", "LayerRegion", "Buffer",
    # plan
    "Read", "Plan", "plan_reads", "plan_all",
    # expand
    "expand_plan",
]
