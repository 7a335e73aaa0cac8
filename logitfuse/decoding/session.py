"""The engine-independent core of fused decoding.

A :class:`FusionSession` holds everything one fused generation needs besides the SLM itself: the
LLM backend and what it has been fed, per row (pending tokens, rollbacks, the cross-tokenizer
re-tokenizer, finished rows), the schedule, α (a fusion head or a fixed number), the fusion call and
the statistics. An engine adapter (the transformers :class:`logitfuse.CoGenesisLogitsProcessor`, or
any decode loop) talks to it in plain terms:

``start(public_prompts, v_slm)``
    One public prompt per row (text or LLM token ids); the LLM prefills them.
``step(appended, slm_logits, slm_hidden=None) -> fused log-probabilities``
    ``appended[r]``: the SLM token ids row ``r`` kept since the previous step (the token chosen
    from the previous step's output, or none at the first step); ``slm_logits``: the SLM's logits
    ``(batch_size, v_slm)`` for the next position. Returns ``(batch_size, v_slm)`` float32
    log-probabilities to choose the next token from; :attr:`alpha_history` gets this step's α.
    ``slm_hidden``: the SLM's last hidden state ``(batch_size, d_model)``, for a head that reads it.
``request(appended)`` then ``complete(request, slm_logits)``
    :meth:`step` in two halves: the LLM call needs no SLM logits, so a decode loop can run it while
    the SLM computes them (:func:`logitfuse.generate`'s ``overlap``).
``step_many(appended, drafts, slm_logits)`` / ``accept_drafts(kept)``
    Speculative fusion: one LLM call scores an SLM draft; the rejected tokens are rolled back.
``reorder(rows)`` / ``finish(row)``
    Beam search reordered its rows (row ``r`` continues former row ``rows[r]``); a row ended.

Privacy: the session only ever hands the LLM the public prompts and the appended tokens. The
adapter's job is to give it nothing else: only tokens the SLM generated and kept.

>>> import torch, logitfuse
>>> from logitfuse.testing import byte_level_tokenizer, tiny_llama
>>> tok = byte_level_tokenizer()
>>> session = logitfuse.FusionSession(logitfuse.HFLLM(tiny_llama(len(tok), seed=1), tok), alpha=0.5)
>>> session.start(["Write an invitation:"], v_slm=len(tok))
>>> fused = session.step([[]], torch.randn(1, len(tok)))     # first position: nothing appended yet
>>> fused = session.step([[fused.argmax().item()]], torch.randn(1, len(tok)))
>>> session.stats.steps, session.stats.llm_calls
(2, 2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Sequence

import torch

from logitfuse.backends import LLMBackend, LLMOutput
from logitfuse.functional import fuse, fuse_with_head, keep_banned
from logitfuse.prompts import has_chat_template, render_prompt
from logitfuse.vocab.retokenize import IncrementalRetokenizer
from logitfuse.decoding.schedules import parse
from logitfuse.config import FUSION_FIELDS, FusionConfig, split_options
from logitfuse.decoding.checks import as_id_set, check_fusion
from logitfuse.heads.protocol import check_slm_side_inputs
from logitfuse.heads.slm_side import SLMSideRows, check_slm_hidden
from logitfuse.types import SessionStats, TopK
from logitfuse.vocab import VocabMap

Tensor = torch.Tensor

__all__ = ["FusionSession", "SessionStats", "StepRequest"]


@dataclass
class StepRequest:
    """What :meth:`FusionSession.request` asked the LLM: the rows called (``None``: no call) and the
    backend's answer, for :meth:`FusionSession.complete`."""

    call: list[bool] | None
    out: LLMOutput | None
    slm_side: dict[str, Tensor] | None = None  # last_tokens, positions (a head's SLM-side inputs)


class FusionSession:
    r"""Fused decoding state and step, for any SLM engine (see the module docstring).

    Args:
        llm (`LLMBackend`): :class:`logitfuse.HFLLM` or :class:`logitfuse.OpenAICompatibleLLM`; ``None``
            only with ``alpha=1`` (the SLM alone: the LLM is never contacted).
        fusion (`FusionConfig`, *optional*): head or fixed α, vocabulary map, mode, tail, schedule,
            ``apply_chat_template``, ``lookbehind``, temperatures: see :class:`logitfuse.FusionConfig`.
            Checked once here against ``llm``.
        slm_tokenizer (*optional*): the SLM's tokenizer (what the SLM is, not how to fuse: so not a config
            field). Needed across tokenizers (a ``vocab_map`` that is not the identity); its
            ``eos_token_id`` is the default ``eos_token_id``.
        eos_token_id (`int` or `list[int]`, *optional*): SLM ids that end a row.
        **options: keyword sugar for the fields of :class:`logitfuse.FusionConfig` (``alpha=0.5``,
            ``head=...``, ``vocab_map=...``, ``mode=...``, ``schedule=...``), applied over ``fusion``.
    """

    def __init__(self, llm: LLMBackend | None, fusion: FusionConfig | None = None, *, slm_tokenizer: Any = None,
                 eos_token_id: Any = None, **options: Any):
        fusion, _ = split_options("FusionSession", fusion, None, options, allow=FUSION_FIELDS)
        if fusion is None:
            raise ValueError("pass exactly one of head= (a trained fusion head, logitfuse.load_head) and alpha= "
                             "(a fixed weight in [0, 1]; 1 = the SLM alone), or fusion=FusionConfig(...)")
        if fusion.uses_rule:
            raise ValueError(f"rule {fusion.rule.spec!r}: a FusionSession runs the two-model mix; a fusion rule runs on "
                             "logitfuse.decoding.rule_session.RuleSession (logitfuse.generate and the processor pick it)")
        mode, tail, self.cross_tokenizer = check_fusion(llm, fusion, slm_tokenizer)
        self.config = fusion
        self.llm, self.head, self.alpha = llm, fusion.head, fusion.alpha
        self.vocab_map, self.mode, self.tail = fusion.vocab_map, mode, tail
        self.schedule = parse(fusion.schedule)
        if self.schedule.needs_call_gain and (self.head is None or self.head.gate is None):
            raise ValueError(f"schedule {self.schedule.spec!r} needs a fusion head with a call gate (logitfuse train "
                             "--gate-hidden 32); use another schedule (entropy_gate, periodic) with this head or alpha")
        self.slm_tokenizer = slm_tokenizer
        if eos_token_id is None and self.slm_tokenizer is not None:
            eos_token_id = getattr(self.slm_tokenizer, "eos_token_id", None)
        self.eos_token_ids = as_id_set(eos_token_id, "eos_token_id")
        self.apply_chat_template = fusion.apply_chat_template
        self.lookbehind = fusion.lookbehind
        self.slm_temperature, self.llm_temperature = fusion.slm_temperature, fusion.llm_temperature
        self._defer_alpha_checks = False
        self.reset()

    def defer_alpha_checks(self) -> None:
        """A head's α is no longer checked to be finite at each step (that check reads the device); instead
        :attr:`alpha_finite` holds, after each :meth:`complete` (or :meth:`step_many`) that used the head,
        which of its α are finite, for the decode loop to fold into the ids it reads anyway and to raise
        :meth:`non_finite_alpha` on (:func:`logitfuse.generate` does)."""
        self._defer_alpha_checks = True

    def non_finite_alpha(self, rows: Sequence[int]) -> ValueError:
        """The error for rows whose α was not finite (with :meth:`defer_alpha_checks`)."""
        return ValueError(f"α is NaN: this {type(self.head).__name__} gave a non-finite α for rows {list(rows)[:10]}; "
                          "the head or its inputs hold non-finite values: check its weights (load or re-train it) "
                          "and the SLM's logits")

    @property
    def slm_only(self) -> bool:
        """A fixed α of 1: the LLM's answer would get weight 0, so it is never asked."""
        return self.alpha == 1.0

    @property
    def batch_size(self) -> int:
        return len(self._finished)

    # ------------------------------------------------------------------ rows
    def reset(self) -> None:
        """Forget the current rows (and the statistics); :meth:`start` begins new ones."""
        self._step = 0
        self._finished: list[bool] = []
        self._pending: list[list[int]] = []
        self._rollback: list[int] = []
        self._drafted: list[int] = []  # draft tokens of the last step_many, per row, until accept_drafts
        self._decided: list[int] = []  # speculative fusion: positions decided per row
        self._retok: IncrementalRetokenizer | None = None
        self._map: list[int] = []
        self._slm_side = SLMSideRows()
        self._vocab_map: VocabMap | None = self.vocab_map
        self._alpha_history: list[Tensor] = []  # α per step, (batch,); on the device until read
        self._stats = SessionStats()
        self._device_fallbacks: Tensor | None = None  # fallbacks counted on the device, until read
        self.alpha_finite: Tensor | None = None  # deferred α checks: the latest α's finiteness, on the device

    @property
    def stats(self) -> SessionStats:
        """The counters (plain ints). Counts kept on the device during decoding (rows whose LLM
        answer a device-side ``ok`` refused) are read here, not at every step."""
        if self._device_fallbacks is not None:
            self._stats.fallbacks += int(self._device_fallbacks)
            self._device_fallbacks = None
        return self._stats

    @property
    def last_alpha(self) -> Tensor:
        """α of the latest step ``(batch_size,)``, where it was made (on the device for a head): no copy,
        no read; :func:`logitfuse.generate` collects these and reads them once at the end."""
        return self._alpha_history[-1]

    @property
    def alpha_history(self) -> list[Tensor]:
        """α used per step, ``(batch_size,)`` float32 on the CPU each; 1 = the SLM alone. A head's α
        stays on the device during decoding and is copied here when read."""
        self._alpha_history[:] = [a if a.device.type == "cpu" else a.cpu() for a in self._alpha_history]
        return self._alpha_history

    def format_prompt(self, prompt: Any) -> Any:
        """A public prompt as the LLM gets it: ids as given; text as given, or (``apply_chat_template``)
        inside the LLM tokenizer's chat template, as ids."""
        if isinstance(prompt, Tensor):
            prompt = prompt.tolist()
        if not (self.apply_chat_template and isinstance(prompt, str)):
            return prompt
        if not has_chat_template(self.llm.tokenizer):
            raise ValueError("apply_chat_template=True but the LLM backend's tokenizer has no chat template; pass "
                             "apply_chat_template=False (the text as it is), or the prompt as token ids")
        return render_prompt(self.llm.tokenizer, [{"role": "user", "content": prompt}])

    def start(self, public_prompts: Sequence[Any], v_slm: int) -> None:
        """Begin one row per public prompt (formatted by :meth:`format_prompt`); the LLM prefills them.

        ``v_slm`` is the size of the SLM logits that :meth:`step` will get. Nothing is sent when the
        session is SLM-only.
        """
        self.reset()
        batch = len(public_prompts)
        rows = [] if self.slm_only else [self.format_prompt(p) for p in public_prompts]  # never sent at α = 1
        if self._vocab_map is None:
            self._vocab_map = VocabMap.identity(v_slm, v_slm if self.llm is None else self.llm.vocab_size)
        elif self._vocab_map.v_slm != v_slm:
            raise ValueError(
                f"the SLM's scores have vocabulary size {v_slm} but vocab_map was built for "
                f"v_slm={self._vocab_map.v_slm}; build the map for this SLM"
            )
        retok = None
        if self.cross_tokenizer:
            retok = IncrementalRetokenizer(self.slm_tokenizer, self.llm.tokenizer, batch_size=batch,
                                           lookbehind=self.lookbehind)
        if not self.slm_only:
            self.llm.start(rows)  # may raise (an empty prompt...): then nothing below has changed
        self._retok = retok
        self._map = self._vocab_map.slm_to_llm.tolist()
        self._finished = [False] * batch
        self._pending = [[] for _ in range(batch)]
        self._rollback = [0] * batch
        self._decided = [0] * batch
        self._slm_side = SLMSideRows(batch)

    def reorder(self, rows: Sequence[int]) -> None:
        """Row ``r`` continues former row ``rows[r]`` (beam search); the LLM's state follows."""
        rows = list(rows)
        if len(rows) != self.batch_size or any(not 0 <= s < self.batch_size for s in rows):
            raise ValueError(f"reorder needs {self.batch_size} row indices in [0, {self.batch_size})")
        if not self.slm_only:
            self.llm.reorder(rows)
        self._pending = [list(self._pending[s]) for s in rows]
        self._rollback = [self._rollback[s] for s in rows]
        self._finished = [self._finished[s] for s in rows]
        self._slm_side.reorder(rows)
        if self._retok is not None:
            self._retok.reorder(rows)
        self._stats.reorders += 1

    def finish(self, row: int) -> None:
        """Row ``row`` ended: it is not advanced on the LLM any more."""
        self._finished[row] = True

    def _append(self, row: int, token: int) -> None:
        """One kept SLM token of ``row``, queued for the LLM (re-tokenized across tokenizers)."""
        if self._finished[row]:
            return
        if token in self.eos_token_ids:
            self._finished[row] = True
            return
        if self._retok is not None:
            rollback, llm_ids = self._retok.push(row, [token])
            if rollback:
                self._stats.rollbacks += rollback
                from_pending = min(rollback, len(self._pending[row]))
                if from_pending:
                    del self._pending[row][-from_pending:]
                self._rollback[row] += rollback - from_pending
            self._pending[row].extend(llm_ids)
            return
        mapped = self._map[token] if 0 <= token < len(self._map) else -1
        # identity map: same ids; an id the LLM lacks (vocabulary padding) is skipped
        if mapped >= 0:
            self._pending[row].append(mapped)
        else:
            self._stats.unmapped_tokens += 1

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, appended: Sequence[Sequence[int]], slm_logits: Tensor, slm_hidden: Tensor | None = None) -> Tensor:
        """Fused log-probabilities ``(batch_size, v_slm)`` for the next position of every row.

        ``appended[r]`` are the SLM ids row ``r`` kept since the previous step. Tokens that the
        engine masked to ``-inf`` in ``slm_logits`` (banned words, a minimum length) stay at ``-inf``.
        ``slm_hidden`` ``(batch_size, d_model)``: the SLM's last hidden state at the position, for a
        head that reads it (``slm_features`` with ``"hidden"``). The same as :meth:`request` then
        :meth:`complete`; with ``head_gate(tau)``, the head's gate decides the call here.
        """
        batch = slm_logits.shape[0]
        if batch != self.batch_size or len(appended) != batch:
            raise ValueError(f"step got {batch} rows of logits and {len(appended)} token lists, but the session "
                             f"started {self.batch_size} rows; call start() first")
        check_slm_hidden(self.head, slm_hidden)
        entropy = slm_logprobs = gain = None
        if self.schedule.needs_entropy and not self.slm_only:
            slm_logprobs = self._slm_logprobs(slm_logits)
            probs = slm_logprobs.exp()
            entropy = -torch.where(probs > 0, probs * slm_logprobs, 0.0).sum(-1)
        if self.schedule.needs_call_gain and not self.slm_only:
            side = self._slm_side.inputs(appended, self._step, slm_logits.device)
            gain = self.head.call_gain(slm_logits, slm_hidden, **side)
        request = self.request(appended, entropy=entropy, call_gain=gain)
        return self.complete(request, slm_logits, slm_logprobs=slm_logprobs, slm_hidden=slm_hidden)

    @torch.no_grad()
    def request(self, appended: Sequence[Sequence[int]], *, entropy: Tensor | None = None,
                call_gain: Tensor | None = None) -> StepRequest:
        """The LLM side of one step: queue ``appended`` (as in :meth:`step`), decide which rows ask the
        LLM and ask it. It does not need the SLM's logits for the position, so a decode loop can run it
        (in a thread) while the SLM computes them, then pass both to :meth:`complete`. A schedule that
        reads the SLM's entropy (``entropy_gate``) needs ``entropy`` ``(batch_size,)``, ``head_gate`` also
        ``call_gain`` (:meth:`logitfuse.FusionHead.call_gain`): use :meth:`step`."""
        batch = self.batch_size
        if len(appended) != batch:
            raise ValueError(f"request got {len(appended)} token lists, but the session started {batch} rows; "
                             "call start() first")
        if self.schedule.needs_entropy and entropy is None and not self.slm_only:
            raise ValueError(f"schedule {self.schedule.spec!r} reads the SLM's entropy; use step(appended, slm_logits)")
        if self.schedule.needs_call_gain and call_gain is None and not self.slm_only:
            raise ValueError(f"schedule {self.schedule.spec!r} reads the head's call gain; use step(appended, slm_logits)")
        self._stats.steps += 1
        if self.slm_only:
            return StepRequest(None, None)
        for r, tokens in enumerate(appended):
            for token in tokens:
                self._append(r, int(token))
        step = self._step
        self._step += 1
        slm_side = self._slm_side.advance(appended, step, inputs=self.head is not None and self.head.reads_slm_side)
        # which rows ask the LLM is host knowledge (the backend needs it as a list); a schedule that
        # decides on the device (the entropy gate) is read here: the one read the step itself needs
        gain = (call_gain,) if self.schedule.needs_call_gain else ()  # a user's schedule may take two arguments
        decision = self.schedule.should_call(step, entropy, *gain)
        if isinstance(decision, Tensor):
            wanted = decision.to(torch.bool).expand(batch).tolist()
        else:
            wanted = [bool(decision)] * batch
        active = [not f for f in self._finished]
        call = [w and a for w, a in zip(wanted, active)]
        self._stats.saved_calls += sum(a and not w for w, a in zip(wanted, active))
        if not any(call):
            return StepRequest(None, None)
        if any(self._rollback):
            self.llm.rollback(self._rollback)
            self._rollback = [0] * batch
        pending, self._pending = self._pending, [[] for _ in range(batch)]
        self._stats.llm_tokens += sum(len(p) for p in pending)
        out = self.llm.advance(pending, need=call)
        self._stats.llm_calls += 1
        self._stats.llm_row_calls += sum(call)
        return StepRequest(call, out, slm_side)

    @torch.no_grad()
    def complete(self, request: StepRequest, slm_logits: Tensor, *, slm_logprobs: Tensor | None = None,
                 slm_hidden: Tensor | None = None) -> Tensor:
        """The fused log-probabilities ``(batch_size, v_slm)`` of the step :meth:`request` asked for,
        from the SLM's logits ``(batch_size, v_slm)`` for that position (``slm_logprobs``: the SLM's
        own log-probabilities when the caller has them already; computed only where a row needs them;
        ``slm_hidden``: as in :meth:`step`)."""
        batch = slm_logits.shape[0]
        if batch != self.batch_size:
            raise ValueError(f"complete got {batch} rows of logits, but the session started {self.batch_size} rows")
        self.alpha_finite = None
        ok = False if request.out is None else self._answered_rows(request.out, request.call, slm_logits.device)
        if ok is False:
            self._alpha_history.append(torch.ones(batch))
            return self._slm_logprobs(slm_logits) if slm_logprobs is None else slm_logprobs
        check_slm_hidden(self.head, slm_hidden)
        alpha, fused = self._fuse(slm_logits, request.out.next, host_alpha=ok is True, slm_hidden=slm_hidden,
                                  slm_side=request.slm_side)
        if ok is not True:
            alpha = torch.where(ok, alpha, 1.0)
        if self._defer_alpha_checks and self.head is not None:
            self.alpha_finite = torch.isfinite(alpha)
        self._alpha_history.append(alpha)
        if ok is True:
            return fused
        slm_logprobs = self._slm_logprobs(slm_logits) if slm_logprobs is None else slm_logprobs
        return torch.where(ok[:, None], fused, slm_logprobs)

    def _slm_logprobs(self, slm_logits: Tensor) -> Tensor:
        """The SLM alone: its log-probabilities at the session's SLM temperature."""
        return torch.log_softmax(slm_logits.float() / self.slm_temperature, dim=-1)

    def _fuse(self, slm_logits: Tensor, llm_next: Any, *, host_alpha: bool, slm_hidden: Tensor | None = None,
              slm_side: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """``(alpha (rows,), fused (rows, v_slm))`` of one batch of positions; a fixed α is made on the
        host when ``host_alpha`` (no device read later). A head reading SLM-side features gets
        ``slm_hidden`` and ``slm_side`` through :func:`fuse_with_head`."""
        device = slm_logits.device
        if isinstance(llm_next, TopK):
            llm_next = TopK(llm_next.ids.to(device, non_blocking=True), llm_next.logprobs.to(device, non_blocking=True))
        else:
            llm_next = llm_next.to(device, non_blocking=True)
        options = dict(vocab_map=self._vocab_map, mode=self.mode, tail=self.tail, slm_temperature=self.slm_temperature,
                       llm_temperature=self.llm_temperature, validate=False)
        if self.head is not None:
            side = {}
            if self.head.reads_slm_side:
                if slm_side is None:  # step_many
                    check_slm_side_inputs(self.head, hidden=False, side=False, where="speculative fusion (step_many)",
                                          fix="use per-step fusion (step) with this head")
                side = {key: value.to(device) for key, value in slm_side.items()} | {"slm_hidden": slm_hidden}
            # rows whose LLM call failed are replaced by the SLM's row by the caller, whatever their α
            alpha, fused = fuse_with_head(slm_logits, llm_next, self.head, **options, **side,
                                          check_finite=not self._defer_alpha_checks)
            alpha = alpha.float()
        else:
            fused = fuse(slm_logits, llm_next, alpha=self.alpha, **options)
            alpha = torch.full((slm_logits.shape[0],), float(self.alpha), device="cpu" if host_alpha else device)
        return alpha, keep_banned(fused, slm_logits)

    # ------------------------------------------------------------------ speculative fusion
    @torch.no_grad()
    def step_many(self, appended: Sequence[Sequence[int]], drafts: Sequence[Sequence[int]],
                  slm_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Fused log-probabilities at ``n + 1`` positions of every row from one LLM call
        (speculative fusion; the backend's ``score``).

        ``appended[r]``: the SLM ids row ``r`` kept since the previous step (as in :meth:`step`);
        ``drafts[r]``: the ``n`` tokens the SLM drafted after them (the same ``n`` for every row
        still running; finished rows' drafts are ignored); ``slm_logits`` ``(batch_size, n + 1,
        v_slm)``: the SLM's logits after ``appended`` and after each draft token. Returns
        ``(fused, alpha)``: ``(batch_size, n + 1, v_slm)`` float32 log-probabilities and the α of
        each position ``(batch_size, n + 1)`` on the logits' device (not added to :attr:`alpha_history`).

        The drafts are sent to the LLM now: call :meth:`accept_drafts` with how many of each row's
        drafts were kept; the others are rolled back before the next LLM call. Needs one tokenizer
        (an identity map), the ``"always"`` schedule and a backend with ``supports_score``.
        """
        batch, positions, v_slm = slm_logits.shape
        if batch != self.batch_size or len(appended) != batch or len(drafts) != batch:
            raise ValueError(f"step_many got {batch} rows of logits, {len(appended)} appended and {len(drafts)} draft "
                             f"lists, but the session started {self.batch_size} rows; call start() first")
        if self._drafted:
            raise RuntimeError("step_many: call accept_drafts(kept) for the previous drafts first")
        if self.cross_tokenizer or self.schedule.spec != "always" or not self.llm.supports_score:
            raise ValueError("speculative fusion needs one tokenizer (an identity vocabulary map), schedule='always' "
                             f"and a backend that can score drafts (supports_score); got "
                             f"{type(self.llm).__name__} with schedule {self.schedule.spec!r}")
        active = [not f for f in self._finished]
        if any(a and len(d) != positions - 1 for a, d in zip(active, drafts)):
            raise ValueError(f"drafts must hold {positions - 1} tokens per running row (slm_logits has {positions} positions)")
        if self.slm_only:
            raise ValueError("step_many: alpha=1 never asks the LLM, so there is nothing to score; use step()")
        slm_logprobs = self._slm_logprobs(slm_logits)
        for r, tokens in enumerate(appended):
            for token in tokens:
                self._append(r, int(token))
        rows = [[] for _ in range(batch)]
        for r in range(batch):
            if active[r]:
                mapped = [self._map[int(t)] if 0 <= int(t) < len(self._map) else -1 for t in drafts[r]]
                if min(mapped, default=0) < 0:
                    raise ValueError(f"drafts[{r}] holds SLM ids the LLM vocabulary lacks; speculative fusion needs "
                                     "every SLM id mapped to itself")
                rows[r] = self._pending[r] + mapped
        if any(self._rollback):
            self.llm.rollback(self._rollback)
            self._rollback = [0] * batch
        out = self.llm.score(rows, need=active)
        self._pending = [[] for _ in range(batch)]
        self._drafted = [positions - 1 if a else 0 for a in active]
        stats = self._stats
        stats.llm_calls += 1
        stats.llm_row_calls += sum(active)
        stats.llm_tokens += sum(len(r) for r in rows)
        stats.draft_tokens_sent += sum(self._drafted)
        device = slm_logits.device
        self.alpha_finite = None
        ok = self._answered_rows(out, active, device)
        if ok is False:
            return slm_logprobs, torch.ones(batch, positions, device=device)
        if isinstance(out.next, TopK):  # a served LLM's top-k: (B, 1 + W, k) each
            llm_next = TopK(*(part[:, -positions:].flatten(0, 1) for part in out.next))
        else:
            llm_next = out.next[:, -positions:].flatten(0, 1)
        alpha, fused = self._fuse(slm_logits.flatten(0, 1), llm_next, host_alpha=True)
        fused, alpha = fused.view(batch, positions, v_slm), alpha.to(device).view(batch, positions)
        if ok is not True:
            fused, alpha = torch.where(ok[:, None, None], fused, slm_logprobs), torch.where(ok[:, None], alpha, 1.0)
        if self._defer_alpha_checks and self.head is not None:
            self.alpha_finite = torch.isfinite(alpha)
        return fused, alpha

    def accept_drafts(self, kept: Sequence[int], decided: Sequence[int] | None = None) -> None:
        """After :meth:`step_many`: row ``r`` kept its first ``kept[r]`` drafts; the rest are rolled back
        on the LLM before its next call (and counted as discarded). ``decided[r]``: the tokens the
        row took from this step (default ``kept[r] + 1``: the kept drafts and the token after them),
        for :attr:`stats` ``.steps``."""
        if len(kept) != len(self._drafted):
            raise ValueError(f"accept_drafts needs one count per row ({len(self._drafted)}) after step_many")
        for r, (k, sent) in enumerate(zip(kept, self._drafted)):
            if not 0 <= k <= sent:
                raise ValueError(f"kept[{r}]={k} must be in [0, {sent}] (the drafts row {r} sent)")
            self._rollback[r] += sent - k
            self._stats.draft_tokens_kept += k
            self._stats.draft_tokens_discarded += sent - k
            if not self._finished[r]:
                self._decided[r] += k + 1 if decided is None else decided[r]
        # steps: the positions decided in the longest row (one LLM call decides several)
        self._stats.steps = max(self._stats.steps, max(self._decided, default=0))
        self._drafted = []

    def _answered_rows(self, out: LLMOutput, call: list[bool], device: torch.device) -> bool | Tensor:
        """Which called rows got a usable LLM answer: ``True`` (all of them), ``False`` (none), or a
        ``(batch_size,)`` bool tensor on ``device``. Counts the others as fallbacks. A backend that knows
        ``ok`` on the host (``ok_rows``) is not read; an ``ok`` on the CPU (an HTTP client) is read for
        free; one on a device stays there, counted lazily."""
        backend_ok = out.ok
        if out.ok_rows is not None or backend_ok.device.type == "cpu":
            rows = out.ok_rows if out.ok_rows is not None else backend_ok.tolist()
            ok = [bool(o) and c for o, c in zip(rows, call)]
            self._stats.fallbacks += sum(c and not o for o, c in zip(ok, call))
            if all(ok) or not any(ok):
                return all(ok)
            return torch.tensor(ok).to(device, non_blocking=True)
        called = torch.tensor(call).to(device, non_blocking=True)
        ok = backend_ok.to(device, non_blocking=True) & called
        failed = (called & ~ok).sum()
        self._device_fallbacks = failed if self._device_fallbacks is None else self._device_fallbacks + failed
        return ok

    # ------------------------------------------------------------------ inspection
    def llm_token_ids(self, row: int) -> list[int] | None:
        """Cross-tokenizer mode: the row's generated text as LLM token ids so far (else ``None``)."""
        return None if self._retok is None else self._retok.llm_ids(row)

    def generated_text(self, row: int) -> str | None:
        """Cross-tokenizer mode: the row's generated text the LLM has been given (else ``None``)."""
        return None if self._retok is None else self._retok.text(row)
