"""CoGenesis fused decoding as a transformers ``LogitsProcessor``.

The SLM generates with its private prompt; at each step the processor reads the SLM's newly
generated tokens off ``input_ids``, feeds them to the LLM backend (which only ever saw the public
prompt), and returns the fused log-probabilities in place of the SLM's scores::

    proc = CoGenesisLogitsProcessor(llm, public_prompt, alpha=0.25)
    slm.generate(**private_inputs, logits_processor=[proc])
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import torch
from transformers import LogitsProcessor

from logitfuse.backends import LLMBackend, LLMOutput
from logitfuse.functional import fuse, fuse_with_head
from logitfuse.retokenize import IncrementalRetokenizer
from logitfuse.schedules import Schedule, parse
from logitfuse.types import MODES, TAILS, TopK
from logitfuse.vocab import VocabMap

Tensor = torch.Tensor

__all__ = ["CoGenesisLogitsProcessor"]


def _is_identity(vocab_map: VocabMap) -> bool:
    """Whether every SLM id maps to itself or to nothing (the same tokenizer, maybe padded)."""
    ids = torch.arange(vocab_map.v_slm)
    return bool(((vocab_map.slm_to_llm == ids) | (vocab_map.slm_to_llm == -1)).all())


def _returns_dense(llm: LLMBackend) -> bool:
    from logitfuse.backends import OpenAICompatibleLLM

    return not isinstance(llm, OpenAICompatibleLLM)


# transformers' decoding methods that call the logits processors once per kept token, on the real
# sequence (greedy and sampling: `_sample`; beam search and beam sampling: `_beam_search`)
_SAFE_DECODING_METHODS = frozenset({"_sample", "_beam_search"})
_SAFE_GENERATION_MODES = frozenset({"greedy_search", "sample", "beam_search", "beam_sample"})


def _unsafe_generate_mode() -> str | None:
    """Why the running ``generate`` call cannot be served privately, or ``None`` when it can.

    Prompt-lookup and assisted decoding call logits processors on *candidate* tokens (copied from
    the private prompt, or drafted by an assistant model) one column at a time, before they are
    verified: read as generated tokens they would carry private text to the LLM. So the processor
    only serves the decoding methods it knows call it once per kept token. It walks the call stack
    (once per generation, before anything is sent): the first frame outside logitfuse, torch's
    ``no_grad`` wrappers and transformers' ``LogitsProcessorList`` is the decoding loop. Inside
    ``generate``, that loop must be ``_sample`` or ``_beam_search`` of
    ``transformers.generation.utils`` and ``generate``'s
    ``generation_mode`` one of greedy, sample, beam search, beam sample; anything else (assisted
    generation, prompt lookup, a ``custom_generate``, a transformers version that renamed these) is
    refused. Called outside ``generate``, the caller's loop owns the documented contract (one call per
    kept token) and is served.
    """
    frame = sys._getframe(2)
    caller = None
    inside_generate = False
    mode = None
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        name = frame.f_code.co_name
        if caller is None and not module.startswith(("logitfuse", "torch.utils._contextlib")) \
                and not (module == "transformers.generation.logits_process" and name == "__call__"):
            caller = (module, name)
        if module == "transformers.generation.utils" and name == "generate":
            inside_generate = True
            mode = frame.f_locals.get("generation_mode", mode)
        frame = frame.f_back
    if not inside_generate:
        return None
    mode_name = getattr(mode, "value", mode)
    if caller is None or caller[0] != "transformers.generation.utils" or caller[1] not in _SAFE_DECODING_METHODS:
        where = "?" if caller is None else f"{caller[0]}.{caller[1]}"
        return f"generate() called the processor from {where} (generation mode {mode_name!r})"
    if mode_name not in _SAFE_GENERATION_MODES:
        return f"generate() runs generation mode {mode_name!r}"
    return None


def _as_id_set(value: Any, name: str) -> frozenset[int]:
    if value is None:
        return frozenset()
    if isinstance(value, int) and not isinstance(value, bool):
        return frozenset([value])
    if isinstance(value, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return frozenset(value)
    raise TypeError(f"{name} must be an int, a list of ints or None, got {value!r}")


class CoGenesisLogitsProcessor(LogitsProcessor):
    r"""Fuse an LLM's next-token distribution into the SLM's at every decoding step (CoGenesis,
    [arXiv 2403.03129](https://arxiv.org/abs/2403.03129), logit-based variant).

    The SLM's ``generate`` drives decoding with the private prompt; this processor is built with the
    *public* prompt only and never sees the private one: on its first call it only records where the
    (left-padded) prompts end, and from then on it reads only the columns generated after that.
    Each step it sends the new tokens to ``llm`` (re-tokenized for the LLM when the vocabulary map is
    not the identity), gets the LLM's next-token information, computes α (a fusion head, or a fixed
    number) and returns :func:`logitfuse.fuse`'s log-probabilities over the SLM vocabulary.

    Args:
        llm (`LLMBackend`): :class:`logitfuse.HFLLM` or :class:`logitfuse.OpenAICompatibleLLM`.
        public_prompt (`str`, `list[str]`, `list[int]` or `list[list[int]]`): what the LLM may see:
            one prompt for all rows, or one per row; text or LLM token ids.
        head (`FusionHead`, *optional*): predicts α per row; exclusive with ``alpha``.
        alpha (`float`, *optional*): fixed SLM weight in ``[0, 1]`` (1 = SLM only); exclusive with ``head``.
        vocab_map (`VocabMap`, *optional*): SLM id -> LLM id; default the identity. A map that is not
            the identity turns on cross-tokenizer decoding and needs ``slm_tokenizer``.
        mode (`str`, *optional*): ``"linear"``, ``"geometric"`` or ``"logit"``; default the head's
            mode, or ``"linear"`` with a fixed ``alpha``.
        tail (`str`, *optional*): where a top-k LLM's missing mass goes; default the head's tail, or
            ``"slm"``.
        schedule (`str` or `Schedule`, defaults to ``"always"``): ``"always"``,
            ``"periodic(P, K, T)"`` or ``"entropy_gate(h)"``; steps without an LLM call use the SLM.
        slm_tokenizer (*optional*): the SLM's tokenizer (needed for cross-tokenizer decoding; its
            ``eos_token_id`` is the default for ``eos_token_id``).
        eos_token_id (`int` or `list[int]`, *optional*): SLM ids that end a row; after one, the row
            is not advanced on the LLM any more (transformers pads finished rows).
        apply_chat_template (`bool`, defaults to `False`): format a text ``public_prompt`` with the
            LLM tokenizer's chat template (one user message, generation prompt added).
        lookbehind (`int`, defaults to 4): LLM tokens re-encoded each step in cross-tokenizer mode.
        slm_temperature, llm_temperature (`float`, default 1.0): passed to :func:`logitfuse.fuse`.

    Generation modes that call logits processors on unverified candidate tokens, prompt lookup
    (``prompt_lookup_num_tokens``) and assisted decoding (``assistant_model``), are refused with a
    ``ValueError`` on the first call, before anything reaches the LLM: their candidates are not
    generated tokens (prompt lookup copies them from the private prompt). A fixed ``alpha=1`` (the
    SLM alone) never contacts the LLM.

    Beam search (``num_beams > 1``) and ``num_return_sequences > 1`` work: each input row's public
    prompt is repeated for its beams, and when beam search reorders its beams the processor finds
    each row's former row by its public prompt and generated history and reorders the LLM's state
    the same way (a backend's ``reorder``; counted in ``stats["reorders"]``).

    The state is explicit: :meth:`reset` before reusing one instance for another ``generate`` call
    (a call whose ``input_ids`` do not continue the previous step's raises ``ValueError`` before
    reading anything). :attr:`stats` counts ``steps``, ``llm_calls`` (backend requests),
    ``llm_row_calls`` (rows consulted), ``saved_calls`` (row steps the schedule skipped),
    ``fallbacks`` (rows whose LLM request failed and used the SLM alone), ``llm_tokens`` (tokens fed),
    ``rollbacks`` (LLM tokens re-tokenized away), ``unmapped_tokens`` (with an identity map, generated
    ids beyond the LLM's vocabulary, e.g. embedding padding, which the LLM cannot be given) and
    ``reorders``. :attr:`alpha_history` holds the α of each step, ``(batch,)`` tensors (1 where the
    SLM decided alone). Tokens that an earlier logits processor set to ``-inf`` (``bad_words_ids``,
    ``min_new_tokens``...) stay at ``-inf`` after fusion.

    Example (offline: two tiny random models with one tokenizer):

    >>> import sys; sys.path.insert(0, "tests")
    >>> from tiny_models import byte_level_tokenizer, tiny_llama
    >>> import logitfuse
    >>> tok = byte_level_tokenizer()
    >>> slm, llm = tiny_llama(len(tok), seed=0), logitfuse.HFLLM(tiny_llama(len(tok), seed=1), tok)
    >>> private = tok(["Martin sells houses on Maple Drive. Write an invitation:"], return_tensors="pt")
    >>> proc = logitfuse.CoGenesisLogitsProcessor(llm, "Write an invitation:", alpha=0.5)
    >>> out = slm.generate(**private, logits_processor=[proc], max_new_tokens=5, do_sample=False, pad_token_id=0)
    >>> proc.stats["steps"], proc.stats["llm_calls"]
    (5, 5)
    """

    def __init__(self, llm: LLMBackend, public_prompt: Any, *, head: Any = None, alpha: float | None = None,
                 vocab_map: VocabMap | None = None, mode: str | None = None, tail: str | None = None,
                 schedule: str | Schedule = "always", slm_tokenizer: Any = None, eos_token_id: Any = None,
                 apply_chat_template: bool = False, lookbehind: int = 4, slm_temperature: float = 1.0,
                 llm_temperature: float = 1.0):
        if not isinstance(llm, LLMBackend):
            raise TypeError(f"llm must be a logitfuse LLM backend (HFLLM, OpenAICompatibleLLM), got {type(llm).__name__}")
        if (head is None) == (alpha is None):
            raise ValueError("pass exactly one of head= (a FusionHead predicting α per row) or alpha= (a fixed float in [0, 1])")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha={alpha!r} must be a float in [0, 1] (1 = SLM only, 0 = LLM only)")
        # with a head, its own setting is the default; without one, linear mode and the SLM-shaped tail
        mode = mode if mode is not None else (getattr(head, "mode", None) or "linear")
        tail = tail if tail is not None else (getattr(head, "tail", None) or "slm")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}")
        if tail not in TAILS:
            raise ValueError(f"tail={tail!r} is not one of {TAILS}")
        if vocab_map is not None and not isinstance(vocab_map, VocabMap):
            raise TypeError(f"vocab_map must be a logitfuse.VocabMap or None, got {type(vocab_map).__name__}")
        if vocab_map is not None and vocab_map.v_llm != llm.vocab_size:
            raise ValueError(
                f"vocab_map was built for v_llm={vocab_map.v_llm} but the LLM has vocab_size={llm.vocab_size}; "
                "build the map for this LLM (VocabMap.identity or VocabMap.from_tokenizers)"
            )
        if head is not None:
            if not callable(head) or not hasattr(head, "check_compatible"):
                raise TypeError(f"head must be a logitfuse.FusionHead or PaperFusionHead, got {type(head).__name__}")
            head.check_compatible(vocab_map=vocab_map, v_llm=llm.vocab_size, mode=mode, tail=tail)
        for name, value in (("slm_temperature", slm_temperature), ("llm_temperature", llm_temperature)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}={value!r} must be a positive number")
        if not isinstance(lookbehind, int) or isinstance(lookbehind, bool) or lookbehind < 0:
            raise ValueError(f"lookbehind={lookbehind!r} must be an int >= 0 (LLM tokens re-encoded each step)")
        if llm_temperature != 1.0 and not _returns_dense(llm):
            raise ValueError(f"llm_temperature={llm_temperature!r} needs dense LLM logits; {type(llm).__name__} "
                             "returns top-k log-probabilities (ask the server for that temperature instead)")
        if vocab_map is None and slm_tokenizer is not None and llm.tokenizer is not None \
                and slm_tokenizer is not llm.tokenizer and slm_tokenizer.get_vocab() != llm.tokenizer.get_vocab():
            raise ValueError("slm_tokenizer and the LLM's tokenizer differ but vocab_map is None (the identity); pass "
                             "vocab_map=logitfuse.VocabMap.from_tokenizers(slm_tokenizer, llm_tokenizer)")
        self.cross_tokenizer = vocab_map is not None and not _is_identity(vocab_map)
        if self.cross_tokenizer:
            if slm_tokenizer is None:
                raise ValueError("vocab_map is not the identity (two tokenizers): pass slm_tokenizer= so the "
                                 "generated text can be re-tokenized for the LLM")
            if llm.tokenizer is None:
                raise ValueError("vocab_map is not the identity (two tokenizers): the LLM backend needs tokenizer=")
        texts = [public_prompt] if isinstance(public_prompt, str) else list(public_prompt) \
            if isinstance(public_prompt, (list, tuple)) else []
        if llm.tokenizer is None and any(isinstance(p, str) for p in texts):
            raise ValueError(f"public_prompt is text but {type(llm).__name__} has no tokenizer to encode it; pass "
                             "tokenizer= to the backend or give the public prompt as LLM token ids")
        if apply_chat_template and llm.tokenizer is None:
            raise ValueError("apply_chat_template=True needs the LLM backend's tokenizer (pass tokenizer= to the backend)")
        self.llm, self.head, self.alpha = llm, head, alpha
        self.vocab_map, self.mode, self.tail = vocab_map, mode, tail
        self.schedule = parse(schedule)
        self.slm_tokenizer = slm_tokenizer
        if eos_token_id is None and slm_tokenizer is not None:
            eos_token_id = getattr(slm_tokenizer, "eos_token_id", None)
        self.eos_token_ids = _as_id_set(eos_token_id, "eos_token_id")
        self.lookbehind = lookbehind
        self.slm_temperature, self.llm_temperature = float(slm_temperature), float(llm_temperature)
        self.public_prompts = self._format_prompts(public_prompt, apply_chat_template)
        self.reset()

    # ------------------------------------------------------------------ state
    def _format_prompts(self, public_prompt: Any, apply_chat_template: bool) -> list[Any] | Any:
        if isinstance(public_prompt, str):
            prompts: Any = public_prompt
        elif isinstance(public_prompt, Tensor):
            prompts = public_prompt.tolist()
        elif isinstance(public_prompt, Sequence) and public_prompt:
            prompts = list(public_prompt)
        else:
            raise TypeError("public_prompt must be a str, a list of str (one per row), or LLM token ids")
        if apply_chat_template:
            tok = self.llm.tokenizer

            def fmt(text: Any) -> list[int]:
                if not isinstance(text, str):
                    raise TypeError("apply_chat_template=True needs text public prompts")
                ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
                if hasattr(ids, "keys") and "input_ids" in ids:  # transformers 5 returns a BatchEncoding
                    ids = ids["input_ids"]
                return [int(i) for i in ids]

            prompts = fmt(prompts) if isinstance(prompts, str) else [fmt(p) for p in prompts]
        return prompts

    def _rows_of_prompts(self, batch: int) -> list[Any]:
        prompts = self.public_prompts
        if isinstance(prompts, str) or (prompts and all(isinstance(i, int) for i in prompts)):
            return [prompts] * batch  # one prompt for every row
        if batch % len(prompts):
            raise ValueError(
                f"input_ids has {batch} rows but {len(prompts)} public prompts were given; pass one public "
                "prompt per input row (or a single one for all)"
            )
        # generate() expands each input row num_beams (or num_return_sequences) times, consecutively
        repeat = batch // len(prompts)
        return [prompt for prompt in prompts for _ in range(repeat)]

    def _follow_reordering(self, history: Tensor) -> None:
        """Rows' generated histories changed since the last call: beam search reordered its beams.
        Find each row's former row (the one with the same history) and reorder every per-row state."""
        # rows with the same public prompt and the same generated history have identical states
        former: dict[tuple[Any, tuple[int, ...]], int] = {}
        for s, row in enumerate(self._history.tolist()):
            former.setdefault((self._row_keys[s], tuple(row)), s)
        order = [former.get((self._row_keys[r], tuple(row))) for r, row in enumerate(history.tolist())]
        if any(s is None for s in order):
            raise ValueError(
                "the generated tokens in input_ids are not a continuation of the previous step's (a new "
                "generation?); call reset() before reusing the processor"
            )
        self.llm.reorder(order)
        self._pending = [list(self._pending[s]) for s in order]
        self._rollback = [self._rollback[s] for s in order]
        self._finished = [self._finished[s] for s in order]
        self._row_keys = [self._row_keys[s] for s in order]
        if self._retok is not None:
            self._retok.reorder(order)
        self.stats["reorders"] += 1

    def reset(self) -> None:
        """Forget the current generation (and the statistics); the next call starts a new one."""
        self._prompt_len: int | None = None
        self._seen = 0
        self._step = 0
        self._history: Tensor | None = None
        self._finished: list[bool] = []
        self._pending: list[list[int]] = []
        self._rollback: list[int] = []
        self._llm_out: LLMOutput | None = None
        self._retok: IncrementalRetokenizer | None = None
        self._row_keys: list[Any] = []
        self._map: list[int] = []
        self._vocab_map: VocabMap | None = self.vocab_map
        self.alpha_history: list[Tensor] = []  # α used per step, (batch,) on CPU; 1 = SLM alone
        self.stats = {"steps": 0, "llm_calls": 0, "llm_row_calls": 0, "saved_calls": 0, "fallbacks": 0,
                      "llm_tokens": 0, "rollbacks": 0, "unmapped_tokens": 0, "reorders": 0}

    def _begin(self, input_ids: Tensor, scores: Tensor) -> None:
        unsafe = _unsafe_generate_mode()
        if unsafe is not None:
            raise ValueError(
                f"CoGenesisLogitsProcessor refused before anything was sent: {unsafe}. Prompt-lookup "
                "(prompt_lookup_num_tokens) and assisted decoding (assistant_model) call logits processors on "
                "candidate tokens that are not generated and kept yet (prompt lookup copies them from the private "
                "prompt), so they could reach the LLM; use greedy decoding, sampling or beam search"
            )
        batch = input_ids.shape[0]
        rows = self._rows_of_prompts(batch)
        if self._vocab_map is None:
            self._vocab_map = VocabMap.identity(scores.shape[1], self.llm.vocab_size)
        elif self._vocab_map.v_slm != scores.shape[1]:
            raise ValueError(
                f"the SLM's scores have vocabulary size {scores.shape[1]} but vocab_map was built for "
                f"v_slm={self._vocab_map.v_slm}; build the map for this SLM"
            )
        retok = None
        if self.cross_tokenizer:
            retok = IncrementalRetokenizer(self.slm_tokenizer, self.llm.tokenizer, batch_size=batch,
                                           lookbehind=self.lookbehind)
        self.llm.start(rows)  # may raise (an empty prompt...): then nothing below has changed
        self._retok = retok
        self._row_keys = [p if isinstance(p, str) else tuple(p) for p in rows]
        self._map = self._vocab_map.slm_to_llm.tolist()
        self._prompt_len = self._seen = input_ids.shape[1]
        self._finished = [False] * batch
        self._pending = [[] for _ in range(batch)]
        self._rollback = [0] * batch

    # ------------------------------------------------------------------ reading input_ids
    def _read_new_tokens(self, input_ids: Tensor) -> None:
        batch, width = input_ids.shape
        if batch != len(self._finished):
            raise ValueError(
                f"input_ids has {batch} rows but this generation started with {len(self._finished)}; "
                "call reset() before reusing the processor"
            )
        if width != self._seen + 1:
            # generate() adds exactly one column per call; anything else is another generation, and
            # reading its columns could mistake private prompt tokens for generated ones
            raise ValueError(
                f"input_ids has {width} columns, expected {self._seen + 1} (one more than at the previous step): "
                "a new generation? call reset() first (assisted/speculative decoding is not supported)"
            )
        if self._history is not None:
            history = input_ids[:, self._prompt_len:self._prompt_len + self._history.shape[1]].detach().cpu()
            if not torch.equal(history, self._history):
                self._follow_reordering(history)
        new = input_ids[:, self._seen:].tolist()
        self._history = input_ids[:, self._prompt_len:].detach().cpu()
        self._seen = width
        for r, tokens in enumerate(new):
            for token in tokens:
                if self._finished[r]:
                    break
                if token in self.eos_token_ids:
                    self._finished[r] = True
                    break
                if self._retok is not None:
                    rollback, llm_ids = self._retok.push(r, [token])
                    if rollback:
                        self.stats["rollbacks"] += rollback
                        from_pending = min(rollback, len(self._pending[r]))
                        if from_pending:
                            del self._pending[r][-from_pending:]
                        self._rollback[r] += rollback - from_pending
                    self._pending[r].extend(llm_ids)
                else:
                    mapped = self._map[token] if 0 <= token < len(self._map) else -1
                    # identity map: same ids; an id the LLM lacks (vocabulary padding) is skipped
                    if mapped >= 0:
                        self._pending[r].append(mapped)
                    else:
                        self.stats["unmapped_tokens"] += 1

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch = scores.shape[0]
        slm_logprobs = torch.log_softmax(scores.float() / self.slm_temperature, dim=-1)
        if self.alpha == 1.0:  # the SLM alone: the LLM's answer would get weight 0, so never ask it
            self.stats["steps"] += 1
            self.alpha_history.append(torch.ones(batch))
            return slm_logprobs
        if self._prompt_len is None:
            self._begin(input_ids, scores)
        else:
            self._read_new_tokens(input_ids)
        self.stats["steps"] += 1
        device = scores.device
        step = self._step
        self._step += 1

        entropy = None
        if self.schedule.needs_entropy:
            probs = slm_logprobs.exp()
            entropy = -torch.where(probs > 0, probs * slm_logprobs, 0.0).sum(-1)
        wanted = torch.as_tensor(self.schedule.should_call(step, entropy), dtype=torch.bool, device=device)
        wanted = wanted.expand(batch).clone()
        active = torch.tensor([not f for f in self._finished], device=device)
        call = wanted & active
        self.stats["saved_calls"] += int((~wanted & active).sum())
        if not bool(call.any()):
            self.alpha_history.append(torch.ones(batch))
            return slm_logprobs

        if any(self._rollback):
            self.llm.rollback(self._rollback)
            self._rollback = [0] * batch
        pending, self._pending = self._pending, [[] for _ in range(batch)]
        self.stats["llm_tokens"] += sum(len(p) for p in pending)
        out = self.llm.advance(pending, need=call.tolist())
        self.stats["llm_calls"] += 1
        self.stats["llm_row_calls"] += int(call.sum())
        ok = out.ok.to(device) & call
        self.stats["fallbacks"] += int((call & ~ok).sum())
        if not bool(ok.any()):
            self.alpha_history.append(torch.ones(batch))
            return slm_logprobs

        llm_next = out.next
        if isinstance(llm_next, TopK):
            llm_next = TopK(llm_next.ids.to(device), llm_next.logprobs.to(device))
        else:
            llm_next = llm_next.to(device)
        options = dict(vocab_map=self._vocab_map, mode=self.mode, tail=self.tail, slm_temperature=self.slm_temperature,
                       llm_temperature=self.llm_temperature, validate=False)
        if self.head is not None:
            # rows whose LLM call failed are replaced by the SLM's row below, whatever their α
            alpha, fused = fuse_with_head(scores, llm_next, self.head, **options)
        else:
            alpha = torch.full((batch,), float(self.alpha), device=device)
            fused = fuse(scores, llm_next, alpha=alpha, **options)
        self.alpha_history.append(torch.where(ok, alpha.float(), 1.0).cpu())
        # a token an earlier processor banned (-inf: bad words, min_new_tokens' EOS...) stays banned,
        # even where the LLM would give it mass
        banned = scores == float("-inf")
        if bool(banned.any()):
            fused = torch.log_softmax(fused.masked_fill(banned, float("-inf")), dim=-1)
        return torch.where(ok[:, None], fused, slm_logprobs)

    # ------------------------------------------------------------------ inspection
    def llm_token_ids(self, row: int) -> list[int] | None:
        """Cross-tokenizer mode: the row's generated text as LLM token ids so far (else ``None``)."""
        return None if self._retok is None else self._retok.llm_ids(row)

    def generated_text(self, row: int) -> str | None:
        """Cross-tokenizer mode: the row's generated text the LLM has been given (else ``None``)."""
        return None if self._retok is None else self._retok.text(row)

    def __repr__(self) -> str:
        weight = f"head={type(self.head).__name__}" if self.head is not None else f"alpha={self.alpha}"
        return f"CoGenesisLogitsProcessor(llm={self.llm!r}, {weight}, mode={self.mode!r}, schedule={self.schedule.spec!r})"

