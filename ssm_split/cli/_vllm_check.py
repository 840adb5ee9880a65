"""`ssm-split vllm-check MODEL --src-tp P --dst-tp D`: vLLM's reads beside ssm_split's.

The comparison itself is `ssm_split.integrations._vllm_check`; vLLM is imported only when
the command runs. Exit status: 0 when ssm_split's reads rebuild every dst page (whatever
vLLM does), 1 otherwise.
"""

from __future__ import annotations

import argparse

from ..errors import PlanError, SpecError
from ..integrations._vllm_check import check_rank, format_rank
from ..plan._plan import plan_reads
from ._core import resolve_model

__all__ = ["COMMANDS"]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="preset name (see `ssm-split models`), Hugging Face id of a preset, "
                             "or path to a config.json")
    parser.add_argument("--src-tp", type=int, required=True, help="TP size of the prefill (src) side")
    parser.add_argument("--dst-tp", type=int, required=True, help="TP size of the decode (dst) side")
    parser.add_argument("--rank", type=int, default=None, help="only this dst rank (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reference state (default 0)")


def _run(args: argparse.Namespace) -> int:
    import dataclasses

    from .. import reference
    from ..integrations._vllm_reads import vllm_reads, vllm_version

    info = resolve_model(args.model)
    spec = info.spec
    if getattr(spec, "conv_layout", "DS") != "DS":
        spec = dataclasses.replace(spec, conv_layout="DS")
    ranks = range(args.dst_tp) if args.rank is None else (args.rank,)
    plans = [plan_reads(spec, args.src_tp, args.dst_tp, rank) for rank in ranks]  # validate first
    print(f"{info.name}: {spec!r}\nsrc TP {args.src_tp} -> dst TP {args.dst_tp}, conv layout DS, "
          f"vLLM {vllm_version()} (derive_mamba_conv_split + remote_conv_offsets); reference "
          f"state seed {args.seed}")
    try:
        theirs = {rank: vllm_reads(spec, args.src_tp, args.dst_tp, rank) for rank in ranks}
    except (PlanError, SpecError) as error:
        print(f"\nvLLM refuses this transfer: {error}\nssm_split's plans:")
        for plan in plans:
            print()
            print(plan.format_table())
        return 0
    state = reference.random_state(spec, args.seed)
    src_content = plans[0].src_content_nbytes
    overshoot = max((r.src_end for reads in theirs.values() for r in reads), default=0)
    src_pages = reference.shard(spec, state, args.src_tp, page_nbytes=max(src_content, overshoot))
    want = reference.shard(spec, state, args.dst_tp)
    checks = [check_rank(spec, args.src_tp, args.dst_tp, rank, theirs[rank], src_pages, want[rank])
              for rank in ranks]
    for check in checks:
        print()
        print(format_rank(spec, args.src_tp, check))
    bad_vllm = [c.dst_rank for c in checks if not c.vllm_right]
    bad_ours = [c.dst_rank for c in checks if not c.ours_right]
    print()
    print(f"vLLM's reads give wrong pages on dst ranks {bad_vllm}." if bad_vllm
          else "vLLM's reads give the reference pages on every dst rank checked.")
    print(f"ssm_split's reads give wrong pages on dst ranks {bad_ours}." if bad_ours
          else "ssm_split's reads give the reference pages on every dst rank checked.")
    return 1 if bad_ours else 0


COMMANDS = {
    "vllm-check": ("compare vLLM's NIXL reads with ssm_split's, judged by the reference model",
                   _add_arguments, _run),
}
