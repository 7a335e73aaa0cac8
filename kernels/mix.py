"""Fused aligned mix: SLM logits + LLM logits (dense or top-k) + vocabulary map + α → fused
log-probabilities ``(B, V_S)`` float32, the kernel behind ``logitfuse.fuse`` on CUDA.

Two passes over each row, in every mode and tail rule:

1. :func:`~logitfuse.kernels._common._row_scalars`: (dense LLM: one streamed read of the LLM row for
   its log-sum-exp), then one read of the SLM row with the LLM values gathered through the map:
   SLM log-sum-exp, known LLM mass, tail statistics and the mixed row's ``log Z`` (closed form for
   ``"linear"``, online log-sum-exp for ``"geometric"``/``"logit"``);
2. one more read of the SLM row and the gathered LLM values, and the only write: ``mixed - log Z``.

No ``(B, V_S)`` copy of the LLM side is made in torch: the gather through the map happens in the kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


from ._common import (MODE_CODES, TAIL_CODES, _load_block, _mix, _row_inputs, _row_scalars, block_size,
                      launch_inputs, per_row, require_one_to_one)


@triton.jit
def fuse_kernel(
    out_ptr, out_stride,
    slm_ptr, slm_stride,
    llm_ptr, llm_stride,
    ids_ptr, lps_ptr, topk_stride,
    map_ptr, alpha_ptr, t_slm_ptr, t_llm_ptr,
    V_S, V_L, K,
    BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_TOPK: tl.constexpr, MODE: tl.constexpr, TAIL: tl.constexpr,
):
    """One program per row. Reads: see the module docstring; writes ``out[row, :]`` once."""
    row, slm_row, llm_row, ids_row, lps_row, a, t_slm, t_llm = _row_inputs(
        slm_ptr, slm_stride, llm_ptr, llm_stride, ids_ptr, lps_ptr, topk_stride, alpha_ptr, t_slm_ptr, t_llm_ptr)
    out_row = out_ptr + row * out_stride

    # pass 1: row scalars
    lse_s, shift, log_r, lu_s_safe, c_tail, log_z, _unused = _row_scalars(
        slm_row, llm_row, ids_row, lps_row, map_ptr, V_S, V_L, K, a, t_slm, t_llm,
        BLOCK_S, BLOCK_L, HAS_TOPK, MODE, TAIL)

    # pass 2: recompute each token's mixed value, write the fused log-probability
    for start in range(0, V_S, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        valid = offs < V_S
        s, known, lraw = _load_block(slm_row, llm_row, ids_row, lps_row, map_ptr, offs, valid,
                                     t_slm, t_llm, K, HAS_TOPK)
        mixed, _lp_s, _lp_l = _mix(s, known, lraw, a, lse_s, shift, log_r, lu_s_safe, c_tail, MODE, TAIL)
        tl.store(out_row + offs, mixed - log_z, mask=valid)


def fuse_forward(slm_logits, llm, slm_to_llm, alpha, *, mode, tail, slm_temperature, llm_temperature):
    """Launch :func:`fuse_kernel`; returns ``(B, V_S)`` float32 fused log-probabilities."""
    slm, vmap, (dense, dense_stride, v_l, ids, lps, topk_stride, k, has_topk) = launch_inputs(
        slm_logits, llm, slm_to_llm, alpha=alpha, slm_temperature=slm_temperature, llm_temperature=llm_temperature)
    batch, v_slm = slm.shape
    out = torch.empty((batch, v_slm), dtype=torch.float32, device=slm.device)
    if batch == 0:
        return out
    fuse_kernel[(batch,)](
        out, out.stride(0),
        slm, slm.stride(0),
        dense, dense_stride,
        ids, lps, topk_stride,
        vmap, per_row(alpha), per_row(slm_temperature), per_row(llm_temperature),
        v_slm, v_l, k,
        BLOCK_S=block_size(v_slm, 2048), BLOCK_L=block_size(v_l, 4096),
        HAS_TOPK=has_topk, MODE=MODE_CODES[mode], TAIL=TAIL_CODES[tail],
        num_warps=8,
    )
    return out


def fuse(slm_logits, llm, slm_to_llm, alpha, *, v_llm, mode, tail, slm_temperature, llm_temperature, llm_to_slm=None):
    """Same signature and result as :func:`logitfuse.reference.fuse_reference`, on the Triton kernel.

    The kernel does not differentiate in ``alpha``: the dispatcher (:mod:`logitfuse.functional`)
    sends an ``alpha`` that needs a gradient to the reference; train through
    :func:`fused_cross_entropy` instead.
    """
    require_one_to_one(llm_to_slm)
    return fuse_forward(slm_logits, llm, slm_to_llm, alpha, mode=mode, tail=tail,
                        slm_temperature=slm_temperature, llm_temperature=llm_temperature)
