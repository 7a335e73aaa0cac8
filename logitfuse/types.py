"""Small value types shared across logitfuse."""

from __future__ import annotations

from typing import NamedTuple

import torch

MODES = ("linear", "geometric", "logit")
TAILS = ("slm", "uniform", "zero")


class TopK(NamedTuple):
    """The LLM's next-token information as a cloud API returns it: its K most likely tokens.

    Parameters
    ----------
    ids : torch.Tensor
        ``(batch_size, k)`` integer token ids in the LLM's vocabulary, distinct within a row.
    logprobs : torch.Tensor
        ``(batch_size, k)`` float log-probabilities of those tokens (``<= 0``, their
        probabilities summing to at most 1). The leftover mass ``1 - sum(exp(logprobs))``
        belongs to the tokens the API did not return; the fusion's tail rule spreads it.

    Example
    -------
    >>> import torch, logitfuse
    >>> topk = logitfuse.TopK(torch.tensor([[3, 1]]), torch.tensor([[-0.5, -1.5]]))
    >>> topk.ids.shape
    torch.Size([1, 2])
    """

    ids: torch.Tensor
    logprobs: torch.Tensor


class RowStats(NamedTuple):
    """Per-row statistics of a logit (or log-probability) matrix ``(batch_size, vocab_size)``.

    ``lse``, ``max_logprob`` and ``entropy`` are ``(batch_size,)``; ``topk_logprobs`` and
    ``topk_ids`` are ``(batch_size, k)``, sorted from most to least likely. All float32 except ids.
    """

    lse: torch.Tensor
    max_logprob: torch.Tensor
    entropy: torch.Tensor
    topk_logprobs: torch.Tensor
    topk_ids: torch.Tensor
