"""Privacy per input under a fusion rule, and how each rule treats a top-k input's unlisted tokens.

Private contexts carry canary strings; after generation under a rule, no canary (nor a run of its
token ids) is in anything a backend that is not on the device received: the served LLM's request
bodies (as the server got them) and an in-process public input's token streams. An on-device input
marked to read the private prompt does get it (the routing works), and what cannot be proved safe is
refused before anything is sent.
"""

from __future__ import annotations

import json

import pytest
import torch

import logitfuse
from logitfuse.decoding.rule_session import RuleSession
from logitfuse.rules import Arithmetic, Input, Mixture
from logitfuse.testing.generation import PUBLIC, chat_ids, contains_subsequence, hf_streams, left_pad, private_prompt_ids
from logitfuse.testing import generation

CANARIES = ["Zq7xK2pL9mWv", "h4TtR8cYbN1s"]


def private_context(canary: str) -> str:
    return f"My name is Martin. Door code: {canary} (never share)."


def needles(tok, canary: str) -> list[list[int]]:
    out = []
    for text in (canary, " " + canary, ": " + canary):
        ids = list(tok.encode(text, add_special_tokens=False))
        out += [ids] + ([ids[1:-1]] if len(ids) >= 5 else [])
    return out


def assert_nothing_private(texts: list[str], streams: list[list[int]], tok, canary: str) -> None:
    for text in texts:
        assert canary not in text
    for ids in streams:
        assert canary not in tok.decode(ids)
        assert not any(contains_subsequence(ids, n) for n in needles(tok, canary))


@pytest.fixture(scope="module")
def served_slm(slm, tok):
    """A second server, on the tiny SLM's weights (a served 'expert' that is not the LLM)."""
    from logitfuse.serve.server import serve_in_thread

    server, url = serve_in_thread(slm, tok, model_name="tiny-slm", log_requests=True)
    yield server, url
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("canary", CANARIES)
@pytest.mark.parametrize("rule", ["steer(0.5)", "contrastive(0.5,0.1)", "mixture(slm=0.4,llm=0.3,slm_private=0.3)"])
def test_only_on_device_private_inputs_see_the_context(rule, canary, served, slm, tok):
    server, url = served
    server.received.clear()
    private = private_prompt_ids(tok, private_context(canary), PUBLIC)
    assert any(contains_subsequence(private, n) for n in needles(tok, canary))
    llm = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=5, tokenizer=tok)
    public_slm = logitfuse.HFLLM(slm, tok)
    private_slm = logitfuse.HFLLM(slm, tok)
    every = {"llm": llm, "slm_public": Input(public_slm, on_device=True),
             "slm_private": Input(private_slm, prompt="private", on_device=True)}
    inputs = {n: i for n, i in every.items() if n in logitfuse.rules.parse_rule(rule).inputs}
    out = logitfuse.generate(slm, inputs, [private], PUBLIC, rule=rule, max_new_tokens=6, eos_token_id=[])
    assert len(out.sequences[0]) == 6
    received = [body.decode("utf-8") for body in server.received]
    assert received and sorted(received) == sorted(llm.audit_log)  # the audit log is what arrived
    assert_nothing_private(received, generation.remote_prompts(llm.audit_log), tok, canary)
    assert_nothing_private([json.dumps(e) for e in public_slm.audit_log], hf_streams(public_slm.audit_log), tok, canary)
    if "slm_private" in inputs:  # the on-device private input got the context: the routing is real
        assert hf_streams(private_slm.audit_log)[0][:len(private)] == private


def test_a_served_backend_is_never_on_device(served, tok):
    _, url = served
    llm = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=5, tokenizer=tok)
    with pytest.raises(ValueError, match="only an in-process model"):
        Input(llm, prompt="private", on_device=True)
    with pytest.raises(ValueError, match="only an input marked on_device=True may read the private prompt"):
        Input(llm, prompt="private")
    assert llm.audit_log == []


def test_the_processor_refuses_a_private_input_before_sending(served, slm, tok):
    server, url = served
    server.received.clear()
    llm = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=5, tokenizer=tok)
    private_slm = logitfuse.HFLLM(slm, tok)
    with pytest.raises(ValueError, match="read the private prompt"):
        logitfuse.CoGenesisLogitsProcessor({"llm": llm, "slm_private": Input(private_slm, prompt="private", on_device=True)},
                                           PUBLIC, rule="mixture(slm=0.5,llm=0.25,slm_private=0.25)")
    assert llm.audit_log == [] and private_slm.audit_log == [] and server.received == []


@pytest.mark.parametrize("canary", CANARIES[:1])
def test_the_processor_under_a_rule_keeps_the_context(canary, served, slm, tok):
    server, url = served
    server.received.clear()
    llm = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=5, tokenizer=tok)
    public_slm = logitfuse.HFLLM(slm, tok)
    proc = logitfuse.CoGenesisLogitsProcessor({"llm": llm, "slm_public": Input(public_slm, on_device=True)}, PUBLIC,
                                              rule="steer(0.5)")
    generation.generate(slm, left_pad([private_prompt_ids(tok, private_context(canary), PUBLIC)]), 5, proc)
    received = [body.decode("utf-8") for body in server.received]
    assert len(received) == 5
    assert_nothing_private(received, generation.remote_prompts(llm.audit_log), tok, canary)
    assert_nothing_private([json.dumps(e) for e in public_slm.audit_log], hf_streams(public_slm.audit_log), tok, canary)


# ------------------------------------------------------------------------------------ top-k tails
def one_step(rule, inputs, slm, tok, public_ids):
    """One step of a RuleSession at the start of the public prompt, with the SLM's logits there."""
    session = RuleSession(rule, inputs)
    session.start([public_ids], v_slm=len(tok))
    with torch.no_grad():
        slm_logits = slm(torch.tensor([public_ids])).logits[:, -1].float()
    return session.step([[]], slm_logits)[0], torch.log_softmax(slm_logits[0], -1)


def test_arithmetic_is_constant_where_no_top_k_input_listed_a_token(served, served_slm, slm, llm_model, tok):
    """Uniform tails: base + β(expert − anti) is one constant over the tokens no top-k input listed, and on
    the others the dense base moves by exactly β(expert − anti)."""
    public = chat_ids(tok, PUBLIC)
    expert = logitfuse.OpenAICompatibleLLM(served[1], "tiny", top_k=5, tokenizer=tok)
    anti = logitfuse.OpenAICompatibleLLM(served_slm[1], "tiny-slm", top_k=5, tokenizer=tok)
    base = logitfuse.HFLLM(llm_model, tok)  # dense
    fused, _ = one_step(Arithmetic("llm", ((2.0, "expert", "anti"),)), {"llm": base, "expert": expert, "anti": anti},
                        slm, tok, public)
    with torch.no_grad():
        lp_base = torch.log_softmax(llm_model(torch.tensor([public])).logits[0, -1].float(), -1)
    expert_top = torch.log_softmax(llm_model(torch.tensor([public])).logits[0, -1].float(), -1).topk(5)
    anti_top = torch.log_softmax(slm(torch.tensor([public])).logits[0, -1].float(), -1).topk(5)
    named = set(expert_top.indices.tolist()) | set(anti_top.indices.tolist())
    rest = torch.tensor([i for i in range(len(tok)) if i not in named])
    shift = (fused - lp_base)[rest]
    assert float(shift.max() - shift.min()) < 1e-4
    # a token both listed: the steering there is exactly 2 (log p_expert − log p_anti), up to the same constant
    both = sorted(set(expert_top.indices.tolist()) & set(anti_top.indices.tolist()))
    for token in both:
        e = float(expert_top.values[expert_top.indices.tolist().index(token)])
        a = float(anti_top.values[anti_top.indices.tolist().index(token)])
        assert float(fused[token] - lp_base[token] - shift[0]) == pytest.approx(2.0 * (e - a) - float(
            2.0 * (_uniform_tail(expert_top) - _uniform_tail(anti_top))), abs=1e-3)


def _uniform_tail(top) -> float:
    """log of a uniform tail token under a top-k answer: log(leftover mass / unlisted count)."""
    return float(torch.log((1 - top.values.exp().sum()).clamp(min=1e-6) / (400 - len(top.values))))


def test_a_mixture_shapes_a_top_k_input_tail_like_the_slm(served, slm, llm_model, tok):
    """Tail 'slm' (the two-model mix's default): on the tokens the served LLM did not list, the mixture is
    proportional to the SLM's own distribution."""
    public = chat_ids(tok, PUBLIC)
    llm = logitfuse.OpenAICompatibleLLM(served[1], "tiny", top_k=5, tokenizer=tok)
    fused, lp_slm = one_step(Mixture(("slm", "llm"), weights=(0.5, 0.5)), {"llm": llm}, slm, tok, public)
    with torch.no_grad():
        listed = llm_model(torch.tensor([public])).logits[0, -1].topk(5).indices.tolist()
    rest = torch.tensor([i for i in range(len(tok)) if i not in listed])
    ratio = (fused - lp_slm)[rest]
    assert float(ratio.max() - ratio.min()) < 1e-4
    assert float((fused - lp_slm)[listed].min()) > float(ratio.max()) + 1e-3  # the listed tokens gained mass
