"""CoGenesis fused decoding as a transformers ``LogitsProcessor``: an adapter over
:class:`logitfuse.FusionSession`. It turns ``input_ids`` into the tokens each row kept (and beam
reorders); the session does the rest. :func:`logitfuse.generate` is the fast path (its own loop,
the LLM's request overlapping the SLM's forward); this is for ``slm.generate`` users."""

from __future__ import annotations

from collections.abc import Mapping, Sized
from typing import Any

import torch
from transformers import LogitsProcessor

from logitfuse.backends import LLMBackend
from logitfuse.config import FUSION_FIELDS, FusionConfig, split_options
from logitfuse.decoding.checks import public_rows
from logitfuse.decoding.guard import check_transformers, refuse_unsafe_generation
from logitfuse.decoding.rule_session import RuleSession, rule_inputs
from logitfuse.decoding.session import FusionSession, SessionStats
from logitfuse.heads.slm_side import HiddenStateCapture

Tensor = torch.Tensor

__all__ = ["CoGenesisLogitsProcessor"]


class CoGenesisLogitsProcessor(LogitsProcessor):
    r"""Fuse an LLM's next-token distribution into the SLM's at every step of ``slm.generate``
    (CoGenesis, [arXiv 2403.03129](https://arxiv.org/abs/2403.03129), logit-based variant).

    Built with the *public* prompt only: on its first call it records where the (left-padded)
    prompts end and from then on reads only the columns generated after them, hands each row's new
    token and the SLM's scores to :attr:`session` (a :class:`logitfuse.FusionSession`: the LLM's
    state, schedule, α, fusion, :attr:`stats`, :attr:`alpha_history`) and returns the fused
    log-probabilities over the SLM vocabulary.

    Args:
        llm (`LLMBackend`): :class:`logitfuse.HFLLM` or :class:`logitfuse.OpenAICompatibleLLM`. With a fusion
            ``rule``: one backend (the input ``"llm"``) or a dict of every input the rule reads besides
            ``"slm"`` (the model that generates), by name. The processor never sees the private prompt apart
            from ``input_ids``, so an input that reads the private prompt is refused here: use
            :func:`logitfuse.generate` for those.
        public_prompt (`str`, `list[str]`, `list[int]` or `list[list[int]]`): what the LLM may see:
            one prompt for all rows, or one per input row; text or LLM token ids.
        fusion (`FusionConfig`, *optional*): α or head, vocabulary map, mode, tail, schedule, or a fusion
            ``rule`` (:mod:`logitfuse.rules`); ``speculate`` must be 0 and ``overlap`` does not apply (the
            processor steps synchronously).
        slm (*optional*): the model that generates, for a head reading the SLM's last hidden state: a
            forward hook (:class:`~logitfuse.heads.slm_side.HiddenStateCapture`) takes it from each
            step's own forward; :meth:`close` removes it.
        slm_tokenizer, eos_token_id: as :class:`logitfuse.FusionSession` (the SLM's tokenizer, for
            cross-tokenizer decoding; the SLM ids that end a row, default the tokenizer's).
        **options: keyword sugar for ``fusion``'s fields (``alpha=0.5, mode="linear"``).

    Only greedy decoding, sampling and beam search are served (:mod:`logitfuse.decoding.guard`):
    prompt lookup and assisted decoding call processors on unverified candidates, so they are refused
    with a ``ValueError`` before anything reaches the LLM; an unknown transformers version is refused
    when the processor is made. Beam search and ``num_return_sequences`` work: the LLM's state follows
    the beams' reorders (``stats["reorders"]``). A fixed ``alpha=1`` never contacts the LLM.
    :meth:`reset` before reusing one instance for another ``generate`` call.

    >>> from logitfuse.testing import byte_level_tokenizer, tiny_llama
    >>> import logitfuse
    >>> tok = byte_level_tokenizer()
    >>> slm, llm = tiny_llama(len(tok), seed=0), logitfuse.HFLLM(tiny_llama(len(tok), seed=1), tok)
    >>> private = tok(["Martin sells houses on Maple Drive. Write an invitation:"], return_tensors="pt",
    ...               return_token_type_ids=False)
    >>> proc = logitfuse.CoGenesisLogitsProcessor(llm, "Write an invitation:", alpha=0.5)
    >>> out = slm.generate(**private, logits_processor=[proc], max_new_tokens=5, do_sample=False, pad_token_id=0)
    >>> proc.stats["steps"], proc.stats["llm_calls"], len(proc.alpha_history)
    (5, 5, 5)
    >>> logitfuse.CoGenesisLogitsProcessor(llm, "Hi", logitfuse.FusionConfig(alpha=0.5), mode="geometric").fusion
    FusionConfig(alpha=0.5, mode='geometric')

    A fusion rule, here context steering (the LLM steered by the SLM's with-context minus without-context
    difference; the SLM over the public prompt is an on-device input):

    >>> inputs = {"llm": llm, "slm_public": logitfuse.rules.Input(logitfuse.HFLLM(slm, tok), on_device=True)}
    >>> steer = logitfuse.CoGenesisLogitsProcessor(inputs, "Write an invitation:", rule="steer(0.5)")
    >>> out = slm.generate(**private, logits_processor=[steer], max_new_tokens=5, do_sample=False, pad_token_id=0)
    >>> steer.stats["llm_calls"]  # both inputs, at each of the 5 steps
    10
    """

    def __init__(self, llm: LLMBackend | Mapping[str, Any] | None, public_prompt: Any, fusion: FusionConfig | None = None,
                 *, slm: Any = None, slm_tokenizer: Any = None, eos_token_id: Any = None, **options: Any):
        check_transformers()
        fusion, _ = split_options(type(self).__name__, fusion, None, options, allow=FUSION_FIELDS)
        self.fusion = fusion = fusion if fusion is not None else FusionConfig()  # FusionConfig() says what is missing
        if fusion.speculate:
            raise ValueError(f"speculate={fusion.speculate}: CoGenesisLogitsProcessor fuses one step per call; use "
                             "logitfuse.generate(..., speculate=K) for speculative fusion, or speculate=0")
        if fusion.uses_rule:
            self.session = RuleSession(fusion.rule, rule_inputs(fusion.rule, llm), fusion,
                                       slm_tokenizer=slm_tokenizer, eos_token_id=eos_token_id)
            if self.session.reads_private:
                raise ValueError(f"inputs {self.session.reads_private} read the private prompt, which the processor "
                                 "cannot tell apart from input_ids' padding: use logitfuse.generate(slm, inputs, ...) "
                                 "for an on-device input over the private prompt")
        elif isinstance(llm, Mapping):
            raise ValueError("llm is a dict of inputs, which a fusion rule reads: pass rule= (e.g. 'steer(0.5)'), or "
                             "one LLM backend")
        else:
            self.session = FusionSession(llm, fusion, slm_tokenizer=slm_tokenizer, eos_token_id=eos_token_id)
        try:  # one prompt for every row, else one per input row
            prompts = public_rows(public_prompt, 1)
        except ValueError:
            prompts = public_rows(public_prompt, (len(public_prompt) or 1) if isinstance(public_prompt, Sized) else 1)
        if isinstance(llm, LLMBackend) and llm.tokenizer is None and any(isinstance(p, str) for p in prompts):
            raise ValueError(f"public_prompt is text but {type(llm).__name__} has no tokenizer to encode it; pass "
                             "tokenizer= to the backend or give the public prompt as LLM token ids")
        self.public_prompts = [self.session.format_prompt(p) for p in prompts]
        self._capture = None
        if getattr(fusion.head, "needs_slm_hidden", False):
            if slm is None:
                raise ValueError(f"this head reads the SLM's last hidden state (slm_features "
                                 f"{fusion.head.slm_features}): pass slm=<the transformers model that generates>")
            self._capture = HiddenStateCapture.for_head(slm, fusion.head)
        self.reset()

    # the session's settings, for inspection
    llm = property(lambda self: self.session.llm)
    head = property(lambda self: self.session.head)
    alpha = property(lambda self: self.session.alpha)
    mode = property(lambda self: self.session.mode)
    tail = property(lambda self: self.session.tail)
    schedule = property(lambda self: self.session.schedule)
    cross_tokenizer = property(lambda self: self.session.cross_tokenizer)
    stats: SessionStats = property(lambda self: self.session.stats)  # type: ignore[assignment]

    @property
    def alpha_history(self) -> list[Tensor]:
        """The α of each step, ``(batch,)`` tensors on the CPU (1 where the SLM decided alone)."""
        return self.session.alpha_history

    def llm_token_ids(self, row: int) -> list[int] | None:
        """Cross-tokenizer mode: the row's generated text as LLM token ids so far (else ``None``)."""
        return self.session.llm_token_ids(row)

    def generated_text(self, row: int) -> str | None:
        """Cross-tokenizer mode: the row's generated text the LLM has been given (else ``None``)."""
        return self.session.generated_text(row)

    def close(self) -> None:
        """Remove the hidden-state hook from the SLM (if any); the processor cannot serve such a head after."""
        if self._capture is not None:
            self._capture.remove()

    def reset(self) -> None:
        """Forget the current generation (and the statistics); the next call starts a new one."""
        self._prompt_len: int | None = None
        self._seen, self._history, self._row_keys = 0, None, []
        self._forwards_seen = None if self._capture is None else self._capture.forwards
        self.session.reset()

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        refuse_unsafe_generation()  # every call, before anything of it is read or sent
        if self._prompt_len is None:
            self._begin(input_ids, scores)
            appended: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
        else:
            appended = self._appended(input_ids)
        return self.session.step(appended, scores, self._step_hidden(scores))

    def _begin(self, input_ids: Tensor, scores: Tensor) -> None:
        batch, prompts = input_ids.shape[0], len(self.public_prompts)
        if batch % prompts:
            raise ValueError(f"input_ids has {batch} rows but {prompts} public prompts were given; pass one public "
                             "prompt per input row (or a single one for all)")
        # generate() repeats each input row num_beams (or num_return_sequences) times, consecutively
        keys = [p for p in range(prompts) for _ in range(batch // prompts)]
        self.session.start([self.public_prompts[k] for k in keys], v_slm=scores.shape[1])
        self._row_keys, self._prompt_len, self._seen = keys, input_ids.shape[1], input_ids.shape[1]
        self._history = input_ids[:, :0].cpu()

    def _appended(self, input_ids: Tensor) -> list[list[int]]:
        """The token each row appended since the previous call (after following beam reorders)."""
        batch, width = input_ids.shape
        if batch != self.session.batch_size:
            raise ValueError(f"input_ids has {batch} rows but this generation started with {self.session.batch_size}; "
                             "call reset() before reusing the processor")
        if width != self._seen + 1:  # reading more columns could mistake private prompt tokens for generated ones
            raise ValueError(f"input_ids has {width} columns, expected {self._seen + 1} (one more than at the previous "
                             "step): a new generation? call reset() first (assisted/speculative decoding is refused)")
        generated = input_ids[:, self._prompt_len:].detach().cpu()
        if not torch.equal(generated[:, :-1], self._history):
            self._follow_reordering(generated[:, :-1])
        self._history, self._seen = generated, width
        return generated[:, -1:].tolist()

    def _follow_reordering(self, history: Tensor) -> None:
        """Beam search reordered its rows: find each row's former row (same prompt, same history)."""
        former: dict[tuple[int, tuple[int, ...]], int] = {}
        for s, row in enumerate(self._history.tolist()):
            former.setdefault((self._row_keys[s], tuple(row)), s)
        order = [former.get((self._row_keys[r], tuple(row))) for r, row in enumerate(history.tolist())]
        if any(s is None for s in order):
            raise ValueError("the generated tokens in input_ids are not a continuation of the previous step's (a new "
                             "generation?); call reset() before reusing the processor")
        self.session.reorder(order)
        self._row_keys = [self._row_keys[s] for s in order]

    def _step_hidden(self, scores: Tensor) -> Tensor | None:
        """The SLM's hidden state from the forward that made ``scores`` (``ValueError`` if none ran)."""
        if self._capture is None:
            return None
        latest = self._capture.latest
        if self._capture.forwards == self._forwards_seen or latest is None or latest.shape[0] != scores.shape[0]:
            raise ValueError("the SLM ran no forward through the hooked model since the previous step: pass slm= the "
                             "model that generates (the one whose generate() calls this processor)")
        self._forwards_seen = self._capture.forwards
        return latest

    def __repr__(self) -> str:
        if self.fusion.uses_rule:
            return f"CoGenesisLogitsProcessor(rule={self.fusion.rule.spec!r}, inputs={list(self.session.inputs)})"
        weight = f"head={type(self.head).__name__}" if self.head is not None else f"alpha={self.alpha}"
        return f"CoGenesisLogitsProcessor(llm={self.llm!r}, {weight}, mode={self.mode!r}, schedule={self.schedule.spec!r})"
