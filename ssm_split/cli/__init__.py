"""The `ssm-split` command line (`main`). Each subcommand lives in a module of its own and
imports NIXL, torch or vLLM only when it runs."""

from ._main import main as main

__all__ = ["main"]
