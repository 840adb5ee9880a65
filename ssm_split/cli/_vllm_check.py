"""`ssm-split vllm-check MODEL --src-tp P --dst-tp D`: vLLM's reads beside ssm_split's.

The comparison itself is `ssm_split.integrations._vllm_check`; vLLM is imported only when
the command runs. Exit status:

- 0: ssm_split's reads rebuild every dst page (and, with `--strict`, vLLM's reads are
  the same bytes);
- 1: ssm_split's reads are wrong on some dst rank, or, with `--strict`, vLLM's reads
  differ from ssm_split's on some dst rank or vLLM refuses the transfer;
- 2: bad arguments or vLLM not installed (one line on stderr, from the dispatcher).

`--json` prints one `ssm-split/vllm-check` document (cli/_json.py) instead of the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from ..errors import PlanError, SpecError
from ..integrations._vllm_check import RankCheck, Row, check_rank, format_rank
from ..plan._plan import plan_reads
from ._console import non_negative_int, positive_int
from ._core import resolve_model
from ._json import emit, plan_json, read_json, spec_json

__all__ = ["COMMANDS"]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="preset name (see `ssm-split models`), Hugging Face id of a preset, "
                             "or path to a config.json")
    parser.add_argument("--src-tp", type=positive_int, required=True, help="TP size of the prefill (src) side")
    parser.add_argument("--dst-tp", type=positive_int, required=True, help="TP size of the decode (dst) side")
    parser.add_argument("--rank", type=non_negative_int, default=None, help="only this dst rank (default: all)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the reference state (default 0)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when vLLM's reads differ from ssm_split's (or vLLM refuses)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (schema ssm-split/vllm-check) instead of tables")


def _piece(piece) -> dict | None:
    return None if piece is None else read_json(piece)


def _row_json(row: Row) -> dict[str, Any]:
    return {"segment": row.segment, "dst_offset": row.dst_offset, "nbytes": row.nbytes,
            "vllm": _piece(row.vllm), "ssm_split": _piece(row.ours), "differs": row.differs,
            "vllm_right": row.vllm_right, "ssm_split_right": row.ours_right}


def _rank_json(check: RankCheck) -> dict[str, Any]:
    return {"dst_rank": check.dst_rank, "differs": any(r.differs for r in check.rows),
            "vllm_right": check.vllm_right, "ssm_split_right": check.ours_right,
            "vllm_reads": [read_json(r) for r in check.vllm_reads],
            "ssm_split_reads": [read_json(r) for r in check.our_reads],
            "rows": [_row_json(r) for r in check.rows]}


def _run(args: argparse.Namespace) -> int:
    from .. import reference

    info = resolve_model(args.model)
    spec = info.spec
    if getattr(spec, "conv_layout", "DS") != "DS":
        spec = dataclasses.replace(spec, conv_layout="DS")
    ranks = range(args.dst_tp) if args.rank is None else (args.rank,)
    plans = [plan_reads(spec, args.src_tp, args.dst_tp, rank) for rank in ranks]  # validate first
    from ..integrations._vllm_reads import vllm_reads, vllm_version

    version = vllm_version()  # ImportError without vLLM: the dispatcher says how to install it
    head = {"model": info.name, "spec": spec_json(spec), "src_tp": args.src_tp, "dst_tp": args.dst_tp,
            "conv_layout": "DS", "vllm_version": version, "seed": args.seed, "strict": args.strict}
    try:
        theirs = {rank: vllm_reads(spec, args.src_tp, args.dst_tp, rank) for rank in ranks}
    except (PlanError, SpecError) as error:
        status = 1 if args.strict else 0
        if args.json:
            emit("vllm-check", head | {"vllm_refused": str(error), "vllm_differs": True,
                                       "plans": [plan_json(p) for p in plans], "ranks": [],
                                       "vllm_wrong_ranks": [], "ssm_split_wrong_ranks": [],
                                       "exit_status": status})
            return status
        print(f"{info.name}: {spec!r}\nvLLM refuses this transfer: {error}\nssm_split's plans:")
        for plan in plans:
            print()
            print(plan.format_table())
        if args.strict:
            print("--strict: vLLM refuses this transfer.", file=sys.stderr)
        return status
    state = reference.random_state(spec, args.seed)
    overshoot = max((r.src_end for reads in theirs.values() for r in reads), default=0)
    src_pages = reference.shard(spec, state, args.src_tp,
                                page_nbytes=max(plans[0].src_content_nbytes, overshoot))
    want = reference.shard(spec, state, args.dst_tp)
    checks = [check_rank(spec, args.src_tp, args.dst_tp, rank, theirs[rank], src_pages, want[rank])
              for rank in ranks]
    bad_vllm = [c.dst_rank for c in checks if not c.vllm_right]
    bad_ours = [c.dst_rank for c in checks if not c.ours_right]
    differs = [c.dst_rank for c in checks if any(r.differs for r in c.rows)]
    status = 1 if bad_ours or (args.strict and differs) else 0
    if args.json:
        emit("vllm-check", head | {"vllm_refused": None, "vllm_differs": bool(differs),
                                   "ranks": [_rank_json(c) for c in checks],
                                   "vllm_wrong_ranks": bad_vllm, "ssm_split_wrong_ranks": bad_ours,
                                   "exit_status": status})
        return status
    print(f"{info.name}: {spec!r}\nsrc TP {args.src_tp} -> dst TP {args.dst_tp}, conv layout DS, "
          f"vLLM {version} (derive_mamba_conv_split + remote_conv_offsets); reference state seed "
          f"{args.seed}")
    for check in checks:
        print()
        print(format_rank(spec, args.src_tp, check))
    print()
    print(f"vLLM's reads give wrong pages on dst ranks {bad_vllm}." if bad_vllm
          else "vLLM's reads give the reference pages on every dst rank checked.")
    print(f"ssm_split's reads give wrong pages on dst ranks {bad_ours}." if bad_ours
          else "ssm_split's reads give the reference pages on every dst rank checked.")
    if args.strict and differs:
        print(f"--strict: vLLM's reads differ from ssm_split's on dst ranks {differs}.", file=sys.stderr)
    return status


COMMANDS = {
    "vllm-check": ("compare vLLM's NIXL reads with ssm_split's, judged by the reference model",
                   _add_arguments, _run),
}
