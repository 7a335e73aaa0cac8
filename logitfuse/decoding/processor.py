"""CoGenesis fused decoding as a transformers ``LogitsProcessor``.

The SLM generates with its private prompt; at each step the processor reads the SLM's newly
generated tokens off ``input_ids`` and hands them, with the SLM's scores, to a
:class:`logitfuse.FusionSession` (which feeds the LLM backend, that only ever saw the public prompt),
and returns the fused log-probabilities in place of the SLM's scores::

    proc = CoGenesisLogitsProcessor(llm, public_prompt, alpha=0.25)
    slm.generate(**private_inputs, logits_processor=[proc])

With ``stopping_criteria=proc.stopping_criteria()`` as well, the LLM's request for a position runs
in a thread while the SLM computes its forward for it (greedy and sampling; see
:meth:`CoGenesisLogitsProcessor.stopping_criteria`).
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import Future
from typing import Any
from collections.abc import Callable, Sequence

import torch
from transformers import LogitsProcessor, StoppingCriteria, StoppingCriteriaList

from logitfuse.backends import LLMBackend
from logitfuse.decoding.schedules import Schedule
from logitfuse.decoding.session import FusionSession, SessionStats, StepRequest
from logitfuse.heads.slm_side import HiddenStateCapture
from logitfuse.vocab import VocabMap

Tensor = torch.Tensor

__all__ = ["CoGenesisLogitsProcessor", "OverlapCriterion"]


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


def _sample_loop_continues(caller: Any, criterion: StoppingCriteria, processor: LogitsProcessor) -> bool:
    """Whether transformers' ``_sample`` loop, which is calling ``criterion`` through the
    ``StoppingCriteriaList`` frame ``caller``, will run another step that calls ``processor``.

    ``_sample`` appends the chosen tokens to ``input_ids``, then calls its stopping criteria, then
    (unless every row is done) runs the SLM's forward and calls its logits processors with that same
    ``input_ids``. The list ORs its criteria in order, so when ``criterion`` is the last one its
    ``is_done`` holds every other criterion's verdict; with ``_sample``'s ``unfinished_sequences`` that
    is the loop's own decision. Anything else (beam search, which calls the criteria on candidate
    beams; another criterion after this one; a call outside ``generate``; ``synced_gpus``; a generate
    call without ``processor``) answers ``False``: no prefetch, the processor steps synchronously.
    """
    loop = caller.f_back
    if (caller.f_globals.get("__name__") != "transformers.generation.stopping_criteria" or loop is None
            or loop.f_globals.get("__name__") != "transformers.generation.utils" or loop.f_code.co_name != "_sample"):
        return False
    criteria, is_done = caller.f_locals.get("self"), caller.f_locals.get("is_done")
    loop_locals = loop.f_locals
    unfinished, processors = loop_locals.get("unfinished_sequences"), loop_locals.get("logits_processor") or ()
    if not isinstance(criteria, list) or not criteria or criteria[-1] is not criterion or loop_locals.get("synced_gpus"):
        return False
    if not isinstance(is_done, Tensor) or not isinstance(unfinished, Tensor) or all(p is not processor for p in processors):
        return False
    return bool((unfinished.bool() & ~is_done).any())


def _in_background(work: Callable[[], StepRequest]) -> Future:
    """Run ``work`` in a new daemon thread; its result (or exception) in the returned future."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as error:  # handed to whoever reads the future
            future.set_exception(error)

    threading.Thread(target=run, name="logitfuse-llm", daemon=True).start()
    return future


class OverlapCriterion(StoppingCriteria):
    """A stopping criterion that never stops a row: it starts the LLM's request for the next position
    (what :class:`CoGenesisLogitsProcessor` would send at its next call) in a thread, so that it runs
    while ``generate`` computes the SLM's forward for that position. Made by
    :meth:`CoGenesisLogitsProcessor.stopping_criteria`; see there."""

    def __init__(self, processor: CoGenesisLogitsProcessor):
        self.processor = processor

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if _sample_loop_continues(sys._getframe(1), self, self.processor):
            self.processor._prefetch(input_ids)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


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
        head, alpha, vocab_map, mode, tail, schedule, slm_tokenizer, eos_token_id,
        apply_chat_template, lookbehind, slm_temperature, llm_temperature: as
            :class:`logitfuse.FusionSession` (exactly one of ``head`` and ``alpha``).
        slm (*optional*): the transformers model that generates; needed for a head that reads the
            SLM's last hidden state (``slm_features`` with ``"hidden"``). Logits processors see only
            ``input_ids`` and scores, so the processor hooks the model's output layer
            (:class:`~logitfuse.heads.slm_side.HiddenStateCapture`) and reads the hidden state of each
            step's own forward: no second forward. :meth:`close` removes the hook.

    Generation modes that call logits processors on unverified candidate tokens, prompt lookup
    (``prompt_lookup_num_tokens``) and assisted decoding (``assistant_model``), are refused with a
    ``ValueError`` on the first call, before anything reaches the LLM: their candidates are not
    generated tokens (prompt lookup copies them from the private prompt). A fixed ``alpha=1`` (the
    SLM alone) never contacts the LLM.

    Beam search (``num_beams > 1``) and ``num_return_sequences > 1`` work: each input row's public
    prompt is repeated for its beams, and when beam search reorders its beams the processor finds
    each row's former row by its public prompt and generated history and reorders the LLM's state
    the same way (a backend's ``reorder``; counted in ``stats["reorders"]``).

    ``slm.generate(..., stopping_criteria=proc.stopping_criteria())`` overlaps each step's LLM request
    with the SLM's forward (greedy and sampling; same tokens and requests; :meth:`stopping_criteria`);
    :attr:`overlapped_steps` counts the steps that did.

    The processor is a thin adapter: it turns ``input_ids`` into the tokens each row appended (and
    beam reorders) for a :class:`logitfuse.FusionSession` (:attr:`session`: the LLM's state, schedule,
    α, fusion, :attr:`stats`, :attr:`alpha_history`). :meth:`reset` before reusing one instance for
    another ``generate`` call (a call whose ``input_ids`` do not continue the previous step's raises
    ``ValueError`` before reading anything).

    Example (offline: two tiny random models with one tokenizer):

    >>> from logitfuse.testing import byte_level_tokenizer, tiny_llama
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
                 llm_temperature: float = 1.0, slm: Any = None):
        self.session = FusionSession(llm, head=head, alpha=alpha, vocab_map=vocab_map, mode=mode, tail=tail,
                                     schedule=schedule, slm_tokenizer=slm_tokenizer, eos_token_id=eos_token_id,
                                     apply_chat_template=apply_chat_template, lookbehind=lookbehind,
                                     slm_temperature=slm_temperature, llm_temperature=llm_temperature)
        if isinstance(public_prompt, Tensor):
            public_prompt = public_prompt.tolist()
        if isinstance(public_prompt, str) or (isinstance(public_prompt, Sequence) and public_prompt
                                              and all(isinstance(i, int) for i in public_prompt)):
            self._one_prompt = True  # one prompt (text or ids) for every row
            prompts = [public_prompt]
        elif isinstance(public_prompt, Sequence) and public_prompt:
            self._one_prompt = False
            prompts = list(public_prompt)
        else:
            raise TypeError("public_prompt must be a str, a list of str (one per row), or LLM token ids")
        if llm.tokenizer is None and any(isinstance(p, str) for p in prompts):
            raise ValueError(f"public_prompt is text but {type(llm).__name__} has no tokenizer to encode it; pass "
                             "tokenizer= to the backend or give the public prompt as LLM token ids")
        self.public_prompts = [self.session.format_prompt(p) for p in prompts]
        self._capture = self._hidden_state_capture(head, slm)
        # one model on both sides: its LLM forwards in the prefetch thread would pass the hidden-state hook too
        self._same_model = self._capture is not None and getattr(llm, "model", None) is slm
        self._prefetched: tuple[Tensor, Future] | None = None
        self.reset()

    @staticmethod
    def _hidden_state_capture(head: Any, slm: Any) -> HiddenStateCapture | None:
        """The hook that gives a head reading the SLM's hidden state its input (``None`` for other heads)."""
        if not getattr(head, "needs_slm_hidden", False):
            return None
        if slm is None:
            raise ValueError(f"this head reads the SLM's last hidden state (slm_features {head.slm_features}): pass "
                             "slm=<the transformers model that generates> so the processor can capture it")
        return HiddenStateCapture.for_head(slm, head)

    def close(self) -> None:
        """Remove the hidden-state hook from the SLM (if any); the processor cannot serve such a head after.
        Waits for a prefetched LLM request still in flight (and drops it)."""
        self._drop_prefetch()
        if self._capture is not None:
            self._capture.remove()

    # the session's configuration, for inspection
    llm = property(lambda self: self.session.llm)
    head = property(lambda self: self.session.head)
    alpha = property(lambda self: self.session.alpha)
    mode = property(lambda self: self.session.mode)
    tail = property(lambda self: self.session.tail)
    schedule = property(lambda self: self.session.schedule)
    cross_tokenizer = property(lambda self: self.session.cross_tokenizer)

    @property
    def stats(self) -> SessionStats:
        return self.session.stats

    @property
    def alpha_history(self) -> list[Tensor]:
        """The α of each step, ``(batch,)`` tensors on the CPU (1 where the SLM decided alone)."""
        return self.session.alpha_history

    def reset(self) -> None:
        """Forget the current generation (and the statistics); the next call starts a new one."""
        self._drop_prefetch()
        self.overlapped_steps = 0
        self._prompt_len: int | None = None
        self._seen = 0
        self._history: Tensor | None = None
        self._row_keys: list[int] = []
        self._forwards_seen = None if self._capture is None else self._capture.forwards
        self.session.reset()

    def _rows_of_prompts(self, batch: int) -> list[int]:
        """Each row's index into :attr:`public_prompts`."""
        if self._one_prompt:
            return [0] * batch
        if batch % len(self.public_prompts):
            raise ValueError(
                f"input_ids has {batch} rows but {len(self.public_prompts)} public prompts were given; pass one public "
                "prompt per input row (or a single one for all)"
            )
        # generate() expands each input row num_beams (or num_return_sequences) times, consecutively
        repeat = batch // len(self.public_prompts)
        return [p for p in range(len(self.public_prompts)) for _ in range(repeat)]

    def _begin(self, input_ids: Tensor, scores: Tensor) -> None:
        unsafe = _unsafe_generate_mode()
        if unsafe is not None:
            raise ValueError(
                f"CoGenesisLogitsProcessor refused before anything was sent: {unsafe}. Prompt-lookup "
                "(prompt_lookup_num_tokens) and assisted decoding (assistant_model) call logits processors on "
                "candidate tokens that are not generated and kept yet (prompt lookup copies them from the private "
                "prompt), so they could reach the LLM; use greedy decoding, sampling or beam search"
            )
        keys = self._rows_of_prompts(input_ids.shape[0])
        self.session.start([self.public_prompts[k] for k in keys], v_slm=scores.shape[1])
        self._row_keys = keys
        self._prompt_len = self._seen = input_ids.shape[1]

    def _follow_reordering(self, history: Tensor) -> None:
        """Rows' generated histories changed since the last call: beam search reordered its beams.
        Find each row's former row (the one with the same prompt and history) and reorder the session."""
        former: dict[tuple[int, tuple[int, ...]], int] = {}
        for s, row in enumerate(self._history.tolist()):
            former.setdefault((self._row_keys[s], tuple(row)), s)
        order = [former.get((self._row_keys[r], tuple(row))) for r, row in enumerate(history.tolist())]
        if any(s is None for s in order):
            raise ValueError(
                "the generated tokens in input_ids are not a continuation of the previous step's (a new "
                "generation?); call reset() before reusing the processor"
            )
        self.session.reorder(order)
        self._row_keys = [self._row_keys[s] for s in order]

    def _plain_append(self, input_ids: Tensor) -> list[list[int]] | None:
        """The column each row appended since the previous call, when that is all that changed (same
        rows, one more column, the earlier generated tokens as they were), recorded as seen; ``None``
        otherwise (a beam reorder, another generation), with nothing recorded."""
        batch, width = input_ids.shape
        if batch != self.session.batch_size or width != self._seen + 1:
            return None
        generated = input_ids[:, self._prompt_len:].detach().cpu()
        if self._history is not None and not torch.equal(generated[:, :self._history.shape[1]], self._history):
            return None
        self._history, self._seen = generated, width
        return generated[:, -1:].tolist()

    def _appended(self, input_ids: Tensor) -> list[list[int]]:
        """The tokens each row appended since the previous call (one column), after following beams."""
        appended = self._plain_append(input_ids)
        if appended is not None:
            return appended
        batch, width = input_ids.shape
        if batch != self.session.batch_size:
            raise ValueError(
                f"input_ids has {batch} rows but this generation started with {self.session.batch_size}; "
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
        self._history = input_ids[:, self._prompt_len:].detach().cpu()
        self._seen = width
        return self._history[:, -1:].tolist()

    # ------------------------------------------------------------------ overlap
    def stopping_criteria(self) -> StoppingCriteriaList:
        """Stopping criteria for the same ``generate`` call that let the LLM's request overlap the SLM's
        forward::

            slm.generate(**private, logits_processor=[proc], stopping_criteria=proc.stopping_criteria())

        ``generate``'s greedy and sampling loop (``_sample``) calls its stopping criteria right after it
        appends the chosen tokens to ``input_ids`` and before the SLM's next forward, which it then
        follows with this processor's call on the same ``input_ids``. The criterion (an
        :class:`OverlapCriterion`, which never stops a row) reads the new tokens there, as the processor
        would at its next call, and starts that call's LLM request in a thread; the processor's call
        waits for it and fuses. A step then costs about max(SLM forward, LLM request) instead of their
        sum; the tokens, α, statistics and LLM requests are the same as without it
        (:attr:`overlapped_steps` counts the steps that overlapped).

        It prefetches only when it can tell that the loop continues and calls this processor next:
        under ``_sample``, as the last stopping criterion (transformers puts its own criteria first;
        put yours before this one), without ``synced_gpus``. Elsewhere it does nothing and the processor
        steps synchronously: beam search (its criteria see candidate beams, not the kept ones), the last
        step, schedules that decide the LLM call from the SLM's logits (``entropy_gate``, ``head_gate``),
        ``alpha=1``, and a head reading the hidden state of an SLM that is also the LLM.
        """
        return StoppingCriteriaList([OverlapCriterion(self)])

    def _prefetch(self, input_ids: Tensor) -> None:
        """Read the tokens appended to ``input_ids`` (as :meth:`_appended` would at the next call) and
        start the session's LLM request for them in a thread. Does nothing where a synchronous call
        would do more than append one column (a beam reorder) or refuse ``input_ids``."""
        schedule = self.session.schedule
        if (self._prefetched is not None or self._prompt_len is None or self.session.slm_only or self._same_model
                or schedule.needs_entropy or schedule.needs_call_gain):
            return
        appended = self._plain_append(input_ids)
        if appended is not None:
            self._prefetched = (input_ids, _in_background(lambda: self.session.request(appended)))

    def _drop_prefetch(self) -> None:
        """Wait for a prefetched request still in flight, then forget it (its error too, if any)."""
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None:
            prefetched[1].exception()

    def _complete_prefetch(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """Fuse ``scores`` with the prefetched request, once it is back (the backend's errors surface here)."""
        (seen_ids, future), self._prefetched = self._prefetched, None
        request = future.result()
        if input_ids is not seen_ids and (input_ids.shape != seen_ids.shape or not torch.equal(input_ids, seen_ids)):
            raise ValueError(
                "input_ids changed between the overlap stopping criterion and this processor's call (generate() "
                "passes both the same tensor); call reset() and pass proc.stopping_criteria() only to the generate() "
                "call that uses this processor"
            )
        self.overlapped_steps += 1
        return self.session.complete(request, scores, slm_hidden=self._step_hidden(scores))

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._prefetched is not None:
            return self._complete_prefetch(input_ids, scores)
        if self._prompt_len is None:
            self._begin(input_ids, scores)
            appended: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
        else:
            appended = self._appended(input_ids)
        return self.session.step(appended, scores, self._step_hidden(scores))

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

    # ------------------------------------------------------------------ inspection
    def llm_token_ids(self, row: int) -> list[int] | None:
        """Cross-tokenizer mode: the row's generated text as LLM token ids so far (else ``None``)."""
        return self.session.llm_token_ids(row)

    def generated_text(self, row: int) -> str | None:
        """Cross-tokenizer mode: the row's generated text the LLM has been given (else ``None``)."""
        return self.session.generated_text(row)

    def __repr__(self) -> str:
        weight = f"head={type(self.head).__name__}" if self.head is not None else f"alpha={self.alpha}"
        return f"CoGenesisLogitsProcessor(llm={self.llm!r}, {weight}, mode={self.mode!r}, schedule={self.schedule.spec!r})"
