# Two commands on a fresh machine (Python >= 3.11 and pip):
#   make demo   -> installs the package and NIXL into .venv, runs the main job
#   make test   -> installs the test extras (and a CPU vLLM for interop tests), runs pytest
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# the package (editable), numpy, pyzmq (the side channel), and NIXL without its multi-GB CUDA torch dependency
$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps nixl==1.5.1 nixl-cu13==1.5.1
	touch $@

# a CPU torch and vLLM (no deps) for the interop tests; see scripts/install-vllm.sh
$(VENV)/.vllm: scripts/install-vllm.sh | $(VENV)/.core
	bash scripts/install-vllm.sh $(BIN)/python
	touch $@

install: $(VENV)/.core
install-test: $(VENV)/.core $(VENV)/.vllm

demo: install
	$(BIN)/ssm-split demo

test: install-test
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
