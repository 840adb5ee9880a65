"""Using ssm_split from a vLLM engine or NIXL connector.

Importing this module does not import vLLM or torch; the functions that need vLLM import
it when called. See docs/vllm.md for a worked example.

Specs:
    spec_from_vllm(mamba_spec, tp, hf_config=None)   # one rank's MambaSpec -> full spec
    spec_from_vllm_config(vllm_config)               # the model a VllmConfig serves
    to_vllm_mamba_spec(spec, tp)                     # full spec -> one rank's MambaSpec
    vllm_conv_layout()                               # "DS" or "SD", as vLLM decides it

What a connector registers, from `plan = ssm_split.plan_reads(spec, src_tp, dst_tp, rank)`:
    connector_read_offsets(plan)       # per src rank: local/remote (offset, nbytes) lists
    page_stride_nbytes(block_stride, content_nbytes, physical_blocks_per_logical)
    block_descriptors(plan, dst_block_ids, src_block_ids, ...)   # absolute (addr, nbytes)
    strided_descriptors(plan, ...)     # (addr, nbytes, device, stride, count) rows

For comparison with vLLM's own arithmetic:
    vllm_reads(spec, src_tp, dst_tp, dst_rank)   # the reads vLLM 0.33's connector makes
"""

from ._vllm_connector import BlockDescriptors as BlockDescriptors
from ._vllm_connector import ConnectorReads as ConnectorReads
from ._vllm_connector import block_descriptors as block_descriptors
from ._vllm_connector import connector_read_offsets as connector_read_offsets
from ._vllm_connector import page_stride_nbytes as page_stride_nbytes
from ._vllm_connector import strided_descriptors as strided_descriptors
from ._vllm_reads import vllm_conv_layout_set as vllm_conv_layout_set
from ._vllm_reads import vllm_reads as vllm_reads
from ._vllm_reads import vllm_version as vllm_version
from ._vllm_spec import MAMBA_TYPES as MAMBA_TYPES
from ._vllm_spec import spec_from_vllm as spec_from_vllm
from ._vllm_spec import spec_from_vllm_config as spec_from_vllm_config
from ._vllm_spec import to_vllm_mamba_spec as to_vllm_mamba_spec
from ._vllm_spec import vllm_conv_layout as vllm_conv_layout

__all__ = [
    "BlockDescriptors", "ConnectorReads", "MAMBA_TYPES", "block_descriptors",
    "connector_read_offsets", "page_stride_nbytes", "spec_from_vllm", "spec_from_vllm_config",
    "strided_descriptors", "to_vllm_mamba_spec", "vllm_conv_layout", "vllm_conv_layout_set",
    "vllm_reads", "vllm_version",
]
