"""Using ssm_split from a vLLM engine or NIXL connector (docs/vllm.md has the recipe).

Importing this module imports neither vLLM nor torch; the functions that need them
import them when called.

Specs:
    spec_from_vllm(mamba_spec, tp, hf_config)     # one rank's MambaSpec -> full spec, checked
    spec_from_vllm(mamba_spec, vllm_config=cfg)   # the same, tp and dtypes from the engine
    spec_from_vllm_config(vllm_config)            # the model a VllmConfig serves
    to_vllm_mamba_spec(spec, tp)                  # full spec -> one rank's MambaSpec
    vllm_conv_layout()                            # "DS" or "SD", as vLLM decides it
    read_mamba_spec(mamba_spec)                   # a MambaSpec's fields, checked

Memory (either side):
    region_set_from_vllm(kv_caches, mamba_spec)   # RegionSet from the engine's state tensors
    vllm_layer_slots(kv_caches)                   # layer name -> RegionSet layer (slot)
    region_set_from_vllm_handshake(base_addrs, block_stride_nbytes=, num_blocks=,
                                   physical_blocks_per_logical=)   # from handshake numbers
    page_stride_nbytes(block_stride, physical_blocks_per_logical)
    allocate_vllm_state(page_nbytes=, content_nbytes=, num_slots=, num_blocks=)

What a connector registers, from `plan = ssm_split.plan_reads(spec, src_tp, dst_tp, rank)`:
    connector_read_offsets(plan)                  # per src rank: (offset, nbytes) in a page
    pair_blocks(src_block_ids, dst_block_ids)     # -> (N, 2) block_pairs
    block_descriptors(plan, block_pairs, ...)     # expand_plan over vLLM's regions
    strided_descriptors(plan, ...)                # prepare_tables over vLLM's regions

For comparison with vLLM's own arithmetic:
    vllm_reads(spec, src_tp, dst_tp, dst_rank)    # the reads vLLM 0.33's connector makes
"""

from ._vllm_connector import ConnectorReads as ConnectorReads
from ._vllm_connector import block_descriptors as block_descriptors
from ._vllm_connector import connector_read_offsets as connector_read_offsets
from ._vllm_connector import pair_blocks as pair_blocks
from ._vllm_connector import strided_descriptors as strided_descriptors
from ._vllm_layout import vllm_conv_layout as vllm_conv_layout
from ._vllm_mamba_spec import MAMBA_TYPES as MAMBA_TYPES
from ._vllm_mamba_spec import MambaState as MambaState
from ._vllm_mamba_spec import read_mamba_spec as read_mamba_spec
from ._vllm_reads import vllm_conv_layout_set as vllm_conv_layout_set
from ._vllm_reads import vllm_reads as vllm_reads
from ._vllm_reads import vllm_version as vllm_version
from ._vllm_regions import allocate_vllm_state as allocate_vllm_state
from ._vllm_regions import page_stride_nbytes as page_stride_nbytes
from ._vllm_regions import region_set_from_vllm as region_set_from_vllm
from ._vllm_regions import region_set_from_vllm_handshake as region_set_from_vllm_handshake
from ._vllm_regions import vllm_layer_slots as vllm_layer_slots
from ._vllm_spec import spec_from_vllm as spec_from_vllm
from ._vllm_spec import spec_from_vllm_config as spec_from_vllm_config
from ._vllm_spec import to_vllm_mamba_spec as to_vllm_mamba_spec

__all__ = [
    "ConnectorReads", "MAMBA_TYPES", "MambaState", "allocate_vllm_state", "block_descriptors",
    "connector_read_offsets", "page_stride_nbytes", "pair_blocks", "read_mamba_spec",
    "region_set_from_vllm", "region_set_from_vllm_handshake", "spec_from_vllm",
    "spec_from_vllm_config", "strided_descriptors", "to_vllm_mamba_spec", "vllm_conv_layout",
    "vllm_conv_layout_set", "vllm_layer_slots", "vllm_reads", "vllm_version",
]
