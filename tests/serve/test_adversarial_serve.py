"""`logitfuse serve` against malformed, hostile and slow clients, over raw sockets on 127.0.0.1.

Every malformed request gets an HTTP answer with a JSON error body (never a dropped connection or a
traceback on the server's stderr), error messages never quote the request, slow senders are cut off,
connections beyond the cap get 503, and an API key, when set, is required on every request.
Each socket has a 10 s safety timeout, so a regression fails instead of hanging.
"""

from __future__ import annotations

import json
import select
import socket
import types

import pytest
import torch

import logitfuse
from logitfuse.testing.generation import PUBLIC, chat_ids
from logitfuse.testing.servers import raw_connect, read_raw_response
from logitfuse.cli import main
from logitfuse.serve.server import CompletionServer, is_loopback_host, serve_in_thread

CANARY = "Zq8WkP3xLm2T"
SAFETY_TIMEOUT = 10.0  # seconds a test socket waits before the test fails (a hang, not a measurement)


def start(llm_model, tok, **options):
    server, url = serve_in_thread(llm_model, tok, model_name="tiny", **options)
    return server, server.server_address[1]


def stop(server):
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def served(llm_model, tok):
    server, port = start(llm_model, tok, max_body_bytes=1 << 20)
    yield server, port
    stop(server)


@pytest.fixture
def no_tracebacks(capfd):
    """Fails the test if the server printed anything to stderr (a traceback, a request line)."""
    yield
    assert capfd.readouterr().err == ""


def connect(port):
    return raw_connect(port, SAFETY_TIMEOUT)


def read_response(reader):
    """``(status, headers, json_body)`` of the next response, or None when the server closed instead."""
    response = read_raw_response(reader)
    if response is not None:
        assert response[1].get("content-type") == "application/json"
    return response


def exchange(port, raw, *, end_stream=True):
    """Send ``raw`` (then end the stream, by default) and read one response."""
    sock, reader = connect(port)
    with sock, reader:
        sock.sendall(raw)
        if end_stream:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:  # the server answered and closed already (a 503 to a connection over the cap)
                pass
        return read_response(reader)


def post(body, *, headers=(), length=None, path="/v1/completions"):
    """Raw bytes of a POST; ``length`` overrides the Content-Length header (None: the true length)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", *headers]
    if length != "omit":
        lines.append(f"Content-Length: {len(data) if length is None else length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def get(path="/health", headers=()):
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *headers]) + "\r\n\r\n").encode()


def assert_error(response, status, *words):
    assert response is not None, "the server closed the connection without answering"
    got, _, body = response
    assert got == status, body
    message = body["error"]["message"]
    assert body["error"]["code"] == status and all(word in message for word in words), message
    assert CANARY not in message
    return message


VALID = {"model": "tiny", "prompt": [5, 6], "max_tokens": 1}


# ------------------------------------------------------------------------------- framing
@pytest.mark.parametrize("raw, status, word", [
    (post(VALID, length=-1), 400, "Content-Length"),  # used to read to the end of the stream: no limit
    (post(VALID, length="abc"), 400, "Content-Length"),
    (post(VALID, length="1e3"), 400, "Content-Length"),
    (post(VALID, length="\u00b2"), 400, "Content-Length"),  # a latin-1 digit that int() refuses
    (post(VALID, headers=["Content-Length: 3"]), 400, "Content-Length"),  # two different lengths
    (post(VALID, length=10 ** 12), 413, "limit"),
    (post(VALID, length="9" * 5000), 413, "limit"),  # int() refuses 5000 digits
    (post(VALID, length="omit"), 411, "Content-Length"),
    (post(VALID, length="omit", headers=["Transfer-Encoding: chunked"]), 411, "Transfer-Encoding"),
    (post(VALID, length=len(json.dumps(VALID)) + 10), 400, "ended before"),  # the body is short
    (post(b"[" * 100_000), 400, "nested too deeply"),
    (post(b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400, "nested too deeply"),
    (post(b"\xff\xfe{}"), 400, "JSON object"),
    (post(b"[1, 2]"), 400, "JSON object"),
    (post(b""), 400, "JSON object"),
    (post(b'{"max_tokens": 1' + b"0" * 5000 + b"}"), 400, "JSON object"),  # too many digits for int()
    (post(VALID, path="/v1/" + CANARY), 404, "/v1/completions"),
])
def test_malformed_bodies_get_a_json_error(served, no_tracebacks, raw, status, word):
    assert_error(exchange(served[1], raw), status, word)


@pytest.mark.parametrize("raw, status", [
    (b"GARBAGE " + CANARY.encode() + b"\r\n\r\n", 400),
    (CANARY.encode() + b"\r\n\r\n", 400),
    (b"GET /health HTTP/1.1 " + CANARY.encode() + b"\r\n\r\n", 400),
    (b"GET /health " + CANARY.encode() + b"\r\n\r\n", 400),
    (b"GET /health HTTP/9.9\r\n\r\n", 505),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    (b"GET /health HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 200 + b"\r\n", 431),
    (b"PUT /v1/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 501),
])
def test_malformed_request_lines_and_headers_get_a_json_error(served, no_tracebacks, raw, status):
    got, headers, body = exchange(served[1], raw)
    assert got == status and body["error"]["code"] == status and CANARY not in json.dumps(body)
    assert headers["connection"] == "close"


def test_a_rejected_body_keeps_the_connection_but_an_unread_one_closes_it(served, no_tracebacks):
    sock, reader = connect(served[1])
    with sock, reader:  # two pipelined requests: a read body that fails validation, then a good one
        sock.sendall(post({**VALID, "temperature": "hot"}) + get())
        assert_error(read_response(reader), 400, "temperature")
        assert read_response(reader)[:1] == (200,)
    sock, reader = connect(served[1])
    with sock, reader:  # a GET carrying a body: answered, then closed (the body is never parsed as a request)
        sock.sendall(get(headers=["Content-Length: 5"]) + b"hello")
        status, headers, _ = read_response(reader)
        assert status == 200 and headers["connection"] == "close" and reader.read() == b""


# ------------------------------------------------------------------------------ parameters
@pytest.mark.parametrize("change, field", [
    ({"temperature": "NaN"}, "temperature"),
    ({"temperature": "Infinity"}, "temperature"),
    ({"temperature": "1e400"}, "temperature"),
    ({"temperature": "-1"}, "temperature"),
    ({"temperature": '"hot"'}, "temperature"),
    ({"temperature": "true"}, "temperature"),
    ({"temperature": "1" + "0" * 400}, "temperature"),  # an int too large for a float
    ({"seed": '"abc"'}, "seed"),
    ({"seed": "1.5"}, "seed"),
    ({"seed": "-1"}, "seed"),
    ({"seed": "true"}, "seed"),
    ({"seed": str(2 ** 64)}, "seed"),
    ({"max_tokens": "true"}, "max_tokens"),
    ({"max_tokens": '"3"'}, "max_tokens"),
    ({"max_tokens": "0"}, "max_tokens"),
    ({"max_tokens": str(10 ** 30)}, "max_tokens"),
    ({"max_tokens": "2.0"}, "max_tokens"),
    ({"logprobs": "true"}, "logprobs"),
    ({"logprobs": '"2"'}, "logprobs"),
    ({"logprobs": "-1"}, "logprobs"),
    ({"prompt": "[[[1]]]"}, "prompt"),
    ({"prompt": "[true, 1]"}, "prompt"),
    ({"prompt": "[1.5]"}, "prompt"),
    ({"prompt": "[]"}, "prompt"),
    ({"prompt": '""'}, "prompt"),
    ({"prompt": "null"}, "prompt"),
    ({"prompt": "[-1]"}, "prompt"),
    ({"prompt": '{"text": "hi"}'}, "prompt"),
    ({"echo": '"no"'}, "echo"),
    ({"echo": "true"}, "echo"),
    ({"return_tokens_as_token_ids": '"yes"'}, "return_tokens_as_token_ids"),
    ({"stop": '["' + CANARY + '"]'}, "stop"),
])
def test_bad_parameters_get_400_naming_the_field(served, no_tracebacks, change, field):
    fields = {"model": '"tiny"', "prompt": "[5, 6]", "max_tokens": "1", **change}  # raw JSON values
    raw = ("{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}").encode()
    assert_error(exchange(served[1], post(raw)), 400, field)


def test_prompts_beyond_the_context_are_refused(served, llm_model, no_tracebacks):
    context = llm_model.config.max_position_embeddings  # read from the model config by default
    assert served[0].max_context == context
    message = assert_error(exchange(served[1], post({**VALID, "prompt": [5] * (context + 1)})), 400, str(context))
    assert "prompt" in message
    too_long = {**VALID, "prompt": [5] * (context - 1), "max_tokens": 2}
    assert_error(exchange(served[1], post(too_long)), 400, "max_tokens", str(context))
    assert_error(exchange(served[1], post({**VALID, "prompt": [[5], [5] * context]})), 400, str(context))


def test_a_tiny_temperature_decodes_greedily(served, no_tracebacks):
    texts = []
    for temperature in (1e-300, 0):  # logits / 1e-300 overflow: sampled, it gave NaN probabilities (500)
        status, _, reply = exchange(served[1], post({**VALID, "temperature": temperature, "max_tokens": 3}),
                                    end_stream=False)  # a client that ends its stream is gone: no answer
        assert status == 200
        texts.append(reply["choices"][0]["text"])
    assert texts[0] == texts[1]


def test_errors_never_quote_the_request(served, tok, no_tracebacks):
    assert_error(exchange(served[1], post({**VALID, "model": CANARY})), 404, "tiny")
    assert_error(exchange(served[1], post({**VALID, "prompt": CANARY, "logprobs": CANARY})), 400, "logprobs")

    class ExplodingModel(torch.nn.Module):
        """A model whose forward fails with the prompt in its message."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.config = types.SimpleNamespace(vocab_size=len(tok))

        def forward(self, input_ids):
            raise RuntimeError(f"cannot run on {tok.decode(input_ids[0])}")

    server, port = start(ExplodingModel(), tok)
    try:
        reply = exchange(port, post({"prompt": CANARY, "max_tokens": 1}), end_stream=False)
        message = assert_error(reply, 500, "internal error")
        assert message == "internal error: RuntimeError"
    finally:
        stop(server)


# --------------------------------------------------------------------- timeouts and the cap
@pytest.fixture(scope="module")
def impatient(llm_model, tok):
    server, port = start(llm_model, tok, read_timeout=0.5)
    yield server, port
    stop(server)


def test_half_sent_headers_are_cut_off(impatient, no_tracebacks):
    sock, reader = connect(impatient[1])
    with sock, reader:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
        assert reader.read() == b""  # the server closed the connection (before: held forever)


def test_a_half_sent_body_gets_408(impatient, no_tracebacks):
    raw = post(VALID, length=1000)  # announces 1000 bytes, sends fewer, keeps the stream open
    assert_error(exchange(impatient[1], raw, end_stream=False), 408, "0.5 s")


def test_a_trickled_request_is_cut_off_by_one_deadline(impatient, no_tracebacks):
    """One byte every 0.1 s never trips a per-read timeout of 0.5 s; the per-request deadline does."""
    sock, reader = connect(impatient[1])
    with sock, reader:
        sock.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
        cut_off = False
        for _ in range(100):  # 10 s of trickle at most; the server must close long before
            try:
                sock.send(b"a")
            except OSError:
                cut_off = True
                break
            if select.select([sock], [], [], 0.1)[0]:
                cut_off = reader.read() == b""
                break
        assert cut_off


def test_connections_beyond_the_cap_get_503(llm_model, tok, no_tracebacks):
    server, port = start(llm_model, tok, max_connections=2)
    holders = [connect(port) for _ in range(2)]
    try:
        for sock, reader in holders:  # answered, and kept alive: each holds a handler thread
            sock.sendall(get())
            assert read_response(reader)[0] == 200
        status, headers, body = exchange(port, get())
        assert status == 503 and body["error"]["code"] == 503 and headers["connection"] == "close"
        assert server.stats["refused_busy"] == 1
    finally:
        for sock, reader in holders:
            reader.close()
            sock.close()
    for _ in range(200):  # the holders' threads end once they see the close; then new clients get in
        response = exchange(port, get())
        if response[0] == 200:
            break
        select.select([], [], [], 0.05)
    assert response[0] == 200
    stop(server)


# ------------------------------------------------------------------------------------- auth
KEY = "s3cret-Key_1"


@pytest.fixture(scope="module")
def locked(llm_model, tok):
    server, port = start(llm_model, tok, api_key=KEY)
    yield server, port
    stop(server)


@pytest.mark.parametrize("headers", [[], [f"Authorization: Bearer {KEY}x"], [f"Authorization: {KEY}"],
                                     [f"Authorization: bearer {KEY}"], ["Authorization: Bearer \u00e9"]])
def test_requests_without_the_key_get_401(locked, no_tracebacks, headers):
    response = exchange(locked[1], get(headers=headers))
    assert_error(response, 401, "Authorization: Bearer")
    assert response[1]["www-authenticate"].startswith("Bearer")
    response = exchange(locked[1], post(VALID, headers=headers), end_stream=False)  # the body is never read
    assert_error(response, 401)
    assert response[1]["connection"] == "close"


def test_requests_with_the_key_are_served(locked, tok, no_tracebacks):
    assert exchange(locked[1], get(headers=[f"Authorization: Bearer {KEY}"]))[0] == 200
    url = f"http://127.0.0.1:{locked[1]}"
    llm = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=3, tokenizer=tok, api_key=KEY, on_failure="raise")
    llm.start([chat_ids(tok, PUBLIC)])
    assert llm.advance([[]]).ok.all()
    with pytest.raises(logitfuse.LLMBackendError, match="401"):
        keyless = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=3, tokenizer=tok, on_failure="raise", retries=0)
        keyless.start([chat_ids(tok, PUBLIC)])
        keyless.advance([[]])


def test_remote_hosts_need_a_key(llm_model, tok):
    assert all(map(is_loopback_host, ["127.0.0.1", "127.0.0.2", "::1", "localhost"]))
    assert not any(map(is_loopback_host, ["0.0.0.0", "", "::", "192.168.1.2", "example.com"]))
    for host in ("0.0.0.0", ""):
        with pytest.raises(ValueError, match="api_key=.*allow_insecure_remote=True"):
            CompletionServer((host, 0), llm_model, tok)
    for bad in [{"api_key": ""}, {"api_key": "has space"}, {"api_key": 123}, {"read_timeout": 0},
                {"read_timeout": float("nan")}, {"max_connections": 0}, {"max_body_bytes": True}]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            CompletionServer(("127.0.0.1", 0), llm_model, tok, **bad)


@pytest.mark.parametrize("argv, env, words", [
    (["--host", "0.0.0.0"], None, ["--host 0.0.0.0", "--api-key", "--allow-insecure-remote"]),
    (["--host", "0.0.0.0", "--api-key", "a key"], None, ["--api-key", "spaces"]),
    (["--host", "0.0.0.0"], "a key", ["LOGITFUSE_API_KEY", "spaces"]),  # the key comes from the variable
    (["--host", "0.0.0.0"], KEY, ["--model"]),  # a good key from the variable: on to the next check
    (["--host", "0.0.0.0", "--allow-insecure-remote"], None, ["--model"]),
    (["--read-timeout", "0"], None, ["--read-timeout"]),
    (["--read-timeout", "nan"], None, ["--read-timeout"]),
    (["--max-connections", "0"], None, ["--max-connections"]),
])
def test_cli_checks_serve_options_before_loading(tmp_path, capsys, monkeypatch, argv, env, words):
    if env is None:
        monkeypatch.delenv("LOGITFUSE_API_KEY", raising=False)
    else:
        monkeypatch.setenv("LOGITFUSE_API_KEY", env)
    assert main(["serve", "--model", str(tmp_path / "missing"), *argv]) == 2  # never gets to load a model
    err = capsys.readouterr().err
    assert err.startswith("logitfuse serve: error: ") and err.count("\n") == 1
    assert all(word in err for word in words), err


def test_cli_help_names_the_auth_and_limit_options(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--api-key", "LOGITFUSE_API_KEY", "--allow-insecure-remote", "--read-timeout", "--max-connections"):
        assert option in text
