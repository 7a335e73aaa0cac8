"""The rule spec strings (``--rule``): each form parses to the rule it names, prints back to an equal
rule, and a malformed one is a ValueError naming the spec and the fix."""

from __future__ import annotations

import pytest

from logitfuse.rules import Arithmetic, Contrastive, Mix, Mixture, parse_rule


class StandInHead:
    """A tiny mixture head with the agreed interface: uniform weights over its inputs."""

    def __init__(self, names):
        self.input_names = tuple(names)

    def __call__(self, logprobs):
        import torch

        n, b, _ = logprobs.shape
        return torch.full((b, n), 1.0 / n)


@pytest.mark.parametrize("spec, rule", [
    ("mix", Mix()),
    (" mix ", Mix()),
    ("mixture(0.7,0.3)", Mixture(("slm", "llm"), weights=(0.7, 0.3))),
    ("mixture(3, 1)", Mixture(("slm", "llm"), weights=(0.75, 0.25))),
    ("geometric(slm=1,llm=1,expert=2)", Mixture(("slm", "llm", "expert"), weights=(0.25, 0.25, 0.5), kind="geometric")),
    ("logit(0.5,0.5)", Mixture(("slm", "llm"), weights=(0.5, 0.5), kind="logit")),
    ("mixture(slm,llm,slm_public)", Mixture(("slm", "llm", "slm_public"))),
    ("arithmetic(1)", Arithmetic("llm", ((1.0, "expert", "anti"),))),
    ("arithmetic(2,base=slm,expert=llm,anti=slm_public)", Arithmetic("slm", ((2.0, "llm", "slm_public"),))),
    ("steer(0.5)", Arithmetic("llm", ((0.5, "slm", "slm_public"),))),
    ("steer(-1e-1)", Arithmetic("llm", ((-0.1, "slm", "slm_public"),))),
    ("contrastive(1)", Contrastive("llm", "slm_public", 1.0, 0.1)),
    ("contrastive(0.5,0.2,expert=slm)", Contrastive("slm", "slm_public", 0.5, 0.2)),
])
def test_each_form_parses_to_its_rule_and_prints_back(spec, rule):
    parsed = parse_rule(spec)
    assert parsed == rule
    assert parse_rule(str(parsed)) == parsed


@pytest.mark.parametrize("spec, fragment", [
    ("blend(0.5)", "is not one of mix, mixture"),
    ("mixture", "mixture needs arguments"),
    ("mixture(0.5)", "one weight per input"),
    ("mixture(0.5,0.3,0.2)", "NAME=W pairs"),
    ("mixture(slm=0.5,llm)", "after a NAME=VALUE"),
    ("mixture(slm=1,slm=2)", "slm is given twice"),
    ("mixture(0,0)", "sum to 0"),
    ("mixture(-1,2)", "must be a finite number"),
    ("mixture(slm,slm)", "two distinct inputs"),
    ("mixture(0.5,,0.5)", "empty argument"),
    ("steer()", "one number"),
    ("steer(1,2)", "one number"),
    ("steer(beta=1)", "no argument beta"),
    ("arithmetic(1,expert=llm,anti=llm)", "the difference would be 0"),
    ("arithmetic(1,expert=3)", "takes an input name"),
    ("contrastive(1,2)", "plausibility=2.0"),
    ("contrastive(-1)", "amateur_weight=-1.0"),
    ("contrastive(1,expert=llm,amateur=llm)", "contrast two different inputs"),
    ("mix(0.5)", "mix takes no arguments"),
    ("mixture(0.5;0.5)", "neither a number nor an input name"),
])
def test_a_malformed_spec_names_itself_and_the_fix(spec, fragment):
    with pytest.raises(ValueError) as err:
        parse_rule(spec)
    assert spec in str(err.value) and fragment in str(err.value)


def test_a_spec_must_be_text():
    with pytest.raises(TypeError, match="must be a string"):
        parse_rule(0.5)


def test_a_head_mixture_waits_for_its_head_and_checks_its_names():
    slot = parse_rule("mixture(slm,llm,expert)")
    assert slot.needs_head
    with pytest.raises(ValueError, match="takes its weights from a mixture head"):
        import torch

        slot.coefficients(torch.zeros(3, 1, 4))
    rule = slot.with_head(StandInHead(("slm", "llm", "expert")))
    assert not rule.needs_head and rule.spec == "mixture(slm,llm,expert)"
    with pytest.raises(ValueError) as err:
        slot.with_head(StandInHead(("slm", "llm")))
    assert "('slm', 'llm')" in str(err.value) and "('slm', 'llm', 'expert')" in str(err.value)


def test_coefficients_per_rule():
    assert Mixture(("slm", "llm"), weights=(1, 3)).fixed_coefficients() == (0.25, 0.75)
    assert parse_rule("arithmetic(2)").fixed_coefficients() == (1.0, 2.0, -2.0)
    # an input named twice gets the sum of its coefficients
    both = Arithmetic("llm", ((1.0, "slm", "slm_public"), (0.5, "expert", "slm_public")))
    assert both.inputs == ("llm", "slm", "slm_public", "expert")
    assert both.fixed_coefficients() == (1.0, 1.0, -1.5, 0.5)
    assert Contrastive(amateur_weight=0.3).inputs == ("llm", "slm_public")
    assert Contrastive(amateur_weight=0.3).fixed_coefficients() == (1.0, -0.3)
    assert parse_rule("steer(0.5)").pivot_coefficient() == 0.5
    assert parse_rule("contrastive(1)").pivot_coefficient() == 0.0
