"""`ssm-split models | layout | plan`: the pure-core subcommands (no NIXL, no torch).

MODEL, wherever a subcommand takes one, is a preset name (`ssm-split models` lists them),
a Hugging Face id of a preset, or a path to a `config.json` (or to a directory holding
one), read with `ssm_split.from_hf_config`.

    ssm-split models
    ssm-split layout qwen3.5-27b --tp 8
    ssm-split plan falcon-h1-7b --src-tp 4 --dst-tp 6
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..errors import SpecError
from ..layout._layout import page_layout
from ..plan._plan import plan_all, plan_reads
from ..specs._presets import ModelInfo, model_info_from_hf_config, models, preset_info
from .._text import format_bytes, format_table
from ..layout._format import format_layout
from ..specs._spec import Spec

__all__ = ["COMMANDS", "resolve_model"]

_MODEL_HELP = ("preset name (see `ssm-split models`), Hugging Face id of a preset, or path to "
               "a config.json (or a directory holding one)")


def resolve_model(text: str) -> ModelInfo:
    """A preset by name or id, or the model described by a config.json path.

    Raises:
        SpecError: unknown name, unreadable file, or unsupported config.
    """
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file() or text.endswith(".json"):
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise SpecError(f"Cannot read the model config {str(path)!r}: {error}. Pass a "
                            f"readable config.json, or a preset name from `ssm-split models`.")
        return model_info_from_hf_config(config, name=str(path))
    return preset_info(text)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    parser.add_argument("--conv-layout", choices=("DS", "SD"), default=None,
                        help="conv state layout (default: the preset's, DS)")
    parser.add_argument("--spec-tokens", type=int, default=None, metavar="K",
                        help="speculative tokens kept in the conv state (default 0)")


def _spec(info: ModelInfo, args: argparse.Namespace) -> Spec:
    changes = {k: v for k, v in (("conv_layout", args.conv_layout),
                                 ("spec_tokens", args.spec_tokens)) if v is not None}
    missing = [k for k in changes if not hasattr(info.spec, k)]
    if missing:
        raise SpecError(f"{info.name} has no conv state ({type(info.spec).__name__}), so "
                        f"--{missing[0].replace('_', '-')} does not apply; drop the option.")
    return dataclasses.replace(info.spec, **changes)


def _header(info: ModelInfo, spec: Spec) -> str:
    hf = f" ({info.hf_id})" if info.hf_id and info.hf_id != info.name else ""
    return (f"{info.name}{hf}: {info.layer_kind}, {info.num_state_layers} of {info.num_layers} "
            f"layers carry state\n{spec!r}")


# -- models -----------------------------------------------------------------------------

def _add_models(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=1,
                        help="show the per-rank state of this TP size (default 1)")


def _run_models(args: argparse.Namespace) -> int:
    rows = []
    for name in models():
        info = preset_info(name)
        try:
            layout = page_layout(info.spec, args.tp, 0)
        except SpecError:  # cannot be sharded on this TP
            rows.append((name, info.family, info.hf_id, info.num_state_layers, "-", "-", "-", "-"))
            continue
        total = layout.content_nbytes
        rows.append((name, info.family, info.hf_id, info.num_state_layers, layout.conv_nbytes,
                     layout.temporal_nbytes, total, format_bytes(total * info.num_state_layers)))
    print(format_table(("preset", "family", "hf id", "layers", "conv B", "temporal B",
                        "total B", "per request"), rows))
    note = (f" '-': the model cannot be sharded on tp={args.tp}."
            if any(row[4] == "-" for row in rows) else "")
    print(f"\nlayers: layers that carry state. Bytes are per layer and per rank at tp={args.tp}; "
          f"per request = total x layers.{note}")
    return 0


# -- layout -----------------------------------------------------------------------------

def _add_layout(parser: argparse.ArgumentParser) -> None:
    _add_model_options(parser)
    parser.add_argument("--tp", type=int, required=True, help="tensor-parallel size")
    ranks = parser.add_mutually_exclusive_group()
    ranks.add_argument("--rank", type=int, default=0, help="the rank to show (default 0)")
    ranks.add_argument("--all-ranks", action="store_true", help="show every rank's page")


def _run_layout(args: argparse.Namespace) -> int:
    info = resolve_model(args.model)
    spec = _spec(info, args)
    ranks = range(args.tp) if args.all_ranks else (args.rank,)
    layouts = [page_layout(spec, args.tp, rank) for rank in ranks]  # validate before printing
    print(_header(info, spec))
    for layout in layouts:
        print()
        print(format_layout(layout))
    return 0


# -- plan -------------------------------------------------------------------------------

def _add_plan(parser: argparse.ArgumentParser) -> None:
    _add_model_options(parser)
    parser.add_argument("--src-tp", type=int, required=True, help="TP size of the side read from")
    parser.add_argument("--dst-tp", type=int, required=True, help="TP size of the reading side")
    parser.add_argument("--rank", type=int, default=None,
                        help="only this dst rank (default: every dst rank)")
    parser.add_argument("--summary", action="store_true",
                        help="print only the per-rank summary, not the reads")


def _run_plan(args: argparse.Namespace) -> int:
    info = resolve_model(args.model)
    spec = _spec(info, args)
    if args.rank is None:
        plans = plan_all(spec, args.src_tp, args.dst_tp)
    else:
        plans = (plan_reads(spec, args.src_tp, args.dst_tp, args.rank),)
    print(_header(info, spec))
    if not args.summary:
        for plan in plans:
            print()
            print(plan.format_table())
    rows = [(p.dst_rank, len(p.reads), p.nbytes, p.dst_content_nbytes,
             " ".join(map(str, p.src_ranks))) for p in plans]
    num_reads, nbytes_total = sum(len(p.reads) for p in plans), sum(p.nbytes for p in plans)
    print(f"\nsummary, src tp={args.src_tp} -> dst tp={args.dst_tp}, per layer:")
    print(format_table(("dst rank", "reads", "bytes", "dst content B", "src ranks"), rows))
    print(f"{num_reads} reads, {nbytes_total} B per layer; x {info.num_state_layers} layers = "
          f"{num_reads * info.num_state_layers} reads, "
          f"{format_bytes(nbytes_total * info.num_state_layers)} per request")
    return 0


COMMANDS = {
    "models": ("list the model presets and their state size per layer", _add_models, _run_models),
    "layout": ("show one rank's page: segments, offsets, sizes", _add_layout, _run_layout),
    "plan": ("show the reads each dst rank makes from the src ranks", _add_plan, _run_plan),
}
