"""A served LLM scores given tokens (teacher-forced) through its prompt log-probabilities:
OpenAICompatibleLLM.score against `logitfuse serve` (echo + logprobs) and fake servers laid out like
vLLM (prompt_logprobs) or like a server without prompt scores; speculation through them; the
llama.cpp echo layouts read by text offset. llama.cpp's real server: tests/backends/test_engine_served_score.py."""

from __future__ import annotations

import json

import pytest
import torch

import logitfuse
from logitfuse.backends.prompt_scores import echo_positions_by_offset
from logitfuse.testing.servers import model_scores, serving

CANARY = "Zq7VtX3kLp9R"
PUBLIC = "Write an invitation:"
TOP_K = 20


def assert_topk_of(llm_out, hf_out, counts, rolled_back=()):
    """Every scored position of ``llm_out`` (a TopK score) holds the top-k of ``hf_out``'s logits
    (HFLLM.score), same right-aligned positions (but the first of a row ``rolled_back`` since its
    last new token, which HFLLM.score leaves undefined)."""
    logprobs = torch.log_softmax(hf_out.next, dim=-1)
    width = logprobs.shape[1] - 1
    assert llm_out.next.ids.shape == (len(counts), width + 1, TOP_K)
    for r, n in enumerate(counts):
        for i in range(width - n + (r in rolled_back), width + 1):
            expected = logprobs[r, i].topk(TOP_K)
            assert llm_out.next.ids[r, i].tolist() == expected.indices.tolist(), (r, i)
            torch.testing.assert_close(llm_out.next.logprobs[r, i], expected.values, atol=1e-4, rtol=0)


def test_score_through_logitfuse_serve_is_hfllm_score(served, llm_model, tok):
    server, url = served
    llm = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=TOP_K, tokenizer=tok)
    hf = logitfuse.HFLLM(llm_model, tok)
    assert llm.supports_score and llm.stats["score_method"] == "echo" and llm.stats["prompt_format"] == "ids"
    prompts = [tok.encode(PUBLIC), tok.encode("Dear friends,")]
    new = [tok.encode(" We invite"), tok.encode(" you")]
    for backend in (llm, hf):
        backend.start(prompts)
    assert_topk_of(llm.score(new), hf.score(new), [len(r) for r in new])
    # after a score the rows hold the new tokens: advance with nothing new returns the last position
    # without a request; a rollback (rejected drafts) then more tokens scores again, rows of unequal length
    sent = llm.stats["requests"]
    last = llm.advance([[], []])
    assert llm.stats["requests"] == sent and last.ok.all()
    for backend in (llm, hf):
        backend.rollback([2, 0])
    new = [tok.encode(" all"), []]
    out, ref = llm.score(new), hf.score(new)
    assert_topk_of(out, ref, [len(r) for r in new], rolled_back=[0])
    assert llm.stats["score_extra_requests"] == 0
    # what was sent: the public prompt and the tokens, as ids, with echo; each request logged as sent
    bodies = [json.loads(b) for b in llm.audit_log]
    assert all(b["echo"] for b in bodies if b["prompt"] != tok.encode(logitfuse.backends.openai.PROBE_TEXT,
                                                                         add_special_tokens=False))


def test_speculation_against_a_served_llm_is_per_step_fusion(served, slm, tok):
    """Greedy speculate=K against `logitfuse serve` gives per-step fusion's tokens with fewer LLM
    calls; nothing private reaches the server (its received bytes hold no canary)."""
    server, url = served
    private = tok([f"My door code is {CANARY}. " + PUBLIC], return_tensors="pt")["input_ids"]
    outputs = {}
    for k in (0, 3):
        llm = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=TOP_K, tokenizer=tok)
        server.received.clear()
        outputs[k] = logitfuse.generate(slm, llm, private, PUBLIC, alpha=0.5, max_new_tokens=16, speculate=k)
        assert not any(CANARY.encode() in raw for raw in server.received)
        assert not any(CANARY in entry for entry in llm.audit_log)
    plain, spec = outputs[0], outputs[3]
    assert spec.sequences == plain.sequences and spec.alpha == plain.alpha
    assert spec.stats.llm_calls < plain.stats.llm_calls
    assert spec.stats.draft_tokens_sent == spec.stats.draft_tokens_kept + spec.stats.draft_tokens_discarded > 0
    assert spec.stats.speculation_fallbacks == 0


def test_a_row_ending_inside_a_character_is_not_scored_and_nothing_is_logged_for_it(served, tok):
    """A text-prompt row whose draft ends inside a UTF-8 character cannot be sent: it is not ok (the
    step uses the SLM alone), and neither the audit log nor the request counters claim a request."""
    server, url = served
    llm = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=TOP_K, tokenizer=tok, prompt_format="text",
                                        score_method="echo")
    llm.start([PUBLIC, PUBLIC])
    logged, sent = len(llm.audit_log), len(server.received)
    half = tok.encode(" \u4e2d")[:-1]  # a space and two of the three bytes of a character
    out = llm.score([half, tok.encode(" ok")])
    assert out.ok.tolist() == [False, True]
    assert len(llm.audit_log) == logged + 1 and len(server.received) == sent + 1  # only the second row's request
    assert llm.stats["score_requests"] == 1


def test_probe_finds_vllm_prompt_logprobs(llm_model, tok):
    """A server that refuses echo but honours vLLM's prompt_logprobs is scored through the latter."""
    with serving(model_scores(llm_model, TOP_K, prompt_logprobs=True)) as server:
        llm = logitfuse.OpenAICompatibleLLM(server.url, "tiny", top_k=TOP_K, tokenizer=tok)
        assert llm.supports_score and llm.stats["score_method"] == "prompt_logprobs"
        hf = logitfuse.HFLLM(llm_model, tok)
        new = [tok.encode(" Dear friends")]
        for backend in (llm, hf):
            backend.start([PUBLIC])
        assert_topk_of(llm.score(new), hf.score(new), [len(new[0])])
        body = json.loads(server.received[-1][3])
        assert body["prompt_logprobs"] == TOP_K and body["prompt"] == tok.encode(PUBLIC) + new[0]


def test_a_server_without_prompt_scores_means_per_step_fusion_counted(llm_model, slm, tok):
    """No echo, no prompt_logprobs: supports_score is False after one probe, and speculate=K fuses
    per step (same tokens as speculate=0), warns once, counts it."""
    with serving(model_scores(llm_model, TOP_K)) as server:
        llm = logitfuse.OpenAICompatibleLLM(server.url, "tiny", top_k=TOP_K, tokenizer=tok)
        private = tok([PUBLIC], return_tensors="pt")["input_ids"]
        with pytest.warns(RuntimeWarning, match="speculation_fallbacks"):
            spec = logitfuse.generate(slm, llm, private, PUBLIC, alpha=0.5, max_new_tokens=8, speculate=4)
        assert llm.stats["score_method"] == "none" and not llm.supports_score
        probes = len(server.received)
        plain = logitfuse.generate(slm, llm, private, PUBLIC, alpha=0.5, max_new_tokens=8)
        assert spec.sequences == plain.sequences
        assert spec.stats.speculation_fallbacks == 1 and plain.stats.speculation_fallbacks == 0
        assert spec.stats.draft_tokens_sent == 0 and spec.stats.llm_calls == plain.stats.llm_calls
        assert len(server.received) - probes == plain.stats.llm_calls  # the probe ran once, not again
        with pytest.raises(RuntimeError, match="cannot score"):
            llm.start([PUBLIC])
            llm.score([[5]])


def test_score_method_argument_checks(tok):
    with pytest.raises(ValueError, match="score_method"):
        logitfuse.OpenAICompatibleLLM("http://127.0.0.1:1", "m", tokenizer=tok, score_method="logits")
    with pytest.raises(ValueError, match="prompt_format"):
        logitfuse.OpenAICompatibleLLM("http://127.0.0.1:1", "m", tokenizer=tok, score_method="prompt_logprobs",
                                      prompt_format="text")
    off = logitfuse.OpenAICompatibleLLM("http://127.0.0.1:1", "m", tokenizer=tok, score_method="none")
    assert not off.supports_score and off.audit_log == []  # no probe sent


def _echo_reply(offsets, prompt_tokens):
    entries = [None] + [{f"t{i}": -0.1 * i} for i in range(1, len(offsets))]
    return {"choices": [{"logprobs": {"top_logprobs": entries, "text_offset": offsets}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1}}


def test_echo_text_offsets_in_both_llama_cpp_layouts():
    """Text "ab cd" (5 characters) as tokens "ab", " cd" and one generated token. Standard layout (a
    BOS model: entries for " cd" and the generated token): the entry of a token is the distribution
    before it. llama-cpp-python without BOS pairs each prompt token with the distribution after it
    (entries "ab", " cd"; none for the generated token)."""
    standard = echo_positions_by_offset(_echo_reply([0, 2, 5], prompt_tokens=3), 5)
    assert standard == {2: {"t1": -0.1}, 5: {"t2": -0.2}}
    late = echo_positions_by_offset(_echo_reply([0, 2], prompt_tokens=2), 5)
    assert late == {5: {"t1": -0.1}}
    with pytest.raises(ValueError, match="text_offset"):
        echo_positions_by_offset({"choices": [{"logprobs": {"top_logprobs": [None]}}]}, 5)


# ------------------------------------------------------------------ train/eval --llm URL
@pytest.fixture(scope="module")
def served_pair(tmp_path_factory, slm, llm_model, tok):
    """Model folders (SLM, LLM: one tokenizer), a tiny data folder whose private fields hold a
    canary, and the LLM served by `logitfuse serve` (recording what it receives)."""
    from logitfuse.serve.server import serve_in_thread

    root = tmp_path_factory.mktemp("served")
    for name, model in (("slm", slm), ("llm", llm_model)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    records = [{"tid": f"0_0_{i}", "profile": [{"title": "Old note", "text": f"My code is {CANARY}.", "id": "1"}],
                "additional_profile": f"Name: {CANARY}",
                "conversations": [{"from": "user", "value": f"Write a short note {i}: about {CANARY} and roses"},
                                  {"from": "assistant", "value": "Thank you; the roses look lovely."}]}
               for i in range(3)]
    (root / "data").mkdir()
    for split in ("dev", "test"):
        (root / "data" / f"context_aware_{split}.json").write_text(json.dumps(records))
    server, url = serve_in_thread(llm_model, tok, model_name="tiny", log_requests=True)
    yield root, server, url
    server.shutdown()
    server.server_close()




def test_train_and_eval_with_a_served_llm_match_the_in_process_cache(served_pair, tmp_path):
    """`train --llm URL` scores the LLM side through the server: top-k heads only, the cache keyed by
    server and model, its top-5 terms those of the in-process LLM (same weights), no canary sent."""
    from logitfuse.cli import main
    from logitfuse.train_fuser.scoring import read_shards

    root, server, url = served_pair
    common = ["--slm", str(root / "slm"), "--data", str(root / "data"), "--llm-top-k", "5"]
    remote = common + ["--llm", url + "/v1", "--llm-model", "tiny", "--llm-tokenizer", str(root / "llm")]
    server.received.clear()
    assert main(["train", *remote, "--out", str(tmp_path / "remote"), "--max-epochs", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "remote" / "heads").iterdir()) == ["top5-slm", "top5-uniform", "top5-zero"]
    assert main(["train", *common, "--llm", str(root / "llm"), "--out", str(tmp_path / "local"), "--max-epochs", "3"]) == 0
    served_cache, meta = read_shards(tmp_path / "remote" / "cache-dev")
    local_cache, _ = read_shards(tmp_path / "local" / "cache-dev")
    assert meta["setting"]["llm"] == f"tiny@{url}/v1/completions" and "dense.terms" not in served_cache
    for name in ("top5-slm.terms", "top5-uniform.features"):
        torch.testing.assert_close(served_cache[name], local_cache[name], atol=1e-4, rtol=1e-4)
    assert main(["eval", *remote, "--head", str(tmp_path / "remote")]) == 0
    assert "LLM with context" not in (tmp_path / "remote" / "results.md").read_text()  # never sends the private prompt
    assert server.received and not any(CANARY.encode() in raw for raw in server.received)


@pytest.mark.parametrize("extra, message", [
    ([], "returns no prompt log-probabilities"),
    (["--llm-model", None], "--llm-model"),
])
def test_train_with_a_server_that_cannot_score_is_a_usage_error(served_pair, llm_model, tmp_path, capsys,
                                                                 extra, message):
    from logitfuse.cli import main

    root, _, _ = served_pair
    with serving(model_scores(llm_model, TOP_K)) as server:  # answers, but scores no prompt tokens
        argv = ["train", "--slm", str(root / "slm"), "--llm", server.url + "/v1", "--llm-model", "tiny",
                "--llm-tokenizer", str(root / "llm"), "--out", str(tmp_path / "out")]
        if extra:
            argv = argv[: argv.index("--llm-model")] + argv[argv.index("--llm-model") + 2:]
        assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("logitfuse train: error: --llm") and message in err
    assert not (tmp_path / "out").exists()
