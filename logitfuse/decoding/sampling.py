"""The parts of :func:`logitfuse.generate`'s loop that choose and keep tokens: one sampler
(:class:`TokenChooser`), one repetition penalty (:class:`RepetitionPenalty`), the rows being generated
(:class:`GeneratedRows`) and the one result type (:class:`FusedGeneration`).

Everything here runs on the logits' device; the host reads are the chosen ids (the loop's) and, once
at the end, the α of every token (:meth:`GeneratedRows.result`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
import torch

from logitfuse.config import SamplingConfig
from logitfuse.reference import sample_from_logprobs, sampling_weights
from logitfuse.types import SessionStats

Tensor = torch.Tensor

__all__ = ["FusedGeneration", "GeneratedRows", "RepetitionPenalty", "TokenChooser"]


@dataclass
class FusedGeneration:
    """What :func:`logitfuse.generate` returns (``logitfuse.SLMGeneration`` is another name for it).

    Attributes:
        sequences: the generated SLM token ids of each row (ending with the EOS token where the row
            stopped at one; no padding).
        alpha: per row, the α used for each generated token (1 = the SLM alone).
        stats: the session's counters (:class:`logitfuse.SessionStats`; with ``speculate``, the
            ``draft_tokens_*`` counts).
        stopped: per row, ``"eos"`` or ``"length"``.
        first_token_seconds: wall seconds from the call to the first token chosen (the prefills of
            both models and the first fusion): what a decode rate leaves out.
        seconds: wall seconds of the whole call.
        texts: per row, the generated text without special tokens, where the SLM's tokenizer is known
            (``slm_tokenizer``, a :class:`logitfuse.LlamaCppSLM`'s own); else ``None``.
    """

    sequences: list[list[int]]
    alpha: list[list[float]]
    stats: SessionStats
    stopped: list[str]
    first_token_seconds: float | None = None
    seconds: float | None = None
    texts: list[str] | None = field(default=None)

    @property
    def token_ids(self) -> list[int]:
        """One row's ids without the EOS token that ended it (a one-row generation, as
        :class:`logitfuse.LlamaCppSLM` makes)."""
        row = self.sequences[0]
        return row[:-1] if self.stopped[0] == "eos" else list(row)

    @property
    def text(self) -> str | None:
        """One row's text (``texts[0]``), ``None`` without a tokenizer."""
        return None if self.texts is None else self.texts[0]


class GeneratedRows:
    """The generated tokens, α and stop reason of each row. α is recorded as device tensors
    (:meth:`record_alpha`) and read once, in :meth:`result`."""

    def __init__(self, batch: int, max_new_tokens: int, eos: frozenset[int]):
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.stopped: list[str | None] = [None] * batch
        self.max_new_tokens, self.eos = max_new_tokens, eos
        self.first_token_at: float | None = None
        self._alpha_blocks: list[tuple[Tensor, list[int]]] = []

    def running(self, r: int) -> bool:
        return self.stopped[r] is None

    def add(self, r: int, tokens: list[int]) -> int:
        """Append what row ``r`` may still take of ``tokens``; returns how many were taken."""
        taken = 0
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        for token in tokens:
            self.tokens[r].append(token)
            taken += 1
            if token in self.eos:
                self.stopped[r] = "eos"
                break
            if len(self.tokens[r]) == self.max_new_tokens:
                self.stopped[r] = "length"
                break
        return taken

    def record_alpha(self, alpha: Tensor, taken: Sequence[int]) -> None:
        """α ``(B, P)`` of ``P`` positions decided together; row ``r`` took the first ``taken[r]``."""
        self._alpha_blocks.append((alpha, list(taken)))

    def done(self) -> bool:
        return all(s is not None for s in self.stopped)

    def alpha(self) -> list[list[float]]:
        """Per row, the α of each token it took (one host read for the whole generation)."""
        batch = len(self.tokens)
        if not self._alpha_blocks:
            return [[] for _ in range(batch)]
        width = max(block.shape[1] for block, _ in self._alpha_blocks)
        device = self._alpha_blocks[-1][0].device
        blocks = [torch.nn.functional.pad(block.float().to(device), (0, width - block.shape[1]), value=1.0)
                  for block, _ in self._alpha_blocks]
        values = torch.stack(blocks, dim=1).tolist()  # (B, blocks, width)
        return [[a for (_, taken), row in zip(self._alpha_blocks, values[r]) for a in row[:taken[r]]]
                for r in range(batch)]

    def result(self, stats: SessionStats, started: float, decode: Callable[[list[int]], str | None]) -> FusedGeneration:
        """The :class:`FusedGeneration`; ``decode`` gives a row's text (the runner's, ``None`` without one)."""
        texts = [decode(row[:-1] if s == "eos" else row) for row, s in zip(self.tokens, self.stopped)]
        texts = None if any(t is None for t in texts) else texts
        first = None if self.first_token_at is None else self.first_token_at - started
        return FusedGeneration(self.tokens, self.alpha(), stats, list(self.stopped), first,
                               time.perf_counter() - started, texts)


class TokenChooser:
    """Token choice as :func:`logitfuse.fuse_sample` makes it, from explicit generator draws, on the
    logits' device. The uniforms are drawn on the generator's device (a CPU ``torch.Generator``, or the
    global CPU generator when none is given) and copied to the logits' device: for a given generator state
    the tokens are the same whatever the device."""

    def __init__(self, sampling: SamplingConfig):
        self.greedy = sampling.greedy
        generator = sampling.generator
        if generator is None and sampling.seed is not None:
            generator = torch.Generator().manual_seed(sampling.seed)
        self.generator = generator
        self.settings = (sampling.temperature, sampling.top_k, sampling.top_p)
        self._warps: dict[tuple[int, torch.device], dict[str, Any]] = {}

    def warp(self, rows: int, device: torch.device) -> dict[str, Any]:
        key = (rows, device)
        if key not in self._warps:
            temperature, top_k, top_p = self.settings
            self._warps[key] = dict(temperature=torch.full((rows,), temperature, device=device),
                                    top_k=torch.full((rows,), top_k, device=device),
                                    top_p=torch.full((rows,), top_p, device=device),
                                    filters=(top_k > 0, top_p < 1))  # known here: not read from the device
        return self._warps[key]

    def uniform(self, batch: int, device: torch.device) -> Tensor:
        where = self.generator.device if self.generator is not None else torch.device("cpu")
        return torch.rand(batch, generator=self.generator, device=where).to(device, non_blocking=True)

    def choose(self, logprobs: Tensor) -> Tensor:
        """One token per row ``(B,)`` from log-probabilities ``(B, V)``, on their device."""
        if self.greedy:
            return logprobs.argmax(dim=-1)
        rows, device = logprobs.shape[0], logprobs.device
        return sample_from_logprobs(logprobs, self.uniform(rows, device), **self.warp(rows, device))

    def probs(self, logprobs: Tensor) -> Tensor:
        """The normalized distribution ``(B, V)`` that :meth:`choose` draws from."""
        weights = sampling_weights(logprobs, **self.warp(logprobs.shape[0], logprobs.device))
        return weights / weights.sum(dim=-1, keepdim=True)


class RepetitionPenalty:
    """transformers' repetition penalty on the SLM's logits, where ``slm.generate`` applies it: before a
    user's logits processor (its built-in processors come first in the merged list), so before fusion.
    A logit of a token seen in the row (its prompt, left padding excepted, and every token generated)
    is divided by ``penalty`` when positive and multiplied by it when negative, as
    ``RepetitionPenaltyLogitsProcessor`` does. ``seen`` is ``None`` at ``penalty == 1`` (off)."""

    def __init__(self, penalty: float, ids: Tensor, mask: Tensor, vocab: int):
        self.penalty, self.seen = penalty, None
        if penalty != 1.0:
            marks = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)
            marks.scatter_(1, ids.masked_fill(mask == 0, vocab).clamp(0, vocab), True)
            self.seen = marks[:, :vocab]

    def fork(self) -> Tensor | None:
        """A copy of the seen tokens to mark drafts in (they may be rejected)."""
        return None if self.seen is None else self.seen.clone()

    def __call__(self, logits: Tensor, seen: Tensor | None = None) -> Tensor:
        seen = self.seen if seen is None else seen
        if seen is None:
            return logits
        seen = seen.to(logits.device)
        return torch.where(seen, torch.where(logits < 0, logits * self.penalty, logits / self.penalty), logits)

    def mark(self, tokens: Sequence[Sequence[int]], seen: Tensor | None = None) -> None:
        """Add ``tokens[r]`` to row ``r``'s seen tokens (of ``seen``, default the kept ones)."""
        seen = self.seen if seen is None else seen
        if seen is not None:
            for r, row in enumerate(tokens):
                if row:
                    seen[r, list(row)] = True

    def mark_column(self, tokens: Tensor, seen: Tensor | None = None) -> None:
        """Add one token per row ``(B,)`` (a device tensor: no host read)."""
        seen = self.seen if seen is None else seen
        if seen is not None:
            seen.scatter_(1, tokens.to(seen.device)[:, None], True)
