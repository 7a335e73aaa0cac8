"""llama.cpp's server (llama-cpp-python) scores drafts through echo + logprobs (started with
logits_all): OpenAICompatibleLLM.score against the same weights in transformers, and speculation
through it against per-step fusion through it.

The server runs the tiny random Llama written as a float32 GGUF in-process (tests/decoding/test_llama_slm.py's
`write_tiny_gguf`); no real model needed. Text prompts: the server re-tokenizes, and the tiny model has
no BOS token, so llama-cpp-python 0.3.x's echo entries are one position late (read by text offset,
logitfuse/backends/prompt_scores.py). Skips without llama-cpp-python[server].
"""

from __future__ import annotations

import pytest
import torch

import logitfuse
from logitfuse.serve.engines import LlamaCppServer, llama_cpp_missing
from logitfuse.testing import byte_level_tokenizer, tiny_llama

pytestmark = pytest.mark.engine

TOP_K = 10
PUBLIC = "Write an invitation:"
CANARY = "Zq7VtX3kLp9R"
# float32 weights on both sides: llama.cpp and transformers agree to ~1e-4 in logits (measured: the
# scored log-probabilities below differ by at most 1.3e-5 nats, every position aligned by text offset;
# the tiny byte-level vocabulary's tokens that hold part of a UTF-8 character print as "" and are
# dropped, ~11% of the entries)
TOL = 1e-3


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    missing = llama_cpp_missing()
    if missing:
        pytest.skip(f"needs llama.cpp's server: pip install \"logitfuse[engine]\" ({missing})")
    from logitfuse.testing.gguf import write_tiny_gguf

    tok = byte_level_tokenizer()
    model = tiny_llama(len(tok), seed=1)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llm.gguf"
    write_tiny_gguf(path, tok, model)
    with LlamaCppServer(path, alias="tiny", n_ctx=256, n_threads=1, logits_all=True) as server:
        yield server, model, tok


def test_llama_cpp_server_scores_like_transformers(tiny_server):
    server, model, tok = tiny_server
    llm = logitfuse.OpenAICompatibleLLM(server.url, "tiny", top_k=TOP_K, tokenizer=tok)
    assert llm.supports_score
    assert llm.stats["score_method"] == "echo" and llm.stats["prompt_format"] == "text"
    hf = logitfuse.HFLLM(model, tok)
    new = [tok.encode(" Dear friends, join us")]
    for backend in (llm, hf):
        backend.start([PUBLIC])
    out, ref = llm.score(new), hf.score(new)
    assert bool(out.ok[0]) and out.next.ids.shape[:2] == ref.next.shape[:2]
    reference = torch.log_softmax(ref.next[0], dim=-1)
    worst = 0.0
    for i in range(reference.shape[0]):
        ids, values = out.next.ids[0, i], out.next.logprobs[0, i]
        keep = values > -float("inf")  # string keys: tokens that print alike share one entry; "" maps to none
        assert int(keep.sum()) >= 3
        worst = max(worst, float((values[keep] - reference[i, ids[keep]]).abs().max()))
    assert worst < TOL, worst


def test_speculation_through_llama_cpp_is_per_step_fusion(tiny_server):
    server, _, tok = tiny_server
    slm = tiny_llama(len(tok), seed=0)
    private = tok([f"My door code is {CANARY}. " + PUBLIC], return_tensors="pt")["input_ids"]
    outputs, backends = {}, {}
    for k in (0, 4):
        backends[k] = logitfuse.OpenAICompatibleLLM(server.url, "tiny", top_k=TOP_K, tokenizer=tok)
        outputs[k] = logitfuse.generate(slm, backends[k], private, PUBLIC, alpha=0.5, max_new_tokens=16,
                                        speculate=k, eos_token_id=[0, 2])
    assert outputs[4].sequences == outputs[0].sequences
    # (random byte-level tokens end inside UTF-8 characters now and then: per-step fusion holds such a
    # position back and uses the SLM alone; a scored draft that ends inside one does so for the draft)
    assert outputs[4].stats.llm_calls < outputs[0].stats.llm_calls
    assert backends[4].stats["score_requests"] >= outputs[4].stats.llm_calls - outputs[4].stats.fallbacks
    assert not any(CANARY in body for b in backends.values() for body in b.audit_log)


def test_check_server_against_llama_cpp(tiny_server):
    """llama-cpp-python's server: /v1/models lists the alias (no max_logprobs); the tokenizer is checked
    through its /extras/tokenize route (issue 23)."""
    from logitfuse.backends import ServerMismatchError
    from logitfuse.testing import sentencepiece_tokenizer

    server, _, tok = tiny_server
    check = logitfuse.OpenAICompatibleLLM(server.url, "tiny", top_k=TOP_K, tokenizer=tok).check_server()
    assert check.models == ("tiny",) and check.tokenizer == "tokenize"
    for model, tokenizer, argument in (("tiny", sentencepiece_tokenizer(), "tokenizer"), ("qwen", tok, "model")):
        with pytest.raises(ServerMismatchError) as caught:
            logitfuse.OpenAICompatibleLLM(server.url, model, top_k=TOP_K, tokenizer=tokenizer).check_server()
        assert caught.value.argument == argument
