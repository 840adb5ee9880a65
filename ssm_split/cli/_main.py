"""`ssm-split` command line: a thin dispatcher over subcommand modules.

Each subcommand lives in a module of its own that imports heavy dependencies (nixl,
torch, vLLM) only inside `run`, so `ssm-split layout` never loads them. A subcommand
module defines `COMMANDS: dict[str, tuple[help, add_arguments, run]]` where

- `help` is one line for `ssm-split --help`;
- `add_arguments(parser)` declares its options;
- `run(args) -> int` does the work and returns the exit status.

What the dispatcher guarantees for every subcommand (docs/cli.md):

- a bad argument, a model or TP size that does not fit, or a missing dependency (NIXL,
  vLLM, a GPU) is answered with one line on stderr, `ssm-split <command>: error: ...`,
  and exit status 2, never a traceback (`-v` adds the traceback above the line);
- `-v` / `-vv` (before or after the command) turn up the library's, NIXL's and UCX's
  logging, which is quiet by default (`_console.verbosity`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import Sequence

from ..errors import SsmSplitError
from ._console import Parser, one_line, verbosity

# name -> module that implements it (relative to this package)
SUBCOMMANDS: tuple[tuple[str, str], ...] = (
    ("models", "ssm_split.cli._core"),
    ("layout", "ssm_split.cli._core"),
    ("plan", "ssm_split.cli._core"),
    ("demo", "ssm_split.cli._demo"),
    ("bench", "ssm_split.cli._bench"),
    ("vllm-check", "ssm_split.cli._vllm_check"),
)

_VERBOSE_HELP = "log more: -v INFO lines of ssm_split and NIXL, -vv DEBUG (default: warnings only)"


def _module(path: str):
    return importlib.import_module(path)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ssm-split",
        description="Plan and move Mamba/GDN state between engines of different TP sizes.",
        epilog="Every command takes --help; the reference and the --json schemas are in "
               "docs/cli.md.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help=_VERBOSE_HELP)
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
        # SUPPRESS: a subparser's default would overwrite `ssm-split -v demo`'s count
        p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                       help=_VERBOSE_HELP)
        add_arguments(p)
        p.set_defaults(_run=run, _parser=p)
    return parser


def _fail(command: str, error: BaseException, verbose: int) -> int:
    if verbose:
        traceback.print_exception(error, file=sys.stderr)
    print(f"ssm-split {command}: error: {one_line(error)}", file=sys.stderr)
    return 2


def _missing(error: ImportError) -> str:
    from ..nixl_backend._nixl_hint import INSTALL_HINT

    name = (error.name or "").split(".")[0]
    if name.startswith("nixl"):
        return f"{error} ({INSTALL_HINT})"
    hints = {"vllm": "install vLLM (a CPU build: `bash scripts/install-vllm.sh .venv/bin/python`)",
             "torch": "install torch (`pip install torch`; with CUDA for --device cuda)"}
    return f"{error}: {hints.get(name, f'install the {name!r} package')}."


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ssm-split` script; returns the exit status."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # name the subcommand whose options these are not
            getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exit:  # --help (0) or a bad argument (2, one line already printed)
        return exit.code if isinstance(exit.code, int) else 2
    with verbosity(args.verbose):
        try:
            return int(args._run(args) or 0)
        except SsmSplitError as error:
            return _fail(args.command, error, args.verbose)
        except ImportError as error:  # a dependency the command needs (NIXL, vLLM, torch)
            if (error.name or "").startswith("ssm_split"):
                raise  # a bug of ours, not a missing dependency
            return _fail(args.command, _missing(error), args.verbose)
        except KeyboardInterrupt:
            print(f"ssm-split {args.command}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `ssm-split plan ... | head`: the reader left, fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0


if __name__ == "__main__":
    sys.exit(main())
