"""Issue 23, item 3: a malformed scoring reply (speculation against a server) follows the failure policy.

A fake server answers with a tiny model's scores (echo + logprobs, or vLLM's prompt_logprobs), the
one-time probe correctly, then corrupts every later scoring reply in one way: a NaN, an id outside the
vocabulary, an id named twice, a positive logprob, probabilities summing to 1.9, or a layout with a
missing or extra position. ``on_failure="fallback"``: generate() finishes, each such step counted as a
fallback (the SLM alone for it); ``"raise"``: an LLMBackendError that says what was wrong.
"""

from __future__ import annotations

import json
import math

import pytest

import logitfuse
from logitfuse.backends import LLMBackendError
from logitfuse.backends.served_scoring import PROBE_TEXT
from logitfuse.testing.servers import model_scores, send_json, serving

PUBLIC = "Write an invitation:"
TOP_K = 5


class Capture:
    """Stands in for the request handler: keeps what model_scores would send."""

    def __init__(self):
        self.raw, self.wfile = b"", self

    def send_response(self, status):
        self.status = status

    def send_header(self, *args):
        pass

    def end_headers(self):
        pass

    def write(self, data):
        self.raw += data


def corrupt(top: dict, how: str) -> str:
    """One position's ``{key: logprob}`` as JSON text, broken as ``how`` says."""
    pairs = list(top.items())
    if how == "nan":
        pairs[0] = (pairs[0][0], math.nan)
    elif how == "out_of_range":
        pairs[0] = ("token_id:99999", pairs[0][1])
    elif how == "duplicate":
        pairs[1] = (pairs[0][0], pairs[1][1])
    elif how == "positive":
        pairs[0] = (pairs[0][0], 0.5)
    elif how == "sum_1.9":
        pairs[0], pairs[1] = (pairs[0][0], math.log(0.95)), (pairs[1][0], math.log(0.95))
    return "{" + ",".join(f"{json.dumps(key)}:{json.dumps(value)}" for key, value in pairs) + "}"


def corrupting(model, tok, how: str, vllm: bool = False):
    """model_scores, with every scoring reply but the probe's broken as ``how`` says."""
    inner = model_scores(model, TOP_K, echo=not vllm, prompt_logprobs=vllm)
    probe = tok.encode(PROBE_TEXT, add_special_tokens=False)

    def behave(handler, raw):
        capture = Capture()
        inner(capture, raw)
        body = json.loads(raw)
        scoring = body.get("echo") or body.get("prompt_logprobs")
        if not scoring or body.get("prompt") == probe or capture.status != 200:
            send_json(handler, capture.raw, capture.status)
            return
        reply = json.loads(capture.raw)
        choice = reply["choices"][0]
        if how in ("missing_position", "extra_position"):
            listed = choice["prompt_logprobs"] if vllm else choice["logprobs"]["top_logprobs"]
            if how == "missing_position":
                del listed[1]
            else:
                listed.insert(1, listed[-1])
            send_json(handler, json.dumps(reply).encode())
            return
        listed = choice["prompt_logprobs"] if vllm else choice["logprobs"]["top_logprobs"]
        target = listed[-1]  # the last prompt position
        if vllm:
            target = {f"token_id:{key}": value["logprob"] for key, value in target.items()}
            listed[-1] = "@@"
            text = json.dumps(reply).replace('"@@"', corrupt(target, how).replace('"token_id:', '"'))
        else:
            listed[-1] = "@@"
            text = json.dumps(reply).replace('"@@"', corrupt(target, how))
        send_json(handler, text.encode())

    return behave


HOWS = ["nan", "out_of_range", "duplicate", "positive", "sum_1.9", "missing_position", "extra_position"]


@pytest.mark.parametrize("how", HOWS)
def test_speculation_with_malformed_scores_falls_back_per_step(how, slm, llm_model, tok):
    with serving(corrupting(llm_model, tok, how)) as server:
        llm = logitfuse.OpenAICompatibleLLM(server.url, "tiny", top_k=TOP_K, tokenizer=tok, retries=0)
        private = tok([PUBLIC], return_tensors="pt")["input_ids"]
        out = logitfuse.generate(slm, llm, private, PUBLIC, alpha=0.5, max_new_tokens=6, speculate=3)
        assert llm.stats["score_method"] == "echo"
        assert out.stats.fallbacks >= 1 and llm.stats["failures"] >= 1
        assert len(out.sequences[0]) == 6


@pytest.mark.parametrize("how", HOWS)
def test_speculation_with_malformed_scores_raises_a_backend_error(how, slm, llm_model, tok):
    with serving(corrupting(llm_model, tok, how)) as server:
        llm = logitfuse.OpenAICompatibleLLM(server.url, "tiny", top_k=TOP_K, tokenizer=tok, retries=0,
                                            on_failure="raise")
        private = tok([PUBLIC], return_tensors="pt")["input_ids"]
        with pytest.raises(LLMBackendError, match="malformed reply"):
            logitfuse.generate(slm, llm, private, PUBLIC, alpha=0.5, max_new_tokens=6, speculate=3)


@pytest.mark.parametrize("how", ["nan", "duplicate", "positive", "sum_1.9", "missing_position"])
def test_vllm_prompt_logprobs_malformed_scores_are_backend_errors(how, llm_model, tok):
    with serving(corrupting(llm_model, tok, how, vllm=True)) as server:
        llm = logitfuse.OpenAICompatibleLLM(server.url, "tiny", top_k=TOP_K, tokenizer=tok, retries=0,
                                            on_failure="raise")
        assert llm.supports_score and llm.stats["score_method"] == "prompt_logprobs"
        llm.start([PUBLIC])
        with pytest.raises(LLMBackendError, match="malformed reply"):
            llm.score([tok.encode(" Dear friends")])


def test_a_top_k_summing_to_more_than_one_is_malformed_in_a_plain_step_too(tok):
    """advance() reads the same rule: probabilities above 1 + 1e-3 are no log-probabilities."""
    reply = {"choices": [{"logprobs": {"top_logprobs": [{"token_id:1": math.log(0.95), "token_id:2": math.log(0.95)}]}}]}
    with pytest.raises(ValueError, match="sum to 1.9"):
        logitfuse.backends.parse_top_logprobs(reply, vocab_size=10)
    ok = {"choices": [{"logprobs": {"top_logprobs": [{"token_id:1": math.log(0.5), "token_id:2": math.log(0.5005)}]}}]}
    assert len(logitfuse.backends.parse_top_logprobs(ok, vocab_size=10)) == 2  # rounding is tolerated
