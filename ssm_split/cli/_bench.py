"""`ssm-split bench`: time the library's own Reader/Endpoint on real NIXL transfers
(`ssm_split.bench`): every strategy and vLLM's descriptor pattern on the same pages,
each verified byte for byte first, next to torch's copy of the same bytes and NIXL's
one-descriptor READ (docs/performance.md, benchmarks/README.md).
"""

from __future__ import annotations

import argparse

from ..errors import SpecError
from ..layout._layout import page_layout
from ..specs._presets import resolve_model
from ._core import MODEL_HELP
from ._console import Parser, non_negative_int, positive_int
from ._json import add_json_option, emit, model_json

__all__ = ["COMMANDS"]


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 0, got {text!r}")
    return values


def _strategies(text: str) -> tuple[str, ...]:
    from ..bench._run import STRATEGIES

    names = tuple(dict.fromkeys(t.strip() for t in text.split(",")))
    bad = [n for n in names if n not in STRATEGIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown strategies {bad}: choose from {', '.join(STRATEGIES)}")
    return names


def _add_arguments(parser: Parser) -> None:
    parser.add_argument("--model", default="qwen3.5-27b", metavar="MODEL", help=f"{MODEL_HELP} (default qwen3.5-27b)")
    parser.add_argument("--layers", type=positive_int, default=None,
                        help="state layers (default: all the model's state layers)")
    parser.add_argument("--src-tp", type=positive_int, default=1, help="prefill TP size (default 1)")
    parser.add_argument("--dst-tp", type=positive_int, default=2, help="decode TP size (default 2)")
    parser.add_argument("--batch", type=_int_list, default=(64,), metavar="N[,N...]",
                        help="batch sizes in requests, comma-separated (default 64)")
    parser.add_argument("--blocks", type=positive_int, default=None,
                        help="blocks per layer on each side (default: twice the largest batch)")
    parser.add_argument("--strategies", type=_strategies, default=None, metavar="S[,S...]",
                        help="of baseline (vLLM's descriptor pattern), auto, direct, staged, packed, peer "
                             "(default: all; peer only with --device cuda)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: VRAM pages (default); cpu: DRAM pages, to try it without a GPU")
    parser.add_argument("--src-devices", type=_int_list, default=None, metavar="GPU[,GPU...]",
                        help="GPUs of the src ranks, round robin (default: GPU 0)")
    parser.add_argument("--dst-devices", type=_int_list, default=None, metavar="GPU[,GPU...]",
                        help="GPUs of the dst ranks, round robin (default: GPU 1 when there are two "
                             "or more GPUs, else GPU 0)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed runs per strategy (default 5)")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed runs first (default 2)")
    parser.add_argument("--staging-mib", type=positive_int, default=512,
                        help="each dst rank's staging area, MiB (default 512)")
    parser.add_argument("--pack-mib", type=positive_int, default=512,
                        help="each src rank's pack area, MiB (default 512)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of pages and blocks (default 0)")
    parser.add_argument("--pages", choices=("per-layer", "stacked"), default="per-layer",
                        help="per-layer: one region per layer, as vLLM keeps them (default); stacked: one "
                             "region whose pages hold every layer unit-major (vLLM's pattern is then skipped)")
    parser.add_argument("--out", default=None, metavar="PATH", help="append the records to this JSON file")
    parser.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of the times")
    add_json_option(parser, "bench")


def _devices(args: argparse.Namespace) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if args.device == "cpu":
        return (0,), (0,)
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    src = args.src_devices or (0,)
    dst = args.dst_devices or ((1,) if count >= 2 else (0,))
    return tuple(src), tuple(dst)


def options_from(args: argparse.Namespace):
    """Checked `BenchOptions` (a `SpecError`/`SetupError` names what does not fit)."""
    from ..bench._run import BenchOptions, check_devices

    info = resolve_model(args.model)
    layers = args.layers or info.num_state_layers
    if layers > info.num_state_layers:
        raise SpecError(f"--layers {layers}: {info.name} has {info.num_state_layers} state layers.")
    page_layout(info.spec, args.src_tp, 0), page_layout(info.spec, args.dst_tp, 0)  # ShardingError if unfit
    if min(args.batch) < 1:
        raise SpecError(f"--batch must be >= 1 request, got {','.join(map(str, args.batch))}.")
    blocks = args.blocks or 2 * max(args.batch)
    if blocks < max(args.batch):
        raise SpecError(f"--blocks {blocks} is fewer than the largest batch ({max(args.batch)}): each request "
                        f"needs its own block; use --blocks {max(args.batch)} or more.")
    strategies = args.strategies or (("baseline", "auto", "direct", "staged", "packed")
                                     + (("peer",) if args.device == "cuda" else ()))
    src_devices, dst_devices = _devices(args)
    check_devices(args.device, src_devices, dst_devices)
    return info, BenchOptions(model=info.name, spec=info.spec, layers=layers, src_tp=args.src_tp,
                              dst_tp=args.dst_tp, batches=tuple(args.batch), num_blocks=blocks,
                              strategies=strategies, device=args.device, src_devices=src_devices,
                              dst_devices=dst_devices, repeats=args.repeats, warmup=args.warmup,
                              staging_nbytes=args.staging_mib << 20, pack_nbytes=args.pack_mib << 20,
                              seed=args.seed, pages=args.pages)


def _run(args: argparse.Namespace) -> int:
    from ..bench._run import format_records, plot_records, run_bench, write_json

    info, options = options_from(args)
    records = run_bench(options)
    if args.out:
        write_json(args.out, records)
    if args.plot:
        plot_records(records, args.plot)
    if args.json:
        emit("bench", {"model": model_json(info), "records": records})
    else:
        print(format_records(records), flush=True)
        print("times: all dst ranks at once, first start to last end; % copy: of torch's copy of the same "
              "bytes between the same GPUs; % NIXL 1-desc: of one NIXL READ of that many bytes.")
    return 0 if all(r["verified"] or r.get("skipped") for r in records) else 1


COMMANDS = {
    "bench": ("time the Reader's strategies and vLLM's descriptor pattern on real NIXL transfers",
              _add_arguments, _run),
}
