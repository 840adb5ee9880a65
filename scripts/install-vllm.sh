#!/usr/bin/env bash
# Install a CPU torch and vLLM (without its dependency list) into the given Python, enough
# to import the three vLLM modules the interop tests use:
#   vllm.v1.kv_cache_interface                                   (MambaSpec)
#   vllm.model_executor.layers.mamba.mamba_utils                 (MambaStateShapeCalculator)
#   vllm.distributed.kv_transfer.kv_connector.v1.ssm_conv_transfer_utils
#                                                                (derive_mamba_conv_split, ...)
#
# Usage: scripts/install-vllm.sh PATH/TO/python   (called by `make install-test`)
#
# Why not `pip install vllm`: vLLM 0.33.0 pins a CUDA torch 2.14.0 plus several GB of GPU
# packages, and requires a certifi newer than PyPI has, so it does not even resolve. The
# modules above need no GPU and no compiled vLLM op, so vLLM goes in with --no-deps and
# only the packages those imports actually execute are added (found by installing nothing,
# importing, and adding the one package each ModuleNotFoundError named, until all three
# imports succeeded; each was re-checked by uninstalling it). Those packages are installed
# *with* their own dependencies, which their imports need. pip then warns that vLLM's other
# requirements are missing; that is expected and harmless here.
#
# Idempotent: when the three modules already import with the pinned versions it does
# nothing. Takes about 2 minutes on a clean venv (2 cores).
set -euo pipefail
PYTHON=${1:?usage: $0 PATH/TO/python}
VLLM_VERSION=0.33.0
TORCH_VERSION=2.13.0

check() {
    VLLM_SSM_CONV_STATE_LAYOUT=DS "$PYTHON" - "$VLLM_VERSION" "$TORCH_VERSION" <<'EOF'
import sys, importlib, importlib.metadata as md
vllm_version, torch_version = sys.argv[1:3]
if md.version("vllm") != vllm_version or not md.version("torch").startswith(torch_version):
    sys.exit(f"want vllm {vllm_version}, torch {torch_version}")
for name in ("vllm.v1.kv_cache_interface",
             "vllm.model_executor.layers.mamba.mamba_utils",
             "vllm.distributed.kv_transfer.kv_connector.v1.ssm_conv_transfer_utils"):
    importlib.import_module(name)
import torch
if torch.version.cuda is not None:
    print(f"warning: torch {torch.__version__} is a CUDA build; a CPU build is enough here",
          file=sys.stderr)
EOF
}

if check >/dev/null 2>&1; then
    echo "install-vllm: vLLM $VLLM_VERSION and torch $TORCH_VERSION already import; nothing to do"
    exit 0
fi

LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
pip_install() {
    if ! "$PYTHON" -m pip install -q "$@" >"$LOG" 2>&1; then
        cat "$LOG" >&2
        exit 1
    fi
}
start=$SECONDS

# torch: the CPU build of 2.13.0 is kept on disk on this project's machines (pip's
# find-links), so this takes no download. (vLLM asks for 2.14.0; the modules we import
# work with 2.13.0.)
pip_install "torch==$TORCH_VERSION"

# vLLM itself, without its dependency list; xgrammar too (without deps: its own
# requirements pull triton), because vllm.v1.structured_output imports it.
pip_install --no-deps "vllm==$VLLM_VERSION" "xgrammar==0.2.8"

# What each import needs (first importer in parentheses):
pip_install \
    packaging==26.3 `# vllm.utils.torch_version (from vllm/__init__)` \
    numpy `# vllm.env_override (from vllm/__init__)` \
    regex `# vllm.utils.platform_utils (kv_cache_interface -> torch_utils)` \
    psutil==7.2.2 `# vllm.utils.network_utils (mamba_utils -> vllm.distributed)` \
    pyzmq==27.3.0 `# vllm.utils.network_utils` \
    requests==2.34.2 `# vllm.connections; also brings urllib3 for network_utils` \
    pydantic==2.14.3 `# vllm.config (mamba_utils -> vllm.config)` \
    cbor2==6.3.0 `# vllm.utils.hashing (vllm.config.device)` \
    transformers==5.20.2 `# vllm quantization base_config (vllm.config.quantization)` \
    pillow==13.0.0 `# transformers' chat-template utils import PIL at import time` \
    aiohttp==3.14.5 `# vllm.connections (vllm.transformers_utils)` \
    oss-harmony==0.0.11 `# openai_harmony, vllm.entrypoints.mcp.tool_server (vllm.reasoning)` \
    openai==3.54.0 `# vllm.entrypoints.mcp.tool` \
    pybase64==1.5.1 `# vllm.multimodal.media (ssm_conv_transfer_utils -> kv_connector chain)` \
    cachetools==8.0.1 `# vllm.utils.cache (vllm.multimodal.cache)` \
    msgspec==0.22.0 `# vllm.pooling_params (vllm.v1.request)` \
    cloudpickle==3.1.2 `# vllm.v1.serial_utils (vllm.sampling_params)` \
    uvloop==0.23.0 `# vllm.v1.utils` \
    py-cpuinfo==9.0.0 `# cpuinfo, vllm.usage.usage_lib (vllm.v1.utils)` \
    prometheus_client==0.26.0 `# vllm.v1.metrics (vllm.outputs)` \
    apache-tvm-ffi==0.1.11 `# tvm_ffi, imported by xgrammar` \
    fastapi==0.136.3 `# vllm.entrypoints.serve (vllm.parser)` \
    partial-json-parser==0.2.1.1.post7 `# vllm.tool_parsers.utils` \
    llguidance==1.7.6 `# vllm.v1.structured_output.backend_guidance`

if ! check; then
    echo "install-vllm: the vLLM modules still do not import (see above)" >&2
    exit 1
fi
# nixl (installed by the Makefile with --no-deps) must still import beside a CPU torch:
# it then falls back to the first installed backend, nixl_cu13.
if "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("nixl") is None)'; then
    "$PYTHON" -c 'import nixl' || { echo "install-vllm: nixl no longer imports" >&2; exit 1; }
fi
echo "install-vllm: vLLM $VLLM_VERSION + torch $TORCH_VERSION (CPU) installed in $((SECONDS - start)) s"
