"""Fused mix cross-entropy for training a fusion head: per-token ``-log p_fused(target)`` ``(N,)`` and
its derivative in α, in one pass over each row, the kernel behind ``logitfuse.fused_cross_entropy``
on CUDA. No ``(N, V)`` tensor is stored: the forward keeps one float per row (``∂loss/∂α``), the
backward multiplies it by the incoming gradient, so memory beyond the inputs is O(N).

One pass per row (dense LLM input: plus one streamed read of the LLM row for its log-sum-exp):
:func:`~logitfuse.kernels._common._row_scalars` gives ``log Z`` and the α-derivative of ``log Z``,
then the target token alone is evaluated (:func:`~logitfuse.kernels._common._at_index`).

Gradient (``t`` the target, ``p_f`` the fused distribution), matching autograd through the reference:

- ``"linear"``: ``fused(t) = log(α p_S(t) + (1-α) p_L(t)) - log Z`` with ``Z = α + (1-α)·Σp_L``, so
  ``∂fused(t)/∂α = (p_S(t) - p_L(t)) / (α p_S(t) + (1-α) p_L(t)) - (1 - Σp_L) / Z``, the sum over
  every SLM token (at ``α = 0`` or 1 too: a token whose mixture is 0 there still takes mass as α
  moves, and the reference's closed-form ``Z`` counts it);
- ``"geometric"``/``"logit"``: ``fused(t) = m(t) - log Z`` with ``m = α·x + (1-α)·y`` (``x``, ``y``
  each side's value on the mode's scale: log-probabilities, or raw logits for ``"logit"``), so
  ``∂fused(t)/∂α = (x̃(t) - ỹ(t)) - E_{p_f}[x̃ - ỹ]`` where ``x̃``, ``ỹ`` read ``-inf`` as 0 (the
  reference's ``_log_product``); the expectation is a softmax-weighted sum kept online in pass 1;

and ``∂loss/∂α = -∂fused(t)/∂α``; rows whose target is ``ignore_index`` get loss 0 and gradient 0,
a target of fused probability 0 gets loss ``inf`` and only the ``-∂log Z/∂α`` part.
Gradients with respect to the logits are not computed (``None``): the fusion head is what trains and
the models' logits are data here; use the reference (CPU, or ``logitfuse.reference`` on CUDA) to
differentiate through the logits.

Memory: one program per row, nothing row-sized is written, so there is nothing to chunk: the grid is
``(N,)`` and the extra memory is the two ``(N,)`` outputs, however large ``N`` is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


from ._common import (MODE_CODES, TAIL_CODES, _at_index, _row_inputs, _row_scalars, block_size,
                      launch_inputs, per_row, require_one_to_one)


@triton.jit
def fused_ce_kernel(
    loss_ptr, dalpha_ptr,
    slm_ptr, slm_stride,
    llm_ptr, llm_stride,
    ids_ptr, lps_ptr, topk_stride,
    map_ptr, alpha_ptr, t_slm_ptr, t_llm_ptr, targets_ptr,
    V_S, V_L, K, ignore_index,
    BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_TOPK: tl.constexpr, MODE: tl.constexpr, TAIL: tl.constexpr,
):
    """One program per row; reads the row once (pass 1), writes ``loss[row]`` and ``dalpha[row]``."""
    row, slm_row, llm_row, ids_row, lps_row, a, t_slm, t_llm = _row_inputs(
        slm_ptr, slm_stride, llm_ptr, llm_stride, ids_ptr, lps_ptr, topk_stride, alpha_ptr, t_slm_ptr, t_llm_ptr)
    target = tl.load(targets_ptr + row)
    ignored = target == ignore_index
    target = tl.where(ignored, 0, target).to(tl.int32)

    lse_s, shift, log_r, lu_s_safe, c_tail, log_z, e_dm = _row_scalars(
        slm_row, llm_row, ids_row, lps_row, map_ptr, V_S, V_L, K, a, t_slm, t_llm,
        BLOCK_S, BLOCK_L, HAS_TOPK, MODE, TAIL)
    mixed, lp_s, lp_l = _at_index(slm_row, llm_row, ids_row, lps_row, map_ptr, target, V_S, K, a,
                                  t_slm, t_llm, lse_s, shift, log_r, lu_s_safe, c_tail,
                                  HAS_TOPK, MODE, TAIL)
    alive = mixed > float("-inf")  # a token of fused mass 0 carries no gradient of its own
    if MODE == 0:
        d_mixed = tl.where(alive, tl.exp(lp_s - mixed) - tl.exp(lp_l - mixed), 0.0)
    else:
        # x̃ - ỹ on the mode's scale (logit: raw logits, i.e. lp + row log-sum-exp)
        if MODE == 1:
            x = lp_s
            y = lp_l
        else:
            x = lp_s + lse_s
            y = lp_l + shift
        d_mixed = tl.where(alive, tl.where(x > float("-inf"), x, 0.0) - tl.where(y > float("-inf"), y, 0.0), 0.0)
    d_fused = d_mixed - e_dm
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, log_z - mixed))
    tl.store(dalpha_ptr + row, tl.where(ignored, 0.0, -d_fused))


def fused_cross_entropy_forward(slm_logits, llm, slm_to_llm, alpha, targets, *, mode, tail,
                                slm_temperature, llm_temperature, ignore_index):
    """Launch :func:`fused_ce_kernel`: ``(loss (N,), dloss/dα (N,))`` float32."""
    slm, vmap, (dense, dense_stride, v_l, ids, lps, topk_stride, k, has_topk) = launch_inputs(
        slm_logits, llm, slm_to_llm, alpha=alpha, targets=targets, slm_temperature=slm_temperature,
        llm_temperature=llm_temperature)
    batch, v_slm = slm.shape
    loss = torch.empty(batch, dtype=torch.float32, device=slm.device)
    dalpha = torch.empty(batch, dtype=torch.float32, device=slm.device)
    if batch == 0:
        return loss, dalpha
    fused_ce_kernel[(batch,)](
        loss, dalpha,
        slm, slm.stride(0),
        dense, dense_stride,
        ids, lps, topk_stride,
        vmap, per_row(alpha), per_row(slm_temperature), per_row(llm_temperature),
        per_row(targets, torch.int64),
        v_slm, v_l, k, int(ignore_index),
        BLOCK_S=block_size(v_slm, 2048), BLOCK_L=block_size(v_l, 4096),
        HAS_TOPK=has_topk, MODE=MODE_CODES[mode], TAIL=TAIL_CODES[tail],
        num_warps=8,
    )
    return loss, dalpha


class FusedCrossEntropy(torch.autograd.Function):
    """``loss = -log p_fused(target)`` per row, differentiable in ``alpha`` only.

    ``forward(ctx, alpha, slm_logits, llm, slm_to_llm, targets, mode, tail, slm_temperature,
    llm_temperature, ignore_index)``; the backward returns ``grad_loss · ∂loss/∂α`` for ``alpha`` and
    ``None`` for everything else (no gradient to the logits; see the module docstring).
    """

    @staticmethod
    def forward(ctx, alpha, slm_logits, llm, slm_to_llm, targets, mode, tail, slm_temperature,
                llm_temperature, ignore_index):
        loss, dalpha = fused_cross_entropy_forward(
            slm_logits, llm, slm_to_llm, alpha, targets, mode=mode, tail=tail,
            slm_temperature=slm_temperature, llm_temperature=llm_temperature, ignore_index=ignore_index)
        ctx.save_for_backward(dalpha)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (dalpha,) = ctx.saved_tensors
        return (grad_loss * dalpha,) + (None,) * 9


def fused_cross_entropy(slm_logits, llm, slm_to_llm, alpha, targets, *, v_llm, mode, tail,
                        slm_temperature, llm_temperature, ignore_index, llm_to_slm=None):
    """Same signature and result as :func:`logitfuse.reference.fused_cross_entropy_reference`:
    per-token loss ``(N,)`` float32, differentiable in ``alpha`` (a float32 ``(N,)`` tensor)."""
    require_one_to_one(llm_to_slm)
    return FusedCrossEntropy.apply(alpha, slm_logits, llm, slm_to_llm, targets, mode, tail,
                                   slm_temperature, llm_temperature, ignore_index)
