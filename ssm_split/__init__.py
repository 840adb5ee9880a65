"""ssm_split: move a request's recurrent (Mamba / GDN / linear-attention) state between
engines of different tensor-parallel sizes.

The core is pure: frozen specs in, frozen byte-range plans out. The NIXL backend
(`ssm_split.nixl_backend`) executes plans; `ssm_split.reference` is a numpy model used
to check them.

    spec = ssm_split.model("granite-4.0-h-tiny")          # or Mamba2Spec(...), GDNSpec(...)
    ssm_split.page_layout(spec, tp=2, rank=0)              # where each segment lives
    plan = ssm_split.plan_reads(spec, src_tp=1, dst_tp=2, dst_rank=0)
    print(plan.format_table())
"""

from ._errors import BlockRangeError as BlockRangeError
from ._errors import HandshakeError as HandshakeError
from ._errors import IntegrityError as IntegrityError
from ._errors import PlanError as PlanError
from ._errors import ShardingError as ShardingError
from ._errors import SpecError as SpecError
from ._errors import SpecMismatchError as SpecMismatchError
from ._errors import StaleHandshakeError as StaleHandshakeError
from ._errors import StateError as StateError
from ._errors import SsmSplitError as SsmSplitError
from ._errors import TransferError as TransferError
from ._expand import Buffer as Buffer
from ._expand import Expansion as Expansion
from ._expand import LayerRegion as LayerRegion
from ._expand import RankDescriptors as RankDescriptors
from ._expand import RegionSet as RegionSet
from ._expand import expand_plan as expand_plan
from ._hf_config import from_hf_config as from_hf_config
from ._integrity import Corruption as Corruption
from ._layout import PageLayout as PageLayout
from ._layout import Segment as Segment
from ._layout import UnitRange as UnitRange
from ._layout import page_layout as page_layout
from ._layout import rank_units as rank_units
from ._layout import sharded_shapes as sharded_shapes
from ._layout import sub_projection_widths as sub_projection_widths
from ._plan import Plan as Plan
from ._plan import Read as Read
from ._plan import plan_all as plan_all
from ._plan import plan_reads as plan_reads
from ._prepared import DescriptorTable as DescriptorTable
from ._prepared import IndexedBatch as IndexedBatch
from ._prepared import RankIndices as RankIndices
from ._prepared import RankTables as RankTables
from ._prepared import index_batch as index_batch
from ._prepared import prepare_tables as prepare_tables
from ._presets import ModelInfo as ModelInfo
from ._presets import model as model
from ._presets import models as models
from ._presets import preset_info as preset_info
from ._render import format_layout as format_layout
from ._spec import DTYPE_NBYTES as DTYPE_NBYTES
from ._spec import GDNSpec as GDNSpec
from ._spec import LinearAttentionSpec as LinearAttentionSpec
from ._spec import Mamba1Spec as Mamba1Spec
from ._spec import Mamba2Spec as Mamba2Spec
from ._spec import Part as Part
from ._spec import ShortConvSpec as ShortConvSpec
from ._spec import Spec as Spec
from ._spec import check_transferable as check_transferable
from ._cost import CostModel as CostModel
from ._cost import baseline_reads as baseline_reads
from ._stacked import StackedSpec as StackedSpec
from ._stacked import layer_view as layer_view
from ._stacked import stack_layers as stack_layers
from ._stacked import stacked_layout as stacked_layout
from ._stacked import stacked_plan as stacked_plan
from ._staging import PackedPlan as PackedPlan
from ._staging import StagedPlan as StagedPlan
from ._staging import pack_plan as pack_plan
from ._staging import stage_plan as stage_plan

__version__ = "0.1.0"
