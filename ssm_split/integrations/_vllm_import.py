"""Importing vLLM modules on demand, quietly.

Importing vLLM (0.33 with a CPU torch) runs torch set-up that emits `DeprecationWarning`s
about torch's own APIs; they are not the caller's to fix, and a program that turns
warnings into errors would otherwise fail on them. Only those are silenced, and only
during the import.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

__all__ = ["import_vllm"]


def import_vllm(module: str) -> ModuleType:
    """`importlib.import_module(module)` with vLLM's import-time deprecation noise ignored.

    Raises:
        ImportError: vLLM (or the module) is not installed.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return importlib.import_module(module)
