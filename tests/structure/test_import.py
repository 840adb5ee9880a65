"""What importing the backend costs and says: no NIXL or torch for the pure parts, an
actionable error without NIXL, and no torch import to pick NIXL's CUDA variant."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_package_and_its_handshake_need_neither_nixl_nor_torch():
    result = run("import sys, ssm_split, ssm_split.nixl_backend as b\n"
                 "b.decode_handshake, b.Handshake, b.fetch_handshake_bytes\n"
                 "import ssm_split.cli._main as c; c.build_parser()\n"
                 "print(sorted(m for m in ('nixl', 'torch') if m in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_without_nixl_the_error_says_what_to_install():
    result = run("import sys\n"
                 "for name in ('nixl', 'nixl._api', 'nixl_cu13', 'nixl_cu12'): sys.modules[name] = None\n"
                 "from ssm_split.nixl_backend import Endpoint")
    assert result.returncode != 0
    assert "ImportError: ssm_split.nixl_backend needs NIXL 1.5.1" in result.stderr
    assert "pip install --no-deps nixl==1.5.1 nixl-cu13==1.5.1" in result.stderr


@pytest.mark.nixl
def test_importing_the_backend_does_not_import_torch_for_a_cpu_build():
    pytest.importorskip("nixl")
    result = run("import sys\nfrom ssm_split.nixl_backend import Endpoint, Reader\n"
                 "print('torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"  # whether or not a CPU torch is installed


@pytest.mark.nixl
@pytest.mark.parametrize("text, cpu_only", [
    ("__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\nhip: Optional[str] = None\n", True),
    ("cuda = None\n", True),
    ("cuda: Optional[str] = '12.8'\nhip: Optional[str] = None\n", False),
    ("cuda = None\nhip = '6.2.41133'\n", False),
    ("", False),  # unreadable: let the nixl package decide
])
def test_reading_torch_build_flavour(text, cpu_only):
    pytest.importorskip("nixl")
    from ssm_split.nixl_backend._nixl import torch_build_is_cpu_only

    assert torch_build_is_cpu_only(text) is cpu_only
