"""`ssm-split models | layout | plan`: the pure-core subcommands (no NIXL, no torch).

MODEL, wherever a subcommand takes one, is a preset name (`ssm-split models` lists them),
a Hugging Face id of a preset, or a path to a `config.json` (or to a directory holding
one), read with `ssm_split.specs.resolve_model`. Each prints tables by default and one
JSON document with `--json` (schemas in docs/cli.md).

    ssm-split models
    ssm-split layout qwen3.5-27b --tp 8
    ssm-split plan falcon-h1-7b --src-tp 4 --dst-tp 6 --json
"""

from __future__ import annotations

import argparse
import dataclasses

from ..errors import ShardingError, SpecError
from ..layout._layout import page_layout, valid_tp_sizes
from ..plan._plan import plan_all, plan_reads
from ..specs._presets import ModelInfo, models, preset_info, resolve_model
from .._text import format_bytes, format_table
from ..layout._format import format_layout
from ..specs._spec import Spec
from ._console import non_negative_int, positive_int
from ._json import add_json_option, emit, layout_json, model_json, plan_json, spec_json

__all__ = ["COMMANDS", "resolve_model", "MODEL_HELP"]

MODEL_HELP = ("a preset name (see `ssm-split models`), a preset's Hugging Face id, or the "
              "path of a config.json or of the directory holding it")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--conv-layout", choices=("DS", "SD"), default=None,
                        help="conv state layout (default: the preset's, DS)")
    parser.add_argument("--spec-tokens", type=non_negative_int, default=None, metavar="K",
                        help="speculative tokens kept in the conv state (default 0)")


def _spec(info: ModelInfo, args: argparse.Namespace) -> Spec:
    changes = {k: v for k, v in (("conv_layout", args.conv_layout),
                                 ("spec_tokens", args.spec_tokens)) if v is not None}
    missing = [k for k in changes if not hasattr(info.spec, k)]
    if missing:
        raise SpecError(f"{info.name} has no conv state ({type(info.spec).__name__}), so "
                        f"--{missing[0].replace('_', '-')} does not apply; drop the option.")
    return dataclasses.replace(info.spec, **changes)


def _check_rank(rank: int | None, tp: int, rank_option: str, tp_option: str) -> None:
    if rank is not None and rank >= tp:
        raise ShardingError(f"{rank_option} {rank} is not a rank of {tp_option} {tp}: ranks are "
                            f"[0, {tp}), so pass {rank_option} {tp - 1} or less.")


def _header(info: ModelInfo, spec: Spec) -> str:
    hf = f" ({info.hf_id})" if info.hf_id and info.hf_id != info.name else ""
    return (f"{info.name}{hf}: {info.layer_kind}, {info.num_state_layers} of {info.num_layers} "
            f"layers carry state\n{spec!r}")


# -- models -----------------------------------------------------------------------------

def _add_models(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=positive_int, default=1,
                        help="show the per-rank state of this TP size (default 1)")
    add_json_option(parser, "models")


def _model_entry(info: ModelInfo, tp: int) -> dict:
    try:
        layout = page_layout(info.spec, tp, 0)
    except ShardingError:  # cannot be sharded on this TP
        layout = None
    page = None if layout is None else {
        "conv_nbytes": layout.conv_nbytes, "temporal_nbytes": layout.temporal_nbytes,
        "content_nbytes": layout.content_nbytes,
        "request_nbytes": layout.content_nbytes * info.num_state_layers}
    return {**model_json(info), "spec": spec_json(info.spec),
            "tp_sizes": list(valid_tp_sizes(info.spec)), "page": page}


def _run_models(args: argparse.Namespace) -> int:
    entries = [_model_entry(preset_info(name), args.tp) for name in models()]
    if args.json:
        emit("models", {"tp": args.tp, "models": entries})
        return 0
    rows = []
    for e in entries:
        p = e["page"]
        sizes = ("-",) * 4 if p is None else (p["conv_nbytes"], p["temporal_nbytes"],
                                               p["content_nbytes"], format_bytes(p["request_nbytes"]))
        rows.append((e["name"], e["family"], e["hf_id"], e["num_state_layers"], *sizes))
    print(format_table(("preset", "family", "hf id", "layers", "conv B", "temporal B",
                        "total B", "per request"), rows))
    note = (f" '-': the model cannot be sharded on tp={args.tp} (`ssm-split models --json` "
            f"lists each model's TP sizes)." if any(e["page"] is None for e in entries) else "")
    print(f"\nlayers: layers that carry state. Bytes are per layer and per rank at tp={args.tp}; "
          f"per request = total x layers.{note}")
    return 0


# -- layout -----------------------------------------------------------------------------

def _add_layout(parser: argparse.ArgumentParser) -> None:
    _add_model_options(parser)
    parser.add_argument("--tp", type=positive_int, required=True, help="tensor-parallel size")
    ranks = parser.add_mutually_exclusive_group()
    ranks.add_argument("--rank", type=non_negative_int, default=0,
                       help="the rank to show (default 0)")
    ranks.add_argument("--all-ranks", action="store_true", help="show every rank's page")
    add_json_option(parser, "layout")


def _run_layout(args: argparse.Namespace) -> int:
    info = resolve_model(args.model)
    spec = _spec(info, args)
    _check_rank(None if args.all_ranks else args.rank, args.tp, "--rank", "--tp")
    ranks = range(args.tp) if args.all_ranks else (args.rank,)
    layouts = [page_layout(spec, args.tp, rank) for rank in ranks]  # validate before printing
    if args.json:
        emit("layout", {"model": model_json(info), "spec": spec_json(spec), "tp": args.tp,
                        "pages": [layout_json(layout) for layout in layouts]})
        return 0
    print(_header(info, spec))
    for layout in layouts:
        print()
        print(format_layout(layout))
    return 0


# -- plan -------------------------------------------------------------------------------

def _add_plan(parser: argparse.ArgumentParser) -> None:
    _add_model_options(parser)
    parser.add_argument("--src-tp", type=positive_int, required=True,
                        help="TP size of the side read from")
    parser.add_argument("--dst-tp", type=positive_int, required=True,
                        help="TP size of the reading side")
    parser.add_argument("--rank", type=non_negative_int, default=None,
                        help="only this dst rank (default: every dst rank)")
    parser.add_argument("--summary", action="store_true",
                        help="print only the per-rank summary, not the reads (tables only)")
    add_json_option(parser, "plan")


def _run_plan(args: argparse.Namespace) -> int:
    info = resolve_model(args.model)
    spec = _spec(info, args)
    _check_rank(args.rank, args.dst_tp, "--rank", "--dst-tp")
    if args.rank is None:
        plans = plan_all(spec, args.src_tp, args.dst_tp)
    else:
        plans = (plan_reads(spec, args.src_tp, args.dst_tp, args.rank),)
    num_reads, nbytes_total = sum(len(p.reads) for p in plans), sum(p.nbytes for p in plans)
    if args.json:
        emit("plan", {"model": model_json(info), "spec": spec_json(spec), "src_tp": args.src_tp,
                      "dst_tp": args.dst_tp, "plans": [plan_json(p) for p in plans],
                      "num_reads": num_reads, "nbytes": nbytes_total})
        return 0
    print(_header(info, spec))
    if not args.summary:
        for plan in plans:
            print()
            print(plan.format_table())
    rows = [(p.dst_rank, len(p.reads), p.nbytes, p.dst_content_nbytes,
             " ".join(map(str, p.src_ranks))) for p in plans]
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
