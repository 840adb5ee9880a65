"""Adapters between ssm_split and inference engines.

- `ssm_split.integrations.vllm`: build specs from vLLM's `MambaSpec` / `VllmConfig`, and
  turn plans into the (offset, size) lists and block descriptors a vLLM NIXL connector
  registers. vLLM is imported only inside the functions that need it.

Importing this package imports no engine, no torch.
"""
