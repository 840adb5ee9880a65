"""Adapters between ssm_split and inference engines.

- `ssm_split.integrations.vllm`: specs from vLLM's `MambaSpec` / `VllmConfig` (checked
  against the model's config), `RegionSet`s from a vLLM engine's state memory, and the
  descriptors a vLLM NIXL connector registers (thin wrappers over `ssm_split.expand`).
  vLLM and torch are imported only inside the functions that need them.

Importing this package imports no engine, no torch.
"""
