"""Row statistics of a logit matrix ``(B, V)``: log-sum-exp, max log-probability, entropy and the top-k
log-probabilities and ids, the kernel behind ``logitfuse.row_stats`` on CUDA (features of the
fusion head).

One pass over each row: an online log-sum-exp carries the running max ``m``, ``Σ e`` with
``e = exp(x - m)`` and ``Σ e·(x - m)`` (rescaled when ``m`` grows), so ``entropy = log Σe - Σe(x-m)/Σe``
needs no second pass and no cancellation against a large ``lse``. Each block also picks its own
``k`` largest logits (``k`` rounds of max + first index) into a small ``(B, n_blocks·k)`` candidate
buffer; a ``torch.topk`` over that buffer (a few hundred entries a row) merges them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from logitfuse.types import RowStats

from ._common import block_size, check_device


@triton.jit
def _row_stats_kernel(
    x_ptr, x_stride,
    lse_ptr, max_ptr, entropy_ptr,
    cand_val_ptr, cand_id_ptr, cand_stride,
    V, k,
    BLOCK: tl.constexpr,
):
    """One program per row. Reads the row once; writes 3 floats and ``n_blocks·k`` candidates."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    cand_val_row = cand_val_ptr + row * cand_stride
    cand_id_row = cand_id_ptr + row * cand_stride
    m = float("-inf")
    acc = 0.0  # Σ exp(x - m)
    wacc = 0.0  # Σ exp(x - m)·(x - m)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < V
        x = tl.load(x_row + offs, mask=valid, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, tl.max(x, 0))
        base = tl.where(new_m == float("-inf"), 0.0, new_m)
        scale = tl.exp(m - base)
        # old terms: e·(x - m) becomes scale·e·(x - m + m - new_m)
        wacc = tl.where(acc > 0, scale * (wacc + (m - base) * acc), 0.0)
        acc = acc * scale
        e = tl.exp(x - base)
        acc += tl.sum(e, 0)
        wacc += tl.sum(tl.where(e > 0, e * (x - base), 0.0), 0)
        m = new_m

        # this block's k largest logits (first index on ties), as candidates
        avail = valid
        slot = (start // BLOCK) * k
        for j in range(0, k):
            value = tl.max(tl.where(avail, x, float("-inf")), 0)
            idx = tl.min(tl.where(avail & (x == value), offs, V), 0)
            found = idx < V
            tl.store(cand_val_row + slot + j, tl.where(found, value, float("-inf")))
            tl.store(cand_id_row + slot + j, tl.where(found, idx, -1).to(tl.int64))
            avail = avail & (offs != idx)
    lse = tl.where(m == float("-inf"), 0.0, m) + tl.log(acc)
    tl.store(lse_ptr + row, lse)
    tl.store(max_ptr + row, m - lse)
    tl.store(entropy_ptr + row, tl.log(acc) - wacc / acc)


def row_stats(logits: torch.Tensor, k: int) -> RowStats:
    """Same signature and result as :func:`logitfuse.reference.row_stats_reference`."""
    check_device(logits)
    x = logits.contiguous()
    batch, vocab = x.shape
    k = min(int(k), vocab)
    block = block_size(vocab, 4096)
    n_blocks = triton.cdiv(vocab, block)
    lse = torch.empty(batch, dtype=torch.float32, device=x.device)
    max_logprob = torch.empty_like(lse)
    entropy = torch.empty_like(lse)
    cand_val = torch.empty((batch, n_blocks * k), dtype=torch.float32, device=x.device)
    cand_id = torch.empty((batch, n_blocks * k), dtype=torch.int64, device=x.device)
    if batch > 0:
        _row_stats_kernel[(batch,)](
            x, x.stride(0), lse, max_logprob, entropy, cand_val, cand_id, cand_val.stride(0),
            vocab, k, BLOCK=block, num_warps=8,
        )
    # merge the per-block candidates; empty slots (id -1) rank below every real one, -inf included
    key = torch.where(cand_id >= 0, cand_val.clamp(min=torch.finfo(torch.float32).min), -torch.inf)
    pick = key.topk(k, dim=-1).indices
    top_values = cand_val.gather(1, pick) - lse[:, None]
    top_ids = cand_id.gather(1, pick)
    return RowStats(lse, max_logprob, entropy, top_values, top_ids)
