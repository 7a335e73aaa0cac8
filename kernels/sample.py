"""Fused mix-and-sample: the inputs of the fused mix plus temperature, top-k, top-p and one uniform
draw per row → token ids ``(B,)`` int64 and the fused log-probability of each drawn id ``(B,)``,
the kernel behind ``logitfuse.fuse_sample`` on CUDA. The fused row is never written to memory: each
pass recomputes it from the inputs (SLM row, map, LLM values gathered through the map).

Semantics are those of :func:`logitfuse.reference.sample_from_logprobs`: ``p = softmax(fused / T)``
(``T = 0``: greedy argmax of the fused log-probabilities); top-k keeps ``p >= k-th largest p`` (ties
kept); top-p, over the renormalized survivors ``q``, keeps ``q >= τ`` with ``τ`` the largest value
whose upper set ``{q >= τ}`` holds mass ``>= top_p - TOP_P_TOLERANCE`` (exactly "the probability at
which the sorted running mass first reaches p", ties kept); then one token is drawn by inverse CDF **in vocabulary
order** over the survivors, so the same ``uniform`` gives the same id as the reference.

Thresholds without a sort: the k-th largest ``p`` and ``τ`` are found by bisection on the IEEE bit
pattern of the (non-negative) probabilities, whose integer order is their value order. Each step is
one pass over the row that counts (top-k) or sums (top-p) the values at or above a pivot and snaps the
interval ends to the nearest actual values, so the search ends on an exact element value after at
most 31 steps (usually far fewer: it stops once the interval holds one distinct value).

Passes over a row (each reads the SLM row and the gathered LLM values; dense LLM input is also read
once streamed in pass 1):

- 1: row scalars (:func:`~logitfuse.kernels._common._row_scalars`);
- 1: log-sum-exp of ``fused / T`` and the greedy argmax (greedy rows stop here);
- ``n_k`` ≤ 31: top-k bisection, only when ``0 < top_k < V_S``;
- 1 + ``n_p`` (``n_p`` ≤ 31): mass of the top-k survivors and the top-p bisection, only when ``top_p < 1``;
- 1: total surviving mass; 1: the inverse-CDF draw with block prefix sums (``tl.cumsum``);
- plus one single-token evaluation for the drawn id's fused log-probability.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from logitfuse.types import TOP_P_TOLERANCE

from ._common import (MODE_CODES, TAIL_CODES, _at_index, _finish_lse, _load_block, _mix, _online_lse, _row_inputs,
                      _row_scalars, block_size, launch_inputs, per_row, require_one_to_one)

@triton.jit
def _fused_block(slm_row, llm_row, ids_row, lps_row, map_ptr, offs, valid, V_S, K, a, t_slm, t_llm,
                 lse_s, shift, log_r, lu_s_safe, c_tail, log_z,
                 HAS_TOPK: tl.constexpr, MODE: tl.constexpr, TAIL: tl.constexpr):
    """Fused log-probabilities of one block (``-inf`` on masked lanes), recomputed from the inputs."""
    s, known, lraw = _load_block(slm_row, llm_row, ids_row, lps_row, map_ptr, offs, valid,
                                 t_slm, t_llm, K, HAS_TOPK)
    mixed, _lp_s, _lp_l = _mix(s, known, lraw, a, lse_s, shift, log_r, lu_s_safe, c_tail, MODE, TAIL)
    return tl.where(valid, mixed - log_z, float("-inf"))


@triton.jit
def _probs_block(start, slm_row, llm_row, ids_row, lps_row, map_ptr, V_S, K, a, t_slm, t_llm,
                 lse_s, shift, log_r, lu_s_safe, c_tail, log_z, t_eff, lse_g,
                 BLOCK_S: tl.constexpr, HAS_TOPK: tl.constexpr, MODE: tl.constexpr, TAIL: tl.constexpr):
    """The block of SLM tokens from ``start``: ``(offs, valid, p)`` with ``p = softmax(fused / T)``
    (0 on masked lanes), recomputed from the inputs."""
    offs = start + tl.arange(0, BLOCK_S)
    valid = offs < V_S
    f = _fused_block(slm_row, llm_row, ids_row, lps_row, map_ptr, offs, valid, V_S, K, a, t_slm,
                     t_llm, lse_s, shift, log_r, lu_s_safe, c_tail, log_z, HAS_TOPK, MODE, TAIL)
    return offs, valid, tl.exp(f / t_eff - lse_g)


@triton.jit
def _survivors(p, valid, kth, kept_mass, tau):
    """Which tokens of a block survive the filters: ``p >= kth`` (top-k, as bits), then
    ``p / kept_mass >= tau`` (top-p, as bits); thresholds of 0 keep every ``p > 0``.
    Returns ``(keep, q)`` with ``q = p / kept_mass`` on the top-k survivors (before the top-p
    filter, which reads it) and 0 elsewhere."""
    keep = valid & (p > 0) & (p.to(tl.int32, bitcast=True) >= kth)
    q = tl.where(keep, p / kept_mass, 0.0)
    return keep & (q.to(tl.int32, bitcast=True) >= tau), q


@triton.jit
def _kept_mass(slm_row, llm_row, ids_row, lps_row, map_ptr, V_S, K, a, t_slm, t_llm,
               lse_s, shift, log_r, lu_s_safe, c_tail, log_z, t_eff, lse_g, kth, kept_mass, tau,
               BLOCK_S: tl.constexpr, HAS_TOPK: tl.constexpr, MODE: tl.constexpr, TAIL: tl.constexpr):
    """Σ p over the tokens that :func:`_survivors` keeps; one pass."""
    total = 0.0
    for start in range(0, V_S, BLOCK_S):
        offs, valid, p = _probs_block(start, slm_row, llm_row, ids_row, lps_row, map_ptr, V_S, K, a, t_slm,
                                      t_llm, lse_s, shift, log_r, lu_s_safe, c_tail, log_z, t_eff, lse_g,
                                      BLOCK_S, HAS_TOPK, MODE, TAIL)
        keep, _q = _survivors(p, valid, kth, kept_mass, tau)
        total += tl.sum(tl.where(keep, p, 0.0), 0)
    return total


@triton.jit
def _bisect_bits(slm_row, llm_row, ids_row, lps_row, map_ptr, V_S, K, a, t_slm, t_llm,
                 lse_s, shift, log_r, lu_s_safe, c_tail, log_z, t_eff, lse_g, kth, kept_mass, goal,
                 BLOCK_S: tl.constexpr, HAS_TOPK: tl.constexpr, MODE: tl.constexpr, TAIL: tl.constexpr,
                 BY_MASS: tl.constexpr):
    """The largest value ``v`` (as IEEE bits) with ``measure({x >= v}) >= goal``, by bisection.

    ``BY_MASS=False`` (top-k): ``x = p`` and the measure counts tokens; ``BY_MASS=True`` (top-p):
    ``x = q``, the renormalized top-k survivors, and the measure sums ``q``. Each step is one pass
    that also snaps the interval ends to the nearest actual values, so the result is an element's.
    (0x7F800000 is the bit pattern of +inf, above every probability's.)"""
    lo = 0
    hi = 0x7F800000
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        measure = 0.0
        min_ge = 0x7F800001
        max_lt = -1
        for start in range(0, V_S, BLOCK_S):
            offs, valid, x = _probs_block(start, slm_row, llm_row, ids_row, lps_row, map_ptr, V_S, K, a, t_slm,
                                          t_llm, lse_s, shift, log_r, lu_s_safe, c_tail, log_z, t_eff, lse_g,
                                          BLOCK_S, HAS_TOPK, MODE, TAIL)
            if BY_MASS:
                _keep, x = _survivors(x, valid, kth, kept_mass, 0)
            bits = x.to(tl.int32, bitcast=True)
            ge = valid & (bits >= mid)
            if BY_MASS:
                measure += tl.sum(tl.where(ge, x, 0.0), 0)
            else:
                measure += tl.sum(ge.to(tl.float32), 0)
            min_ge = tl.minimum(min_ge, tl.min(tl.where(ge, bits, 0x7F800001), 0))
            max_lt = tl.maximum(max_lt, tl.max(tl.where(valid & (bits < mid), bits, -1), 0))
        ok = measure >= goal
        lo = tl.where(ok, min_ge, lo)
        hi = tl.where(ok, hi, tl.maximum(max_lt, lo))
    return lo


@triton.jit
def fuse_sample_kernel(
    ids_out_ptr, logprob_out_ptr,
    slm_ptr, slm_stride,
    llm_ptr, llm_stride,
    ids_ptr, lps_ptr, topk_stride,
    map_ptr, alpha_ptr, t_slm_ptr, t_llm_ptr,
    uniform_ptr, temp_ptr, top_k_ptr, top_p_ptr,
    V_S, V_L, K, top_p_tol,
    BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_TOPK: tl.constexpr, MODE: tl.constexpr, TAIL: tl.constexpr,
):
    """One program per row; writes one id and one log-probability (passes: module docstring)."""
    row, slm_row, llm_row, ids_row, lps_row, a, t_slm, t_llm = _row_inputs(
        slm_ptr, slm_stride, llm_ptr, llm_stride, ids_ptr, lps_ptr, topk_stride, alpha_ptr, t_slm_ptr, t_llm_ptr)
    temp = tl.load(temp_ptr + row).to(tl.float32)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row).to(tl.float32)
    u = tl.load(uniform_ptr + row).to(tl.float32)

    # pass 1: row scalars of the fused distribution
    lse_s, shift, log_r, lu_s_safe, c_tail, log_z, _unused = _row_scalars(
        slm_row, llm_row, ids_row, lps_row, map_ptr, V_S, V_L, K, a, t_slm, t_llm,
        BLOCK_S, BLOCK_L, HAS_TOPK, MODE, TAIL)

    # pass 2: log-sum-exp of g = fused / T, and the first argmax of fused (greedy)
    greedy = temp == 0
    t_eff = tl.where(greedy, 1.0, temp)
    m_g = float("-inf")
    acc_g = 0.0
    best = float("-inf")
    chosen = 0
    for start in range(0, V_S, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        valid = offs < V_S
        f = _fused_block(slm_row, llm_row, ids_row, lps_row, map_ptr, offs, valid, V_S, K, a, t_slm,
                         t_llm, lse_s, shift, log_r, lu_s_safe, c_tail, log_z, HAS_TOPK, MODE, TAIL)
        m_g, acc_g = _online_lse(m_g, acc_g, f / t_eff)
        block_best = tl.max(f, 0)
        block_idx = tl.min(tl.where(valid & (f == block_best), offs, V_S), 0)
        chosen = tl.where(block_best > best, block_idx, chosen)
        best = tl.maximum(best, block_best)
    lse_g = _finish_lse(m_g, acc_g)

    if temp != 0:
        # top-k threshold: the largest p value v with #{p >= v} >= k, as bits (0 = keep all p > 0)
        k = tl.minimum(tl.maximum(top_k, 0), V_S).to(tl.int32)
        kth = 0
        if (k > 0) & (k < V_S):
            kth = _bisect_bits(slm_row, llm_row, ids_row, lps_row, map_ptr, V_S, K, a, t_slm, t_llm,
                               lse_s, shift, log_r, lu_s_safe, c_tail, log_z, t_eff, lse_g, 0, 1.0,
                               k.to(tl.float32), BLOCK_S, HAS_TOPK, MODE, TAIL, False)

        # top-p threshold over the renormalized top-k survivors q: the largest q value τ whose
        # upper set {q >= τ} holds mass >= top_p - TOP_P_TOLERANCE (0 = keep all survivors)
        tau = 0
        kept_mass = 1.0
        if top_p < 1:
            kept_mass = _kept_mass(slm_row, llm_row, ids_row, lps_row, map_ptr, V_S, K, a, t_slm, t_llm,
                                   lse_s, shift, log_r, lu_s_safe, c_tail, log_z, t_eff, lse_g, kth, 1.0, 0,
                                   BLOCK_S, HAS_TOPK, MODE, TAIL)
            tau = _bisect_bits(slm_row, llm_row, ids_row, lps_row, map_ptr, V_S, K, a, t_slm, t_llm,
                               lse_s, shift, log_r, lu_s_safe, c_tail, log_z, t_eff, lse_g, kth, kept_mass,
                               top_p - top_p_tol, BLOCK_S, HAS_TOPK, MODE, TAIL, True)

        # total surviving mass, then the inverse CDF in vocabulary order
        total = _kept_mass(slm_row, llm_row, ids_row, lps_row, map_ptr, V_S, K, a, t_slm, t_llm,
                           lse_s, shift, log_r, lu_s_safe, c_tail, log_z, t_eff, lse_g, kth, kept_mass, tau,
                           BLOCK_S, HAS_TOPK, MODE, TAIL)
        target = u * total
        carry = 0.0
        below = 0  # number of positions whose running mass is <= target
        last_kept = 0
        for start in range(0, V_S, BLOCK_S):
            offs, valid, p = _probs_block(start, slm_row, llm_row, ids_row, lps_row, map_ptr, V_S, K, a, t_slm,
                                          t_llm, lse_s, shift, log_r, lu_s_safe, c_tail, log_z, t_eff, lse_g,
                                          BLOCK_S, HAS_TOPK, MODE, TAIL)
            keep, _q = _survivors(p, valid, kth, kept_mass, tau)
            weights = tl.where(keep, p, 0.0)
            cdf = carry + tl.cumsum(weights, 0)
            below += tl.sum((valid & (cdf <= target)).to(tl.int32), 0)
            last_kept = tl.maximum(last_kept, tl.max(tl.where(keep, offs, 0), 0))
            carry += tl.sum(weights, 0)
        # the filters always keep the most likely token, so total > 0; should float rounding ever
        # disagree between passes and leave nothing, fall back to that token rather than to id 0
        chosen = tl.where(total > 0, tl.minimum(below, last_kept), chosen)

    mixed, _lp_s, _lp_l = _at_index(slm_row, llm_row, ids_row, lps_row, map_ptr, chosen, V_S, K, a,
                                    t_slm, t_llm, lse_s, shift, log_r, lu_s_safe, c_tail,
                                    HAS_TOPK, MODE, TAIL)
    tl.store(ids_out_ptr + row, chosen.to(tl.int64))
    tl.store(logprob_out_ptr + row, mixed - log_z)


def fuse_sample(slm_logits, llm, slm_to_llm, alpha, uniform, *, v_llm, mode, tail, slm_temperature,
                llm_temperature, temperature, top_k, top_p, llm_to_slm=None):
    """Same signature and result as :func:`logitfuse.reference.fuse_sample_reference`:
    ``(ids (B,) int64, fused log-probability of each id (B,) float32)``."""
    require_one_to_one(llm_to_slm)
    slm, vmap, (dense, dense_stride, v_l, ids, lps, topk_stride, k, has_topk) = launch_inputs(
        slm_logits, llm, slm_to_llm, alpha=alpha, uniform=uniform, slm_temperature=slm_temperature,
        llm_temperature=llm_temperature, temperature=temperature, top_k=top_k, top_p=top_p)
    batch, v_slm = slm.shape
    ids_out = torch.empty(batch, dtype=torch.int64, device=slm.device)
    logprob_out = torch.empty(batch, dtype=torch.float32, device=slm.device)
    if batch == 0:
        return ids_out, logprob_out
    fuse_sample_kernel[(batch,)](
        ids_out, logprob_out,
        slm, slm.stride(0),
        dense, dense_stride,
        ids, lps, topk_stride,
        vmap, per_row(alpha), per_row(slm_temperature), per_row(llm_temperature),
        per_row(uniform), per_row(temperature), per_row(top_k, torch.int64), per_row(top_p),
        v_slm, v_l, k, TOP_P_TOLERANCE,
        BLOCK_S=block_size(v_slm, 2048), BLOCK_L=block_size(v_l, 4096),
        HAS_TOPK=has_topk, MODE=MODE_CODES[mode], TAIL=TAIL_CODES[tail],
        num_warps=8,
    )
    return ids_out, logprob_out
