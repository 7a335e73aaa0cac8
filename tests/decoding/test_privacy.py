"""The privacy boundary: nothing of the private context reaches an LLM backend.

Private contexts carry random canary strings (hypothesis); after fused generation (both backends,
one and two tokenizers) and the sketch variant, no canary, and no run of its token ids, appears in
any payload a backend sent (its audit log) or a server received.
"""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import logitfuse
from logitfuse.testing.generation import PUBLIC, contains_subsequence, generate, hf_streams, left_pad, private_prompt_ids
from logitfuse.testing import byte_level_tokenizer, sentencepiece_tokenizer, tiny_llama

canaries = st.text(alphabet=string.ascii_letters + string.digits, min_size=12, max_size=12)
# derandomized: the same canaries on every run, so CI cannot flake on a chance token coincidence
privacy_settings = settings(max_examples=6, deadline=None, derandomize=True,
                            suppress_health_check=[HealthCheck.function_scoped_fixture])


def private_context(canary: str, other: str) -> str:
    return f"My name is Martin. Door code: {canary}. Bank PIN and notes: {other} (never share)."


def canary_needles(tokenizer, canary: str) -> list[list[int]]:
    """Runs of token ids the canary can appear as: alone, after a space, and their inner parts
    (robust to merges with the neighbouring characters)."""
    needles = []
    for text in (canary, " " + canary, ": " + canary):
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        needles.append(ids)
        if len(ids) >= 5:
            needles.append(ids[1:-1])
    return needles


def assert_nothing_private(payload_texts: list[str], id_lists: list[list[int]], tokenizer, canaries_: list[str]):
    for canary in canaries_:
        for text in payload_texts:
            assert canary not in text
        for ids in id_lists:
            assert canary not in tokenizer.decode(ids)
            for needle in canary_needles(tokenizer, canary):
                assert not contains_subsequence(ids, needle)


def slm_inputs(tokenizer, canary, other, rows=2):
    publics = [PUBLIC, "Dear friends,"][:rows]
    return left_pad([private_prompt_ids(tokenizer, private_context(canary, other), p) for p in publics]), publics


@privacy_settings
@given(canary=canaries, other=canaries)
def test_hfllm_never_sees_the_private_context(slm, llm_model, tok, canary, other):
    inputs, publics = slm_inputs(tok, canary, other)
    # the SLM side does hold the canaries: the check below is not vacuous
    assert any(contains_subsequence(inputs["input_ids"][0].tolist(), n) for n in canary_needles(tok, canary))
    llm = logitfuse.HFLLM(llm_model, tok)
    proc = logitfuse.CoGenesisLogitsProcessor(llm, publics, alpha=0.5, schedule="periodic(2, 1, 1)")
    generate(slm, inputs, 6, proc)
    streams = hf_streams(llm.audit_log)
    texts = [json.dumps(entry) for entry in llm.audit_log]
    assert_nothing_private(texts, streams, tok, [canary, other])


@privacy_settings
@given(canary=canaries, other=canaries)
def test_cross_tokenizer_llm_never_sees_the_private_context(canary, other):
    slm_tok, llm_tok = sentencepiece_tokenizer(), byte_level_tokenizer()
    slm, llm_model = tiny_llama(len(slm_tok), seed=2), tiny_llama(len(llm_tok), seed=3)
    inputs, publics = slm_inputs(slm_tok, canary, other)
    llm = logitfuse.HFLLM(llm_model, llm_tok)
    proc = logitfuse.CoGenesisLogitsProcessor(llm, publics, alpha=0.5, slm_tokenizer=slm_tok,
                                              vocab_map=logitfuse.VocabMap.from_tokenizers(slm_tok, llm_tok))
    generate(slm, inputs, 6, proc)
    assert_nothing_private([json.dumps(e) for e in llm.audit_log], hf_streams(llm.audit_log), llm_tok, [canary, other])


@privacy_settings
@given(canary=canaries, other=canaries)
def test_remote_never_sends_the_private_context(served, slm, tok, canary, other):
    server, url = served
    server.received.clear()
    inputs, publics = slm_inputs(tok, canary, other)
    llm = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=5, tokenizer=tok)
    proc = logitfuse.CoGenesisLogitsProcessor(llm, publics, alpha=0.5)
    generate(slm, inputs, 6, proc)
    received = [body.decode("utf-8") for body in server.received]
    assert len(received) == len(llm.audit_log) == 2 * 6
    assert sorted(received) == sorted(llm.audit_log)  # the audit log is exactly what arrived
    prompts = [json.loads(body)["prompt"] for body in received]
    assert_nothing_private(received, prompts, tok, [canary, other])


@privacy_settings
@given(canary=canaries, other=canaries)
def test_sketch_variant_keeps_the_context_on_the_device(served, slm, llm_model, tok, canary, other):
    server, url = served
    server.received.clear()
    context = private_context(canary, other)
    local = logitfuse.HFLLM(llm_model, tok)
    remote = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=1, tokenizer=tok)
    for llm in (local, remote):
        result = logitfuse.sketch_generate(llm, slm, PUBLIC, context, slm_tokenizer=tok,
                                           outline_max_new_tokens=3, max_new_tokens=3)
        assert isinstance(result.text, str) and len(result.output_ids) == 3
    streams = hf_streams(local.audit_log)
    assert PUBLIC in tok.decode(streams[0])  # the LLM did get the public instruction
    received = [body.decode("utf-8") for body in server.received]
    prompts = [json.loads(body)["prompt"] for body in received]
    assert_nothing_private([json.dumps(e) for e in local.audit_log] + remote.audit_log + received,
                           streams + prompts, tok, [canary, other])


def test_processor_errors_do_not_echo_private_data(slm, tok, llm_model):
    """A mismatch discovered at the first call (after the private prompt is in input_ids) names
    only shapes, never tokens."""
    canary = "Zq8WkP3xLm2T"
    inputs, _ = slm_inputs(tok, canary, "x" * 12, rows=2)
    proc = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), [PUBLIC] * 3, alpha=0.5)
    with pytest.raises(ValueError) as info:
        generate(slm, inputs, 2, proc)
    message = str(info.value)
    assert canary not in message and "2 rows" in message
    ids = inputs["input_ids"][0].tolist()
    assert ",".join(map(str, ids[-6:-3])) not in message


def test_the_check_catches_a_leak(slm, llm_model, tok):
    """If the private prompt were handed to the backend, the assertions above would fire."""
    canary, other = "Zq8WkP3xLm2T", "Yy7VbN4cXa1R"
    inputs, _ = slm_inputs(tok, canary, other, rows=1)
    leaky = [inputs["input_ids"][0].tolist()]  # the private prompt passed as if it were public
    llm = logitfuse.HFLLM(llm_model, tok)
    generate(slm, inputs, 2, logitfuse.CoGenesisLogitsProcessor(llm, leaky, alpha=0.5))
    with pytest.raises(AssertionError):
        assert_nothing_private([], hf_streams(llm.audit_log), tok, [canary])


@pytest.mark.parametrize("extra", [0, 1, 7])
def test_reuse_without_reset_never_reads_the_new_private_prompt(slm, llm_model, tok, extra):
    """Forgetting reset() between two generations must raise before anything of the second
    (private) prompt is sent, whatever its length."""
    llm = logitfuse.HFLLM(llm_model, tok)
    first, _ = slm_inputs(tok, "Aa1Bb2Cc3Dd4", "Ee5Ff6Gg7Hh8", rows=1)
    proc = logitfuse.CoGenesisLogitsProcessor(llm, [PUBLIC], alpha=0.5)
    seen = generate(slm, first, 3, proc).shape[1] - 1  # the columns of the processor's last call
    canary = "Zq8WkP3xLm2T"
    ids = private_prompt_ids(tok, private_context(canary, "Yy7VbN4cXa1R"), PUBLIC)
    width = seen + 1 if extra == 0 else len(ids) + extra
    ids = (ids + [5] * width)[:width] if len(ids) < width else ids[-width:]
    assert len(ids) == width
    with pytest.raises(ValueError, match="reset"):
        generate(slm, left_pad([ids]), 3, proc)
    assert_nothing_private([json.dumps(e) for e in llm.audit_log], hf_streams(llm.audit_log), tok, [canary])
