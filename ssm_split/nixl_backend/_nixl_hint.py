"""What to install when NIXL is missing (importable without NIXL)."""

INSTALL_HINT = (
    "ssm_split.nixl_backend needs NIXL 1.5.1. Install it without its CUDA torch dependency: "
    "`pip install --no-deps nixl==1.5.1 nixl-cu13==1.5.1` (use nixl-cu12 instead of "
    "nixl-cu13 next to a CUDA 12 torch), plus numpy; see docs/backend.md."
)
