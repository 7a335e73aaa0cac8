"""Per-row statistics of the two distributions a :class:`~logitfuse.FusionHead` reads, the kernel
behind ``logitfuse.functional.fusion_feature_stats`` on CUDA, without the ``(B, V_S)`` pulled-back
LLM tensor that :func:`logitfuse.align` would make.

- SLM side: :func:`.row_stats.row_stats` on the SLM logits (one pass);
- LLM side, one program per row, at temperature 1 with the head's tail rule:

  1. :func:`~logitfuse.kernels._common._row_scalars` (pass 1 of the fuse kernel) for the LLM's
     log-sum-exp, the tail mass and the unknown-set statistics;
  2. one more read of the SLM row and the LLM values gathered through the map: each block's
     pulled-back LLM log-probabilities (:func:`~logitfuse.kernels._common._mix`) go through the same
     online log-sum-exp, entropy and top-k candidates as ``row_stats``
     (:func:`~logitfuse.kernels._common._stats_block`), and the value at the SLM's argmax is kept.

The candidates are merged in torch; the SLM log-probability at the LLM's argmax is one gather.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from logitfuse.types import FeatureStats, RowStats

from ._common import (TAIL_CODES, _load_block, _mix, _row_scalars, _stats_block, _store_stats, block_size,
                      launch_inputs, merge_candidates, require_one_to_one, stats_buffers)
from .row_stats import row_stats


@triton.jit
def _llm_side_kernel(
    lse_ptr, max_ptr, entropy_ptr, cand_val_ptr, cand_id_ptr, cand_stride, at_slm_argmax_ptr,
    slm_ptr, slm_stride,
    llm_ptr, llm_stride,
    ids_ptr, lps_ptr, topk_stride,
    map_ptr, slm_argmax_ptr, one,
    V_S, V_L, K, k,
    BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr, HAS_TOPK: tl.constexpr, TAIL: tl.constexpr,
):
    """One program per row (``one`` is 1.0: α and both temperatures). Reads: see the module
    docstring; writes 4 floats and ``n_blocks·k`` candidates."""
    row = tl.program_id(0).to(tl.int64)
    slm_row = slm_ptr + row * slm_stride
    llm_row = llm_ptr + row * llm_stride
    ids_row = ids_ptr + row * topk_stride
    lps_row = lps_ptr + row * topk_stride
    # pass 1: the row scalars of the pull-back (α = 1 and the linear mode: only the tail scalars are used)
    lse_s, shift, log_r, lu_s_safe, c_tail, _log_z, _e_dm = _row_scalars(
        slm_row, llm_row, ids_row, lps_row, map_ptr, V_S, V_L, K, one, one, one,
        BLOCK_S, BLOCK_L, HAS_TOPK, 0, TAIL)
    slm_argmax = tl.load(slm_argmax_ptr + row)
    m = float("-inf")
    acc = 0.0
    wacc = 0.0
    at_slm_argmax = 0.0
    # pass 2: the pulled-back LLM log-probabilities, streamed into the row statistics
    for start in range(0, V_S, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        valid = offs < V_S
        s, known, lraw = _load_block(slm_row, llm_row, ids_row, lps_row, map_ptr, offs, valid, one, one, K, HAS_TOPK)
        _mixed, _lp_s, lp_l = _mix(s, known, lraw, one, lse_s, shift, log_r, lu_s_safe, c_tail, 0, TAIL)
        x = tl.where(valid, lp_l, float("-inf"))
        at_slm_argmax += tl.sum(tl.where(offs == slm_argmax, x, 0.0), 0)
        m, acc, wacc = _stats_block(x, offs, valid, m, acc, wacc, cand_val_ptr + row * cand_stride,
                                    cand_id_ptr + row * cand_stride, (start // BLOCK_S) * k, k, V_S)
    _store_stats(m, acc, wacc, lse_ptr + row, max_ptr + row, entropy_ptr + row)
    tl.store(at_slm_argmax_ptr + row, at_slm_argmax)


def fusion_feature_stats(slm_logits, llm, slm_to_llm, *, v_llm, tail, k, llm_to_slm=None) -> FeatureStats:
    """Same signature and result as :func:`logitfuse.reference.fusion_feature_stats_reference`."""
    require_one_to_one(llm_to_slm)
    slm, vmap, (dense, dense_stride, v_l, ids, lps, topk_stride, k_llm, has_topk) = launch_inputs(
        slm_logits, llm, slm_to_llm)
    batch, v_slm = slm.shape
    k = min(int(k), v_slm)
    slm_stats = row_stats(slm, k)
    block = block_size(v_slm, 2048)
    lse, max_logprob, entropy, cand_val, cand_id = stats_buffers(batch, v_slm, block, k, slm.device)
    at_slm_argmax = torch.empty(batch, dtype=torch.float32, device=slm.device)
    if batch > 0:
        _llm_side_kernel[(batch,)](
            lse, max_logprob, entropy, cand_val, cand_id, cand_val.stride(0), at_slm_argmax,
            slm, slm.stride(0),
            dense, dense_stride,
            ids, lps, topk_stride,
            vmap, slm_stats.topk_ids[:, 0].contiguous(), 1.0,
            v_slm, v_l, k_llm, k,
            BLOCK_S=block, BLOCK_L=block_size(v_l, 4096), HAS_TOPK=has_topk, TAIL=TAIL_CODES[tail],
            num_warps=8,
        )
    llm_stats = RowStats(lse, max_logprob, entropy, *merge_candidates(cand_val, cand_id, lse, k))
    slm_at_llm_argmax = slm.gather(1, llm_stats.topk_ids[:, :1]).squeeze(1).float() - slm_stats.lse
    return FeatureStats(slm_stats, llm_stats, at_slm_argmax, slm_at_llm_argmax)
