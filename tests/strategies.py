"""Hypothesis strategies for specs, TP sizes and transfers, shared by every test suite.

All strategies are composite with keyword-only options and valid by construction: model
dimensions are built as "units per rank x lcm(tp sizes)", and replicated units (Mamba2
B/C groups, GDN key heads) are drawn only from counts that every TP size of the case can
either shard or replicate. No strategy uses `assume`, so shrinking never stalls. Draws
shrink toward TP 1, the first family (Mamba2), one group, tiny dimensions, bfloat16, the
DS layout and no speculative tokens.

With the default `max_dim` and `max_tp`, a full state has well under 65535 elements, so
`ssm_split.reference.iota_state` gives every element a distinct id.

Main entry points:

- `specs(tps=(2, 3))`: a spec that can be sharded on each TP size in `tps`;
- `layout_cases()`: `(spec, tp)`;
- `transfer_cases()`: `(spec, src_tp, dst_tp)`, including non-divisible pairs (4 -> 6)
  and replication on either side;
- `rank_cases()`: `(spec, src_tp, dst_tp, dst_rank)`;
- `replicated_transfer_cases()`: `(spec, src_tp, dst_tp)` with different TP sizes and
  B/C groups or GDN key heads replicated on at least one side;
- `unshardable_cases()`: `(spec, tp)` that sharding must reject;
- `paddings()`: extra bytes after a page's content;
- `strided_layouts()`: per-layer bases, page sizes, strides and block counts of one
  memory (what `RegionSet.strided` takes), non-overlapping by construction.
"""

from __future__ import annotations

import math
from typing import Sequence

from hypothesis import strategies as st

from ssm_split import GDNSpec, LinearAttentionSpec, Mamba1Spec, Mamba2Spec, ShortConvSpec

__all__ = [
    "FAMILIES",
    "CONV_FAMILIES",
    "DTYPES",
    "LAYOUTS",
    "tp_sizes",
    "tp_pairs",
    "dtypes",
    "conv_layouts",
    "replicable_counts",
    "specs",
    "layout_cases",
    "transfer_cases",
    "rank_cases",
    "replicated_transfer_cases",
    "unshardable_cases",
    "paddings",
    "seeds",
    "strided_layouts",
]

FAMILIES: tuple[str, ...] = ("mamba2", "gdn", "mamba1", "short_conv", "linear_attention")
"""Every spec family, simplest-to-shrink-to first."""

CONV_FAMILIES: tuple[str, ...] = ("mamba2", "gdn", "mamba1", "short_conv")
"""The families with a conv state (and so a conv layout and spec tokens)."""

DTYPES: tuple[str, ...] = ("bfloat16", "float32", "float16")
LAYOUTS: tuple[str, ...] = ("DS", "SD")


def tp_sizes(*, max_tp: int = 8) -> st.SearchStrategy[int]:
    """A TP size in `[1, max_tp]`, shrinking toward 1."""
    return st.integers(1, max_tp)


@st.composite
def tp_pairs(draw, *, max_tp: int = 8, divisible: bool = False) -> tuple[int, int]:
    """`(src_tp, dst_tp)`, each in `[1, max_tp]`.

    With `divisible=True` one of the two divides the other (the only pairs vLLM
    supports); otherwise any pair, such as 4 -> 6 or 3 -> 2.
    """
    src_tp = draw(tp_sizes(max_tp=max_tp))
    if not divisible:
        return src_tp, draw(tp_sizes(max_tp=max_tp))
    options = [d for d in range(1, max_tp + 1) if d % src_tp == 0 or src_tp % d == 0]
    return src_tp, draw(st.sampled_from(options))


def dtypes() -> st.SearchStrategy[str]:
    """A dtype name, shrinking toward "bfloat16"."""
    return st.sampled_from(DTYPES)


def conv_layouts(layouts: Sequence[str] = LAYOUTS) -> st.SearchStrategy[str]:
    """A conv layout name, shrinking toward "DS"."""
    return st.sampled_from(tuple(layouts))


def replicable_counts(tps: Sequence[int], *, limit: int) -> list[int]:
    """Unit counts in `[1, limit]` that every TP size in `tps` can shard or replicate.

    A count `g` fits `tp` when `g % tp == 0` (sharded) or `tp % g == 0` (each rank holds
    one replicated unit). Example: `replicable_counts((4, 6), limit=24) == [1, 2, 12, 24]`.
    """
    return [g for g in range(1, limit + 1) if all(g % tp == 0 or tp % g == 0 for tp in tps)]


@st.composite
def _conv_fields(draw, *, layouts: Sequence[str], max_spec_tokens: int) -> dict:
    # kernel 1 keeps no row unless speculative tokens add some
    kernels = st.integers(2, 4) | st.just(1) if max_spec_tokens > 0 else st.integers(2, 4)
    conv_kernel = draw(kernels)
    spec_tokens = draw(st.integers(0 if conv_kernel > 1 else 1, max_spec_tokens))
    return {
        "conv_kernel": conv_kernel,
        "spec_tokens": spec_tokens,
        "conv_dtype": draw(dtypes()),
        "conv_layout": draw(conv_layouts(layouts)),
    }


@st.composite
def specs(draw, *, tps: Sequence[int] = (1,), families: Sequence[str] = FAMILIES,
          layouts: Sequence[str] = LAYOUTS, replication: bool = True,
          max_multiple: int = 2, max_dim: int = 4, max_spec_tokens: int = 2,
          max_groups: int | None = None):
    """A spec that can be sharded on every TP size in `tps`.

    Args:
        tps: the TP sizes the spec must fit (e.g. `(src_tp, dst_tp)`).
        families: family names to draw from (see `FAMILIES`).
        layouts: conv layouts to draw from.
        replication: allow B/C groups or GDN key heads fewer than some TP size (replicated
            units); False keeps every part fully sharded on every TP size.
        max_multiple: sharded unit counts are `lcm(tps) * k` with `k` in `[1, max_multiple]`.
        max_dim: head dims, state sizes and per-head widths are in `[1, max_dim]`.
        max_spec_tokens: speculative tokens in `[0, max_spec_tokens]`.
        max_groups: at most this many B/C groups or GDN key heads (with `replication`);
            below a TP size of `tps`, that side replicates them.
    """
    lcm = math.lcm(*tps)
    # Mamba2 and GDN (grouped units, replication) are drawn twice as often as the others
    family = draw(st.sampled_from(tuple(f for f in families for _ in range(1 + (f in ("mamba2", "gdn"))))))
    multiple = st.integers(1, max_multiple)
    dim = st.integers(1, max_dim)
    if replication:
        limit = lcm * max_multiple if max_groups is None else max_groups
        grouped = st.sampled_from(replicable_counts(tps, limit=limit))
    else:
        grouped = multiple.map(lambda k: lcm * k)
    if family == "linear_attention":
        return LinearAttentionSpec(num_heads=lcm * draw(multiple), head_dim=draw(dim),
                                   ssm_dtype=draw(dtypes()))
    conv = draw(_conv_fields(layouts=layouts, max_spec_tokens=max_spec_tokens))
    if family == "short_conv":
        return ShortConvSpec(conv_dim=lcm * draw(multiple), **conv)
    ssm_dtype = draw(dtypes())
    if family == "mamba1":
        return Mamba1Spec(intermediate_size=lcm * draw(multiple), state_size=draw(dim),
                          ssm_dtype=ssm_dtype, **conv)
    units = draw(grouped)
    heads = math.lcm(units, lcm) * draw(multiple)
    if family == "gdn":
        return GDNSpec(num_k_heads=units, num_v_heads=heads, head_k_dim=draw(dim),
                       head_v_dim=draw(dim), ssm_dtype=ssm_dtype, **conv)
    return Mamba2Spec(num_heads=heads, head_dim=draw(dim), num_groups=units, state_size=draw(dim),
                      ssm_dtype=ssm_dtype, **conv)


@st.composite
def layout_cases(draw, *, max_tp: int = 8, **spec_options) -> tuple:
    """`(spec, tp)` with `spec` shardable on `tp`; options as for `specs`."""
    tp = draw(tp_sizes(max_tp=max_tp))
    return draw(specs(tps=(tp,), **spec_options)), tp


@st.composite
def transfer_cases(draw, *, max_tp: int = 8, divisible: bool = False, **spec_options) -> tuple:
    """`(spec, src_tp, dst_tp)` with `spec` shardable on both TP sizes.

    Covers dst_tp > src_tp, dst_tp < src_tp, equal TP, pairs that do not divide each
    other (unless `divisible`), and replicated groups / key heads on either side (unless
    `replication=False`). Other options as for `specs`.
    """
    src_tp, dst_tp = draw(tp_pairs(max_tp=max_tp, divisible=divisible))
    return draw(specs(tps=(src_tp, dst_tp), **spec_options)), src_tp, dst_tp


@st.composite
def rank_cases(draw, **options) -> tuple:
    """`(spec, src_tp, dst_tp, dst_rank)`; options as for `transfer_cases`."""
    spec, src_tp, dst_tp = draw(transfer_cases(**options))
    return spec, src_tp, dst_tp, draw(st.integers(0, dst_tp - 1))


@st.composite
def replicated_transfer_cases(draw, *, max_tp: int = 8, divisible: bool = False,
                              families: Sequence[str] = ("mamba2", "gdn"), **spec_options) -> tuple:
    """`(spec, src_tp, dst_tp)` with `src_tp != dst_tp` where the side with the larger TP
    replicates its B/C groups (Mamba2) or key heads (GDN): n_groups=1 models such as
    Falcon-H1 and Granite-4.0-H at 1 -> 2, or 2 groups at 4 -> 2. Options as for `specs`.
    """
    src_tp = draw(st.integers(1, max_tp))
    options = [d for d in range(1, max_tp + 1)
               if d != src_tp and (not divisible or d % src_tp == 0 or src_tp % d == 0)]
    dst_tp = draw(st.sampled_from(options))
    spec = draw(specs(tps=(src_tp, dst_tp), families=families, replication=True,
                      max_groups=max(src_tp, dst_tp) - 1, **spec_options))
    return spec, src_tp, dst_tp


@st.composite
def unshardable_cases(draw, *, max_tp: int = 8, families: Sequence[str] = FAMILIES) -> tuple:
    """`(spec, tp)` such that `spec` cannot be sharded on `tp` (`tp` >= 2).

    Either a part sharded by whole units has a count that `tp` does not divide (e.g. 24
    heads on 16 ranks), or the grouped units of a Mamba2/GDN spec can be neither sharded
    nor replicated on `tp` (e.g. 2 groups on 3 ranks).
    """
    tp = draw(st.integers(2, max_tp))
    family = draw(st.sampled_from(tuple(families)))
    odd = tp * draw(st.integers(0, 2)) + draw(st.integers(1, tp - 1))  # odd % tp != 0
    bad_groups = [g for g in range(2, 4 * tp) if g % tp and tp % g]
    by_groups = family in ("mamba2", "gdn") and draw(st.booleans())
    units = draw(st.sampled_from(bad_groups)) if by_groups else 1
    heads = math.lcm(units, tp) if by_groups else odd * units
    if family == "linear_attention":
        return LinearAttentionSpec(num_heads=odd, head_dim=2), tp
    if family == "short_conv":
        return ShortConvSpec(conv_dim=odd), tp
    if family == "mamba1":
        return Mamba1Spec(intermediate_size=odd, state_size=2), tp
    if family == "gdn":
        return GDNSpec(num_k_heads=units, num_v_heads=heads, head_k_dim=2, head_v_dim=2), tp
    return Mamba2Spec(num_heads=heads, head_dim=2, num_groups=units, state_size=2), tp


def paddings(*, max_nbytes: int = 48) -> st.SearchStrategy[int]:
    """Bytes of padding after a page's content, shrinking toward 0."""
    return st.integers(0, max_nbytes)


def seeds() -> st.SearchStrategy[int]:
    """A seed for `ssm_split.reference.random_state`."""
    return st.integers(0, 2**32 - 1)


@st.composite
def strided_layouts(draw, *, max_layers: int = 4, max_blocks: int = 5,
                    min_page_nbytes: int = 1, max_page_nbytes: int = 64) -> dict:
    """Keyword arguments of `RegionSet.strided` for one memory that starts at 0: per
    layer a page size, a stride of at least that size (a padded page) and a block
    count; layers laid one after another with an optional gap. Offsets only: add a
    base address.

    Returns `{"base_addrs", "page_nbytes", "page_stride_nbytes", "num_blocks",
    "nbytes"}`, lists of ints (one per layer) and the memory's size."""
    num_layers = draw(st.integers(1, max_layers))
    page = draw(st.integers(min_page_nbytes, max_page_nbytes))
    pages = draw(st.lists(st.just(page) | st.integers(min_page_nbytes, max_page_nbytes),
                          min_size=num_layers, max_size=num_layers))
    strides = [p + draw(st.integers(0, 32)) for p in pages]
    blocks = draw(st.lists(st.integers(1, max_blocks), min_size=num_layers, max_size=num_layers))
    bases, cursor = [], 0
    for p, s, n in zip(pages, strides, blocks):
        cursor += draw(st.integers(0, 16))
        bases.append(cursor)
        cursor += (n - 1) * s + p
    return {"base_addrs": bases, "page_nbytes": pages, "page_stride_nbytes": strides,
            "num_blocks": blocks, "nbytes": cursor}
