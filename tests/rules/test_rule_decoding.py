"""Fusion rules through the decode loop (logitfuse.generate) and the transformers processor.

Each rule's greedy tokens are compared with a plain loop written here from the rule's formula (every
model re-reads its whole prompt at every step, no KV cache, no session): the engine's alignment,
per-input sessions and combine must give the same tokens. The default (no rule, or "mix") gives the
tokens of fusion without a rule, greedy and sampled.
"""

from __future__ import annotations

import pytest
import torch

import logitfuse
from logitfuse.rules import Arithmetic, Contrastive, Input, Mixture
from logitfuse.testing import tiny_llama
from logitfuse.testing.generation import PRIVATE, PUBLIC, chat_ids, generate, left_pad, private_prompt_ids

STEPS = 8


@pytest.fixture(scope="module")
def models(tok, slm, llm_model):
    return {"slm": slm, "llm": llm_model, "expert": tiny_llama(len(tok), seed=2), "anti": tiny_llama(len(tok), seed=3)}


@pytest.fixture(scope="module")
def prompts(tok):
    """``(private ids, public ids)`` of one row."""
    return private_prompt_ids(tok, PRIVATE, PUBLIC), chat_ids(tok, PUBLIC)


def alone(model, ids: list[int]) -> torch.Tensor:
    """The model's next-token log-probabilities after ``ids``, from a full forward (the oracle's view)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)


def reference_greedy(formula, models, private: list[int], public: list[int]) -> list[int]:
    """Greedy decoding from ``formula(lp)`` (``lp``: name -> log-probabilities), each input re-read whole."""
    out: list[int] = []
    for _ in range(STEPS):
        lp = {"slm": alone(models["slm"], private + out), "slm_public": alone(models["slm"], public + out)}
        for name in ("llm", "expert", "anti"):
            lp[name] = alone(models[name], public + out)
        out.append(int(formula(lp).argmax()))
    return out


def contrastive_formula(lam: float, tau: float):
    def formula(lp):
        expert, amateur = lp["llm"], lp["slm_public"]
        keep = expert.exp() >= tau * expert.exp().max()
        return torch.where(keep, expert - lam * amateur, -torch.inf)
    return formula


FORMULAS = {
    "steer(0.7)": lambda lp: lp["llm"] + 0.7 * (lp["slm"] - lp["slm_public"]),
    "arithmetic(1.5)": lambda lp: lp["llm"] + 1.5 * (lp["expert"] - lp["anti"]),
    "contrastive(0.5,0.1)": contrastive_formula(0.5, 0.1),
    "contrastive(1,0.3)": contrastive_formula(1.0, 0.3),
    "mixture(0.3,0.7)": lambda lp: torch.logaddexp(lp["slm"] + torch.tensor(0.3).log(), lp["llm"] + torch.tensor(0.7).log()),
    "geometric(0.3,0.7)": lambda lp: 0.3 * lp["slm"] + 0.7 * lp["llm"],
    "logit(0.3,0.7)": lambda lp: 0.3 * lp["slm"] + 0.7 * lp["llm"],
    "mixture(slm=0.2,llm=0.3,expert=0.5)": lambda lp: torch.logsumexp(torch.stack([
        lp["slm"] + torch.tensor(0.2).log(), lp["llm"] + torch.tensor(0.3).log(), lp["expert"] + torch.tensor(0.5).log()]), 0),
}


def inputs_for(rule, tok, models) -> dict[str, Input]:
    """Every input the rule reads besides slm: the LLM, the SLM over the public prompt (on-device), the
    expert/anti pair."""
    every = {"llm": logitfuse.HFLLM(models["llm"], tok),
             "slm_public": Input(logitfuse.HFLLM(models["slm"], tok), on_device=True),
             "expert": Input(logitfuse.HFLLM(models["expert"], tok)), "anti": Input(logitfuse.HFLLM(models["anti"], tok))}
    wanted = logitfuse.rules.parse_rule(rule).inputs
    return {name: inp for name, inp in every.items() if name in wanted}


@pytest.mark.parametrize("rule", sorted(FORMULAS))
@pytest.mark.parametrize("overlap", [True, False])
def test_generate_follows_the_rule_formula(rule, overlap, tok, models, prompts):
    private, public = prompts
    out = logitfuse.generate(models["slm"], inputs_for(rule, tok, models), [private], public, rule=rule,
                             max_new_tokens=STEPS, eos_token_id=[], overlap=overlap)
    assert out.sequences[0] == reference_greedy(FORMULAS[rule], models, private, public)


@pytest.mark.parametrize("rule", ["steer(0.7)", "contrastive(0.5,0.1)", "geometric(0.3,0.7)"])
def test_the_processor_follows_the_rule_formula(rule, tok, models, prompts):
    private, public = prompts
    proc = logitfuse.CoGenesisLogitsProcessor(inputs_for(rule, tok, models), public, rule=rule)
    new = generate(models["slm"], left_pad([private]), STEPS, proc)
    assert new[0].tolist() == reference_greedy(FORMULAS[rule], models, private, public)
    assert proc.stats["steps"] == STEPS


def test_the_rule_runs_several_rows_of_different_lengths(tok, models):
    """Rows batched with left padding give each row's own tokens."""
    publics = [PUBLIC, "Dear friends,"]
    privates = [private_prompt_ids(tok, PRIVATE, p) for p in publics]
    rule = "steer(0.7)"
    both = logitfuse.generate(models["slm"], inputs_for(rule, tok, models), privates, [chat_ids(tok, p) for p in publics],
                              rule=rule, max_new_tokens=STEPS, eos_token_id=[])
    for row, public in enumerate(publics):
        assert both.sequences[row] == reference_greedy(FORMULAS[rule], models, privates[row], chat_ids(tok, public))


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_p=0.9, seed=3)], ids=["greedy", "sampled"])
def test_the_default_rule_gives_the_tokens_of_fusion_without_a_rule(sampling, tok, slm, llm_model, prompts):
    private, public = prompts
    llm = logitfuse.HFLLM(llm_model, tok)
    run = dict(max_new_tokens=12, alpha=0.4, eos_token_id=[], **sampling)
    before = logitfuse.generate(slm, llm, [private, private[3:]], public, **run)
    for rule in ("mix", logitfuse.rules.Mix()):
        assert logitfuse.generate(slm, llm, [private, private[3:]], public, rule=rule, **run).sequences == before.sequences
    # the processor too
    plain = generate(slm, left_pad([private]), 6, logitfuse.CoGenesisLogitsProcessor(llm, public, alpha=0.4))
    mixed = generate(slm, left_pad([private]), 6, logitfuse.CoGenesisLogitsProcessor(llm, public, alpha=0.4, rule="mix"))
    assert torch.equal(plain, mixed)


def test_a_two_input_linear_mixture_picks_the_tokens_of_the_mix(tok, slm, llm_model, prompts):
    """mixture(a, 1 - a) and the two-model mix at α = a are one distribution (computed two ways)."""
    private, public = prompts
    llm = logitfuse.HFLLM(llm_model, tok)
    mix = logitfuse.generate(slm, llm, [private], public, alpha=0.3, max_new_tokens=STEPS, eos_token_id=[])
    rule = logitfuse.generate(slm, llm, [private], public, rule="mixture(0.3,0.7)", max_new_tokens=STEPS,
                              eos_token_id=[])
    assert rule.sequences == mix.sequences
    assert rule.alpha[0] == pytest.approx([0.3] * STEPS)


class EntropyHead(torch.nn.Module):
    """A stand-in mixture head with the agreed interface: the lower an input's entropy, the larger its weight."""

    input_names = ("slm", "llm")

    def forward(self, logprobs: torch.Tensor) -> torch.Tensor:
        entropy = -(logprobs.exp() * logprobs.nan_to_num(neginf=0.0)).sum(-1)  # (N, B)
        return torch.softmax(-entropy.t(), dim=-1)


def test_a_mixture_head_weighs_each_step(tok, slm, llm_model, prompts):
    private, public = prompts
    rule = Mixture(("slm", "llm"), head=EntropyHead())

    def formula(lp):
        weights = EntropyHead()(torch.stack([lp["slm"][None], lp["llm"][None]]))[0]
        return torch.logaddexp(lp["slm"] + weights[0].log(), lp["llm"] + weights[1].log())

    out = logitfuse.generate(slm, logitfuse.HFLLM(llm_model, tok), [private], public, rule=rule,
                             max_new_tokens=STEPS, eos_token_id=[])
    assert out.sequences[0] == reference_greedy(formula, {"slm": slm, "llm": llm_model, "expert": slm, "anti": slm},
                                                private, public)
    assert len(set(round(a, 6) for a in out.alpha[0])) > 1  # the SLM's weight changes per step


def test_sampling_under_a_rule_follows_the_seed(tok, models, prompts):
    private, public = prompts
    rule = "steer(0.7)"

    def run(seed):
        return logitfuse.generate(models["slm"], inputs_for(rule, tok, models), [private], public, rule=rule,
                                  max_new_tokens=STEPS, temperature=1.0, seed=seed, eos_token_id=[]).sequences

    assert run(5) == run(5)
    assert any(run(5) != run(s) for s in (6, 7, 8))


def test_a_row_ends_at_its_eos_under_a_rule(tok, models, prompts):
    private, public = prompts
    rule = "steer(0.7)"
    first = reference_greedy(FORMULAS[rule], models, private, public)
    out = logitfuse.generate(models["slm"], inputs_for(rule, tok, models), [private], public, rule=rule,
                             max_new_tokens=STEPS, eos_token_id=[first[2]])
    assert out.sequences[0] == first[:first.index(first[2]) + 1]


# ------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("settings, fragment", [
    (dict(rule="steer(1)", speculate=2), "speculate=2"),
    (dict(rule="steer(1)", schedule="entropy_gate(2.0)"), "schedule='entropy_gate(2.0)'"),
    (dict(rule="steer(1)", alpha=0.5), "alpha=0.5"),
    (dict(rule="steer(1)", mode="geometric"), "mode='geometric'"),
    (dict(rule="mixture(slm,llm)"), "takes its weights from a mixture head"),
    (dict(rule="steer(1)"), "['slm_public'] is not given"),
    (dict(rule="mixture(0.5,0.5)", extra=True), "inputs ['extra'] are given but rule"),
    (dict(alpha=0.5, extra=True), "llm is a dict of inputs, which a fusion rule reads"),
    (dict(rule="mixture(0.5,0.5)", slm=True), "'slm' is the SLM the loop generates with"),
])
def test_what_a_rule_cannot_do_is_refused_before_anything_is_sent(settings, fragment, tok, slm, llm_model, prompts):
    private, public = prompts
    llm, other = logitfuse.HFLLM(llm_model, tok), logitfuse.HFLLM(slm, tok)
    settings = dict(settings)
    inputs = llm
    if settings.pop("extra", None):
        inputs = {"llm": llm, "extra": other}
    if settings.pop("slm", None):
        inputs = {"llm": llm, "slm": other}
    with pytest.raises(ValueError) as err:
        logitfuse.generate(slm, inputs, [private], public, max_new_tokens=2, **settings)
    assert fragment in str(err.value)
    assert llm.audit_log == [] and other.audit_log == []


def test_a_rule_without_the_llm_needs_no_llm(tok, models, prompts):
    """A rule that does not read "llm" runs without it."""
    private, public = prompts
    rule = Arithmetic(base="slm", terms=((0.5, "expert", "anti"),))
    inputs = {n: i for n, i in inputs_for("arithmetic(1)", tok, models).items() if n != "llm"}
    out = logitfuse.generate(models["slm"], inputs, [private], public, rule=rule, max_new_tokens=STEPS, eos_token_id=[])
    assert out.sequences[0] == reference_greedy(lambda lp: lp["slm"] + 0.5 * (lp["expert"] - lp["anti"]), models,
                                                private, public)


def test_contrastive_keeps_only_plausible_tokens(tok, models, prompts):
    """Every chosen token passes the cut: p_expert >= τ · max p_expert, at τ high enough to bite."""
    private, public = prompts
    tau = 0.5
    out = logitfuse.generate(models["slm"], inputs_for("contrastive(1)", tok, models), [private], public,
                             rule=Contrastive(amateur_weight=3.0, plausibility=tau), max_new_tokens=STEPS, eos_token_id=[])
    for i, token in enumerate(out.sequences[0]):
        expert = alone(models["llm"], public + out.sequences[0][:i]).exp()
        assert expert[token] >= tau * expert.max()


def test_each_public_input_may_get_its_own_public_prompt(tok, models, prompts):
    """public_prompt as a dict by input name (each input's prompt in its own chat template, say)."""
    private, public = prompts
    rule = "steer(0.7)"
    other = chat_ids(tok, "Dear friends,")

    def formula(lp):
        return lp["llm"] + 0.7 * (lp["slm"] - lp["slm_public"])

    out = logitfuse.generate(models["slm"], inputs_for(rule, tok, models), [private], {"llm": public, "slm_public": other},
                             rule=rule, max_new_tokens=STEPS, eos_token_id=[])
    expected: list[int] = []
    for _ in range(STEPS):
        lp = {"slm": alone(models["slm"], private + expected), "slm_public": alone(models["slm"], other + expected),
              "llm": alone(models["llm"], public + expected)}
        expected.append(int(formula(lp).argmax()))
    assert out.sequences[0] == expected
    inputs = inputs_for(rule, tok, models)
    with pytest.raises(ValueError, match=r"\['slm_public'\] missing"):
        logitfuse.generate(models["slm"], inputs, [private], {"llm": public}, rule=rule, max_new_tokens=2)
    assert inputs["llm"].audit_log == []


def test_a_fusion_session_refuses_a_rule(tok, llm_model):
    llm = logitfuse.HFLLM(llm_model, tok)
    with pytest.raises(ValueError, match="a FusionSession runs the two-model mix"):
        logitfuse.FusionSession(llm, rule="steer(1)")
    assert logitfuse.FusionSession(llm, alpha=0.5, rule="mix").alpha == 0.5
