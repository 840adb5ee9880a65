"""`ssm-split` command line: a thin dispatcher over subcommand modules.

Each subcommand lives in a module of its own that imports heavy dependencies (nixl,
torch, vLLM) only inside `run`, so `ssm-split layout` never loads them. A subcommand
module defines `COMMANDS: dict[str, tuple[help, add_arguments, run]]` where

- `help` is one line for `ssm-split --help`;
- `add_arguments(parser)` declares its options;
- `run(args) -> int` does the work and returns the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from ..errors import SsmSplitError

# name -> module that implements it (relative to this package)
SUBCOMMANDS: tuple[tuple[str, str], ...] = (
    ("models", "ssm_split.cli._core"),
    ("layout", "ssm_split.cli._core"),
    ("plan", "ssm_split.cli._core"),
    ("demo", "ssm_split.cli._demo"),
    ("bench", "ssm_split.bench._run"),
    ("vllm-check", "ssm_split.cli._vllm_check"),
)


def _module(path: str):
    return importlib.import_module(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssm-split",
        description="Plan and move Mamba/GDN state between engines of different TP sizes.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, path in SUBCOMMANDS:
        try:
            module = _module(path)
        except ModuleNotFoundError as error:  # not written yet: not offered
            if error.name and error.name.startswith("ssm_split"):
                continue
            raise
        help_text, add_arguments, run = module.COMMANDS[name]
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ssm-split` script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except SsmSplitError as error:
        print(f"ssm-split {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
