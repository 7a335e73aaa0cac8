"""Generation modes that would leak: refused before anything reaches the LLM backend.

Prompt-lookup and assisted decoding call the logits processors on *candidate* tokens (copied from
the prompt, or drafted by an assistant model) one column at a time, before they are verified. A
processor that read them as generated tokens would send text copied from the private prompt to the
LLM. These tests run each such mode against both backends and assert on what the backend received
(the HFLLM audit log; the request bodies a local server logged), not on the error alone.
"""

from __future__ import annotations

import json

import pytest
import torch

import logitfuse
from logitfuse.testing.generation import PUBLIC, generate, left_pad, private_prompt_ids

CANARY = "Zq8WkP3xLm2T"
PRIVATE = f"{CANARY} is my door code. {CANARY} again, and {CANARY} once more."

# every mode that calls logits processors on unverified candidate tokens (transformers 4.46's prompt
# lookup fails without an end-of-sequence id, before it calls any processor: EOS gives it one)
EOS = 2
LEAKY_MODES = {
    "prompt_lookup": lambda slm: {"prompt_lookup_num_tokens": 10, "eos_token_id": EOS},
    "assistant_model": lambda slm: {"assistant_model": slm},
}


def _inputs(tok):
    return left_pad([private_prompt_ids(tok, PRIVATE, PUBLIC)])


def _backend(kind, llm_model, tok, served):
    if kind == "hf":
        return logitfuse.HFLLM(llm_model, tok)
    server, url = served
    return logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=5, tokenizer=tok, timeout=10, on_failure="raise")


def _received(kind, llm, served) -> list[str]:
    """Everything the backend sent (HFLLM: its fed token lists; HTTP: the bodies the server logged)."""
    if kind == "hf":
        return [json.dumps(entry) for entry in llm.audit_log]
    server, _ = served
    return [body.decode("utf-8", "replace") if isinstance(body, bytes) else json.dumps(body)
            for body in server.received]


@pytest.mark.parametrize("backend", ["hf", "http"])
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
@pytest.mark.parametrize("mode", sorted(LEAKY_MODES))
def test_candidate_decoding_modes_are_refused_before_anything_is_sent(slm, llm_model, tok, served, backend,
                                                                      sampling, mode):
    inputs = _inputs(tok)
    assert CANARY in tok.decode(inputs["input_ids"][0])  # the SLM does hold the canary
    llm = _backend(backend, llm_model, tok, served)
    before = len(_received(backend, llm, served))
    proc = logitfuse.CoGenesisLogitsProcessor(llm, PUBLIC, alpha=0.5)
    extra = LEAKY_MODES[mode](slm)
    with pytest.raises(ValueError, match="refused before anything was sent"):
        generate(slm, inputs, 8, proc, do_sample=sampling, **extra)
    sent = _received(backend, llm, served)[before:]
    assert sent == []  # not even the public prompt: the mode is refused before the first request
    assert proc.stats["llm_calls"] == 0


def test_refusal_leaves_the_processor_usable_for_a_safe_generate(slm, llm_model, tok):
    llm = logitfuse.HFLLM(llm_model, tok)
    proc = logitfuse.CoGenesisLogitsProcessor(llm, PUBLIC, alpha=0.5)
    inputs = _inputs(tok)
    with pytest.raises(ValueError):
        generate(slm, inputs, 4, proc, prompt_lookup_num_tokens=3, eos_token_id=EOS)
    proc.reset()
    generate(slm, inputs, 4, proc)
    assert proc.stats["llm_calls"] == 4
    fed = [t for entry in llm.audit_log if entry["op"] == "advance" for row in entry["token_ids"] for t in row]
    assert CANARY not in tok.decode(fed)


def test_direct_calls_follow_the_one_column_contract(slm, llm_model, tok):
    """Outside generate(), the caller owns the loop: one call per kept token, as documented; a call
    with more than one new column is refused before its columns are read."""
    llm = logitfuse.HFLLM(llm_model, tok)
    proc = logitfuse.CoGenesisLogitsProcessor(llm, PUBLIC, alpha=0.5)
    ids = _inputs(tok)["input_ids"]
    scores = torch.randn(1, len(tok))
    proc(ids, scores)
    fed_before = list(llm.audit_log)
    copied = ids[:, -3:]  # three tokens copied from the prompt at once
    with pytest.raises(ValueError, match="one more than at the previous step"):
        proc(torch.cat([ids, copied], dim=1), scores)
    assert llm.audit_log == fed_before


def test_alpha_one_never_contacts_the_llm(slm, llm_model, tok, served):
    """α = 1 is the SLM alone: no LLM request at all, and the output equals the SLM's."""
    server, url = served
    llm = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=5, tokenizer=tok, on_failure="raise")
    before = len(server.received)
    proc = logitfuse.CoGenesisLogitsProcessor(llm, PUBLIC, alpha=1.0)
    inputs = _inputs(tok)
    fused = generate(slm, inputs, 6, proc)
    assert torch.equal(fused, generate(slm, inputs, 6))
    assert len(server.received) == before and llm.audit_log == []
    assert proc.stats["steps"] == 6 and proc.stats["llm_calls"] == 0


def test_a_head_with_nan_weights_stops_generation_with_an_error(slm, llm_model, tok):
    """A broken head must not decode on silently (a NaN α once gave token 0 forever)."""
    head = logitfuse.FusionHead(len(tok), len(tok))
    with torch.no_grad():
        next(head.parameters()).fill_(float("nan"))
    proc = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), PUBLIC, head=head)
    with pytest.raises(ValueError, match="α"):
        generate(slm, _inputs(tok), 4, proc)
