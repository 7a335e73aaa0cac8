"""The fusion rules: how N aligned next-token distributions become the one the loop samples from.

Every rule reads *inputs* by name: ``"slm"`` is the pivot (the on-device SLM over the private prompt,
whose tokens the loop generates); every other name is an :class:`logitfuse.rules.Input` given beside
the rule (``"llm"``, ``"slm_public"``, ``"expert"``, ``"anti"``... by convention). Each input's
distribution is pulled onto the SLM's vocabulary first, then the rule says, per row, one coefficient
per input (``coefficients``) and how :func:`logitfuse.rules.combine.combine` adds them up
(``combine_rule``: ``"mixture"``, ``log Σ c·p``, or ``"sum"``, ``log_softmax(Σ c·log p)``), with the
contrastive plausibility cut on input 0 where ``plausibility`` is set.

:class:`Mix` is today's two-model CoGenesis mix (α or a head from :class:`logitfuse.FusionConfig`,
computed by the session exactly as without a rule). The others:

- :class:`Mixture`: ``Σ wᵢ pᵢ`` (``kind="linear"``) or ``∝ Π pᵢ^wᵢ`` (``"geometric"``; ``"logit"``
  is the same thing: each input's per-row log-sum-exp cancels), weights fixed or from a mixture head;
- :class:`Arithmetic`: ``log p_base + Σ βᵢ (log p_expertᵢ − log p_antiᵢ)``, renormalized;
- :class:`Contrastive`: ``log p_expert − λ log p_amateur`` over the tokens whose expert probability is
  at least ``τ · max p_expert`` (Li et al. 2023, arXiv 2210.15097).

These are plain frozen settings objects (they import nothing of logitfuse but its constants), so
:class:`logitfuse.FusionConfig` can hold one.

>>> from logitfuse.rules import Arithmetic, Contrastive, Mixture
>>> Mixture(("slm", "llm"), weights=(3, 1)).weights
(0.75, 0.25)
>>> rule = Arithmetic(base="llm", terms=((0.5, "slm", "slm_public"),))
>>> rule.inputs, rule.fixed_coefficients(), str(rule)
(('llm', 'slm', 'slm_public'), (1.0, 0.5, -0.5), 'steer(0.5)')
>>> Contrastive(amateur_weight=0.5).fixed_coefficients()
(1.0, -0.5)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["PIVOT", "Arithmetic", "Contrastive", "Mix", "Mixture", "Rule"]

#: the pivot input: the on-device SLM over the private prompt; its vocabulary is the one every input is pulled onto
PIVOT = "slm"
MIXTURE_KINDS = ("linear", "geometric", "logit")
MIXTURE_TAILS = ("slm", "uniform")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _number(name: str, value: Any, *, low: float = -math.inf, high: float = math.inf, low_open: bool = False) -> float:
    """``value`` as a float if it is a finite real in the interval; ``ValueError`` naming ``name`` otherwise."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name}={value!r} must be a finite number in {interval}")
    return float(value)


def _input_name(field: str, value: Any) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{field}={value!r} must be an input name (letters, digits, _), e.g. 'slm', 'llm', "
                         "'slm_public', 'expert'")
    return value


def _g(x: float) -> str:
    """A number as the spec writes it (``0.5``, ``2``, ``1e-05``)."""
    return f"{x:g}"


class Rule:
    """What every rule declares (see the module docstring); the rules are frozen dataclasses.

    Attributes the decode loop reads: ``inputs`` (names, in the order the distributions are stacked),
    ``combine_rule`` (``"mixture"`` or ``"sum"``), ``plausibility`` (``None`` or τ, cut on input 0),
    ``tail`` (how a top-k input's unlisted tokens are filled) and :meth:`coefficients`.
    """

    inputs: tuple[str, ...]
    combine_rule: str = "sum"
    plausibility: float | None = None
    tail: str = "uniform"

    def fixed_coefficients(self) -> tuple[float, ...] | None:
        """One coefficient per input when they do not depend on the step (``None``: a head decides)."""
        raise NotImplementedError

    def coefficients(self, logprobs: Any) -> Any:
        """``(B, N)`` float32 coefficients for ``logprobs`` ``(N, B, V)`` (the inputs on the pivot vocabulary)."""
        import torch

        fixed = self.fixed_coefficients()
        return torch.tensor(fixed, dtype=torch.float32, device=logprobs.device).expand(logprobs.shape[1], -1)

    def pivot_coefficient(self) -> float | None:
        """The coefficient of the pivot ``"slm"`` (0 if the rule does not read it; ``None`` from a head):
        what :attr:`logitfuse.FusedGeneration.alpha` records per token under this rule."""
        fixed = self.fixed_coefficients()
        if fixed is None:
            return None
        return fixed[self.inputs.index(PIVOT)] if PIVOT in self.inputs else 0.0

    def __str__(self) -> str:
        return self.spec

    @property
    def spec(self) -> str:
        """The rule as :func:`logitfuse.rules.parse_rule` reads it back."""
        raise NotImplementedError


@dataclass(frozen=True)
class Mix(Rule):
    """Today's two-model CoGenesis mix of ``"slm"`` and ``"llm"``: α (or a fusion head), mode and tail
    come from :class:`logitfuse.FusionConfig`, and the tokens are those of fusion without a rule."""

    inputs: tuple[str, ...] = (PIVOT, "llm")

    def fixed_coefficients(self) -> tuple[float, ...] | None:
        return None

    @property
    def spec(self) -> str:
        return "mix"


@dataclass(frozen=True)
class Mixture(Rule):
    """A mixture of N distributions with fixed weights or weights from a mixture head.

    Args:
        inputs: the input names, e.g. ``("slm", "llm")``; at least two, distinct.
        weights: one per input, ``>= 0`` with a positive sum; divided by their sum.
        head: instead of ``weights``, an N-weight head: ``head(logprobs (N, B, V)) -> (B, N)`` weights (rows summing to 1) with
            ``head.input_names`` equal to ``inputs`` (:func:`logitfuse.heads.mixture.load_mixture_head`).
        kind: ``"linear"`` (``log Σ wᵢ pᵢ``), ``"geometric"`` (``log_softmax(Σ wᵢ log pᵢ)``) or ``"logit"``
            (weighted raw logits, the same distribution as ``"geometric"``: each input's log-sum-exp is a
            per-row constant that the softmax removes).
        tail: a top-k input's unlisted tokens: ``"slm"`` (the leftover mass shaped like the SLM's
            distribution, as the two-model mix does; default) or ``"uniform"``.

    With neither ``weights`` nor ``head`` (what ``parse_rule("mixture(slm,llm)")`` gives) the rule waits
    for its head (:meth:`with_head`); the decode loop refuses it until then.

    >>> from logitfuse.rules import Mixture
    >>> Mixture(("slm", "llm", "expert"), weights=(2, 1, 1), kind="geometric").spec
    'geometric(slm=0.5,llm=0.25,expert=0.25)'
    """

    inputs: tuple[str, ...] = (PIVOT, "llm")
    weights: tuple[float, ...] | None = None
    head: Any = None
    kind: str = "linear"
    tail: str = "slm"

    def __post_init__(self) -> None:
        names = tuple(_input_name("inputs", n) for n in self.inputs) if isinstance(self.inputs, (tuple, list)) else ()
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"inputs={self.inputs!r} must name at least two distinct inputs, e.g. ('slm', 'llm')")
        object.__setattr__(self, "inputs", names)
        if self.weights is not None and self.head is not None:
            raise ValueError("Mixture: pass weights= (one per input) or head= (a mixture head, "
                             "logitfuse.heads.mixture.load_mixture_head), not both")
        if self.weights is not None:
            weights = tuple(_number(f"weights[{i}]", w, low=0.0) for i, w in enumerate(self.weights))
            if len(weights) != len(names):
                raise ValueError(f"weights={self.weights!r} holds {len(weights)} numbers for {len(names)} inputs "
                                 f"{names}; give one weight per input")
            total = sum(weights)
            if total <= 0:
                raise ValueError(f"weights={self.weights!r} sum to 0; give at least one input a positive weight")
            object.__setattr__(self, "weights", tuple(w / total for w in weights))
        elif self.head is not None:
            head_names = tuple(getattr(self.head, "input_names", ()) or ())
            if not callable(self.head) or head_names != names:
                raise ValueError(f"this mixture head was trained for the inputs {head_names} but the rule mixes "
                                 f"{names}; name the rule's inputs as the head's (or train a head for these)")
        if self.kind not in MIXTURE_KINDS:
            raise ValueError(f"kind={self.kind!r} is not one of {', '.join(map(repr, MIXTURE_KINDS))}")
        if self.tail not in MIXTURE_TAILS:
            raise ValueError(f"tail={self.tail!r} is not one of {', '.join(map(repr, MIXTURE_TAILS))} (a rule "
                             "needs normalized inputs, so not 'zero')")

    @property
    def combine_rule(self) -> str:  # type: ignore[override]
        return "mixture" if self.kind == "linear" else "sum"

    @property
    def needs_head(self) -> bool:
        """Neither weights nor a head yet (``mixture(NAME,...)``): :meth:`with_head` gives the usable rule."""
        return self.weights is None and self.head is None

    def with_head(self, head: Any) -> Mixture:
        """This mixture weighted per step by ``head`` (its ``input_names`` must equal :attr:`inputs`)."""
        return Mixture(self.inputs, head=head, kind=self.kind, tail=self.tail)

    def fixed_coefficients(self) -> tuple[float, ...] | None:
        return self.weights

    def coefficients(self, logprobs: Any) -> Any:
        if self.head is None:
            if self.weights is None:
                raise ValueError(f"rule {self.spec!r} takes its weights from a mixture head: "
                                 "rule.with_head(logitfuse.heads.mixture.load_mixture_head(PATH))")
            return super().coefficients(logprobs)
        return self.head(logprobs).float()

    @property
    def spec(self) -> str:
        name = "mixture" if self.kind == "linear" else self.kind
        if self.weights is None:
            return f"{name}({','.join(self.inputs)})"
        if self.inputs == (PIVOT, "llm"):
            return f"{name}({','.join(map(_g, self.weights))})"
        return f"{name}({','.join(f'{n}={_g(w)}' for n, w in zip(self.inputs, self.weights))})"


@dataclass(frozen=True)
class Arithmetic(Rule):
    """Log-probability arithmetic: ``log_softmax(log p_base + Σ βᵢ (log p_expertᵢ − log p_antiᵢ))``.

    Proxy-tuning (Liu et al. 2024, arXiv 2401.08565: a large base steered by a small tuned-minus-untuned
    pair, β = 1), DExperts (Liu et al. 2021, arXiv 2105.03023) and context steering: the LLM steered by
    the SLM's with-context minus without-context difference, ``base="llm"``, term ``(β, "slm",
    "slm_public")``: the context shapes the step through the SLM only, never sent.

    Args:
        base: the input that is steered (coefficient 1).
        terms: ``(beta, expert, anti)`` triples; an input named twice gets the sum of its coefficients.

    A top-k input's unlisted tokens get the uniform tail (``tail="uniform"``): an input says nothing
    about them, and the difference of two such inputs is one constant there, which the softmax removes.

    >>> from logitfuse.rules import Arithmetic
    >>> Arithmetic().spec, Arithmetic(terms=((2.0, "expert", "anti"), (0.5, "slm", "slm_public"))).inputs
    ('arithmetic(1)', ('llm', 'expert', 'anti', 'slm', 'slm_public'))
    """

    base: str = "llm"
    terms: tuple[tuple[float, str, str], ...] = ((1.0, "expert", "anti"),)

    def __post_init__(self) -> None:
        _input_name("base", self.base)
        if not isinstance(self.terms, (tuple, list)) or not self.terms:
            raise ValueError(f"terms={self.terms!r} must hold at least one (beta, expert, anti) triple")
        terms = []
        for i, term in enumerate(self.terms):
            if not isinstance(term, (tuple, list)) or len(term) != 3:
                raise ValueError(f"terms[{i}]={term!r} must be a (beta, expert, anti) triple")
            beta, expert, anti = term
            terms.append((_number(f"terms[{i}] beta", beta), _input_name(f"terms[{i}] expert", expert),
                          _input_name(f"terms[{i}] anti", anti)))
            if expert == anti:
                raise ValueError(f"terms[{i}]: expert and anti are both {expert!r}; the difference would be 0")
        object.__setattr__(self, "terms", tuple(terms))

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        names = [self.base] + [n for _, expert, anti in self.terms for n in (expert, anti)]
        return tuple(dict.fromkeys(names))

    def fixed_coefficients(self) -> tuple[float, ...]:
        coef = dict.fromkeys(self.inputs, 0.0)
        coef[self.base] += 1.0
        for beta, expert, anti in self.terms:
            coef[expert] += beta
            coef[anti] -= beta
        return tuple(coef.values())

    @property
    def spec(self) -> str:
        if self.base == "llm" and len(self.terms) == 1:
            beta, expert, anti = self.terms[0]
            if (expert, anti) == ("expert", "anti"):
                return f"arithmetic({_g(beta)})"
            if (expert, anti) == (PIVOT, "slm_public"):
                return f"steer({_g(beta)})"
        if len(self.terms) == 1:
            beta, expert, anti = self.terms[0]
            return f"arithmetic({_g(beta)},base={self.base},expert={expert},anti={anti})"
        raise ValueError("an Arithmetic rule of several terms has no spec string; build it in Python")


@dataclass(frozen=True)
class Contrastive(Rule):
    """Contrastive decoding (Li et al. 2023, arXiv 2210.15097): ``log p_expert − λ log p_amateur`` over the
    plausible tokens ``{x : p_expert(x) ≥ τ · max p_expert}``; the others get probability 0.

    Args:
        expert, amateur: input names (default the LLM as the expert and the SLM reading the public
            prompt as the amateur: the paper's large-versus-small pair on one prompt; ``expert="slm"``
            instead contrasts the SLM with and without its private context).
        amateur_weight: λ ``>= 0`` (the paper: 1; O'Brien & Lewis 2023 use smaller values).
        plausibility: τ in ``[0, 1]`` (the paper's α, 0.1).

    A top-k input's unlisted tokens get the uniform tail, as in :class:`Arithmetic`; an expert's unlisted
    tokens fall under the cut whenever its tail probability is below τ times its top one.

    >>> from logitfuse.rules import Contrastive
    >>> Contrastive(expert="slm", amateur="slm_public", amateur_weight=0.5).spec
    'contrastive(0.5,0.1,expert=slm,amateur=slm_public)'
    """

    expert: str = "llm"
    amateur: str = "slm_public"
    amateur_weight: float = 1.0
    plausibility: float | None = 0.1  # type: ignore[assignment]

    def __post_init__(self) -> None:
        _input_name("expert", self.expert)
        _input_name("amateur", self.amateur)
        if self.expert == self.amateur:
            raise ValueError(f"expert and amateur are both {self.expert!r}; contrast two different inputs")
        object.__setattr__(self, "amateur_weight", _number("amateur_weight", self.amateur_weight, low=0.0))
        object.__setattr__(self, "plausibility", _number("plausibility", self.plausibility, low=0.0, high=1.0))

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.expert, self.amateur)  # the expert first: the plausibility cut reads input 0

    def fixed_coefficients(self) -> tuple[float, ...]:
        return (1.0, -self.amateur_weight)

    @property
    def spec(self) -> str:
        out = f"contrastive({_g(self.amateur_weight)},{_g(self.plausibility)}"
        if (self.expert, self.amateur) != ("llm", "slm_public"):
            out += f",expert={self.expert},amateur={self.amateur}"
        return out + ")"
