"""The two settings objects every entry point takes: :class:`FusionConfig` and :class:`SamplingConfig`.

Both are frozen dataclasses validated once, when they are made: a bad value raises ``ValueError`` (or
``TypeError``) naming the field and the fix, before any model runs. ``logitfuse.generate``,
:class:`logitfuse.FusionSession`, :class:`logitfuse.CoGenesisLogitsProcessor` and the command line
build them; keyword arguments given to those entry points are sugar for the same fields
(:func:`split_options`).

>>> from logitfuse import FusionConfig, SamplingConfig
>>> FusionConfig(alpha=0.75, mode="linear")
FusionConfig(alpha=0.75, mode='linear')
>>> SamplingConfig(max_new_tokens=32, temperature=0.7, top_p=0.9).greedy
False
>>> FusionConfig(alpha=1.5)
Traceback (most recent call last):
...
ValueError: alpha=1.5 must be a number in [0, 1] (the SLM's weight: 1 = the SLM alone, 0 = the LLM alone)

This module sits at the bottom of the package (it imports only :mod:`logitfuse.types` and the fusion
rules' settings objects, :mod:`logitfuse.rules.base`, which import nothing of logitfuse but their
constants): what a field holds beyond plain values (a head, a vocabulary map, a schedule) is checked
by the layer that uses it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from logitfuse.rules.base import Mix, Rule
from logitfuse.rules.spec import parse_rule
from logitfuse.types import MODES, TAILS

__all__ = ["FusionConfig", "SamplingConfig", "check_choice", "check_int", "check_number", "split_options"]


# ------------------------------------------------------------------------- shared number checks
def check_number(name: str, value: Any, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
                 fix: str = "") -> float:
    """``value`` as a float, if it is a real number (not a bool, not NaN) in ``[low, high]`` (``(low, high]``
    with ``low_open``); otherwise ``ValueError`` naming ``name`` and, where given, the ``fix``."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name}={value!r} must be a number in {interval}" + (f" ({fix})" if fix else ""))
    return float(value)


def check_int(name: str, value: Any, low: int = 0, *, fix: str = "") -> int:
    """``value`` if it is an int (not a bool) ``>= low``; otherwise ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}" + (f" ({fix})" if fix else ""))
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``; otherwise ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
    return value


def _check_ids(name: str, value: Any) -> tuple[int, ...] | None:
    """``None``, one id or a sequence of ids, as a tuple of ints >= 0."""
    if value is None:
        return None
    ids = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(ids, Sequence) or isinstance(ids, str) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{name}={value!r} must be a token id (int >= 0) or a list of them")
    return tuple(int(i) for i in ids)


class _Config:
    """What both configs share: a repr that shows only the fields set away from their defaults."""

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.default is dataclasses.MISSING or value is not default and value != default:
                shown.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


# ------------------------------------------------------------------------- fusion
@dataclass(frozen=True, repr=False, eq=False)
class FusionConfig(_Config):
    """How the two next-token distributions are mixed, and how the LLM is asked.

    Attributes:
        head: a trained fusion head (:class:`logitfuse.FusionHead`, :func:`logitfuse.load_head`) that
            predicts α per step; exactly one of ``head`` and ``alpha``.
        alpha: a fixed weight in [0, 1] (1 = the SLM alone, 0 = the LLM alone).
        vocab_map: the :class:`logitfuse.VocabMap` from SLM to LLM token ids (default: identity, the
            two models share one vocabulary).
        mode: ``"linear"``, ``"geometric"`` or ``"logit"`` (default: the head's mode, else ``"linear"``).
        tail: where a top-k LLM's leftover mass goes: ``"slm"``, ``"uniform"`` or ``"zero"`` (default:
            the head's tail, else ``"slm"``).
        schedule: when to ask the LLM: ``"always"``, ``"periodic(P,K,T)"``, ``"entropy_gate(h)"``,
            ``"head_gate(tau)"`` or a :class:`logitfuse.decoding.schedules.Schedule`.
        speculate: SLM tokens drafted per LLM call (exact speculative fusion); 0 = per-step fusion.
            Rejected drafts reach the LLM: opt-in.
        overlap: issue the LLM's request for a position while the SLM computes it (per-step fusion).
        apply_chat_template: wrap text public prompts in the LLM tokenizer's chat template.
        lookbehind: LLM tokens re-encoded each step when the two models have different tokenizers.
        slm_temperature, llm_temperature: scale each model's logits before fusion (``llm_temperature``:
            every input but the SLM's, under a rule).
        rule: a fusion rule over N inputs (:mod:`logitfuse.rules`: a :class:`~logitfuse.rules.Rule` or a spec
            string such as ``"steer(0.5)"``, :func:`logitfuse.rules.parse_rule`); ``None`` or ``"mix"`` is
            the two-model mix above. Any other rule brings its own weights: ``alpha``, ``head``, ``mode``
            and ``tail`` stay unset, ``schedule`` is ``"always"`` and ``speculate`` 0.

    The SLM's tokenizer is no field: it describes the SLM, not the fusion. It is an attribute of the SLM
    runner (a :class:`logitfuse.LlamaCppSLM`'s ``tokenizer``), or ``slm_tokenizer=`` given to
    :func:`logitfuse.generate` and :class:`logitfuse.FusionSession` beside the configs.
    """

    head: Any = None
    alpha: float | None = None
    vocab_map: Any = None
    mode: str | None = None
    tail: str | None = None
    schedule: Any = "always"
    speculate: int = 0
    overlap: bool = True
    apply_chat_template: bool = False
    lookbehind: int = 4
    slm_temperature: float = 1.0
    llm_temperature: float = 1.0
    rule: Any = None

    def __post_init__(self) -> None:
        if self.rule is not None:
            object.__setattr__(self, "rule", parse_rule(self.rule))
        if self.uses_rule:
            self._check_rule()
        elif (self.head is None) == (self.alpha is None):
            raise ValueError("pass exactly one of head= (a trained fusion head, logitfuse.load_head) and alpha= "
                             "(a fixed weight in [0, 1]; 1 = the SLM alone)")
        if self.alpha is not None:
            object.__setattr__(self, "alpha", check_number(
                "alpha", self.alpha, 0.0, 1.0, fix="the SLM's weight: 1 = the SLM alone, 0 = the LLM alone"))
        if self.mode is not None:
            check_choice("mode", self.mode, MODES)
        if self.tail is not None:
            check_choice("tail", self.tail, TAILS)
        if not isinstance(self.schedule, str) and not callable(getattr(self.schedule, "should_call", None)):
            raise TypeError(f"schedule must be a string such as 'always' or 'entropy_gate(2.0)', or a Schedule, got "
                            f"{type(self.schedule).__name__}")
        check_int("speculate", self.speculate, 0, fix="draft tokens per LLM call; 0 = per-step fusion")
        for name in ("overlap", "apply_chat_template"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_int("lookbehind", self.lookbehind, 1, fix="LLM tokens re-encoded per step across tokenizers")
        for name in ("slm_temperature", "llm_temperature"):
            object.__setattr__(self, name, check_number(name, getattr(self, name), 0.0, low_open=True,
                                                        fix="1 leaves the logits as they are"))

    def _check_rule(self) -> None:
        """What a rule other than the two-model mix leaves unset (each ``ValueError`` names the field)."""
        rule = self.rule
        for name in ("head", "alpha", "mode", "tail"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}={getattr(self, name)!r} shapes the two-model mix, but rule {rule.spec!r} "
                                 "brings its own weights; leave it unset (a Mixture takes weights=, head=, kind=, "
                                 "tail=), or use rule='mix'")
        if self.schedule != "always":
            raise ValueError(f"schedule={self.schedule!r}: rule {rule.spec!r} asks every input at every step; use "
                             "schedule='always' (schedules work with the two-model mix)")
        if self.speculate:
            raise ValueError(f"speculate={self.speculate}: speculative fusion is exact for the two-model mix only; "
                             f"use speculate=0 with rule {rule.spec!r}")

    @property
    def uses_rule(self) -> bool:
        """A rule other than the two-model mix (:class:`logitfuse.rules.Mix`) is set."""
        return isinstance(self.rule, Rule) and not isinstance(self.rule, Mix)

    @property
    def slm_only(self) -> bool:
        """A fixed α of 1: the SLM alone, the LLM never asked."""
        return self.alpha == 1.0


# ------------------------------------------------------------------------- sampling
@dataclass(frozen=True, repr=False, eq=False)
class SamplingConfig(_Config):
    """How the fused token is chosen, and when a row stops.

    Attributes:
        max_new_tokens: tokens to generate at most per row.
        temperature: 0 is greedy (argmax); else sample at this temperature.
        top_k: keep the k most likely tokens before sampling (0 = off).
        top_p: keep the smallest set of tokens whose mass reaches p (1 = off).
        repetition_penalty: transformers' rule on the SLM's logits before fusion (1 = off, 1.1 usual).
        seed: seeds a fresh ``torch.Generator`` for the draws (the same seed, the same tokens).
        generator: a ``torch.Generator`` to draw from instead (not with ``seed``).
        eos_token_id: SLM id(s) that end a row (kept in its output); default the SLM's.
        pad_token_id: fed to the SLM for rows that have stopped; default the SLM config's, or 0.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    generator: Any = None
    eos_token_id: Any = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, 1, fix="tokens to generate per row")
        object.__setattr__(self, "temperature", check_number("temperature", self.temperature, 0.0,
                                                             fix="0 is greedy"))
        check_int("top_k", self.top_k, 0, fix="0 = off")
        object.__setattr__(self, "top_p", check_number("top_p", self.top_p, 0.0, 1.0, low_open=True,
                                                       fix="1 = off; 0 would keep no token"))
        object.__setattr__(self, "repetition_penalty", check_number(
            "repetition_penalty", self.repetition_penalty, 0.0, low_open=True, fix="1 = off, 1.1 is usual"))
        if self.seed is not None:
            check_int("seed", self.seed, 0)
            if self.generator is not None:
                raise ValueError("pass seed= or generator=, not both")
        if self.generator is not None and not type(self.generator).__name__ == "Generator":
            raise TypeError(f"generator must be a torch.Generator or None, got {type(self.generator).__name__}")
        object.__setattr__(self, "eos_token_id", _check_ids("eos_token_id", self.eos_token_id))
        if self.pad_token_id is not None:
            check_int("pad_token_id", self.pad_token_id, 0)

    @property
    def greedy(self) -> bool:
        """Temperature 0: the argmax, no draws."""
        return self.temperature == 0


FUSION_FIELDS = frozenset(f.name for f in fields(FusionConfig))
SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingConfig))


def split_options(where: str, fusion: FusionConfig | None, sampling: SamplingConfig | None,
                  options: Mapping[str, Any], *, allow: frozenset[str] = FUSION_FIELDS | SAMPLING_FIELDS,
                  ) -> tuple[FusionConfig | None, SamplingConfig | None]:
    """Keyword sugar: the configs ``fusion`` and ``sampling`` with the fields named in ``options`` set
    (each made if not given). A name that is no field of either (or not in ``allow``) is a ``TypeError``
    naming ``where``. A config that is neither given nor touched stays ``None``.

    >>> f, s = split_options("generate", None, None, {"alpha": 0.5, "max_new_tokens": 8})
    >>> f.alpha, s.max_new_tokens
    (0.5, 8)
    """
    unknown = sorted(set(options) - allow)
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {', '.join(unknown)}; the settings are the "
                        f"fields of FusionConfig and SamplingConfig")
    for given, cls in ((fusion, FusionConfig), (sampling, SamplingConfig)):
        if given is not None and not isinstance(given, cls):
            raise TypeError(f"{where}(): expected a {cls.__name__}, got {type(given).__name__}")
    f_opts = {k: v for k, v in options.items() if k in FUSION_FIELDS}
    s_opts = {k: v for k, v in options.items() if k in SAMPLING_FIELDS}
    if f_opts:
        if fusion is None:
            fusion = FusionConfig(**f_opts)
        else:  # one of head/alpha given replaces the other
            if "head" in f_opts and "alpha" not in f_opts:
                f_opts["alpha"] = None
            if "alpha" in f_opts and "head" not in f_opts:
                f_opts["head"] = None
            fusion = dataclasses.replace(fusion, **f_opts)
    if s_opts:
        sampling = SamplingConfig(**s_opts) if sampling is None else dataclasses.replace(sampling, **s_opts)
    return fusion, sampling
