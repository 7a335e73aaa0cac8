"""The N-input combine op on Triton: the kernel behind :func:`logitfuse.rules.combine.combine` for
CUDA tensors with ``N ≤ 4`` inputs (same signature and result as
:func:`logitfuse.rules.combine.combine_reference`; the math is in that module's docstring).

One program per row ``b``; ``N`` (1..4), the rule and whether there is a plausibility cut are
``tl.constexpr``, so each variant compiles to straight-line code over its inputs. Per block of tokens
the kernel reads the N inputs' values (any stride between inputs and between rows; contiguous
tokens) and forms the combined, unnormalized value:

- ``"mixture"``: ``logaddexp`` over ``i`` of ``log coef[b, i] + logprobs[i, b]``, ``log 0 = -inf``;
- ``"sum"``: ``Σ_i coef[b, i] · logprobs[i, b]`` over the inputs with ``coef ≠ 0``, ``-inf`` where one
  of those is ``-inf`` (so a negative coefficient never makes ``+inf``).

Passes over the row (DRAM reads): with a plausibility cut, pass 0 reads input 0 for its max
(``threshold = max + log τ``); pass 1 reads the N inputs and keeps an online log-sum-exp of the
combined values (cut tokens ``-inf``), giving ``log Z``; pass 2 reads them again and writes
``combined - log Z`` (float32). So ``2N`` (``2N + 1`` with the cut) reads of ``V`` floats and one
write. The row's ``log Z`` is also written; a row whose every token is ``-inf`` (``log Z = -inf``)
makes :func:`combine` raise ``ValueError``, which reads that ``(B,)`` vector on the host.

No gradient: the op is for decode time and evaluation (the dispatcher runs it under
``torch.no_grad()``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import _finish_lse, _logaddexp, _online_lse, block_size, interpreting

#: the rules, as the kernel's ``RULE`` constexpr
RULE_CODES = {"mixture": 0, "sum": 1}
#: the most inputs one compiled variant takes
MAX_INPUTS = 4


@triton.jit
def _log_weight(c):
    """``log c`` with ``log 0 = -inf`` (a mixture weight; no ``log 0`` is evaluated)."""
    return tl.where(c > 0, tl.log(tl.where(c > 0, c, 1.0)), float("-inf"))


@triton.jit
def _combined_block(lp_row, stride_n, coef_row, offs, valid, threshold,
                    N: tl.constexpr, RULE: tl.constexpr, HAS_CUT: tl.constexpr):
    """The combined (unnormalized) values of the tokens ``offs`` of one row: reads the N inputs there.

    ``lp_row`` points at input 0's row; input ``i``'s is ``stride_n`` further per step (pointer
    arithmetic in 64 bits). Masked lanes are ``-inf``. With ``HAS_CUT``, tokens whose input-0 value
    is below ``threshold`` are ``-inf``.
    """
    first = tl.load(lp_row + offs, mask=valid, other=float("-inf")).to(tl.float32)
    c = tl.load(coef_row).to(tl.float32)
    if RULE == 0:
        combined = _log_weight(c) + first
    else:
        # ruled out where an input of nonzero coef is -inf; a finite value times coef 0 adds ±0
        ruled_out = tl.where(c != 0, first == float("-inf"), False)
        combined = tl.where(first > float("-inf"), c * first, 0.0)
    row_i = lp_row
    for i in tl.static_range(1, N):
        row_i += stride_n
        x = tl.load(row_i + offs, mask=valid, other=float("-inf")).to(tl.float32)
        c = tl.load(coef_row + i).to(tl.float32)
        if RULE == 0:
            combined = _logaddexp(combined, _log_weight(c) + x)
        else:
            ruled_out = ruled_out | tl.where(c != 0, x == float("-inf"), False)
            combined += tl.where(x > float("-inf"), c * x, 0.0)
    if RULE == 1:
        combined = tl.where(ruled_out | ~valid, float("-inf"), combined)
    if HAS_CUT:
        combined = tl.where(first >= threshold, combined, float("-inf"))
    return combined


@triton.jit
def combine_kernel(out_ptr, out_stride, lp_ptr, stride_n, stride_b, coef_ptr, log_z_ptr, V, log_tau,
                   N: tl.constexpr, RULE: tl.constexpr, HAS_CUT: tl.constexpr, BLOCK: tl.constexpr):
    """One row ``b = program_id(0)`` of :func:`combine`: writes ``out[b, :]`` and ``log_z[b]``.

    ``lp_ptr``: ``(N, B, V)`` float32 with strides ``(stride_n, stride_b, 1)``; ``coef_ptr``: ``(B, N)``
    contiguous float32; ``log_tau``: ``log τ`` of the cut (read only with ``HAS_CUT``).
    """
    row = tl.program_id(0).to(tl.int64)  # int64 before the stride products: B·V may pass 2^31
    lp_row = lp_ptr + row * stride_b
    coef_row = coef_ptr + row * N
    out_row = out_ptr + row * out_stride

    # pass 0 (cut only): input 0's max; the cut keeps lp_0 >= max + log τ, i.e. p_0 >= τ·max p_0
    threshold = float("-inf")
    if HAS_CUT:
        top = float("-inf")
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(lp_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            top = tl.maximum(top, tl.max(x, 0))
        threshold = top + log_tau

    # pass 1: log Z = logsumexp of the combined values, online (running max m, acc = Σ exp(x - m))
    m = float("-inf")
    acc = 0.0
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        combined = _combined_block(lp_row, stride_n, coef_row, offs, offs < V, threshold, N, RULE, HAS_CUT)
        m, acc = _online_lse(m, acc, combined)
    log_z = _finish_lse(m, acc)
    tl.store(log_z_ptr + row, log_z)

    # pass 2: recompute each block, write the normalized log-probabilities
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < V
        combined = _combined_block(lp_row, stride_n, coef_row, offs, valid, threshold, N, RULE, HAS_CUT)
        tl.store(out_row + offs, combined - log_z, mask=valid)


def combine_forward(logprobs: torch.Tensor, coef: torch.Tensor, *, rule: str,
                    plausibility: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch :func:`combine_kernel`; returns ``(out, log_z)``: ``(B, V)`` float32 log-probabilities and
    each row's ``(B,)`` log-normalizer (``-inf`` for a row with no possible token, whose ``out`` is
    NaN). No host read: :func:`combine` adds the check."""
    n_inputs, batch, vocab = logprobs.shape
    if not 1 <= n_inputs <= MAX_INPUTS:
        raise ValueError(f"the combine kernel takes 1 to {MAX_INPUTS} inputs, got logprobs of shape "
                         f"{tuple(logprobs.shape)}; logitfuse.rules.combine.combine runs more on the reference")
    device = logprobs.device
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"logitfuse.kernels run on CUDA tensors, got logprobs on {device}; move the inputs with "
                         ".to('cuda') or call logitfuse.rules.combine.combine (the torch reference on CPU)")
    if coef.device != device:
        raise ValueError(f"coef is on {coef.device} but logprobs is on {device}; put both on one device")
    if logprobs.stride(2) != 1:  # tokens must be contiguous; inputs and rows may have any stride
        logprobs = logprobs.contiguous()
    coef = coef.detach().to(torch.float32).contiguous()
    out = torch.empty((batch, vocab), dtype=torch.float32, device=device)
    log_z = torch.empty(batch, dtype=torch.float32, device=device)
    if batch == 0:
        return out, log_z
    combine_kernel[(batch,)](
        out, out.stride(0), logprobs, logprobs.stride(0), logprobs.stride(1), coef, log_z, vocab,
        0.0 if plausibility is None else math.log(plausibility),
        N=n_inputs, RULE=RULE_CODES[rule], HAS_CUT=plausibility is not None, BLOCK=block_size(vocab, 4096),
        num_warps=8,
    )
    return out, log_z


def combine(logprobs: torch.Tensor, coef: torch.Tensor, *, rule: str, plausibility: float | None = None) -> torch.Tensor:
    """Same signature and result as :func:`logitfuse.rules.combine.combine_reference`, on the Triton
    kernel (arguments already checked by :func:`logitfuse.rules.combine.combine`). A row with no
    possible token raises ``ValueError``: that check reads the ``(B,)`` log-normalizers on the host."""
    out, log_z = combine_forward(logprobs, coef, rule=rule, plausibility=plausibility)
    dead = torch.isneginf(log_z)
    if bool(dead.any()):
        row = int(dead.nonzero()[0])
        weight = "a positive coef" if rule == "mixture" else "a nonzero coef"
        cut = f" among the tokens that pass the plausibility cut (tau={plausibility:g})" if plausibility is not None else ""
        raise ValueError(f"row {row} has no possible token under rule {rule!r}: every input with {weight} gives each "
                         f"token{cut} probability 0 (-inf); give every row at least one token that all of its "
                         "weighted inputs allow")
    return out
