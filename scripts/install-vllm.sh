#!/usr/bin/env bash
# Install a CPU torch and vLLM (without its dependency list) into the given Python,
# enough to import vLLM's Mamba layout modules for the interop tests.
set -euo pipefail
PYTHON=${1:-python3}
"$PYTHON" -m pip install -q torch==2.13.0
