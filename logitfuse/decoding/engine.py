"""Our own fused decode loop: :func:`generate`, with exact speculative fusion (``speculate=K``).

A small loop in the manner of gpt-fast over the SLM's KV cache: prefill the private prompt once, then
one forward per token, with the SLM in transformers (:class:`SLMCache`) or in llama.cpp
(:class:`logitfuse.LlamaCppSLM`, one row, through :class:`logitfuse.decoding.llama_cpp.LlamaCppCache`), and a
:class:`logitfuse.FusionSession` for the LLM side (the backend's state, α, fusion). Per step the
session returns the fused log-probabilities and the token is chosen as :func:`logitfuse.fuse_sample`
chooses it (greedy argmax, or temperature, top-k then top-p from an explicit ``torch.Generator``).

With ``speculate=K`` the SLM drafts K tokens alone and the LLM scores all K + 1 positions in one call;
the drafts are accepted by the speculative-sampling rule, so the tokens are distributed exactly as
per-step fusion's (greedy: identical). See :mod:`logitfuse.decoding.speculative`.

Overlap (per-step fusion, on by default): the LLM's request for a position is issued in a thread as
soon as the token before it is chosen, while the SLM computes its forward for that position, so a
step costs about max(SLM, LLM) plus fusion instead of the sum.

Privacy: the LLM sees the public prompts and the tokens the SLM generated and kept; with
``speculate``, also the drafts that end up rejected (opt-in, counted in the statistics).

>>> import torch, logitfuse
>>> from logitfuse.testing import byte_level_tokenizer, tiny_llama
>>> tok = byte_level_tokenizer()
>>> slm, llm = tiny_llama(len(tok), seed=0), logitfuse.HFLLM(tiny_llama(len(tok), seed=1), tok)
>>> private = tok(["Martin sells houses. Write an invitation:"], return_tensors="pt")
>>> out = logitfuse.generate(slm, llm, private["input_ids"], "Write an invitation:", alpha=0.5,
...                          max_new_tokens=6, speculate=2)
>>> out.sequences == logitfuse.generate(slm, llm, private["input_ids"], "Write an invitation:",
...                                     alpha=0.5, max_new_tokens=6).sequences
True
"""

from __future__ import annotations

import inspect
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Sequence

import torch

from logitfuse.backends.hf import drop_last_tokens
from logitfuse.decoding.llama_cpp import LlamaCppCache, LlamaCppSLM
from logitfuse.reference import sample_from_logprobs, sampling_weights
from logitfuse.decoding.session import FusionSession, SessionStats
from logitfuse.heads.slm_side import HiddenStateCapture
from logitfuse.decoding.speculative import check_speculation, speculative_accept, speculative_fusion

Tensor = torch.Tensor

__all__ = ["FusedGeneration", "generate", "speculative_accept"]


@dataclass
class FusedGeneration:
    """What :func:`generate` returns.

    Attributes:
        sequences: the generated SLM token ids of each row (ending with the EOS token where the row
            stopped at one; no padding).
        alpha: per row, the α used for each generated token (1 = the SLM alone).
        stats: the session's counters (:class:`logitfuse.SessionStats`; with ``speculate``, the
            ``draft_tokens_*`` counts).
        stopped: per row, ``"eos"`` or ``"length"``.
        first_token_seconds: wall seconds from the call to the first token chosen (the prefills of
            both models and the first fusion): what a decode rate leaves out.
    """

    sequences: list[list[int]]
    alpha: list[list[float]]
    stats: SessionStats
    stopped: list[str]
    first_token_seconds: float | None = None


class SLMCache:
    """The transformers SLM engine of the loop (the llama.cpp one is :class:`logitfuse.decoding.llama_cpp.LlamaCppCache`;
    both have ``ids``, ``mask``, ``batch_size``, ``device``, ``prefill()``, ``append(tokens)`` and
    ``drop(n)``): the SLM's KV cache over left-padded private prompts, one column appended per forward; dropped
    positions are masked out (and cropped where every row dropped them), as in :class:`logitfuse.HFLLM`.
    Positions come from each row's count of live tokens, so every row's logits are those of a plain
    forward over its own tokens. Nothing here is ever sent anywhere."""

    def __init__(self, model: Any, input_ids: Tensor, attention_mask: Tensor):
        from transformers import DynamicCache

        self.model = model
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" in params
        try:
            self.cache = DynamicCache(config=model.config)
        except TypeError:  # older signatures
            self.cache = DynamicCache()
        self.ids, self.mask = input_ids, attention_mask
        self.batch_size, self.device = input_ids.shape[0], input_ids.device
        self.lengths = attention_mask.sum(dim=1)

    @torch.inference_mode()
    def _forward(self, ids: Tensor, positions: Tensor) -> Tensor:
        kwargs = {self._cache_kw: self.cache, "use_cache": True}
        if self._keep_kw:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, **kwargs)
        return out.logits[:, -1, :].float()

    def prefill(self) -> Tensor:
        """The logits ``(B, V)`` for the first new position."""
        positions = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 0)  # as transformers' generate
        return self._forward(self.ids, positions)

    def append(self, tokens: Tensor) -> Tensor:
        """Feed one token per row ``(B,)``; the logits ``(B, V)`` for the position after it."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        logits = self._forward(tokens[:, None], self.lengths[:, None].clone())
        self.lengths = self.lengths + 1
        return logits

    def drop(self, n: Sequence[int]) -> None:
        """Forget the last ``n[r]`` tokens of each row (rejected drafts)."""
        if any(n):
            self.mask = drop_last_tokens(self.cache, self.mask, n, who="logitfuse.generate")
            self.lengths = self.lengths - torch.tensor(n, device=self.lengths.device)


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
                seen[r, list(row)] = True


# ------------------------------------------------------------------------- argument checks
def _check_private(slm: Any, private_input_ids: Any, attention_mask: Any, pad_id: int) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` ``(B, L)`` on the SLM's device, left padded, checked."""
    if not callable(slm) or not hasattr(slm, "config") or not hasattr(slm, "get_output_embeddings"):
        raise TypeError(f"slm must be a transformers causal LM (AutoModelForCausalLM), got {type(slm).__name__}")
    device = next(slm.parameters()).device
    if isinstance(private_input_ids, Tensor):
        ids = private_input_ids
        if ids.dim() == 1:
            ids = ids[None]
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
    elif isinstance(private_input_ids, Sequence) and private_input_ids and all(
            isinstance(row, Sequence) and not isinstance(row, str) and row for row in private_input_ids):
        if attention_mask is not None:
            raise ValueError("attention_mask goes with private_input_ids as a tensor; lists of ids are left padded here")
        width = max(len(row) for row in private_input_ids)
        ids = torch.full((len(private_input_ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(private_input_ids):
            ids[r, width - len(row):] = torch.tensor([int(i) for i in row])
            mask[r, width - len(row):] = 1
    else:
        raise TypeError("private_input_ids must be a (batch, length) tensor of SLM token ids, or a list of non-empty "
                        "lists of ids (one per row)")
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"private_input_ids must be a (batch, length) integer tensor, got {tuple(ids.shape)} {ids.dtype}")
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but private_input_ids has {tuple(ids.shape)}")
    mask = mask.long()
    if bool(((mask != 0) & (mask != 1)).any()) or bool((mask.sum(1) == 0).any()):
        raise ValueError("attention_mask must hold 0s and 1s with at least one 1 per row")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("private_input_ids must be left padded (attention_mask 0...0 1...1 per row); "
                         "tokenize with padding_side='left'")
    vocab = int(slm.get_output_embeddings().weight.shape[0])
    live = ids[mask.bool()]
    if bool(((live < 0) | (live >= vocab)).any()):
        raise ValueError(f"private_input_ids holds ids outside the SLM's vocabulary [0, {vocab})")
    return ids.long().to(device), mask.to(device)


def _public_rows(public_prompt: Any, batch: int) -> list[Any]:
    if isinstance(public_prompt, Tensor):
        public_prompt = public_prompt.tolist()
    if isinstance(public_prompt, str) or (isinstance(public_prompt, Sequence) and public_prompt
                                          and all(isinstance(i, int) for i in public_prompt)):
        return [public_prompt] * batch
    if isinstance(public_prompt, Sequence) and len(public_prompt) == batch:
        return list(public_prompt)
    raise ValueError(f"public_prompt must be one prompt (text or LLM token ids) for every row, or a list of "
                     f"{batch} (one per row of private_input_ids)")


def _check_number(name: str, value: Any, low: float, high: float = float("inf")) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} must be a number in [{low}, {high}]")
    return float(value)


def _check_int(name: str, value: Any, low: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low} ({fix})")
    return value


# ------------------------------------------------------------------------- the loop
class GeneratedRows:
    """The generated tokens, α and stop reason of each row."""

    def __init__(self, batch: int, max_new_tokens: int, eos: frozenset[int]):
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.alpha: list[list[float]] = [[] for _ in range(batch)]
        self.stopped: list[str | None] = [None] * batch
        self.max_new_tokens, self.eos = max_new_tokens, eos
        self.first_token_at: float | None = None

    def running(self, r: int) -> bool:
        return self.stopped[r] is None

    def add(self, r: int, tokens: list[int], alpha: list[float]) -> int:
        """Append what row ``r`` may still take of ``tokens``; returns how many were taken."""
        taken = 0
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        for token, a in zip(tokens, alpha):
            self.tokens[r].append(token)
            self.alpha[r].append(a)
            taken += 1
            if token in self.eos:
                self.stopped[r] = "eos"
                break
            if len(self.tokens[r]) == self.max_new_tokens:
                self.stopped[r] = "length"
                break
        return taken

    def done(self) -> bool:
        return all(s is not None for s in self.stopped)


class TokenChooser:
    """Token choice as :func:`logitfuse.fuse_sample` makes it, from explicit ``generator`` draws."""

    def __init__(self, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None):
        self.greedy = temperature == 0
        self.generator = generator
        self.settings = (temperature, top_k, top_p)

    def warp(self, rows: int) -> dict[str, Tensor]:
        temperature, top_k, top_p = self.settings
        return dict(temperature=torch.full((rows,), temperature), top_k=torch.full((rows,), top_k),
                    top_p=torch.full((rows,), top_p))

    def uniform(self, batch: int) -> Tensor:
        return torch.rand(batch, generator=self.generator)

    def choose(self, logprobs: Tensor) -> Tensor:
        """One token per row ``(B,)`` from log-probabilities ``(B, V)``."""
        if self.greedy:
            return logprobs.argmax(dim=-1)
        rows = logprobs.shape[0]
        return sample_from_logprobs(logprobs.cpu(), self.uniform(rows), **self.warp(rows)).to(logprobs.device)

    def probs(self, logprobs: Tensor) -> Tensor:
        """The normalized distribution ``(B, V)`` that :meth:`choose` draws from."""
        weights = sampling_weights(logprobs.cpu(), **self.warp(logprobs.shape[0]))
        return weights / weights.sum(dim=-1, keepdim=True)


def _per_step(slm: SLMCache | LlamaCppCache, session: FusionSession, rows: GeneratedRows, chooser: TokenChooser,
              start: Callable[[], None], pad_id: int, overlap: bool, penalty: RepetitionPenalty,
              capture: HiddenStateCapture | None) -> None:
    """Per-step fusion (``start`` starts the session's rows). With ``overlap`` the LLM's request for the
    next position runs in a thread while the SLM computes its forward for it (and the LLM's prefill
    while the SLM's runs). ``penalty`` acts on the SLM's logits before the session fuses them;
    ``capture`` (a head reading the SLM's hidden state) holds the hidden state of the forward that
    made them."""
    batch, device = slm.batch_size, slm.device
    appended: list[list[int]] = [[] for _ in range(batch)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="logitfuse-llm") as pool:

        def first_request():
            start()
            return session.request(appended)

        if overlap:
            request = pool.submit(first_request)
            logits = slm.prefill()
            request = request.result()
        else:
            start()
            logits = slm.prefill()
        while True:
            logits = penalty(logits)
            hidden = None if capture is None else capture.latest
            if overlap:
                fused = session.complete(request, logits, slm_hidden=hidden)
            else:
                fused = session.step(appended, logits, slm_hidden=hidden)
            alpha = session.alpha_history[-1].tolist()
            tokens = chooser.choose(fused).tolist()
            appended = [[] for _ in range(batch)]
            for r in range(batch):
                if rows.running(r):
                    rows.add(r, [tokens[r]], [alpha[r]])
                    appended[r] = [tokens[r]]
                else:
                    tokens[r] = pad_id
            if rows.done():
                return
            penalty.mark([[t] for t in tokens])  # finished rows see padding, as in slm.generate
            fed = torch.tensor(tokens, device=device)
            if overlap:
                request = pool.submit(session.request, appended)
                logits = slm.append(fed)
                request = request.result()
            else:
                logits = slm.append(fed)


def _hidden_state_capture(head: Any, slm: Any) -> HiddenStateCapture | None:
    """The hook that gives a head reading the SLM's last hidden state its input, from the SLM's own
    forwards (``None`` for other heads); refused on llama.cpp, which does not expose it."""
    if not getattr(head, "needs_slm_hidden", False):
        return None
    if isinstance(slm, LlamaCppSLM):
        raise ValueError(f"this head reads the SLM's last hidden state (slm_features {head.slm_features}), which the "
                         "llama.cpp SLM does not expose; use a head without the 'hidden' group (logitfuse train "
                         "--slm-features token,position) or the transformers SLM")
    return HiddenStateCapture.for_head(slm, head)


# ------------------------------------------------------------------------- public entry point
def generate(slm: Any, llm: Any, private_input_ids: Any, public_prompt: Any, *, max_new_tokens: int,
             head: Any = None, alpha: float | None = None, vocab_map: Any = None, mode: str | None = None,
             tail: str | None = None, schedule: Any = "always", temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, generator: torch.Generator | None = None, speculate: int = 0, overlap: bool = True,
             eos_token_id: Any = None, attention_mask: Any = None, slm_tokenizer: Any = None,
             apply_chat_template: bool = False, pad_token_id: int | None = None,
             repetition_penalty: float = 1.0) -> FusedGeneration:
    r"""Fused generation with our own decode loop over the SLM's KV cache (see the module docstring).

    Args:
        slm: a transformers causal LM (the on-device model), in eval mode, or a
            :class:`logitfuse.LlamaCppSLM` (one row; its end-of-generation ids and ``tokenizer`` are the
            defaults of ``eos_token_id`` and ``slm_tokenizer``). It alone reads ``private_input_ids``.
        llm (`LLMBackend`): the LLM side (:class:`logitfuse.HFLLM`, :class:`logitfuse.OpenAICompatibleLLM`).
        private_input_ids: ``(batch, length)`` SLM token ids, left padded (with ``attention_mask``),
            or a list of id lists (left padded here).
        public_prompt: what the LLM may see: one prompt (text or LLM ids) for all rows, or one per row.
        max_new_tokens (`int`): tokens to generate at most per row.
        head, alpha, vocab_map, mode, tail, schedule, slm_tokenizer, apply_chat_template: as
            :class:`logitfuse.FusionSession` (exactly one of ``head`` and ``alpha``). A head with SLM-side
            features gets them here: the hidden state of each step's own SLM forward (a hook on the
            output layer, :class:`~logitfuse.heads.slm_side.HiddenStateCapture`, removed at the end; not on
            llama.cpp), the last token and the position; not with ``speculate`` (``ValueError``).
        temperature (`float`, defaults to 0): 0 is greedy; else sample with ``top_k`` (0 = off) then
            ``top_p`` (1 = off) on the fused distribution, by :func:`logitfuse.fuse_sample`'s rules.
        generator (`torch.Generator`, *optional*): the sampling draws (the same state, the same tokens).
        speculate (`int`, defaults to 0): draft this many SLM tokens per LLM call (exact speculative
            fusion). Needs ``schedule="always"`` and a head without SLM-side features (otherwise
            ``ValueError`` before anything is sent); speculates where both sides share one tokenizer
            (an identity map) and the backend scores drafts (``supports_score``:
            :class:`logitfuse.HFLLM`; :class:`logitfuse.OpenAICompatibleLLM` where the server returns
            prompt log-probabilities); otherwise it fuses per step, warns once and counts
            ``stats.speculation_fallbacks``.
            With ``alpha=1`` (the SLM alone, the LLM never asked) there is nothing to speculate on.
            Rejected drafts are seen by the LLM: opt-in, counted in :attr:`FusedGeneration.stats`.
        overlap (`bool`, defaults to `True`): per-step fusion issues the LLM's request for a position
            (in a thread) as soon as the token before it is chosen, and runs the SLM's forward for that
            position meanwhile, so a step costs about max(SLM, LLM) instead of their sum (the same
            tokens, requests and statistics as without). Not with ``speculate`` (the LLM's call needs
            the draft) nor with ``schedule="entropy_gate(h)"`` or ``"head_gate(tau)"`` (whether to call
            needs the SLM's logits): there the two run one after the other.
        eos_token_id (`int` or `list[int]`, *optional*): SLM ids that end a row (kept in its output).
        attention_mask: with a tensor ``private_input_ids``: 1 for real tokens, 0 for left padding.
        pad_token_id (`int`, *optional*): fed to the SLM for finished rows; default the SLM config's, or 0.
        repetition_penalty (`float`, defaults to 1): transformers' rule on the SLM's logits before fusion,
            where ``slm.generate(..., repetition_penalty=...)`` applies it ahead of the fusion processor
            (a seen token's positive logit divided by it, a negative one multiplied; seen: the row's
            prompt and its generated tokens), so greedy output is the processor path's at the same
            penalty. Exact with ``speculate`` too (drafts and targets read the same penalized logits).

    Returns:
        :class:`FusedGeneration` (ids per row, α per token, the session's statistics, why each row stopped).
    """
    started = time.perf_counter()
    if not isinstance(overlap, bool):
        raise TypeError(f"overlap must be True or False, got {overlap!r}")
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1, "tokens to generate per row")
    speculate = _check_int("speculate", speculate, 0, "draft tokens per LLM call; 0 = per-step fusion")
    temperature = _check_number("temperature", temperature, 0.0)
    top_p = _check_number("top_p", top_p, 0.0, 1.0)
    if top_p == 0.0:
        raise ValueError("top_p=0 keeps no token; pass a number in (0, 1] (1 = off)")
    top_k = _check_int("top_k", top_k, 0, "0 = off")
    penalty = _check_number("repetition_penalty", repetition_penalty, 0.0)
    if penalty == 0.0:
        raise ValueError("repetition_penalty=0 divides by zero; pass a number > 0 (1 = off, 1.1 is usual)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if pad_token_id is None:
        pad_token_id = getattr(slm.config, "pad_token_id", None) if hasattr(slm, "config") else None
    pad_id = int(pad_token_id) if pad_token_id is not None else 0
    if isinstance(slm, LlamaCppSLM):  # one row in llama.cpp; its own end-of-generation ids and tokenizer
        cache = slm.decode_cache(private_input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask)
        ids, mask, v_slm = cache.ids, cache.mask, slm.vocab_size
        eos_token_id = sorted(slm.eos_token_ids) if eos_token_id is None else eos_token_id
        slm_tokenizer = slm.tokenizer if slm_tokenizer is None else slm_tokenizer
    else:
        ids, mask = _check_private(slm, private_input_ids, attention_mask, pad_id)
        cache, v_slm = SLMCache(slm, ids, mask), int(slm.get_output_embeddings().weight.shape[0])
    batch = ids.shape[0]
    session = FusionSession(llm, head=head, alpha=alpha, vocab_map=vocab_map, mode=mode, tail=tail, schedule=schedule,
                            slm_tokenizer=slm_tokenizer, eos_token_id=eos_token_id,
                            apply_chat_template=apply_chat_template)
    speculating = bool(speculate) and not session.slm_only and check_speculation(session, v_slm)
    capture = _hidden_state_capture(head, slm)
    publics = _public_rows(public_prompt, batch)
    rows = GeneratedRows(batch, max_new_tokens, session.eos_token_ids)
    chooser = TokenChooser(temperature, top_k, top_p, generator)
    penalize = RepetitionPenalty(penalty, ids, mask, v_slm)

    def start() -> None:
        session.start(publics, v_slm=v_slm)  # the LLM prefills the public prompts only

    try:
        if speculating:
            start()
            speculative_fusion(cache, session, rows, chooser, cache.prefill(), pad_id, speculate, penalize)
        else:
            # one model on both sides: its LLM forwards (in the thread) would pass the hidden-state hook too
            same_model = capture is not None and getattr(llm, "model", None) is slm
            overlap = overlap and not session.slm_only and not session.schedule.needs_entropy and not same_model
            _per_step(cache, session, rows, chooser, start, pad_id, overlap, penalize, capture)
            if speculate and not session.slm_only:  # asked for, but the backend cannot score drafts
                session.stats.speculation_fallbacks += 1
    finally:
        if capture is not None:
            capture.remove()
    return FusedGeneration(rows.tokens, rows.alpha, session.stats, list(rows.stopped),
                           rows.first_token_at - started)
