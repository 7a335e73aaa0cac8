"""LLM backends: HFLLM's KV cache against full re-forwards; argument and reply validation."""

from __future__ import annotations

import random

import pytest
import torch

import logitfuse
from logitfuse.backends import LLMBackend, LLMOutput, parse_top_logprobs
from logitfuse.types import TopK


@pytest.fixture(scope="module")
def model(llm_model):
    return llm_model


def full_forward(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("seed", [0, 1])
def test_hfllm_cache_equals_full_reforward_every_step(model, seed):
    """Left-padded prefill, then variable counts per row (0, 1 or several), rollbacks: at every
    step each row's logits equal a plain forward over that row's tokens."""
    rng = random.Random(seed)
    rows = [[rng.randrange(3, 400) for _ in range(n)] for n in (7, 2, 4)]
    llm = logitfuse.HFLLM(model)
    llm.start([list(r) for r in rows])
    for step in range(10):
        if step % 4 == 3:
            drop = [rng.randint(0, min(2, len(r) - 1)) for r in rows]
            llm.rollback(drop)
            for row, n in zip(rows, drop):
                if n:
                    del row[-n:]
            new = [[rng.randrange(3, 400) for _ in range(rng.randint(1, 3))] for _ in rows]
        else:
            new = [[rng.randrange(3, 400) for _ in range(rng.randint(0, 3))] for _ in rows]
        for row, extra in zip(rows, new):
            row.extend(extra)
        out = llm.advance(new)
        assert out.ok.all() and out.next.shape == (3, 400) and out.next.dtype == torch.float32
        for r, row in enumerate(rows):
            torch.testing.assert_close(out.next[r], full_forward(model, row), atol=1e-4, rtol=1e-4)
    assert llm.kv.cache.get_seq_length() == llm.kv.mask.shape[1]


def test_hfllm_text_prompts_and_audit_log(model, tok):
    llm = logitfuse.HFLLM(model, tok)
    llm.start(["Dear friends,", "Thank you"])
    llm.advance([[5], []])
    assert llm.audit_log[0] == {"op": "start", "token_ids": [tok.encode("Dear friends,"), tok.encode("Thank you")]}
    assert llm.audit_log[1] == {"op": "advance", "token_ids": [[5], []]}
    llm.reset()
    assert llm.batch_size == 0 and len(llm.audit_log) == 2  # the log outlives reset


def test_hfllm_greedy_matches_generate(model, tok):
    ids = tok.encode("Dear friends,")
    llm = logitfuse.HFLLM(model, tok)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(ids):]
    assert llm.greedy(ids, 6) == ref.tolist()


@pytest.mark.parametrize("call, match", [
    (lambda llm: llm.advance([[1]]), "before start"),
    (lambda llm: llm.start([[]]), "empty"),
    (lambda llm: llm.start(["text"]), "tokenizer"),
    (lambda llm: llm.start([[1, 2, 999]]), "outside"),
    (lambda llm: llm.start("one string"), "list"),
])
def test_hfllm_errors(model, call, match):
    llm = logitfuse.HFLLM(model)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(llm)


def test_hfllm_advance_checks_rows(model):
    llm = logitfuse.HFLLM(model)
    llm.start([[1, 2], [3]])
    with pytest.raises(ValueError, match="2 lists"):
        llm.advance([[1]])
    with pytest.raises(ValueError, match="outside"):
        llm.advance([[1], [400]])
    llm.rollback([1, 0])
    with pytest.raises(RuntimeError, match="rolled-back"):
        llm.advance([[], [4]])


@pytest.mark.parametrize("kwargs, match", [
    (dict(base_url="localhost:8000"), "base_url"),
    (dict(model=""), "model"),
    (dict(top_k=0), "top_k"),
    (dict(timeout=0), "timeout"),
    (dict(retries=-1), "retries"),
    (dict(on_failure="ignore"), "on_failure"),
    (dict(vocab_size=None), "vocab_size"),
])
def test_remote_constructor_validation(kwargs, match):
    args = dict(base_url="http://127.0.0.1:1", model="m", top_k=5, vocab_size=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        logitfuse.OpenAICompatibleLLM(**args)


def test_remote_payload_is_the_documented_protocol():
    llm = logitfuse.OpenAICompatibleLLM("http://127.0.0.1:1/", "m", top_k=3, vocab_size=10)
    assert llm.url == "http://127.0.0.1:1/v1/completions"
    import json

    assert json.loads(llm.payload([1, 2])) == {
        "model": "m", "prompt": [1, 2], "max_tokens": 1, "logprobs": 3, "temperature": 1.0, "echo": False,
        "return_tokens_as_token_ids": True,
    }


def reply(top):
    return {"choices": [{"logprobs": {"top_logprobs": [top]}}]}


def test_parse_top_logprobs():
    assert parse_top_logprobs(reply({"token_id:3": -2.0, "token_id:7": -0.5})) == [(7, -0.5), (3, -2.0)]
    for bad, match in [
        ({}, "top_logprobs"),
        ({"choices": []}, "top_logprobs"),
        (reply({}), "non-empty"),
        (reply({"hello": -1.0}), "token_id"),
        (reply({"token_id:x": -1.0}), "integer"),
        (reply({"token_id:1": float("nan")}), "log-prob"),
        (reply({"token_id:1": 3.0}), "log-prob"),
        (reply({"token_id:1": "a"}), "log-prob"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_top_logprobs(bad)
    with pytest.raises(ValueError, match="outside"):
        parse_top_logprobs(reply({"token_id:12": -1.0}), vocab_size=10)


def test_hfllm_reorder_follows_rows(model):
    llm = logitfuse.HFLLM(model)
    rows = [[5, 6, 7], [8, 9], [10]]
    llm.start([list(r) for r in rows])
    llm.advance([[11], [12, 13], []])
    rows = [rows[0] + [11], rows[1] + [12, 13], rows[2]]
    order = [2, 0, 0]
    llm.reorder(order)
    rows = [list(rows[s]) for s in order]
    new = [[14], [15, 16], [17]]
    out = llm.advance(new)
    for r, row in enumerate(rows):
        torch.testing.assert_close(out.next[r], full_forward(model, row + new[r]), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="reorder"):
        llm.reorder([0, 1])


def test_remote_reorder_and_rollback_need_no_server():
    llm = logitfuse.OpenAICompatibleLLM("http://127.0.0.1:1", "m", top_k=2, vocab_size=50)
    llm.start([[1, 2], [3, 4, 5]])
    llm.reorder([1, 1])
    llm.rollback([1, 2])
    assert llm.sequences() == [[3, 4], [3]] and llm.audit_log == []


# ------------------------------------------------------------------- the declared output kind
class FixedTopK(LLMBackend):
    """A top-k backend that is not :class:`OpenAICompatibleLLM`: every row always answers
    token 5 at 3/4 and token 9 at 1/4."""

    output_kind = "topk"
    vocab_size = 400

    def __init__(self):
        super().__init__()
        self.rows = 0

    def start(self, public_prompts):
        self.rows = len(self.encode_prompts(public_prompts))

    def advance(self, new_tokens, need=None):
        rows, _ = self.check_new_tokens(new_tokens, need)
        ids = torch.tensor([[5, 9]] * len(rows))
        return LLMOutput(TopK(ids, torch.tensor([[0.75, 0.25]] * len(rows)).log()), torch.ones(len(rows), dtype=torch.bool))

    def rollback(self, n):
        pass

    def reset(self):
        self.rows = 0

    @property
    def batch_size(self):
        return self.rows


def test_backends_declare_what_advance_returns(model):
    remote = logitfuse.OpenAICompatibleLLM("http://127.0.0.1:1", "m", top_k=2, vocab_size=50)
    assert (logitfuse.HFLLM.output_kind, logitfuse.OpenAICompatibleLLM.output_kind) == ("dense", "topk")
    assert logitfuse.HFLLM(model).output_kind == "dense" and remote.output_kind == "topk"
    assert FixedTopK().greedy([1, 2], max_new_tokens=3) == [5, 5, 5]


def test_a_backend_that_does_not_declare_its_output_cannot_be_built():
    class Undeclared(FixedTopK):
        output_kind = LLMBackend.output_kind  # the abstract one

    class Misdeclared(FixedTopK):
        output_kind = "logits"

    with pytest.raises(TypeError, match="output_kind"):
        Undeclared()
    with pytest.raises(TypeError, match=r"output_kind='logits' must be one of \('dense', 'topk'\)"):
        Misdeclared()


def test_llm_temperature_is_refused_for_any_topk_backend_not_only_the_http_one(model):
    """The session reads the backend's declared ``output_kind``, not its class."""
    with pytest.raises(ValueError, match="llm_temperature=2.0 needs dense LLM logits; FixedTopK"):
        logitfuse.FusionSession(FixedTopK(), alpha=0.5, llm_temperature=2.0)
    logitfuse.FusionSession(FixedTopK(), alpha=0.5)  # temperature 1 is fine
    logitfuse.FusionSession(logitfuse.HFLLM(model), alpha=0.5, llm_temperature=2.0)  # dense: allowed
