"""The learned call gate (schedule ``head_gate(tau)``): parsing and checks, decoding decisions equal
to the gate applied offline to the same SLM-side inputs, and skipped steps send nothing."""

import json

import pytest
import torch

import logitfuse
from logitfuse.heads import FusionHead
from logitfuse.schedules import HeadGate, parse
from logitfuse.slm_side import NO_TOKEN, HiddenStateCapture

PUBLIC, PRIVATE = "Write an invitation:", "Martin sells houses on Maple Drive. Write an invitation:"


def _gated_head(tok, slm, seed=1):
    head = FusionHead(len(tok), len(tok), slm_hidden_size=slm.config.hidden_size,
                      slm_features=["hidden", "token", "position"], gate_hidden=8)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return head.eval()


def test_head_gate_specs_parse_and_bad_ones_say_what_to_write():
    assert isinstance(parse("head_gate(0.05)"), HeadGate) and parse(" head_gate( -1e-2 ) ").spec == "head_gate(-0.01)"
    with pytest.raises(ValueError, match=r"tau must be a number, e.g. 'head_gate\(0.05\)'"):
        parse("head_gate(1.2.3)")
    with pytest.raises(ValueError, match="tau=nan must be a finite number"):
        HeadGate(float("nan"))
    with pytest.raises(ValueError, match=r"not one of .*'head_gate\(tau\)'"):
        parse("head_gate()")
    with pytest.raises(ValueError, match="call gain"):
        HeadGate(0.1).should_call(0, None)


def test_head_gate_needs_a_head_with_a_gate(tok, llm_model):
    llm = logitfuse.HFLLM(llm_model, tok)
    for weight in (dict(head=FusionHead(len(tok), len(tok))), dict(alpha=0.5)):
        with pytest.raises(ValueError, match=r"needs a fusion head with a call gate \(logitfuse train --gate-hidden 32\)"):
            logitfuse.FusionSession(llm, schedule="head_gate(0.1)", **weight)


def test_gate_decisions_equal_the_offline_gate_and_skipped_steps_send_nothing(served, slm, tok):
    server, url = served
    server.received.clear()
    head, tau, steps = _gated_head(tok, slm), 0.0, 8
    llm = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=5, tokenizer=tok)
    public_ids = tok(PUBLIC)["input_ids"]
    proc = logitfuse.CoGenesisLogitsProcessor(llm, public_ids, head=head, slm=slm, schedule=f"head_gate({tau})")
    private = tok([PRIVATE], return_tensors="pt")
    out = slm.generate(**private, logits_processor=[proc], max_new_tokens=steps, do_sample=False, pad_token_id=0)
    proc.close()
    called = [float(a[0]) != 1.0 for a in proc.alpha_history]
    # offline: the gate on one explicit forward over the generated text (nothing from the LLM)
    prompt_len = private["input_ids"].shape[1]
    generated = out[0, prompt_len:].tolist()
    with torch.no_grad(), HiddenStateCapture(slm, keep_all=True) as capture:
        slm_logits = slm(input_ids=out[:, :-1]).logits[0, prompt_len - 1:]
        gain = head.call_gain(slm_logits, capture.latest[0, prompt_len - 1:],
                              last_tokens=torch.tensor([NO_TOKEN] + generated[:-1]), positions=torch.arange(steps))
    assert float((gain - tau).abs().min()) > 1e-4  # no decision on a knife's edge
    assert called == (gain >= tau).tolist()
    assert 0 < sum(called) < steps  # the gate both called and skipped
    stats = proc.stats
    assert (stats.llm_calls, stats.saved_calls) == (sum(called), steps - sum(called))
    # one request per called step, none for a skipped one; each carries the tokens kept up to its step
    prompts = [json.loads(body)["prompt"] for body in server.received]
    assert prompts == [public_ids + generated[:t] for t in range(steps) if called[t]]
