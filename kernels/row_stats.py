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

from ._common import _stats_block, _store_stats, block_size, check_device, merge_candidates, stats_buffers


@triton.jit
def row_stats_kernel(
    x_ptr, x_stride,
    lse_ptr, max_ptr, entropy_ptr,
    cand_val_ptr, cand_id_ptr, cand_stride,
    V, k,
    BLOCK: tl.constexpr,
):
    """One program per row. Reads the row once; writes 3 floats and ``n_blocks·k`` candidates."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    m = float("-inf")
    acc = 0.0  # Σ exp(x - m)
    wacc = 0.0  # Σ exp(x - m)·(x - m)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < V
        x = tl.load(x_row + offs, mask=valid, other=float("-inf")).to(tl.float32)
        m, acc, wacc = _stats_block(x, offs, valid, m, acc, wacc, cand_val_ptr + row * cand_stride,
                                    cand_id_ptr + row * cand_stride, (start // BLOCK) * k, k, V)
    _store_stats(m, acc, wacc, lse_ptr + row, max_ptr + row, entropy_ptr + row)


def row_stats(logits: torch.Tensor, k: int) -> RowStats:
    """Same signature and result as :func:`logitfuse.reference.row_stats_reference`."""
    check_device(logits)
    x = logits.contiguous()
    batch, vocab = x.shape
    k = min(int(k), vocab)
    block = block_size(vocab, 4096)
    lse, max_logprob, entropy, cand_val, cand_id = stats_buffers(batch, vocab, block, k, x.device)
    if batch > 0:
        row_stats_kernel[(batch,)](
            x, x.stride(0), lse, max_logprob, entropy, cand_val, cand_id, cand_val.stride(0),
            vocab, k, BLOCK=block, num_warps=8,
        )
    return RowStats(lse, max_logprob, entropy, *merge_candidates(cand_val, cand_id, lse, k))
