"""Shared pieces of the fusion kernels: launcher helpers and ``@triton.jit`` building blocks.

The building blocks implement the math of :mod:`logitfuse.reference` one block of SLM tokens at a
time, in float32 whatever the input dtype:

- :func:`_load_block` reads a block of SLM logits ``s / T_S`` and pulls the LLM side back through the
  vocabulary map: for dense LLM logits it gathers ``l[m(i)] / T_L`` (a random-access read of the LLM
  row), for top-k input it compares ``m(i)`` with the row's K ids (K scalar loads, cached);
- :func:`_row_scalars` is pass 1 over a row: the SLM log-sum-exp, the LLM log-sum-exp (dense: one
  streamed read of the LLM row), the known LLM mass and tail mass ``r``, the unknown-set statistics
  of the tail rule, and the log-normalizer ``log Z`` of the mixed row, without a second pass:

  * ``"linear"``: ``Z = α·Σp_S + (1-α)·Σp_L`` over SLM tokens with ``Σp_S = 1`` and
    ``Σp_L = known mass + tail mass given to unknown tokens``, both pass-1 scalars, all in log space:
    ``log Z = logaddexp(log α, log(1-α) + log Σp_L)`` with ``log 0 = -inf`` (guarded ``where``s), the
    known mass as an online log-sum-exp, so nothing underflows and ``α = 0``/``1`` are exact;
  * ``"geometric"``/``"logit"``: an online log-sum-exp over the known tokens of the raw mix
    ``w(α, s) + w(1-α, l)`` (row constants ``α·lse_S``, ``(1-α)·lse_L`` are subtracted afterwards), and
    for the unknown tokens either an online log-sum-exp of ``w(α, s)`` (tails ``"uniform"``/``"zero"``,
    whose LLM value is a row constant) or a closed form (tail ``"slm"``: on unknown tokens the mix is
    ``lp_S + (1-α)·(log r - L)`` with ``L`` the unknown set's SLM log-mass).

  ``"logit"`` differs from ``"geometric"`` by the row constant ``α·lse_S + (1-α)·lse_L`` only (the
  reference's ``"zero"`` tail is already ``0`` on the raw LLM scale), which cancels in the
  log-softmax, so both modes share one code path.

- :func:`_mix` turns a block plus the row scalars into the mixed (unnormalized) log-values; the fused
  log-probability is ``mixed - log Z``. Linear mode mixes in log space,
  ``logaddexp(log α + lp_S, log(1-α) + lp_L)``, as the reference does.

``w(a, x)`` is the reference's ``_weighted``: ``a·x`` with ``0·(±inf) = 0``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from logitfuse import types
from logitfuse.types import TopK

NEG = tl.constexpr(float("-inf"))
#: the reference's floor on the LLM tail mass, as a compile-time constant
TAIL_FLOOR = tl.constexpr(types.TAIL_FLOOR)

MODE_CODES = {"linear": 0, "geometric": 1, "logit": 2}
TAIL_CODES = {"slm": 0, "uniform": 1, "zero": 2}


# ------------------------------------------------------------------------------ python helpers
def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def block_size(n: int, gpu_cap: int) -> int:
    """Block width for a row of ``n`` elements: one block for the whole row under the interpreter
    (it pays per operation, not per element), at most ``gpu_cap`` on a GPU."""
    width = max(16, triton.next_power_of_2(max(n, 1)))
    return min(width, 16384 if interpreting() else gpu_cap)


def check_device(slm_logits: torch.Tensor, **others: torch.Tensor | None) -> torch.device:
    """All tensors on ``slm_logits``' device, and that device runnable by Triton here."""
    device = slm_logits.device
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"logitfuse.kernels run on CUDA tensors, got slm_logits on {device}; move the inputs with "
            ".to('cuda') or call logitfuse.fuse (which uses the torch reference on CPU)"
        )
    for name, tensor in others.items():
        if tensor is not None and tensor.device != device:
            raise ValueError(
                f"{name} is on {tensor.device} but slm_logits is on {device}; put all inputs on one device"
            )
    return device


def require_one_to_one(llm_to_slm) -> None:
    """The kernels gather through one-to-one maps only; the dispatcher (:mod:`logitfuse.functional`)
    routes maps that aggregate LLM tokens (``llm_to_slm``) to the reference. A guard, not a fallback."""
    if llm_to_slm is not None:
        raise ValueError("the Triton kernels take one-to-one vocabulary maps; a map with llm_to_slm "
                         "runs on logitfuse.reference (logitfuse.fuse routes it there)")


def launch_inputs(slm_logits: torch.Tensor, llm, slm_to_llm: torch.Tensor, **row_tensors: torch.Tensor):
    """What every launcher does first: check devices (``row_tensors`` are the per-row inputs, named
    in error messages), make the SLM logits and the map contiguous, unpack the LLM side.

    Returns ``(slm, vmap, llm_arguments(llm, vmap))``.
    """
    check_device(slm_logits, slm_to_llm=slm_to_llm, llm=llm.ids if isinstance(llm, TopK) else llm, **row_tensors)
    slm = slm_logits.contiguous()
    vmap = slm_to_llm.to(torch.int64).contiguous()
    return slm, vmap, llm_arguments(llm, vmap)


def llm_arguments(llm, slm_to_llm: torch.Tensor):
    """Kernel arguments for the LLM side: ``(llm, llm_row_stride, V_L, ids, logprobs, topk_stride, K,
    has_topk)``; unused pointers get a placeholder tensor."""
    if isinstance(llm, TopK):
        ids = llm.ids.to(torch.int64).contiguous()
        logprobs = llm.logprobs.contiguous()
        # dense pointer unused: point it at the logprobs
        return logprobs, 0, 1, ids, logprobs, ids.stride(0), ids.shape[1], True
    dense = llm.contiguous()
    # top-k pointers unused: point them at the map (int64) and the dense row
    return dense, dense.stride(0), dense.shape[1], slm_to_llm, dense, 0, 0, False


def stats_buffers(batch: int, vocab: int, block: int, k: int, device: torch.device):
    """Outputs of a row-statistics kernel: ``(lse, max_logprob, entropy)`` ``(B,)`` float32 and the
    per-block top-``k`` candidates ``(cand_val, cand_id)`` ``(B, n_blocks·k)``."""
    n_cand = triton.cdiv(vocab, block) * k
    lse, max_logprob, entropy = (torch.empty(batch, dtype=torch.float32, device=device) for _ in range(3))
    cand_val = torch.empty((batch, n_cand), dtype=torch.float32, device=device)
    cand_id = torch.empty((batch, n_cand), dtype=torch.int64, device=device)
    return lse, max_logprob, entropy, cand_val, cand_id


def merge_candidates(cand_val: torch.Tensor, cand_id: torch.Tensor, lse: torch.Tensor, k: int):
    """The top-``k`` ``(log-probabilities, ids)`` of each row from the per-block candidates (a stable
    sort of a few hundred entries a row: candidates lie in increasing id order among equal values, so
    ties go to the first index); empty slots (id -1) rank below every real one, ``-inf`` included."""
    key = torch.where(cand_id >= 0, cand_val.clamp(min=torch.finfo(torch.float32).min), -torch.inf)
    pick = key.sort(dim=-1, descending=True, stable=True).indices[:, :k]
    return cand_val.gather(1, pick) - lse[:, None], cand_id.gather(1, pick)


def per_row(value: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """A ``(B,)`` per-row parameter as a contiguous tensor of ``dtype`` (expanded views copied)."""
    return value.detach().to(dtype).contiguous()


# ------------------------------------------------------------------------------ jit building blocks
@triton.jit
def _row_inputs(slm_ptr, slm_stride, llm_ptr, llm_stride, ids_ptr, lps_ptr, topk_stride,
                alpha_ptr, t_slm_ptr, t_llm_ptr):
    """This program's row (``program_id(0)``, as int64 so offsets cannot overflow), its row pointers
    into the SLM logits, the dense LLM logits and the top-k ids/logprobs, and its α and temperatures.
    Returns ``(row, slm_row, llm_row, ids_row, lps_row, a, t_slm, t_llm)``."""
    row = tl.program_id(0).to(tl.int64)
    a = tl.load(alpha_ptr + row).to(tl.float32)
    t_slm = tl.load(t_slm_ptr + row).to(tl.float32)
    t_llm = tl.load(t_llm_ptr + row).to(tl.float32)
    return (row, slm_ptr + row * slm_stride, llm_ptr + row * llm_stride, ids_ptr + row * topk_stride,
            lps_ptr + row * topk_stride, a, t_slm, t_llm)


@triton.jit
def _online_lse(m, acc, x):
    """One block of an online log-sum-exp: running max ``m`` and ``acc = Σ exp(x - m)``."""
    new_m = tl.maximum(m, tl.max(x, 0))
    base = tl.where(new_m == float("-inf"), 0.0, new_m)
    acc = acc * tl.exp(m - base) + tl.sum(tl.exp(x - base), 0)
    return new_m, acc


@triton.jit
def _online_step(m, x):
    """Rescaling step of an online softmax: ``(new_m, scale, e)`` with ``scale = exp(m - new_m)`` for
    the running sums and ``e = exp(x - new_m)`` for this block (``-inf`` everywhere stays 0)."""
    new_m = tl.maximum(m, tl.max(x, 0))
    base = tl.where(new_m == float("-inf"), 0.0, new_m)
    return new_m, tl.exp(m - base), tl.exp(x - base)


@triton.jit
def _stats_block(x, offs, valid, m, acc, wacc, cand_val_row, cand_id_row, slot, k, V):
    """One block of row statistics (``x`` ``-inf`` on invalid lanes): the online log-sum-exp carries
    the running max ``m``, ``acc = Σ e`` with ``e = exp(x - m)`` and ``wacc = Σ e·(x - m)`` (rescaled
    when ``m`` grows), so the entropy needs no second pass; the block's ``k`` largest values (first
    index on ties) go to the candidate slots ``slot .. slot + k``. Returns ``(m, acc, wacc)``."""
    new_m = tl.maximum(m, tl.max(x, 0))
    base = tl.where(new_m == float("-inf"), 0.0, new_m)
    scale = tl.exp(m - base)
    # old terms: e·(x - m) becomes scale·e·(x - m + m - new_m)
    wacc = tl.where(acc > 0, scale * (wacc + (m - base) * acc), 0.0)
    acc = acc * scale
    e = tl.exp(x - base)
    acc += tl.sum(e, 0)
    wacc += tl.sum(tl.where(e > 0, e * (x - base), 0.0), 0)
    avail = valid
    for j in range(0, k):
        value = tl.max(tl.where(avail, x, float("-inf")), 0)
        idx = tl.min(tl.where(avail & (x == value), offs, V), 0)
        found = idx < V
        tl.store(cand_val_row + slot + j, tl.where(found, value, float("-inf")))
        tl.store(cand_id_row + slot + j, tl.where(found, idx, -1).to(tl.int64))
        avail = avail & (offs != idx)
    return new_m, acc, wacc


@triton.jit
def _store_stats(m, acc, wacc, lse_ptr, max_ptr, entropy_ptr):
    """Write a row's log-sum-exp, max log-probability and entropy from :func:`_stats_block`'s sums."""
    lse = tl.where(m == float("-inf"), 0.0, m) + tl.log(acc)
    tl.store(lse_ptr, lse)
    tl.store(max_ptr, m - lse)
    tl.store(entropy_ptr, tl.log(acc) - wacc / acc)


@triton.jit
def _finish_lse(m, acc):
    """``log Σ exp`` from an online pair; ``-inf`` for an empty set (guarded: no ``log 0``)."""
    empty = m == float("-inf")
    return tl.where(empty, float("-inf"), tl.where(empty, 0.0, m) + tl.log(tl.where(empty, 1.0, acc)))


@triton.jit
def _logaddexp(x, y):
    """``log(exp(x) + exp(y))`` with ``-inf`` on both sides giving ``-inf`` (not NaN, no ``log 0``)."""
    top = tl.maximum(x, y)
    dead = top == float("-inf")
    base = tl.where(dead, 0.0, top)
    # the larger side contributes exp(0) = 1, so the sum is >= 1 wherever it is used
    total = tl.where(dead, 1.0, tl.exp(x - base) + tl.exp(y - base))
    return tl.where(dead, float("-inf"), base + tl.log(total))


@triton.jit
def _log_weights(a):
    """``(log α, log(1-α))`` with ``log 0 = -inf`` (guarded: no ``log 0`` is evaluated)."""
    log_a = tl.where(a > 0, tl.log(tl.where(a > 0, a, 1.0)), float("-inf"))
    log_b = tl.where(a < 1, tl.log(tl.where(a < 1, 1.0 - a, 1.0)), float("-inf"))
    return log_a, log_b


@triton.jit
def _load_block(slm_row, llm_row, ids_row, lps_row, map_ptr, offs, mask, t_slm, t_llm, K,
                HAS_TOPK: tl.constexpr):
    """Read one block of SLM tokens ``offs`` and their LLM counterparts.

    DRAM reads: SLM logits and map entries at ``offs``; dense: LLM logits gathered at ``m(offs)``;
    top-k: the row's K ids and logprobs (same addresses for every block, so they stay in cache).
    Returns ``(s, known, lraw)``: ``s = slm/T_S`` (``-inf`` on masked lanes); ``known`` whether the LLM
    reported ``m(i)``; ``lraw`` the LLM value there (dense: ``l/T_L``, top-k: the logprob), else ``-inf``.
    """
    s = tl.load(slm_row + offs, mask=mask, other=float("-inf")).to(tl.float32) / t_slm
    tok = tl.load(map_ptr + offs, mask=mask, other=-1)
    if HAS_TOPK:
        known = offs < 0  # all false, the block's shape
        lraw = tl.where(known, 0.0, float("-inf"))
        for kk in range(0, K):
            tid = tl.load(ids_row + kk)
            tlp = tl.load(lps_row + kk).to(tl.float32)
            hit = tok == tl.where(tlp > float("-inf"), tid, -2)  # a -inf entry is padding: matches no token
            known = known | hit
            lraw = tl.where(hit, tlp, lraw)
    else:
        known = tok >= 0
        col = tl.where(known, tok, 0)
        lraw = tl.load(llm_row + col, mask=known, other=float("-inf")).to(tl.float32) / t_llm
    return s, known, lraw


@triton.jit
def _mix(s, known, lraw, a, lse_s, shift, log_r, lu_s_safe, c_tail,
         MODE: tl.constexpr, TAIL: tl.constexpr):
    """Mixed (unnormalized) log-values of one block; returns ``(mixed, lp_S, lp_L)``.

    ``lp_S = s - lse_S``; ``lp_L`` is ``lraw - shift`` on known tokens and the tail rule elsewhere:
    ``"slm"``: ``log r + s - lse_unknown(s)``, ``"uniform"``/``"zero"``: the row constant ``c_tail``.
    """
    lp_s = s - lse_s
    if TAIL == 0:
        lp_tail = log_r + s - lu_s_safe
    else:
        lp_tail = tl.where(known, 0.0, 0.0) + c_tail
    lp_l = tl.where(known, lraw - shift, lp_tail)
    if MODE == 0:
        # log(α p_S + (1-α) p_L) in log space: exact at α = 0 and 1; a mixture of 0 is -inf
        log_a, log_b = _log_weights(a)
        mixed = _logaddexp(log_a + lp_s, log_b + lp_l)
    else:
        # α·lp_S + (1-α)·lp_L; a side of weight 0 does not take part, -inf on the other side is -inf
        mixed = tl.where(a == 0, 0.0, a * lp_s) + tl.where(a == 1, 0.0, (1.0 - a) * lp_l)
    return mixed, lp_s, lp_l


@triton.jit
def _row_scalars(slm_row, llm_row, ids_row, lps_row, map_ptr, V_S, V_L, K, a, t_slm, t_llm,
                 BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr, HAS_TOPK: tl.constexpr,
                 MODE: tl.constexpr, TAIL: tl.constexpr):
    """Pass 1 over one row (see the module docstring).

    DRAM reads: dense LLM row once streamed (its log-sum-exp), then the SLM row, the map, and the
    LLM values gathered through the map. Returns ``(lse_s, shift, log_r, lu_s_safe, c_tail, log_z,
    e_dm)``; ``e_dm = ∂log Z/∂α`` serves the α-gradient: ``E_{p_f}[∂mixed/∂α]`` for
    geometric/logit (on the mode's own scale), ``Σ(p_S - p_L)/Z`` over living tokens for linear.
    """
    shift = 0.0
    if not HAS_TOPK:
        m_l = float("-inf")
        acc_l = 0.0
        for start in range(0, V_L, BLOCK_L):
            offs_l = start + tl.arange(0, BLOCK_L)
            x = tl.load(llm_row + offs_l, mask=offs_l < V_L, other=NEG).to(tl.float32) / t_llm
            m_l, acc_l = _online_lse(m_l, acc_l, x)
        shift = _finish_lse(m_l, acc_l)

    m_s = float("-inf")
    acc_s = 0.0
    mass = 0.0  # Σ_known p_L
    n_unk = 0
    m_u = float("-inf")  # unknown set: lse of s (tail "slm")
    acc_u = 0.0
    # known set: online lse of the raw mix w(α, s) + w(1-α, lraw), and softmax-weighted sums of
    # each side's finite values and of the weight on finite values (for E_{p_f}[∂mixed/∂α])
    m_k = float("-inf")
    acc_k = 0.0
    w_ks = 0.0
    n_ks = 0.0
    w_kl = 0.0
    n_kl = 0.0
    # unknown set, tails "uniform"/"zero": online lse of w(α, s), weighted sums of finite s
    m_v = float("-inf")
    acc_v = 0.0
    w_vs = 0.0
    n_vs = 0.0
    # linear: known set, online lse of the LLM values (log of the known mass, never underflowing)
    m_kl = float("-inf")
    acc_kl = 0.0
    for start in range(0, V_S, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        valid = offs < V_S
        s, known, lraw = _load_block(slm_row, llm_row, ids_row, lps_row, map_ptr, offs, valid,
                                     t_slm, t_llm, K, HAS_TOPK)
        unknown = valid & (known == 0)
        s_fin = s > NEG
        l_fin = lraw > NEG
        m_s, scale, e = _online_step(m_s, s)
        acc_s = acc_s * scale + tl.sum(e, 0)
        p_l = tl.where(known, tl.exp(lraw - shift), 0.0)
        mass += tl.sum(p_l, 0)
        if TAIL == 0:
            m_u, acc_u = _online_lse(m_u, acc_u, tl.where(unknown, s, NEG))
        else:
            n_unk += tl.sum(unknown.to(tl.int32), 0)
        if MODE == 0:
            m_kl, acc_kl = _online_lse(m_kl, acc_kl, tl.where(known, lraw, NEG))
        else:
            ws = tl.where(a == 0, 0.0, a * s)
            km = tl.where(known, ws + tl.where(a == 1, 0.0, (1.0 - a) * lraw), NEG)
            m_k, scale, e = _online_step(m_k, km)
            acc_k = acc_k * scale + tl.sum(e, 0)
            w_ks = w_ks * scale + tl.sum(tl.where((e > 0) & s_fin, e * s, 0.0), 0)
            n_ks = n_ks * scale + tl.sum(tl.where(s_fin, e, 0.0), 0)
            w_kl = w_kl * scale + tl.sum(tl.where((e > 0) & l_fin, e * lraw, 0.0), 0)
            n_kl = n_kl * scale + tl.sum(tl.where(l_fin, e, 0.0), 0)
            if TAIL != 0:
                m_v, scale, e = _online_step(m_v, tl.where(unknown, ws, NEG))
                acc_v = acc_v * scale + tl.sum(e, 0)
                w_vs = w_vs * scale + tl.sum(tl.where((e > 0) & s_fin, e * s, 0.0), 0)
                n_vs = n_vs * scale + tl.sum(tl.where(s_fin, e, 0.0), 0)

    lse_s = _finish_lse(m_s, acc_s)
    r = tl.maximum(1.0 - mass, TAIL_FLOOR)
    log_r = tl.log(r)
    if TAIL == 0:
        lu_s = _finish_lse(m_u, acc_u)
        has_u = lu_s > NEG
        # the reference's lse_unknown = 0 when no unknown token has mass: lp_tail = log r + lp_S
        lu_s_safe = tl.where(has_u, lu_s, lse_s)
        c_tail = 0.0
        log_tail = tl.where(has_u, log_r, NEG)
    elif TAIL == 1:
        lu_s_safe = 0.0
        c_tail = log_r - tl.log(tl.maximum(n_unk, 1).to(tl.float32))
        log_tail = tl.where(n_unk > 0, log_r, NEG)
    else:
        lu_s_safe = 0.0
        c_tail = -shift
        log_tail = tl.where(n_unk > 0, tl.log(tl.maximum(n_unk, 1).to(tl.float32)) + c_tail, NEG)

    if MODE == 0:
        # all in log space (Σp_S = 1): log Z = logaddexp(log α, log(1-α) + log Σp_L), with
        # log Σp_L = logaddexp(log known mass, log tail mass); exact at α = 0 and 1
        log_sum_l = _logaddexp(_finish_lse(m_kl, acc_kl) - shift, log_tail)
        log_a, log_b = _log_weights(a)
        log_z = _logaddexp(log_a, log_b + log_sum_l)
        # ∂log Z/∂α = (Σp_S - Σp_L) / Z over every token, at α = 0 and 1 too (as the reference)
        live_z = log_z > NEG
        safe_z = tl.where(live_z, log_z, 0.0)
        e_dm = tl.where(live_z, tl.exp(-safe_z) - tl.exp(log_sum_l - safe_z), 0.0)
    else:
        # ∂mixed/∂α = x̃ - ỹ on tokens of non-zero fused mass, x̃/ỹ each side's value with -inf read
        # as 0 (the reference's _log_product); x = s - cx, y = lraw - cy on the mode's scale
        if MODE == 1:
            cx = lse_s
            cy = shift
        else:
            cx = 0.0
            cy = 0.0
        known_part = _finish_lse(m_k, acc_k) - a * lse_s - (1.0 - a) * shift
        mean_k = (w_ks - cx * n_ks - w_kl + cy * n_kl) / tl.where(acc_k > 0, acc_k, 1.0)
        if TAIL == 0:
            big_l = lu_s - lse_s
            unk_part = tl.where(has_u, big_l + (1.0 - a) * (log_r - big_l), NEG)
            # x - y = (s - cx) - (log r + s - lse_unknown + shift - cy), the same on every token
            mean_u = lu_s_safe - log_r - cx - shift + cy
        else:
            unk_part = _finish_lse(m_v, acc_v) - a * lse_s + (1.0 - a) * c_tail
            mean_u = (w_vs - cx * n_vs) / tl.where(acc_v > 0, acc_v, 1.0) - (c_tail + shift - cy)
        log_z = _logaddexp(known_part, unk_part)
        e_dm = tl.where(known_part > NEG, tl.exp(known_part - log_z) * mean_k, 0.0) + tl.where(
            unk_part > NEG, tl.exp(unk_part - log_z) * mean_u, 0.0)
    return lse_s, shift, log_r, lu_s_safe, c_tail, log_z, e_dm


@triton.jit
def _at_index(slm_row, llm_row, ids_row, lps_row, map_ptr, idx, V_S, K, a, t_slm, t_llm,
              lse_s, shift, log_r, lu_s_safe, c_tail, HAS_TOPK: tl.constexpr, MODE: tl.constexpr,
              TAIL: tl.constexpr):
    """``(mixed, lp_S, lp_L)`` of the single SLM token ``idx`` (a 2-lane block, one lane used)."""
    offs = idx + tl.arange(0, 2)
    sel = (offs == idx) & (offs < V_S)
    s, known, lraw = _load_block(slm_row, llm_row, ids_row, lps_row, map_ptr, offs, sel,
                                 t_slm, t_llm, K, HAS_TOPK)
    mixed, lp_s, lp_l = _mix(s, known, lraw, a, lse_s, shift, log_r, lu_s_safe, c_tail, MODE, TAIL)
    return (tl.sum(tl.where(sel, mixed, 0.0), 0), tl.sum(tl.where(sel, lp_s, 0.0), 0),
            tl.sum(tl.where(sel, lp_l, 0.0), 0))
