"""OpenAICompatibleLLM against servers that differ from `logitfuse serve` (no engine needed):
token-string ``top_logprobs`` keys (llama.cpp's server), text-only prompts with a capability probe,
and recorded reply shapes of llama.cpp, vLLM and SGLang."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import logitfuse
from logitfuse.testing.generation import PUBLIC, generate, left_pad, private_prompt_ids
from logitfuse.backends import TokenStringMap, parse_top_logprobs, render_token_bytes
from logitfuse.vocab.retokenize import token_bytes, token_bytes_table
from logitfuse.testing import sentencepiece_tokenizer, tiny_llama

# ------------------------------------------------------------------- recorded reply shapes
# llama-cpp-python 0.3.36, POST /v1/completions {"prompt": "The capital of France is", "max_tokens": 1,
# "logprobs": 3} on SmolLM2-135M-Instruct Q4_1 (shape as recorded; ids/strings as that server renders them)
LLAMA_CPP_REPLY = {
    "id": "cmpl-8d1c", "object": "text_completion", "created": 1764345600, "model": "llm",
    "choices": [{"text": " Paris", "index": 0,
                 "logprobs": {"text_offset": [24], "token_logprobs": [-0.0986], "tokens": [" Paris"],
                              "top_logprobs": [{" Paris": -0.0986, " London": -4.21, " the": -4.9}]},
                 "finish_reason": "length"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}
# vLLM >= 0.6 with "return_tokens_as_token_ids": true (keys "token_id:N", tokens too)
VLLM_REPLY = {
    "id": "cmpl-1a2b", "object": "text_completion", "created": 1764345600, "model": "Qwen/Qwen2.5-1.5B-Instruct",
    "choices": [{"index": 0, "text": " Paris", "stop_reason": None, "finish_reason": "length",
                 "logprobs": {"text_offset": [0], "token_logprobs": [-0.031], "tokens": ["token_id:12095"],
                              "top_logprobs": [{"token_id:12095": -0.031, "token_id:7148": -4.03,
                                                "token_id:279": -5.2}]}}],
    "usage": {"prompt_tokens": 6, "total_tokens": 7, "completion_tokens": 1},
}
# SGLang's OpenAI-compatible /v1/completions: OpenAI shape, token-string keys unless ids are requested
SGLANG_REPLY = {
    "id": "5c0f", "object": "text_completion", "created": 1764345600, "model": "default",
    "choices": [{"index": 0, "text": " Paris", "finish_reason": "length", "matched_stop": None,
                 "logprobs": {"text_offset": [0], "token_logprobs": [-0.031], "tokens": [" Paris"],
                              "top_logprobs": [{" Paris": -0.031, " London": -4.03}]}}],
    "usage": {"prompt_tokens": 6, "total_tokens": 7, "completion_tokens": 1},
}


@pytest.fixture(scope="module")
def sp_tok():
    return sentencepiece_tokenizer()


def test_vllm_token_id_keys_parse_as_ids():
    counts = {}
    pairs = parse_top_logprobs(VLLM_REPLY, vocab_size=151936, counts=counts)
    assert pairs == [(12095, -0.031), (7148, -4.03), (279, -5.2)]
    assert counts == {"topk_entries": 3, "topk_mapped": 3}


def test_string_keys_need_a_tokenizer():
    with pytest.raises(ValueError, match="token_id"):
        parse_top_logprobs(LLAMA_CPP_REPLY)


def test_string_keys_map_to_ids_exactly(tok):
    smap = TokenStringMap(tok)
    table = token_bytes_table(tok)
    ids = tok.encode(" the capital", add_special_tokens=False)
    reply = {"choices": [{"logprobs": {"top_logprobs": [
        {render_token_bytes(table[i]): -1.0 - n for n, i in enumerate(ids)}]}}]}
    counts = {}
    pairs = parse_top_logprobs(reply, token_strings=smap, counts=counts)
    assert [p[0] for p in pairs] == ids and counts["topk_mapped"] == len(ids)
    # the recorded llama.cpp/SGLang shapes parse with a tokenizer (keys this tiny vocabulary lacks are dropped)
    for recorded in (LLAMA_CPP_REPLY, SGLANG_REPLY):
        counts = {}
        pairs = parse_top_logprobs(recorded, token_strings=smap, counts=counts)
        assert counts["topk_entries"] == len(recorded["choices"][0]["logprobs"]["top_logprobs"][0])
        assert all(table[i].decode() in recorded["choices"][0]["logprobs"]["top_logprobs"][0] for i, _ in pairs)


def test_every_lossless_token_round_trips(tok, sp_tok):
    for tokenizer in (tok, sp_tok):
        smap = TokenStringMap(tokenizer)
        table = token_bytes_table(tokenizer)
        for idx, data in enumerate(table):
            text = render_token_bytes(data)
            if text and text.encode() == data:
                assert idx in smap.lookup(text), (idx, data)


def test_leading_space_multibyte_and_partial_bytes(tok):
    smap = TokenStringMap(tok)
    table = token_bytes_table(tok)
    cafe = tok.encode(" café", add_special_tokens=False)  # [" ", "c", "a", "fé"]: a multi-byte merge
    assert table[cafe[-1]] == "fé".encode() and smap.lookup("fé") == [cafe[-1]]
    assert smap.lookup(" ") == [cafe[0]]  # the leading-space token itself
    lone = table.index(b"\xc3")  # a byte that is not valid UTF-8 alone: llama.cpp prints it as ""
    assert render_token_bytes(table[lone]) == "" and smap.lookup("") == []
    counts = {}
    pairs = parse_top_logprobs({"choices": [{"logprobs": {"top_logprobs": [{"": -0.7, "fé": -1.2}]}}]},
                               token_strings=smap, counts=counts)
    assert pairs == [(cafe[-1], -1.2)] and counts == {"topk_entries": 2, "topk_mapped": 1}


def test_duplicate_strings_keep_their_mass(sp_tok):
    # "<0x20>" (byte fallback) and "▁" are both exactly b" ": the key " " is shared
    table = token_bytes_table(sp_tok)
    both = [i for i, data in enumerate(table) if data == b" "]
    assert len(both) == 2
    split = TokenStringMap(sp_tok, ties="split")
    pairs = parse_top_logprobs({"choices": [{"logprobs": {"top_logprobs": [{" ": math.log(0.5)}]}}]},
                               token_strings=split)
    assert sorted(p[0] for p in pairs) == both
    assert math.isclose(sum(math.exp(p[1]) for p in pairs), 0.5, rel_tol=1e-9)  # no mass lost
    canonical = TokenStringMap(sp_tok, ties="canonical")
    assert canonical.lookup(" ") == [min(both)]
    # a lossy rendering never takes the mass of an exact one: ties prefer ids whose bytes are the key
    lossy = TokenStringMap(sp_tok, render=lambda data: data.decode("utf-8", "ignore").lower())
    assert lossy.lookup("a") and all(table[i] == b"a" for i in lossy.lookup("a"))


# ------------------------------------------------------------------- a llama.cpp-like fake server
class LlamaLikeServer(ThreadingHTTPServer):
    """Refuses token-id prompts as llama-cpp-python 0.3.36's server does (HTTP 500, body recorded
    below; or a plain 422) and answers text prompts with token-string keys; records every body."""

    daemon_threads = True

    def __init__(self, keys: dict[str, float], refuse_status: int = 500):
        self.keys, self.received, self.refuse_status = keys, [], refuse_status
        super().__init__(("127.0.0.1", 0), LlamaLikeHandler)


class LlamaLikeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.received.append(body)
        prompt = json.loads(body)["prompt"]
        if isinstance(prompt, str):
            status, data = 200, {"choices": [{"text": "x", "index": 0, "finish_reason": "length",
                                              "logprobs": {"top_logprobs": [dict(self.server.keys)]}}]}
        elif self.server.refuse_status == 500:  # recorded from llama-cpp-python 0.3.36
            status, data = 500, {"error": {
                "message": "3 validation errors:\n  {'type': 'string_type', 'loc': ('body', 'prompt', 'str'), "
                           "'msg': 'Input should be a valid string', 'input': [504, 3458]}\n ...",
                "type": "internal_server_error", "param": None, "code": None}}
        else:
            status, data = 422, {"detail": [{"type": "string_type", "loc": ["body", "prompt", "str"],
                                             "msg": "Input should be a valid string"}]}
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


@pytest.fixture(params=[500, 422])
def llama_like(tok, request):
    table = token_bytes_table(tok)
    # a distribution: the probabilities, the unmappable "" included, sum to 0.96
    keys = {render_token_bytes(table[i]): lp
            for i, lp in zip(tok.encode(" the friends", add_special_tokens=False), (-0.5, -1.5, -2.5))}
    keys[""] = -3.0  # a partial-byte or control token: unmappable
    server = LlamaLikeServer(keys, refuse_status=request.param)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_auto_probe_falls_back_to_text_and_remembers(llama_like, tok):
    server, url = llama_like
    llm = logitfuse.OpenAICompatibleLLM(url, "llm", top_k=5, tokenizer=tok, on_failure="raise")
    llm.start(["Dear friends,"])
    out = llm.advance([[]])
    assert out.ok.all() and llm.stats["prompt_format"] == "text"
    assert isinstance(json.loads(server.received[0])["prompt"], list)  # the probe
    assert json.loads(server.received[1])["prompt"] == "Dear friends,"
    new = tok.encode(" café", add_special_tokens=False)
    out = llm.advance([new])
    assert json.loads(server.received[-1])["prompt"] == "Dear friends, café" and len(server.received) == 3
    assert llm.stats["topk_mapped_share"] == pytest.approx(6 / 8)
    assert [json.loads(b) for b in server.received] == [json.loads(b) for b in llm.audit_log]
    assert set(out.next.ids[0].tolist()) == set(tok.encode(" the friends", add_special_tokens=False)[:3])


def test_text_mode_holds_back_half_characters(llama_like, tok):
    server, url = llama_like
    llm = logitfuse.OpenAICompatibleLLM(url, "llm", top_k=5, tokenizer=tok, prompt_format="text")
    table = token_bytes_table(tok)
    llm.start(["Hi"])
    lead = table.index(b"\xc3")
    assert not llm.advance([[lead]]).ok.any() and llm.stats["held_back"] == 1 and not server.received
    tail = table.index(b"\xa9")
    assert llm.advance([[tail]]).ok.all()
    assert json.loads(server.received[-1])["prompt"] == "Hié"
    llm.rollback([1])
    assert llm.row_text(0) is None


def test_text_mode_prompt_ids_are_sent_as_their_text(llama_like, tok):
    server, url = llama_like
    llm = logitfuse.OpenAICompatibleLLM(url, "llm", top_k=5, tokenizer=tok, prompt_format="text")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    llm.start([list(ids)])
    llm.advance([[]])
    assert json.loads(server.received[-1])["prompt"] == token_bytes(tok, list(ids)).decode()
    assert "<|im_start|>" in json.loads(server.received[-1])["prompt"]


def test_fused_generation_over_text_prompts_same_and_cross_tokenizer(llama_like, tok, sp_tok):
    server, url = llama_like
    slm = tiny_llama(len(tok), seed=0)
    inputs = left_pad([private_prompt_ids(tok, "Secret CANARYxyz stuff.", PUBLIC)])
    llm = logitfuse.OpenAICompatibleLLM(url, "llm", top_k=5, tokenizer=tok, on_failure="raise")
    proc = logitfuse.CoGenesisLogitsProcessor(llm, PUBLIC, alpha=0.5)
    out = generate(slm, inputs, 5, proc)
    assert proc.stats["fallbacks"] == 0 and llm.stats["prompt_format"] == "text"
    generated = out[0, :-1].tolist()  # the new tokens; the last one is never sent
    assert json.loads(server.received[-1])["prompt"] == PUBLIC + token_bytes(tok, generated).decode("utf-8", "replace")
    assert not any(b"CANARYxyz" in body for body in server.received)
    # two tokenizers: the text sent is exactly the text the processor re-tokenized
    sp_slm = tiny_llama(len(sp_tok), seed=2)
    vmap = logitfuse.VocabMap.from_tokenizers(sp_tok, tok)
    llm2 = logitfuse.OpenAICompatibleLLM(url, "llm", top_k=5, tokenizer=tok, prompt_format="text")
    proc2 = logitfuse.CoGenesisLogitsProcessor(llm2, PUBLIC, alpha=0.5, vocab_map=vmap, slm_tokenizer=sp_tok)
    sp_inputs = left_pad([sp_tok.encode("Secret CANARYxyz stuff. " + PUBLIC)])
    generate(sp_slm, sp_inputs, 6, proc2)
    assert json.loads(llm2.audit_log[-1])["prompt"] == llm2.row_text(0)
    assert llm2.row_text(0) == PUBLIC + proc2.generated_text(0) and proc2.stats["llm_tokens"] > 0


def test_replacement_char_renderings_map_too(tok):
    # a token cut inside a character: llama.cpp prints b"\xafve" as "ve" (the key of the exact token
    # "ve", which keeps it), a server decoding with errors="replace" as "\ufffdve" (mapped to it)
    smap = TokenStringMap(tok)
    table = token_bytes_table(tok)
    cut = table.index(b"\xafve")
    assert smap.lookup("\ufffdve") == [cut]
    assert smap.lookup("ve") == [table.index(b"ve")]


def test_one_token_bytes_table_and_nothing_is_stored_on_the_tokenizer(tok, sp_tok):
    """Training alignment (train_fuser.scoring), token-string mapping and re-tokenization all read
    retokenize.token_bytes_table, which caches beside the tokenizer, never on it."""
    from logitfuse.train_fuser.scoring import align_response

    before = (set(vars(tok)), set(vars(sp_tok)))
    text = " Dear friends, café"
    slm_ids, llm_ids, index = align_response(sp_tok, tok, text)
    TokenStringMap(tok)
    assert (set(vars(tok)), set(vars(sp_tok))) == before
    assert token_bytes(sp_tok, slm_ids) == token_bytes(tok, llm_ids) == text.encode()
    # an SLM token aligned to an LLM token starts at the same byte in both tokenizations
    for i, j in enumerate(index.tolist()):
        if j >= 0:
            assert token_bytes(sp_tok, slm_ids[:i]) == token_bytes(tok, llm_ids[:j])
