"""Fusion rules over N aligned inputs: mixtures, log-probability arithmetic, contrastive decoding.

A rule (:class:`Mixture`, :class:`Arithmetic`, :class:`Contrastive`, or :class:`Mix`, today's two-model
mix) reads named inputs: ``"slm"``, the pivot (the on-device SLM over the private prompt), and
:class:`Input` objects (a backend, the prompt it reads, whether it is on the device). Give the rule to
:func:`logitfuse.generate` or :class:`logitfuse.CoGenesisLogitsProcessor` with ``rule=`` (a rule or a
spec string, :func:`parse_rule`) and the inputs with ``inputs={"name": Input(...)}``; the LLM backend
passed as ``llm`` is the input ``"llm"``. See the docs page "Fusion rules (N models)".

>>> from logitfuse.rules import parse_rule
>>> parse_rule("steer(0.5)").inputs
('llm', 'slm', 'slm_public')
"""

from logitfuse.rules.base import PIVOT, Arithmetic, Contrastive, Mix, Mixture, Rule
from logitfuse.rules.inputs import Input
from logitfuse.rules.spec import RULE_NAMES, parse_rule

__all__ = ["PIVOT", "RULE_NAMES", "Arithmetic", "Contrastive", "Input", "Mix", "Mixture", "Rule", "parse_rule"]
