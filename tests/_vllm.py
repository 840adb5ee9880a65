"""How the vLLM tests import vLLM: quietly (torch's own deprecation warnings during the
import only), as an error in CI (which installs vLLM, `make install-test`), and as a
module skip elsewhere.

    with importing_vllm():
        import vllm
        from vllm.v1.kv_cache_interface import MambaSpec
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Iterator

import pytest


@contextmanager
def importing_vllm() -> Iterator[None]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    except ImportError as error:  # pragma: no cover - depends on the machine
        if os.environ.get("CI"):
            raise RuntimeError("CI must import vLLM: run `make install-test`") from error
        pytest.skip(f"vLLM cannot be imported ({error})", allow_module_level=True)
