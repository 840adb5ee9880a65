"""vLLM's three-read arithmetic against `plan_reads`, on the reference model's pages
(Hypothesis properties; no vLLM needed: `tests/_vllm_restated.py` restates vLLM 0.33's
offsets).

- With replicated B/C groups (or GDN key heads) under heterogeneous TP, vLLM's reads
  rebuild a wrong page on some dst rank, while `plan_reads` rebuilds every page;
- on fully sharded cases (groups and key heads sharded on both sides, divisible TP, DS)
  both move exactly the same bytes.
"""

from __future__ import annotations

import numpy as np
from hypothesis import example, given

from ssm_split import GDNSpec, Mamba1Spec, Mamba2Spec, plan_all
from ssm_split.reference import apply, content_nbytes, iota_state, shard
from tests._vllm_restated import as_plan, byte_sources, vllm_reads
from tests.strategies import replicated_transfer_cases, transfer_cases


@given(case=replicated_transfer_cases(divisible=True, layouts=("DS",)))
@example(case=(Mamba2Spec(num_heads=2, head_dim=1, num_groups=1, state_size=1, conv_kernel=2), 1, 2))
@example(case=(GDNSpec(num_k_heads=1, num_v_heads=4, head_k_dim=2, head_v_dim=1), 4, 2))
def test_replicated_groups_break_vllm_but_not_plan_reads(case):
    """Whenever the larger TP side replicates B/C groups or GDN key heads, some dst rank
    gets wrong bytes from vLLM's arithmetic; plan_reads rebuilds every page."""
    spec, src_tp, dst_tp = case
    state = iota_state(spec)
    src_pages, want = shard(spec, state, src_tp), shard(spec, state, dst_tp)
    vllm_right = []
    for dst_rank, plan in enumerate(plan_all(spec, src_tp, dst_tp)):
        blank = np.zeros(content_nbytes(spec, dst_tp), dtype=np.uint8)
        np.testing.assert_array_equal(apply(plan, src_pages, blank), want[dst_rank])
        reads = vllm_reads(spec, src_tp, dst_tp, dst_rank)
        if any(r.src_end > len(src_pages[0]) or r.dst_end > len(blank) for r in reads):
            vllm_right.append(False)  # vLLM would read another block's memory
            continue
        theirs = apply(as_plan(spec, src_tp, dst_tp, dst_rank), src_pages, blank)
        vllm_right.append(np.array_equal(theirs, want[dst_rank]))
    assert not all(vllm_right)


# --- fully sharded, divisible TP, DS: both move the same bytes -----------------------------


@given(case=transfer_cases(divisible=True, replication=False, layouts=("DS",),
                           families=("mamba2", "gdn", "mamba1")))
@example(case=(Mamba2Spec(num_heads=8, head_dim=2, num_groups=4, state_size=2), 4, 2))
@example(case=(GDNSpec(num_k_heads=4, num_v_heads=8, head_k_dim=2, head_v_dim=3, spec_tokens=1), 2, 4))
@example(case=(Mamba1Spec(intermediate_size=8, state_size=3, ssm_dtype="float32"), 8, 1))
def test_fully_sharded_cases_move_identical_bytes(case):
    spec, src_tp, dst_tp = case
    nbytes = content_nbytes(spec, dst_tp)
    for dst_rank, plan in enumerate(plan_all(spec, src_tp, dst_tp)):
        theirs = byte_sources(vllm_reads(spec, src_tp, dst_tp, dst_rank), nbytes)
        ours = byte_sources(plan.reads, nbytes)
        np.testing.assert_array_equal(theirs, ours, err_msg=f"dst rank {dst_rank}")
        assert (ours >= 0).all()
        assert len(plan.reads) <= len(vllm_reads(spec, src_tp, dst_tp, dst_rank))
