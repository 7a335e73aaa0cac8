"""The remote path end to end on 127.0.0.1: `logitfuse serve` + OpenAICompatibleLLM, and faults."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import logitfuse
from logitfuse.testing.generation import PUBLIC, chat_ids, generate, left_pad, private_prompt_ids
from logitfuse.cli import main
from logitfuse.serve.server import serve_in_thread

N_NEW = 6
PUBLICS = [PUBLIC, "Dear friends,"]


@pytest.fixture(scope="module")
def served(llm_model, tok):
    server, url = serve_in_thread(llm_model, tok, model_name="tiny", top_k_max=len(tok), log_requests=True)
    yield server, url
    server.shutdown()
    server.server_close()


def get_json(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_topk_logprobs_match_the_local_model(served, llm_model, tok):
    server, url = served
    llm = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=20, tokenizer=tok)
    prompts = [chat_ids(tok, p) for p in PUBLICS]
    llm.start(prompts)
    out = llm.advance([[5, 6], [7]])
    assert out.ok.all() and out.next.ids.shape == (2, 20)
    for row, ids in enumerate([prompts[0] + [5, 6], prompts[1] + [7]]):
        with torch.no_grad():
            ref = torch.log_softmax(llm_model(torch.tensor([ids])).logits[0, -1].float(), -1).topk(20)
        assert out.next.ids[row].tolist() == ref.indices.tolist()
        torch.testing.assert_close(out.next.logprobs[row], ref.values, atol=1e-5, rtol=1e-5)
    # nothing new for row 1: only row 0 is asked again
    before = len(llm.audit_log)
    llm.advance([[9], []])
    assert len(llm.audit_log) == before + 1


def test_server_endpoints_and_errors(served, tok):
    server, url = served
    assert get_json(url + "/health") == (200, {"status": "ok"})
    status, models = get_json(url + "/v1/models")
    assert status == 200 and models["data"][0]["id"] == "tiny"
    status, reply = get_json(url + "/v1/completions", {"model": "tiny", "prompt": "Dear friends,", "max_tokens": 3,
                                                       "logprobs": 2, "temperature": 0})
    assert status == 200 and len(reply["choices"][0]["logprobs"]["top_logprobs"]) == 3
    status, reply = get_json(url + "/v1/completions", {"model": "tiny", "prompt": [[1, 2], [3]], "max_tokens": 1})
    assert status == 200 and [c["index"] for c in reply["choices"]] == [0, 1]
    for body, code in [
        ({"model": "other", "prompt": [1]}, 404),
        ({"model": "tiny", "prompt": [1], "logprobs": len(tok) + 1}, 400),
        ({"model": "tiny", "prompt": [1], "echo": True}, 400),
        ({"model": "tiny", "prompt": [10 ** 6]}, 400),
        ({"model": "tiny", "prompt": {"a": 1}}, 400),
    ]:
        status, reply = get_json(url + "/v1/completions", body)
        assert status == code and "message" in reply["error"]


def test_remote_fused_generation_with_full_topk_equals_local(served, slm, llm_model, tok):
    """With K = V the top-k path carries the whole distribution: same tokens as the dense HFLLM."""
    server, url = served
    inputs = left_pad([private_prompt_ids(tok, "Secret stuff.", p) for p in PUBLICS])
    public_ids = [chat_ids(tok, p) for p in PUBLICS]
    local = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), public_ids, alpha=0.3)
    remote_llm = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=len(tok), tokenizer=tok)
    remote = logitfuse.CoGenesisLogitsProcessor(remote_llm, public_ids, alpha=0.3)
    assert torch.equal(generate(slm, inputs, N_NEW, local), generate(slm, inputs, N_NEW, remote))
    assert remote.stats["fallbacks"] == 0 and remote_llm.stats["requests"] == 2 * N_NEW


def test_remote_greedy_outline(served, llm_model, tok):
    server, url = served
    ids = chat_ids(tok, PUBLIC)
    remote = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=1, tokenizer=tok)
    assert remote.greedy(ids, 5) == logitfuse.HFLLM(llm_model, tok).greedy(ids, 5)


# ----------------------------------------------------------------------------- fault injection
class FaultServer(ThreadingHTTPServer):
    """Misbehaves in one way for the first `failures` requests (all of them by default), then
    answers with a fixed valid reply. Every handler returns by itself (a slow one after `delay`)."""

    daemon_threads = True

    def __init__(self, mode, failures=10 ** 9, delay=0.6):
        self.mode, self.failures, self.delay = mode, failures, delay
        self.received = []
        super().__init__(("127.0.0.1", 0), FaultHandler)


class FaultHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.received.append(body)
        mode = self.server.mode if len(self.server.received) <= self.server.failures else "ok"
        if mode == "close":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if mode == "timeout":
            time.sleep(self.server.delay)
        status, data = 200, json.dumps({"choices": [{"logprobs": {"top_logprobs": [{"token_id:5": -0.1, "token_id:6": -2.5}]}}]})
        if mode == "500":
            status, data = 500, '{"error": "boom"}'
        elif mode == "garbage":
            data = "<html>not json"
        elif mode == "wrong_shape":
            data = json.dumps({"choices": [{"text": "hi"}]})
        raw = data.encode()
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        except OSError:  # the client gave up (timeout) and closed the socket
            pass


@pytest.fixture
def fault_server(request):
    servers = []

    def make(mode, **kwargs):
        server = FaultServer(mode, **kwargs)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}"

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


MODES = ["timeout", "500", "garbage", "close", "wrong_shape"]


@pytest.mark.parametrize("mode", MODES)
def test_faults_fallback_to_the_slm(fault_server, slm, tok, mode):
    server, url = fault_server(mode)
    llm = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=2, tokenizer=tok, timeout=0.2, retries=1, backoff=0.01)
    inputs = left_pad([private_prompt_ids(tok, "Secret stuff.", PUBLIC)])
    proc = logitfuse.CoGenesisLogitsProcessor(llm, PUBLIC, alpha=0.0)
    out = generate(slm, inputs, 3, proc)
    assert torch.equal(out, generate(slm, inputs, 3))  # every step fell back to the SLM alone
    assert proc.stats["fallbacks"] == 3 and proc.stats["llm_calls"] == 3
    assert llm.stats["attempts"] == 3 * 2 and len(server.received) == 3 * 2  # one retry each


@pytest.mark.parametrize("mode", MODES)
def test_faults_raise_when_configured(fault_server, slm, tok, mode):
    server, url = fault_server(mode)
    llm = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=2, tokenizer=tok, timeout=0.2, retries=0,
                                        on_failure="raise")
    proc = logitfuse.CoGenesisLogitsProcessor(llm, PUBLIC, alpha=0.5)
    expected = {"timeout": "timed out", "500": "HTTP 500", "garbage": "malformed", "close": "connection",
                "wrong_shape": "malformed"}[mode]
    with pytest.raises(logitfuse.LLMBackendError, match=expected) as info:
        generate(slm, left_pad([private_prompt_ids(tok, "Secret stuff.", PUBLIC)]), 3, proc)
    message = str(info.value)
    sent = json.loads(server.received[0])["prompt"]
    assert url in message and ",".join(map(str, sent[:3])) not in message  # no request content


def test_transient_failure_is_retried(fault_server, slm, tok):
    server, url = fault_server("500", failures=1)
    llm = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=2, tokenizer=tok, retries=2, backoff=0.01)
    proc = logitfuse.CoGenesisLogitsProcessor(llm, PUBLIC, alpha=0.5)
    generate(slm, left_pad([private_prompt_ids(tok, "Secret stuff.", PUBLIC)]), 2, proc)
    assert proc.stats["fallbacks"] == 0 and llm.stats["attempts"] == 3


def test_connection_refused_falls_back(slm, tok):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    llm = logitfuse.OpenAICompatibleLLM(f"http://127.0.0.1:{port}", "tiny", top_k=2, tokenizer=tok, retries=0)
    proc = logitfuse.CoGenesisLogitsProcessor(llm, PUBLIC, alpha=0.5)
    generate(slm, left_pad([private_prompt_ids(tok, "Secret stuff.", PUBLIC)]), 2, proc)
    assert proc.stats["fallbacks"] == 2


# ----------------------------------------------------------------------------------------- CLI
def test_cli_help_and_no_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0 and "--top-k-max" in capsys.readouterr().out
    assert main([]) == 2
    for command in ("train", "eval", "models"):  # registered from their own modules
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0


@pytest.mark.parametrize("api_key", [None, "from-the-env-1"])
def test_cli_serve_answers_then_stops(tmp_path, monkeypatch, llm_model, tok, api_key):
    if api_key is None:
        monkeypatch.delenv("LOGITFUSE_API_KEY", raising=False)
    else:
        monkeypatch.setenv("LOGITFUSE_API_KEY", api_key)
    llm_model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", main(
        ["serve", "--model", str(tmp_path / "tiny"), "--port", str(port), "--max-requests", "2"])), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):  # wait until it listens (model loading), at most ~20 s
        try:
            health = get_json(url + "/health")
            break
        except OSError:
            time.sleep(0.1)
    assert health[0] == (200 if api_key is None else 401)  # the key comes from LOGITFUSE_API_KEY
    llm = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=3, tokenizer=tok, api_key=api_key)
    llm.start([chat_ids(tok, PUBLIC)])
    assert llm.advance([[]]).ok.all()
    thread.join(timeout=20)
    assert result.get("rc") == 0


def test_cli_serve_takes_a_hugging_face_hub_id_from_the_local_cache(tmp_path, monkeypatch, llm_model, tok, capsys):
    """`--model ORG/NAME` resolves as transformers does (here offline, from a hub cache the test writes); the
    served name defaults to the id; an id missing offline is one line, exit 2, before anything loads."""
    monkeypatch.delenv("LOGITFUSE_API_KEY", raising=False)
    cache, revision = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--tiny-org--tiny-llm" / "snapshots" / revision
    llm_model.save_pretrained(snapshot)
    tok.save_pretrained(snapshot)
    (cache / "models--tiny-org--tiny-llm" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llm" / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()  # the progress bars of the saves above
    assert main(["serve", "--model", "tiny-org/no-such-model", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("logitfuse serve: error: --model 'tiny-org/no-such-model'") and err.count("\n") == 1, err
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", main(
        ["serve", "--model", "tiny-org/tiny-llm", "--port", str(port), "--max-requests", "2"])), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):  # wait until it listens (model loading), at most ~20 s
        try:
            get_json(url + "/health")
            break
        except OSError:
            time.sleep(0.1)
    llm = logitfuse.OpenAICompatibleLLM(url, "tiny-org/tiny-llm", top_k=3, tokenizer=tok)
    llm.start([chat_ids(tok, PUBLIC)])
    assert llm.advance([[]]).ok.all()
    thread.join(timeout=20)
    assert result.get("rc") == 0
