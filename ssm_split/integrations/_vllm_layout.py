"""Which conv-state layout vLLM uses, "DS" or "SD", read the way vLLM reads it.

vLLM decides once per process: `get_conv_state_layout()` (`vllm/model_executor/layers/
mamba/mamba_utils.py`, wrapped in `functools.lru_cache`) returns the environment variable
`VLLM_SSM_CONV_STATE_LAYOUT` when it is set (exactly "SD" or "DS"; anything else is an
error) and "SD" otherwise. Every shape vLLM builds goes through that cached answer.

`vllm_conv_layout()` returns what vLLM uses in this process without changing it:

- vLLM's layout module is imported and its cache holds an answer: that answer (the
  variable may have changed since; vLLM keeps using the cached value);
- otherwise: the variable, by vLLM's rule. vLLM's function is not called then, because
  calling it would fix the answer before the engine decides (vLLM's CPU platform writes
  "DS" into the variable at start-up when a NIXL connector is configured).
"""

from __future__ import annotations

import os
import sys

from ..errors import SpecError

__all__ = ["LAYOUT_VARIABLE", "vllm_conv_layout"]

LAYOUT_VARIABLE = "VLLM_SSM_CONV_STATE_LAYOUT"
_MODULE = "vllm.model_executor.layers.mamba.mamba_utils"


def vllm_conv_layout() -> str:
    """The conv state layout vLLM uses in this process: "DS" (dim-first) or "SD".

    Raises:
        SpecError: `VLLM_SSM_CONV_STATE_LAYOUT` holds something other than "SD" or "DS"
            (vLLM refuses it too; the check is case-sensitive, as vLLM's).
    """
    module = sys.modules.get(_MODULE)
    cached = getattr(module, "get_conv_state_layout", None)
    if cached is not None and hasattr(cached, "cache_info") and cached.cache_info().currsize:
        return str(cached())
    value = os.environ.get(LAYOUT_VARIABLE)
    if value is None:
        return "SD"
    if value not in ("SD", "DS"):
        raise SpecError(f"{LAYOUT_VARIABLE}={value!r} is not a layout vLLM accepts: set it to "
                        f"\"DS\" or \"SD\" (exactly), or unset it for vLLM's default \"SD\".")
    return value
