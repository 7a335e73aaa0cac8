"""A fused step under a fusion rule over N inputs (:mod:`logitfuse.rules`): :class:`RuleSession`.

It speaks the :class:`logitfuse.FusionSession` protocol the decode loop and the transformers processor
use (``start``, ``request`` / ``complete``, ``step``, ``reorder``, ``finish``, ``stats``...), so
:func:`logitfuse.generate` and :class:`logitfuse.CoGenesisLogitsProcessor` run a rule with the loop
they already have.

Alignment is the two-model path's, unchanged: each input other than the pivot ``"slm"`` gets its own
:class:`logitfuse.FusionSession` at α = 0, which feeds its backend the input's prompt and the tokens the
loop kept (re-tokenized across tokenizers, rolled back, finished rows skipped), and returns that input
alone on the SLM's vocabulary: ``fuse(..., alpha=0, mode="linear")`` is exactly the input's pulled-back
log-probabilities (``log 0 + lp_S = -inf`` drops the SLM's side), a top-k input's tail filled by the
rule's ``tail``. The pivot is ``log_softmax(slm_logits / slm_temperature)``. The stacked ``(N, B, V)``
log-probabilities, the rule's coefficients and :func:`logitfuse.rules.combine.combine` give the step's
distribution; tokens the engine banned in the SLM's logits stay banned.

A row whose input did not answer (a served backend under ``on_failure="fallback"``) uses the SLM alone
for that step, as the two-model mix does, counted in ``stats.fallbacks``.

Privacy: each input's session sends its backend only that input's prompt and the kept tokens; only an
input marked on-device (:class:`logitfuse.rules.Input`) is given the private prompt, and everything is
checked before the first backend is started.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from logitfuse.config import FusionConfig
from logitfuse.decoding.checks import as_id_set
from logitfuse.decoding.schedules import parse
from logitfuse.decoding.session import FusionSession, StepRequest
from logitfuse.functional import keep_banned
from logitfuse.rules.base import PIVOT, Mixture, Rule
from logitfuse.rules.combine import combine
from logitfuse.rules.inputs import Input
from logitfuse.types import SessionStats

Tensor = torch.Tensor

__all__ = ["RuleRequest", "RuleSession", "rule_inputs"]


def rule_inputs(rule: Rule, llm: Any) -> dict[str, Input]:
    """The inputs ``rule`` reads besides ``"slm"``, checked. ``llm`` is what a decoding entry point got as
    its ``llm``: one backend (the input ``"llm"``), ``None``, or a dict of inputs by name, each an
    :class:`~logitfuse.rules.Input` or a bare backend (public prompt, not on-device). ``ValueError``
    naming what is missing or given but not read.

    >>> import logitfuse
    >>> from logitfuse.rules import Input, parse_rule
    >>> from logitfuse.decoding.rule_session import rule_inputs
    >>> from logitfuse.testing import byte_level_tokenizer, tiny_llama
    >>> tok = byte_level_tokenizer()
    >>> backend = logitfuse.HFLLM(tiny_llama(len(tok)), tok)
    >>> sorted(rule_inputs(parse_rule("mixture(0.5,0.5)"), backend))
    ['llm']
    >>> rule_inputs(parse_rule("steer(1)"), backend)
    Traceback (most recent call last):
    ...
    ValueError: rule 'steer(1)' reads the inputs ['llm', 'slm', 'slm_public'], but ['slm_public'] is not given; pass llm={'llm': ..., 'slm_public': logitfuse.rules.Input(backend, ...)}
    """
    if llm is None:
        given = {}
    elif isinstance(llm, Mapping):
        given = dict(llm)
    else:
        given = {"llm": llm}
    if PIVOT in given:
        raise ValueError(f"inputs[{PIVOT!r}]: {PIVOT!r} is the SLM the loop generates with (the pivot); name "
                         "another input, e.g. 'slm_public' for the SLM over the public prompt")
    given = {name: value if isinstance(value, Input) else Input(value) for name, value in given.items()}
    wanted = [n for n in rule.inputs if n != PIVOT]
    missing = [n for n in wanted if n not in given]
    if missing:
        example = ", ".join(f"{n!r}: ..." for n in wanted if n not in missing)
        raise ValueError(f"rule {rule.spec!r} reads the inputs {list(rule.inputs)}, but {missing} "
                         f"{'is' if len(missing) == 1 else 'are'} not given; pass llm={{{example}{', ' if example else ''}"
                         f"{missing[0]!r}: logitfuse.rules.Input(backend, ...)}}")
    unread = sorted(set(given) - set(wanted))
    if unread:
        raise ValueError(f"inputs {unread} are given but rule {rule.spec!r} does not read them (it reads "
                         f"{list(rule.inputs)}); leave them out: an input that is not read is not sent anything")
    return {name: given[name] for name in wanted}


@dataclass
class RuleRequest:
    """What :meth:`RuleSession.request` asked: each input's :class:`~logitfuse.decoding.session.StepRequest`."""

    parts: dict[str, StepRequest]


class RuleSession:
    r"""Fused decoding state and step under a fusion rule (see the module docstring).

    Args:
        rule (`Rule`): a :mod:`logitfuse.rules` rule (not :class:`~logitfuse.rules.Mix`: that one is
            :class:`logitfuse.FusionSession` itself).
        inputs (`dict[str, Input]`): every input the rule reads except ``"slm"``, by name (:func:`rule_inputs`).
        fusion (`FusionConfig`, *optional*): ``apply_chat_template``, ``lookbehind`` and the temperatures
            (``llm_temperature`` for every input but the SLM).
        slm_tokenizer, eos_token_id: as :class:`logitfuse.FusionSession`.

    >>> import torch, logitfuse
    >>> from logitfuse.rules import Input
    >>> from logitfuse.decoding.rule_session import RuleSession
    >>> from logitfuse.testing import byte_level_tokenizer, tiny_llama
    >>> tok = byte_level_tokenizer()
    >>> slm = tiny_llama(len(tok), seed=0)
    >>> inputs = {"llm": logitfuse.HFLLM(tiny_llama(len(tok), seed=1), tok),
    ...           "slm_public": Input(logitfuse.HFLLM(slm, tok), on_device=True)}
    >>> session = RuleSession("steer(0.5)", inputs)
    >>> session.start(["Write an invitation:"], v_slm=len(tok))
    >>> fused = session.step([[]], torch.randn(1, len(tok)))
    >>> fused.shape, round(float(fused.exp().sum()), 4), session.stats.llm_calls
    (torch.Size([1, 400]), 1.0, 2)
    """

    def __init__(self, rule: Rule | str, inputs: Mapping[str, Input], fusion: FusionConfig | None = None, *,
                 slm_tokenizer: Any = None, eos_token_id: Any = None):
        fusion = FusionConfig(rule=rule) if fusion is None else fusion.replace(rule=rule)
        if not fusion.uses_rule:
            raise ValueError(f"rule {fusion.rule!r}: the two-model mix runs on logitfuse.FusionSession; RuleSession "
                             "takes the other rules (logitfuse.rules)")
        self.rule = rule = fusion.rule
        if isinstance(rule, Mixture) and rule.needs_head:
            raise ValueError(f"rule {rule.spec!r} takes its weights from a mixture head: pass "
                             "rule.with_head(logitfuse.heads.mixture.load_mixture_head(PATH)) (CLI: --head PATH)")
        self.inputs = rule_inputs(rule, inputs)
        self.config = fusion
        self.slm_temperature = fusion.slm_temperature
        self.schedule = parse("always")
        if eos_token_id is None and slm_tokenizer is not None:
            eos_token_id = getattr(slm_tokenizer, "eos_token_id", None)
        self.eos_token_ids = as_id_set(eos_token_id, "eos_token_id")
        # each input alone on the SLM's vocabulary: a two-model session at α = 0 (see the module docstring)
        alone = FusionConfig(alpha=0.0, mode="linear", tail=rule.tail, apply_chat_template=fusion.apply_chat_template,
                             lookbehind=fusion.lookbehind, slm_temperature=fusion.slm_temperature,
                             llm_temperature=fusion.llm_temperature)
        self.sessions = {name: FusionSession(inp.backend, alone.replace(vocab_map=inp.vocab_map),
                                             slm_tokenizer=slm_tokenizer, eos_token_id=sorted(self.eos_token_ids))
                         for name, inp in self.inputs.items()}
        self.reset()

    # what the decode loops read of a session; a rule has no α, head, mode or schedule of its own
    head = None
    alpha = None
    mode = None
    tail = property(lambda self: self.rule.tail)
    slm_only = False
    alpha_finite = None
    llm = property(lambda self: self.sessions["llm"].llm if "llm" in self.sessions else None)
    cross_tokenizer = property(lambda self: any(s.cross_tokenizer for s in self.sessions.values()))

    @property
    def reads_private(self) -> list[str]:
        """The inputs (besides the pivot) that read the private prompt."""
        return [name for name, inp in self.inputs.items() if inp.prompt == "private"]

    def defer_alpha_checks(self) -> None:
        """Nothing to defer: a rule's coefficients are checked by :func:`~logitfuse.rules.combine.combine`."""

    def non_finite_alpha(self, rows: Sequence[int]) -> ValueError:
        return ValueError(f"rows {list(rows)[:10]} got a non-finite coefficient under rule {self.rule.spec!r}")

    def format_prompt(self, prompt: Any) -> Any:
        """A public prompt as given (each input's session formats it for its own backend at :meth:`start`)."""
        return prompt.tolist() if isinstance(prompt, Tensor) else prompt

    @property
    def batch_size(self) -> int:
        return len(self._finished)

    def reset(self) -> None:
        """Forget the current rows (and the statistics)."""
        for session in self.sessions.values():
            session.reset()
        self._finished: list[bool] = []
        self._steps = 0
        self._alpha_history: list[Tensor] = []

    @property
    def stats(self) -> SessionStats:
        """The counters summed over the inputs (``steps``: the loop's steps). Per input: :meth:`input_stats`."""
        total = SessionStats(steps=self._steps)
        for session in self.sessions.values():
            part = session.stats
            for f in fields(SessionStats):
                if f.name != "steps":
                    setattr(total, f.name, getattr(total, f.name) + getattr(part, f.name))
        return total

    def input_stats(self, name: str) -> SessionStats:
        """The counters of one input (its calls, tokens sent, fallbacks...)."""
        return self.sessions[name].stats

    @property
    def last_alpha(self) -> Tensor:
        """The pivot's coefficient in the latest step ``(batch_size,)`` (1 where the SLM decided alone)."""
        return self._alpha_history[-1]

    @property
    def alpha_history(self) -> list[Tensor]:
        """The pivot's coefficient per step, ``(batch_size,)`` on the CPU each."""
        self._alpha_history[:] = [a.cpu() for a in self._alpha_history]
        return self._alpha_history

    def start(self, public_prompts: Sequence[Any] | Mapping[str, Sequence[Any]], v_slm: int,
              private_prompts: Sequence[Any] | None = None) -> None:
        """Begin one row per public prompt: each input's backend prefills its own prompt. ``public_prompts``:
        one prompt per row for every public input, or a dict of such lists by input name (each input's
        prompt in its own chat template, say). ``private_prompts`` (one list of SLM ids per row) is needed
        where an on-device input reads the private prompt. Nothing is sent before every input is checked."""
        self.reset()
        public = [n for n, inp in self.inputs.items() if inp.prompt == "public"]
        if isinstance(public_prompts, Mapping):
            missing = [n for n in public if n not in public_prompts]
            unread = sorted(set(public_prompts) - set(public))
            if missing or unread:
                raise ValueError(f"public_prompt by input: give one for each public input {public}"
                                 + (f"; {missing} missing" if missing else "")
                                 + (f"; {unread} are no public input of the rule" if unread else ""))
            per_input = {n: list(public_prompts[n]) for n in public}
        else:
            per_input = {n: list(public_prompts) for n in public}
        rows = {len(p) for p in per_input.values()} | ({len(private_prompts)} if private_prompts is not None else set())
        if len(rows) > 1:
            raise ValueError(f"the prompts hold different numbers of rows {sorted(rows)}; give one prompt per row to "
                             "every input")
        private = self.reads_private
        if private and private_prompts is None:
            raise ValueError(f"inputs {private} read the private prompt, which this entry point does not have; use "
                             "logitfuse.generate (it hands the on-device inputs the SLM's private ids)")
        for name in private:
            backend = self.inputs[name].backend
            if backend.vocab_size < v_slm:
                raise ValueError(f"input {name!r} reads the SLM's private ids but its vocabulary ({backend.vocab_size}) "
                                 f"is smaller than the SLM's ({v_slm}); it must share the SLM's tokenizer")
            per_input[name] = list(private_prompts)
        for name, session in self.sessions.items():
            session.start(per_input[name], v_slm=v_slm)
        self._finished = [False] * rows.pop()

    def reorder(self, rows: Sequence[int]) -> None:
        """Row ``r`` continues former row ``rows[r]`` (beam search); every input follows."""
        for session in self.sessions.values():
            session.reorder(rows)
        self._finished = [self._finished[s] for s in rows]

    def finish(self, row: int) -> None:
        """Row ``row`` ended: no input is advanced for it any more."""
        self._finished[row] = True
        for session in self.sessions.values():
            session.finish(row)

    @torch.no_grad()
    def request(self, appended: Sequence[Sequence[int]]) -> RuleRequest:
        """Every input's side of one step (as :meth:`logitfuse.FusionSession.request`), one after the other."""
        if len(appended) != self.batch_size:
            raise ValueError(f"request got {len(appended)} token lists, but the session started {self.batch_size} "
                             "rows; call start() first")
        self._steps += 1
        return RuleRequest({name: session.request(appended) for name, session in self.sessions.items()})

    @torch.no_grad()
    def complete(self, request: RuleRequest, slm_logits: Tensor, *, slm_logprobs: Tensor | None = None,
                 slm_hidden: Tensor | None = None) -> Tensor:
        """The step's log-probabilities ``(batch_size, v_slm)`` under the rule, from the SLM's logits."""
        if slm_logits.shape[0] != self.batch_size:
            raise ValueError(f"complete got {slm_logits.shape[0]} rows of logits, but the session started "
                             f"{self.batch_size} rows")
        device = slm_logits.device
        if slm_logprobs is None:
            slm_logprobs = torch.log_softmax(slm_logits.float() / self.slm_temperature, dim=-1)
        alone, failed = {PIVOT: slm_logprobs}, torch.zeros(self.batch_size, dtype=torch.bool, device=device)
        for name, session in self.sessions.items():
            alone[name] = session.complete(request.parts[name], slm_logits, slm_logprobs=slm_logprobs)
            failed |= session.last_alpha.to(device) == 1.0  # α = 0 unless the row fell back to the SLM alone
        logprobs = torch.stack([alone[name] for name in self.rule.inputs])
        coef = self.rule.coefficients(logprobs)
        plausibility = self.rule.plausibility or None  # τ = 0 cuts nothing
        fused = combine(logprobs, coef.to(device=device, dtype=torch.float32).contiguous(),
                        rule=self.rule.combine_rule, plausibility=plausibility)
        fused = keep_banned(torch.where(failed[:, None], slm_logprobs, fused), slm_logits)
        pivot = coef[:, self.rule.inputs.index(PIVOT)] if PIVOT in self.rule.inputs else torch.zeros_like(coef[:, 0])
        self._alpha_history.append(torch.where(failed, 1.0, pivot.to(device)))
        return fused

    def step(self, appended: Sequence[Sequence[int]], slm_logits: Tensor, slm_hidden: Tensor | None = None) -> Tensor:
        """:meth:`request` then :meth:`complete` (``slm_hidden`` is not read: no rule head reads it)."""
        return self.complete(self.request(appended), slm_logits)

    def llm_token_ids(self, row: int, name: str = "llm") -> list[int] | None:
        """Across tokenizers: the row's generated text as input ``name``'s token ids (else ``None``)."""
        return self.sessions[name].llm_token_ids(row)

    def generated_text(self, row: int, name: str = "llm") -> str | None:
        """Across tokenizers: the row's generated text input ``name`` has been given (else ``None``)."""
        return self.sessions[name].generated_text(row)
