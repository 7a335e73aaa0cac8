"""Fusion rules written as one short string (``logitfuse generate --rule``, ``logitfuse eval --rule``).

Grammar: ``NAME`` or ``NAME(ARG,ARG,...)``; an argument is a number, an input name, or ``KEY=VALUE``.
Input names: ``slm`` (the pivot: the SLM over the private prompt), ``llm``, ``slm_public`` (the SLM
over the public prompt), ``expert``, ``anti``, or any name a caller gives an input.

======================================  ===================================================================
spec                                    rule
======================================  ===================================================================
``mix``                                 today's two-model CoGenesis mix (α or head from the other settings)
``mixture(W_SLM,W_LLM)``                linear mixture of ``slm`` and ``llm``; weights divided by their sum
``mixture(NAME=W,NAME=W,...)``          linear mixture of the named inputs (any N >= 2)
``mixture(NAME,NAME,...)``              weights per step from a mixture head (:meth:`Mixture.with_head`)
``geometric(...)``, ``logit(...)``      the same arguments; product of experts (``logit``: the same result)
``arithmetic(BETA)``                    ``llm + BETA·(expert − anti)``: proxy-tuning, DExperts
``arithmetic(BETA,base=B,expert=E,anti=A)``  the same with other inputs
``steer(BETA)``                         ``llm + BETA·(slm − slm_public)``: context steering
``contrastive(LAMBDA[,TAU])``           ``llm − LAMBDA·slm_public`` over tokens with ``p_llm ≥ TAU·max p_llm``
                                        (TAU default 0.1); ``expert=E,amateur=A`` name other inputs
======================================  ===================================================================

>>> from logitfuse.rules import parse_rule
>>> parse_rule("mixture(0.7, 0.3)")
Mixture(inputs=('slm', 'llm'), weights=(0.7, 0.3), head=None, kind='linear', tail='slm')
>>> parse_rule("steer(0.5)").fixed_coefficients()
(1.0, 0.5, -0.5)
>>> str(parse_rule("contrastive(0.5)"))
'contrastive(0.5,0.1)'
>>> parse_rule("mixture(0.5)")
Traceback (most recent call last):
...
ValueError: rule 'mixture(0.5)': mixture takes one weight per input: two numbers (slm, llm) or NAME=W pairs, e.g. mixture(0.7,0.3) or mixture(slm=0.5,llm=0.3,expert=0.2)
"""

from __future__ import annotations

import re
from typing import Any

from logitfuse.rules.base import PIVOT, Arithmetic, Contrastive, Mix, Mixture, Rule

__all__ = ["RULE_NAMES", "parse_rule"]

RULE_NAMES = ("mix", "mixture", "geometric", "logit", "arithmetic", "steer", "contrastive")
_SPEC = re.compile(r"^\s*([a-z]+)\s*(?:\((.*)\))?\s*$", re.S)
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _value(text: str) -> float | str:
    if _NUMBER.match(text):
        return float(text)
    if _IDENT.match(text):
        return text
    raise ValueError(f"{text!r} is neither a number nor an input name")


def _arguments(body: str | None) -> tuple[list[Any], dict[str, Any]]:
    """``(positional, keyword)`` arguments of ``NAME(...)``; ``ValueError`` on a malformed one."""
    if body is None or not body.strip():
        return [], {}
    positional, keyword = [], {}
    for part in (p.strip() for p in body.split(",")):
        if not part:
            raise ValueError("an empty argument (two commas, or a trailing one)")
        key, eq, value = part.partition("=")
        if eq:
            key = key.strip()
            if not _IDENT.match(key):
                raise ValueError(f"{key!r} is not a name")
            if key in keyword:
                raise ValueError(f"{key} is given twice")
            keyword[key] = _value(value.strip())
        else:
            if keyword:
                raise ValueError(f"the plain argument {part!r} comes after a NAME=VALUE one")
            positional.append(_value(part))
    return positional, keyword


def _numbers(name: str, values: list[Any], low: int, high: int, what: str) -> list[float]:
    if not low <= len(values) <= high or not all(isinstance(v, float) for v in values):
        raise ValueError(f"{name} takes {what}")
    return values


def _names(keyword: dict[str, Any], allowed: tuple[str, ...], name: str) -> dict[str, str]:
    unknown = sorted(set(keyword) - set(allowed))
    if unknown:
        raise ValueError(f"{name} has no argument {', '.join(unknown)} (it takes {', '.join(allowed)})")
    for key, value in keyword.items():
        if not isinstance(value, str):
            raise ValueError(f"{key}= takes an input name, got {value:g}")
    return keyword


def _mixture(name: str, positional: list[Any], keyword: dict[str, Any]) -> Mixture:
    kind = "linear" if name == "mixture" else name
    usage = (f"{name} takes one weight per input: two numbers (slm, llm) or NAME=W pairs, e.g. {name}(0.7,0.3) or "
             f"{name}(slm=0.5,llm=0.3,expert=0.2); or input names only ({name}(slm,llm)) for a mixture head")
    if not positional and not keyword:
        raise ValueError(f"{name} needs arguments: {usage.split(': ', 1)[1]}")
    if positional and all(isinstance(v, str) for v in positional) and not keyword:
        return Mixture(tuple(positional), kind=kind)  # weights from a head, given later (Mixture.with_head)
    if keyword and not positional:
        if not all(isinstance(v, float) for v in keyword.values()):
            raise ValueError(usage)
        return Mixture(tuple(keyword), weights=tuple(keyword.values()), kind=kind)
    if len(positional) == 2 and not keyword and all(isinstance(v, float) for v in positional):
        return Mixture((PIVOT, "llm"), weights=tuple(positional), kind=kind)
    raise ValueError(usage.split("; or")[0])


def parse_rule(spec: str) -> Rule:
    """The rule a spec string names (grammar: the module docstring); ``ValueError`` naming the spec and
    the fix otherwise. ``str(rule)`` gives a spec that parses back to an equal rule.

    >>> from logitfuse.rules import parse_rule
    >>> parse_rule("arithmetic(1.5)")
    Arithmetic(base='llm', terms=((1.5, 'expert', 'anti'),))
    >>> parse_rule("mix")
    Mix(inputs=('slm', 'llm'))
    """
    if isinstance(spec, Rule):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a rule spec must be a string such as 'mix' or 'steer(0.5)', got {type(spec).__name__}")
    match = _SPEC.match(spec)
    if match is None or match.group(1) not in RULE_NAMES:
        raise ValueError(f"rule {spec!r} is not one of {', '.join(RULE_NAMES)}, written NAME or NAME(ARGS), e.g. "
                         "'mix', 'mixture(0.7,0.3)', 'steer(0.5)', 'arithmetic(1)', 'contrastive(1,0.1)'")
    name, body = match.group(1), match.group(2)
    try:
        positional, keyword = _arguments(body)
        if name == "mix":
            if positional or keyword:
                raise ValueError("mix takes no arguments (α or the head come from --alpha / --head, FusionConfig)")
            return Mix()
        if name in ("mixture", "geometric", "logit"):
            return _mixture(name, positional, keyword)
        if name == "steer":
            _names(keyword, (), name)
            (beta,) = _numbers(name, positional, 1, 1, "one number, BETA: steer(0.5)")
            return Arithmetic(base="llm", terms=((beta, PIVOT, "slm_public"),))
        if name == "arithmetic":
            names = _names(keyword, ("base", "expert", "anti"), name)
            (beta,) = _numbers(name, positional, 1, 1, "one number, BETA, then optionally base=, expert=, anti= "
                                                       "input names: arithmetic(1) or arithmetic(1,expert=slm)")
            return Arithmetic(base=names.get("base", "llm"),
                              terms=((beta, names.get("expert", "expert"), names.get("anti", "anti")),))
        names = _names(keyword, ("expert", "amateur"), name)  # contrastive
        numbers = _numbers(name, positional, 1, 2, "LAMBDA and optionally TAU (default 0.1): contrastive(1) "
                                                   "or contrastive(0.5,0.1)")
        return Contrastive(expert=names.get("expert", "llm"), amateur=names.get("amateur", "slm_public"),
                           amateur_weight=numbers[0], plausibility=numbers[1] if len(numbers) > 1 else 0.1)
    except ValueError as err:
        raise ValueError(f"rule {spec!r}: {err}") from None
