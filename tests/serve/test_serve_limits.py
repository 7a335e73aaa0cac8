"""`logitfuse serve` hardened (issue 23): every mistake on the command line is one line with exit status
2 before the model loads (a port in use, a folder without config.json, a missing tokenizer, a bad
--host, --device cuda without a GPU), a failure at run time is one line with exit status 1; the work of
one request is capped, stops when its client leaves, echo offsets cost time linear in the prompt, and
SIGINT/SIGTERM stop the server cleanly while a request computes. Raw sockets on 127.0.0.1 only; every
wait is bounded (a hang fails the test, nothing is timed).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from logitfuse.cli import main
from logitfuse.serve import server as serve_server
from logitfuse.serve.server import CompletionServer, check_bindable, serve_in_thread
from logitfuse.testing import tiny_llama
from logitfuse.testing.servers import raw_connect, read_raw_response

SAFETY_TIMEOUT = 10.0  # seconds a test socket waits before the test fails (a hang, not a measurement)
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------- helpers
def connect(port):
    return raw_connect(port, SAFETY_TIMEOUT)


def read_response(reader):
    """``(status, json_body)`` of the next response, or None when the server closed instead."""
    response = read_raw_response(reader)
    return None if response is None else (response[0], response[2])


def post(body):
    data = json.dumps(body).encode()
    return (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def exchange(port, raw):
    sock, reader = connect(port)
    with sock, reader:
        sock.sendall(raw)
        return read_response(reader)


def health(port):
    return exchange(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model or a tokenizer fails the test: the mistake must be caught before."""
    import transformers

    def tripwire(*args, **kwargs):
        raise AssertionError(f"something was loaded before the arguments were checked: {args!r}")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", tripwire)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tripwire)


def fake_model_dir(folder: Path, *, config=True, tokenizer=True) -> Path:
    """A folder that looks like a model to the checks (it would not load)."""
    folder.mkdir(parents=True, exist_ok=True)
    if config:
        (folder / "config.json").write_text("{}")
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    return folder


def assert_one_line(code, err, status, *fragments):
    """Exit ``status`` and one line of error (after transformers' progress bar, if the model loaded)."""
    lines = [line for line in err.strip().splitlines() if not line.startswith("Loading weights")]
    assert code == status, err
    assert len(lines) == 1 and lines[0].startswith("logitfuse serve: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    """A real (tiny) transformers model folder with its tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-served")
    tiny_llama(len(tok), seed=1).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ------------------------------------------------- 1 and 3: one line, before the model loads
def test_a_port_in_use_is_one_line_before_loading(tmp_path, capsys, no_loading, monkeypatch):
    monkeypatch.delenv("LOGITFUSE_API_KEY", raising=False)
    model = fake_model_dir(tmp_path / "m")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code = main(["serve", "--model", str(model), "--port", str(port)])
    assert_one_line(code, capsys.readouterr().err, 2, f"--port {port}", "in use", "0 picks a free one")


@pytest.mark.parametrize("make, argv, fragments", [
    (dict(config=False), [], ["--model", "config.json", "save_pretrained"]),
    (dict(), ["--tokenizer", "{tmp}/no-such-tokenizer"], ["--tokenizer", "not a folder"]),
    (dict(), ["--tokenizer", "{tmp}"], ["--tokenizer", "holds no tokenizer"]),
    (dict(tokenizer=False), [], ["--model", "holds no tokenizer", "--tokenizer DIR"]),
    (dict(), ["--host", "256.256.256.256"], ["--host 256.256.256.256", "not an IP address"]),
    (dict(), ["--host", "256.256.256.256", "--allow-insecure-remote"], ["--host", "not an IP address"]),
    (dict(), ["--host", "::zz"], ["--host ::zz", "not an IP address"]),
    (dict(), ["--host", "192.0.2.1", "--allow-insecure-remote"], ["--host 192.0.2.1", "no address of this machine"]),
    (dict(), ["--max-request-tokens", "0"], ["--max-request-tokens 0"]),
    (dict(), ["--device", "nonsense"], ["--device", "not a torch device"]),
])
def test_serve_mistakes_are_one_line_before_loading(tmp_path, capsys, no_loading, monkeypatch, make, argv,
                                                     fragments):
    monkeypatch.delenv("LOGITFUSE_API_KEY", raising=False)
    model = fake_model_dir(tmp_path / "m", **make)
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    code = main(["serve", "--model", str(model), "--port", "0", *argv])
    assert_one_line(code, capsys.readouterr().err, 2, *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_one_line_before_loading(tmp_path, capsys, no_loading):
    code = main(["serve", "--model", str(fake_model_dir(tmp_path / "m")), "--port", "0", "--device", "cuda"])
    assert_one_line(code, capsys.readouterr().err, 2, "--device cuda", "--device cpu")


def test_a_model_that_does_not_load_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LOGITFUSE_API_KEY", raising=False)
    model = fake_model_dir(tmp_path / "m")  # config.json is "{}": transformers cannot build it
    code = main(["serve", "--model", str(model), "--port", "0"])
    assert_one_line(code, capsys.readouterr().err, 1, "cannot load --model")


def test_a_port_taken_while_the_model_loads_is_one_line_exit_1(model_dir, capsys, monkeypatch):
    monkeypatch.delenv("LOGITFUSE_API_KEY", raising=False)
    monkeypatch.setattr(serve_server, "check_bindable", lambda host, port: None)  # it was free when checked
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code = main(["serve", "--model", str(model_dir), "--port", str(port)])
    assert_one_line(code, capsys.readouterr().err, 1, f"--port {port}", "in use")


def test_help_names_the_work_cap(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-request-tokens" in text and "default 16384" in text


def test_an_ipv6_loopback_host_is_served(llm_model, tok):
    """``--host ::1`` passes the checks; the server binds it (before: an IPv4 socket) at a bracketed URL."""
    try:
        check_bindable("::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    server, url = serve_in_thread(llm_model, tok, host="::1")
    try:
        assert url.startswith("http://[::1]:")
        with urllib.request.urlopen(url + "/health", timeout=SAFETY_TIMEOUT) as response:
            assert response.status == 200
    finally:
        server.shutdown()
        server.server_close()


# -------------------------------------------------------------- 2: the work of one request
@pytest.fixture(scope="module")
def capped(llm_model, tok):
    server, url = serve_in_thread(llm_model, tok, model_name="tiny", max_request_tokens=64)
    yield server, server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("prompt, max_tokens", [
    ([[5] * 10, [6] * 10], 30),  # 2 x (10 + 30) = 80 tokens
    ([[5]] * 10_000, 1),  # many prompts: refused before they are tokenized
    ("x" * 100, 1),  # one long text prompt
])
def test_requests_over_the_work_cap_get_400(capped, prompt, max_tokens):
    status, body = exchange(capped[1], post({"prompt": prompt, "max_tokens": max_tokens}))
    message = body["error"]["message"]
    assert status == 400 and "64 tokens" in message and "--max-request-tokens" in message, message
    assert "max_tokens" in message and "fewer or shorter prompts" in message


def test_requests_within_the_work_cap_are_served(capped):
    status, body = exchange(capped[1], post({"prompt": [[5] * 10, [6] * 10], "max_tokens": 2}))  # 24 tokens
    assert status == 200 and len(body["choices"]) == 2


def test_the_work_cap_must_be_positive(llm_model, tok):
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="max_request_tokens"):
            CompletionServer(("127.0.0.1", 0), llm_model, tok, max_request_tokens=bad)


def test_work_stops_when_the_client_leaves(llm_model, tok):
    """A client that sends a long request and leaves frees its connection slot at the next forward pass
    (before: the work went on to the end, and a server with one slot answered 503 all along)."""
    forwards = []
    hook = llm_model.register_forward_hook(lambda *args: forwards.append(1))
    server, _ = serve_in_thread(llm_model, tok, model_name="tiny", max_connections=1)
    port = server.server_address[1]
    requested = 8 * 500
    try:
        sock, reader = connect(port)
        sock.sendall(post({"prompt": [[5]] * 8, "max_tokens": 500}))
        for _ in range(1000):  # until the work has begun (bounded)
            if forwards:
                break
            select.select([], [], [], 0.01)
        assert forwards, "the request never started"
        reader.close()
        sock.close()
        for _ in range(600):  # the slot frees once the work stops; 30 s at most, then the test fails
            response = health(port)
            if response is not None and response[0] == 200:
                break
            select.select([], [], [], 0.05)
        assert response is not None and response[0] == 200, response
        assert len(forwards) < requested and server.stats["cancelled"] == 1
        for _ in range(600):  # and it serves on (once the health check's own connection has ended)
            status, body = exchange(port, post({"prompt": [5, 6], "max_tokens": 2}))
            if status != 503:
                break
            select.select([], [], [], 0.05)
        assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    finally:
        hook.remove()
        server.shutdown()
        server.server_close()


class CountingTokenizer:
    """A tokenizer that counts the token ids it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_echo_offsets_cost_time_linear_in_the_prompt(llm_model, tok):
    """Each echoed token's text offset used to decode the whole prefix before it (n^2 / 2 tokens)."""
    counting = CountingTokenizer(tok)
    server, _ = serve_in_thread(llm_model, counting, model_name="tiny")
    try:
        n = 500
        status, body = exchange(server.server_address[1],
                                post({"prompt": [5, 6, 7, 8, 9] * (n // 5), "max_tokens": 1, "echo": True,
                                      "logprobs": 1}))
        assert status == 200 and len(body["choices"][0]["logprobs"]["text_offset"]) == n + 1
        assert counting.decoded < 40 * n, counting.decoded  # linear; the prefixes were ~n^2 / 2 = 125,000
    finally:
        server.shutdown()
        server.server_close()


def test_echo_offsets_are_the_decoded_prefix_lengths(served, tok):
    """Split characters (byte-level tokens inside a UTF-8 sequence) and spaces keep their offsets."""
    text = "Héllo wörld — ünïcode ✓ 日本語 and 🙂 emoji, twice: Héllo wörld — ✓ 日本語 🙂!"
    ids = tok.encode(text)
    server, url = served
    status, body = exchange(server.server_address[1], post({"prompt": ids, "max_tokens": 1, "echo": True,
                                                            "logprobs": 1}))
    assert status == 200
    offsets = body["choices"][0]["logprobs"]["text_offset"]
    assert offsets[:len(ids)] == [len(tok.decode(ids[:j])) for j in range(len(ids))]


# ------------------------------------------------------------ 2: a clean stop on a signal
def wait_line(stream, seconds):
    """The next line of ``stream`` (a pipe), or b"" after ``seconds`` (a hang guard)."""
    if select.select([stream], [], [], seconds)[0]:
        return stream.readline()
    return b""


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_a_signal_while_a_request_computes_stops_cleanly(model_dir, signum, status):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LOGITFUSE_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "logitfuse.cli", "serve", "--model", str(model_dir),
                             "--port", "0"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = wait_line(proc.stdout, 180).decode()
        if "/v1" not in line:
            proc.kill()
            pytest.fail(f"the server did not start: {line!r} {proc.stderr.read().decode()[-2000:]}")
        port = int(line.split("/v1")[0].rsplit(":", 1)[1])
        assert health(port)[0] == 200
        sock, reader = connect(port)
        with sock, reader:
            sock.sendall(post({"prompt": [[5]] * 30, "max_tokens": 500}))  # 15,000 forward passes
            time.sleep(1.0)  # let it start computing (not a measurement: the signal may come at any point)
            proc.send_signal(signum)
            sock.settimeout(60)
            response = read_response(reader)
        assert response is None or response[0] == 503, response  # told, or closed: never a half answer
        code = proc.wait(timeout=60)
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert code == status, (code, err)  # before: SIGABRT (-6) from torch in a daemon thread at exit
    assert "Traceback" not in err and "terminate" not in err and "stopping" in err, err
