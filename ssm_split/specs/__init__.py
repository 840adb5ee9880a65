"""Stage 1 — what state a model has: frozen, validated specs of one layer's recurrent state
(one class per family), the presets of real models, and Hugging Face config parsing.

    spec = ssm_split.specs.model("granite-4.0-h-tiny")     # or Mamba2Spec(...), GDNSpec(...)
    info = ssm_split.specs.preset_info("qwen3.5-27b")       # spec + layer count + HF id
    spec = ssm_split.specs.from_hf_config(config_dict)
    info = ssm_split.specs.resolve_model("qwen3.5-27b")     # or a config.json path, or its dir

Specs never know about ranks or bytes; the next stage (`ssm_split.layout`) does.
"""

from ._spec import Spec as Spec
from ._spec import Mamba2Spec as Mamba2Spec
from ._spec import GDNSpec as GDNSpec
from ._spec import Mamba1Spec as Mamba1Spec
from ._spec import ShortConvSpec as ShortConvSpec
from ._spec import LinearAttentionSpec as LinearAttentionSpec
from ._spec import Part as Part
from ._spec import DTYPE_NBYTES as DTYPE_NBYTES
from ._stacked import check_transferable as check_transferable
from ._stacked import StackedSpec as StackedSpec
from ._stacked import stack_layers as stack_layers
from ._presets import ModelInfo as ModelInfo
from ._presets import model as model
from ._presets import models as models
from ._presets import preset_info as preset_info
from ._presets import model_info_from_hf_config as model_info_from_hf_config
from ._presets import resolve_model as resolve_model
from ._hf_config import from_hf_config as from_hf_config

__all__ = [
    "Spec",
    "Mamba2Spec",
    "GDNSpec",
    "Mamba1Spec",
    "ShortConvSpec",
    "LinearAttentionSpec",
    "Part",
    "DTYPE_NBYTES",
    "check_transferable",
    "StackedSpec",
    "stack_layers",
    "ModelInfo",
    "model",
    "models",
    "preset_info",
    "model_info_from_hf_config",
    "resolve_model",
    "from_hf_config",
]
