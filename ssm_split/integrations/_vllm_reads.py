"""The reads vLLM's own NIXL arithmetic makes, computed by calling the installed vLLM.

For comparison only (tests, `ssm-split vllm-check`): vLLM's connector rebuilds each
engine's sub-projection widths with `derive_mamba_conv_split(mamba_spec, tp)`, then the
decode (dst) rank reads, from each prefill (src) rank it maps to:

- `tp_ratio = dst_tp // src_tp >= 1`: one src rank, `dst_rank // tp_ratio`; conv pieces
  at `MambaConvSplitInfo.remote_conv_offsets(dst_rank % tp_ratio, tp_ratio)` into its
  own `local_conv_offsets`, and its temporal slice at
  `src_conv_nbytes + (dst_rank % tp_ratio) * dst_temporal_nbytes`;
- `tp_ratio = -(src_tp // dst_tp)`: each of the `n = src_tp // dst_tp` src ranks
  `dst_rank * n + p` fills the p-th `1/n` (integer division) of each local descriptor,
  from `remote_conv_offsets(0, tp_ratio)` and the whole src temporal state.

These are returned as `Read`s so they can be compared with a `Plan` byte for byte.
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from typing import Iterator

from ..errors import PlanError
from ..plan._plan import Read
from ..specs._spec import GDNSpec, Mamba1Spec, Mamba2Spec, Spec, check_is_spec
from ._vllm_import import import_vllm
from ._vllm_spec import to_vllm_mamba_spec

__all__ = ["vllm_reads", "vllm_version", "vllm_conv_layout_set"]

_LAYOUT_VAR = "VLLM_SSM_CONV_STATE_LAYOUT"


def vllm_version() -> str:
    """The installed vLLM's version (imports vLLM)."""
    return str(import_vllm("vllm").__version__)


@contextmanager
def vllm_conv_layout_set(layout: str) -> Iterator[None]:
    """Run vLLM with `VLLM_SSM_CONV_STATE_LAYOUT=layout` inside the block, then restore
    the variable and clear vLLM's cached layout."""
    mamba_utils = import_vllm("vllm.model_executor.layers.mamba.mamba_utils")
    old = os.environ.get(_LAYOUT_VAR)
    os.environ[_LAYOUT_VAR] = layout
    mamba_utils.get_conv_state_layout.cache_clear()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_LAYOUT_VAR, None)
        else:
            os.environ[_LAYOUT_VAR] = old
        mamba_utils.get_conv_state_layout.cache_clear()


def _split_info(spec: Spec, tp: int):
    derive_mamba_conv_split = import_vllm(
        "vllm.distributed.kv_transfer.kv_connector.v1.ssm_conv_transfer_utils").derive_mamba_conv_split

    try:
        return derive_mamba_conv_split(to_vllm_mamba_spec(spec, tp), tp)
    except (AssertionError, NotImplementedError, ValueError) as error:
        raise PlanError(f"vLLM's derive_mamba_conv_split rejects {spec!r} at tp={tp}: "
                        f"{error or type(error).__name__}") from error


def _remote_conv_offsets(info, local_offset: int, tp_ratio: int, src_conv_nbytes: int):
    """`info.remote_conv_offsets`, with the remote conv size where the signature has it
    (unreleased vLLM adds a third parameter)."""
    params = list(inspect.signature(info.remote_conv_offsets).parameters)
    if len(params) >= 3:
        return info.remote_conv_offsets(local_offset, tp_ratio, src_conv_nbytes)
    return info.remote_conv_offsets(local_offset, tp_ratio)


def vllm_reads(spec: Spec, src_tp: int, dst_tp: int, dst_rank: int) -> tuple[Read, ...]:
    """The reads vLLM's NIXL connector makes for dst rank `dst_rank`, from vLLM's own
    functions (imports vLLM), sorted by src rank then dst offset.

    Reads may fall outside the src page's state: vLLM does not check.

    Raises:
        PlanError: cases vLLM refuses: a TP pair where neither size divides the other,
            the SD conv layout, a family other than Mamba1/Mamba2/GDN, or shapes its
            `derive_mamba_conv_split` rejects.
        SpecError: layouts vLLM never builds (see `to_vllm_mamba_spec`).
        ImportError: vLLM is not installed.
    """
    check_is_spec(spec)
    if not isinstance(spec, (Mamba1Spec, Mamba2Spec, GDNSpec)):
        raise PlanError(f"vLLM's NIXL connector moves Mamba1, Mamba2 and GDN state only, "
                        f"not {type(spec).__name__}.")
    if spec.conv_layout != "DS":
        raise PlanError("vLLM's NIXL connector requires the DS conv layout "
                        "(VLLM_SSM_CONV_STATE_LAYOUT=DS).")
    if dst_tp % src_tp and src_tp % dst_tp:
        raise PlanError(f"vLLM's NIXL connector rejects src_tp={src_tp} -> dst_tp={dst_tp}: "
                        f"one TP size must divide the other.")
    if not 0 <= dst_rank < dst_tp:
        raise PlanError(f"`dst_rank` must be in [0, {dst_tp}), got {dst_rank}.")
    with vllm_conv_layout_set("DS"):
        dst, src = _split_info(spec, dst_tp), _split_info(spec, src_tp)
    dst_conv, dst_temporal = dst.ssm_sizes
    src_conv, src_temporal = src.ssm_sizes
    local = [*dst.local_conv_offsets, (dst_conv, dst_temporal)]
    reads = []
    if dst_tp >= src_tp:
        ratio = dst_tp // src_tp
        offset = dst_rank % ratio
        remote = [*_remote_conv_offsets(dst, offset, ratio, src_conv),
                  (src_conv + offset * dst_temporal, dst_temporal)]
        pieces = [(dst_rank // ratio, loc, rem) for loc, rem in zip(local, remote)]
    else:
        n = src_tp // dst_tp
        remote = [*_remote_conv_offsets(dst, 0, -n, src_conv), (src_conv, src_temporal)]
        pieces = []
        for p in range(n):
            for (off, size), rem in zip(local, remote):
                pieces.append((dst_rank * n + p, (off + p * (size // n), size // n), rem))
    for src_rank, (dst_offset, dst_nbytes), (src_offset, src_nbytes) in pieces:
        if dst_nbytes != src_nbytes:
            raise PlanError(f"vLLM pairs a local descriptor of {dst_nbytes} bytes with a "
                            f"remote one of {src_nbytes} bytes; NIXL would reject the transfer.")
        if dst_nbytes:
            reads.append(Read(int(src_rank), int(src_offset), int(dst_offset), int(dst_nbytes)))
    return tuple(sorted(reads, key=lambda r: (r.src_rank, r.dst_offset)))

