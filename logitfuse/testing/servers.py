"""Fake OpenAI-compatible servers for tests: scripted (misbehaving) replies, every request recorded.

:func:`serving` runs a standard-library HTTP server on ``127.0.0.1`` (a free port) in a daemon thread
that answers each request with ``behave(handler, body)`` and records ``(method, path, headers,
body)`` in ``server.received``. Handlers should wait on ``server.stop`` (never longer than a few
seconds), so that leaving the ``with`` block ends them too. A real model behind the same API is
:func:`logitfuse.serve.server.serve_in_thread`; :func:`model_scores` answers with a tiny model's
log-probabilities the way other servers lay out prompt scores (vLLM's ``prompt_logprobs``, a server
that ignores ``echo``).

>>> import json, urllib.request
>>> from logitfuse.testing.servers import completion_reply, send_json, serving
>>> with serving(lambda handler, body: send_json(handler, completion_reply({"token_id:7": -0.1}))) as server:
...     request = urllib.request.Request(server.url + "/v1/completions", data=b"{}", method="POST")
...     reply = json.loads(urllib.request.urlopen(request, timeout=5).read())
>>> reply["choices"][0]["logprobs"]["top_logprobs"], len(server.received)
([{'token_id:7': -0.1}], 1)
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from typing import Any
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Callable, Iterator

__all__ = ["FakeServer", "completion_reply", "model_scores", "raw_connect", "read_raw_response", "send_json",
           "serving", "trickle"]

Behaviour = Callable[[BaseHTTPRequestHandler, bytes], None]


class FakeServer(ThreadingHTTPServer):
    """Answers every request with ``behave(handler, body)``; records each request in ``received``."""

    daemon_threads = True

    def __init__(self, behave: Behaviour):
        self.behave, self.received, self.stop = behave, [], threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.received.append((self.command, self.path, dict(self.headers), body))
        with contextlib.suppress(ConnectionError):
            self.server.behave(self, body)

    do_GET = do_POST


@contextlib.contextmanager
def serving(behave: Behaviour) -> Iterator[FakeServer]:
    """A :class:`FakeServer` running for the ``with`` block, then stopped (its handlers too)."""
    server = FakeServer(behave)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield server
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()


def completion_reply(top: dict[str, float]) -> bytes:
    """A ``/v1/completions`` reply body with one position of ``top_logprobs``."""
    return json.dumps({"choices": [{"text": "x", "index": 0, "finish_reason": "length",
                                    "logprobs": {"top_logprobs": [top]}}]}).encode()


def send_json(handler: BaseHTTPRequestHandler, raw: bytes, status: int = 200, headers: dict | None = None) -> None:
    """Answer with ``raw`` as a JSON body (extra ``headers`` override the defaults)."""
    handler.send_response(status)
    for name, value in {"Content-Type": "application/json", "Content-Length": str(len(raw)), **(headers or {})}.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(raw)


def trickle(handler: BaseHTTPRequestHandler, data: bytes, period: float = 0.3, limit_s: float = 12.0) -> None:
    """Write ``data`` one byte per ``period`` seconds, for at most ``limit_s`` seconds."""
    for i in range(min(len(data), int(limit_s / period))):
        if handler.server.stop.wait(period):
            return
        handler.wfile.write(data[i:i + 1])
        handler.wfile.flush()


def model_scores(model: Any, top_k: int = 20, *, echo: bool = False, prompt_logprobs: bool = False) -> Behaviour:
    """A behaviour for :func:`serving`: ``/v1/completions`` over token-id prompts answered with
    ``model``'s top-``top_k`` log-probabilities (``"token_id:N"`` keys) after the prompt. With
    ``prompt_logprobs`` it honours vLLM's extra parameter (``choices[0].prompt_logprobs``: ``null``,
    then ``{"<id>": {"logprob", "rank", "decoded_token"}}`` per prompt token); with ``echo`` it
    honours ``echo`` (the prompt's entries first); otherwise it ignores ``echo`` (one entry only),
    as a server without prompt scores does. A text prompt is refused with a 400."""
    import torch

    def behave(handler: BaseHTTPRequestHandler, raw: bytes) -> None:
        body = json.loads(raw or b"{}")
        ids = body.get("prompt")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
            send_json(handler, json.dumps({"error": {"message": "validation error: prompt must be token ids"}}).encode(),
                      400)
            return
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        values, tops = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
        entry = [{f"token_id:{int(i)}": float(v) for v, i in zip(values[j], tops[j])} for j in range(len(ids))]
        choice: dict = {"text": "x", "index": 0, "finish_reason": "length",
                        "logprobs": {"top_logprobs": ([None] + entry if echo and body.get("echo") else entry[-1:])}}
        if prompt_logprobs and body.get("prompt_logprobs"):
            choice["prompt_logprobs"] = [None] + [
                {str(int(i)): {"logprob": float(v), "rank": rank + 1, "decoded_token": "?"}
                 for rank, (v, i) in enumerate(zip(values[j - 1], tops[j - 1]))} for j in range(1, len(ids))]
        send_json(handler, json.dumps({"choices": [choice], "usage": {"prompt_tokens": len(ids)}}).encode())

    return behave


# ------------------------------------------------------------------------------- raw sockets
def raw_connect(port: int, timeout: float) -> tuple[socket.socket, Any]:
    """A socket to ``127.0.0.1:port`` (``timeout`` seconds a read waits: a hang guard) and a binary reader of it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return sock, sock.makefile("rb")


def read_raw_response(reader: Any) -> tuple[int, dict[str, str], Any] | None:
    """``(status, headers, json_body)`` of the next HTTP response on ``reader`` (header names lower-cased),
    or ``None`` when the server closed the connection instead."""
    status_line = reader.readline()
    if not status_line:
        return None
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, json.loads(reader.read(int(headers["content-length"])))
