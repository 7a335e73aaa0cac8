"""Small value types and constants shared across logitfuse (and the only module the kernels import)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch

MODES = ("linear", "geometric", "logit")
TAILS = ("slm", "uniform", "zero")
#: floor on the LLM's leftover (tail) mass, so the tail rule never takes the log of 0
TAIL_FLOOR = 1e-6
#: a running mass within this of top_p counts as having reached it (float32 sums of exact halves)
TOP_P_TOLERANCE = 1e-6


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


class Aligned(NamedTuple):
    """One step's two next-token distributions on the SLM vocabulary, computed once
    (:func:`logitfuse.align`); a fusion head's features and the mix (:func:`logitfuse.reference.mix`)
    both read it.

    Parameters
    ----------
    slm_logits : torch.Tensor
        ``(batch_size, v_slm)`` the SLM's logits as given (not scaled; the paper's head reads them).
    slm_logprobs : torch.Tensor
        ``(batch_size, v_slm)`` float32 ``log_softmax(slm_logits / slm_temperature)``.
    slm_lse : torch.Tensor
        ``(batch_size,)`` float32 the SLM's normalizer, ``logsumexp(slm_logits / slm_temperature)``:
        ``slm_logprobs + slm_lse[:, None]`` is the scaled SLM logits.
    llm_logprobs : torch.Tensor
        ``(batch_size, v_slm)`` float32 the LLM's log-probabilities pulled back onto the SLM
        vocabulary through the vocabulary map (dense logits, or top-k with the tail rule for the
        tokens the LLM did not report). Need not sum to 1 (LLM tokens without an SLM counterpart).
    llm_lse : torch.Tensor
        ``(batch_size,)`` float32 the LLM's log-sum-exp of ``llm / llm_temperature`` (0 for top-k
        input): ``llm_logprobs + llm_lse[:, None]`` is on the LLM's raw logit scale.
    tail : str
        The tail rule that filled ``llm_logprobs``.

    Example
    -------
    >>> import torch, logitfuse
    >>> view = logitfuse.align(torch.randn(2, 6), torch.randn(2, 6), tail="slm")
    >>> view.slm_logprobs.shape, view.llm_lse.shape
    (torch.Size([2, 6]), torch.Size([2]))
    """

    slm_logits: torch.Tensor
    slm_logprobs: torch.Tensor
    slm_lse: torch.Tensor
    llm_logprobs: torch.Tensor
    llm_lse: torch.Tensor
    tail: str


class FeatureStats(NamedTuple):
    """What a :class:`~logitfuse.FusionHead`'s features are made of, per row: the
    :class:`RowStats` of both distributions on the SLM vocabulary (the LLM's pulled back, tail rule
    applied, renormalized for its statistics) and the two cross log-probabilities.

    ``llm_at_slm_argmax`` is the pulled-back LLM log-probability of the SLM's most likely token,
    ``slm_at_llm_argmax`` the SLM log-probability of the pulled-back LLM's most likely token, both
    ``(batch_size,)`` float32. Computed by ``fusion_feature_stats`` (the reference, or a kernel that
    never makes the ``(batch_size, v_slm)`` pulled-back LLM tensor).
    """

    slm: RowStats
    llm: RowStats
    llm_at_slm_argmax: torch.Tensor
    slm_at_llm_argmax: torch.Tensor


@dataclass
class SessionStats:
    """Counters of one fused generation.

    Attributes:
        steps: decoding steps (positions) fused or decided by the SLM alone (with speculative
            fusion, the positions decided in the longest row).
        llm_calls: backend requests (one per step that consulted any row).
        llm_row_calls: rows consulted, summed over steps.
        saved_calls: row steps the schedule skipped.
        fallbacks: rows whose LLM request failed (they used the SLM alone).
        llm_tokens: tokens fed to the LLM after the public prompts.
        rollbacks: LLM tokens re-tokenized away (two tokenizers).
        unmapped_tokens: with an identity map, generated ids beyond the LLM's vocabulary (padding).
        reorders: beam reorderings followed.
        draft_tokens_sent: speculative fusion (``FusionSession.step_many``): SLM draft tokens
            sent to the LLM to be scored.
        draft_tokens_kept: drafts accepted (they are in the output).
        draft_tokens_discarded: drafts rejected (the LLM saw them; the output does not hold them).
        speculation_fallbacks: speculative fusion asked for, but the backend cannot score drafts
            (``supports_score`` False, e.g. a server without prompt log-probabilities): the
            generation fused per step instead (1 per :func:`logitfuse.generate` call).

    ``stats["steps"]`` works as well as ``stats.steps``, and ``dict(stats)`` gives a plain dict.
    """

    steps: int = 0
    llm_calls: int = 0
    llm_row_calls: int = 0
    saved_calls: int = 0
    fallbacks: int = 0
    llm_tokens: int = 0
    rollbacks: int = 0
    unmapped_tokens: int = 0
    reorders: int = 0
    draft_tokens_sent: int = 0
    draft_tokens_kept: int = 0
    draft_tokens_discarded: int = 0
    speculation_fallbacks: int = 0

    def __getitem__(self, name: str) -> int:
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)

    def keys(self) -> list[str]:
        return list(self.__dataclass_fields__)

    def items(self) -> list[tuple[str, int]]:
        return list(dataclasses.asdict(self).items())
