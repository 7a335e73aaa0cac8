"""``logitfuse serve``: a small OpenAI-compatible completions server for a local transformers model.

It stands in for a cloud LLM on a laptop and lets the remote path be tested end to end on loopback.
Endpoints (a subset of the OpenAI / vLLM API, standard library only):

- ``POST /v1/completions``: ``prompt`` as text, a list of token ids, or a list of either (a batch);
  ``max_tokens`` (default 16), ``logprobs`` (top-k per generated token, at most ``top_k_max``),
  ``temperature`` (0 = greedy, else sampling; ``seed`` optional), ``echo`` (only ``false``),
  ``return_tokens_as_token_ids`` (top-logprob keys ``"token_id:123"``, as vLLM writes them),
  ``stop`` is not supported. Log-probabilities are the model's raw next-token log-softmax.
- ``GET /v1/models``, ``GET /health``.

Each request is one forward pass over its prompt per generated token (no cache shared between
requests, so nothing of one request can reach another). For tests, :func:`serve_in_thread` starts a
server on a free port and records what it receives (``log_requests=True``).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

__all__ = ["CompletionServer", "serve_in_thread"]

_MAX_BODY = 16 * 1024 * 1024


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class CompletionServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` serving one causal LM; forwards are serialized by a lock.

    Args:
        address: ``(host, port)``; port 0 picks a free one.
        model: a transformers causal LM.
        tokenizer: its tokenizer.
        model_name (`str`): the name clients must send (``/v1/models`` lists it).
        top_k_max (`int`, defaults to 20): the largest ``logprobs`` accepted.
        log_requests (`bool`, defaults to False): keep every request body received in
            :attr:`received` (for tests and audits; unbounded, so off by default).
        max_requests (`int`, optional): stop serving after this many requests (for scripts and tests).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], model: Any, tokenizer: Any, *, model_name: str = "logitfuse-local",
                 top_k_max: int = 20, log_requests: bool = False, max_requests: int | None = None):
        if not isinstance(top_k_max, int) or top_k_max < 1:
            raise ValueError(f"top_k_max={top_k_max!r} must be a positive int")
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.top_k_max = top_k_max
        self.log_requests = log_requests
        self.received: list[bytes] = []
        self.max_requests = max_requests
        self.requests_served = 0
        self._lock = threading.Lock()
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.vocab_size = int(out_emb.weight.shape[0]) if out_emb is not None else int(model.config.vocab_size)
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ the model
    def _encode(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        if isinstance(prompt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            if any(not 0 <= i < self.vocab_size for i in prompt):
                raise _BadRequest(400, f"prompt token ids must lie in [0, {self.vocab_size})")
            return list(prompt)
        raise _BadRequest(400, "prompt must be a string, a list of token ids, or a list of those")

    def _key(self, token: int, as_ids: bool) -> str:
        return f"token_id:{token}" if as_ids else self.tokenizer.decode([token])

    @torch.inference_mode()
    def complete(self, body: dict) -> dict:
        """The reply object for one completions request body (raises ``_BadRequest``)."""
        if body.get("model") not in (None, self.model_name):
            raise _BadRequest(404, f"The model `{body.get('model')}` does not exist; this server serves `{self.model_name}`")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            prompts = [self._encode(p) for p in prompt]
        else:
            prompts = [self._encode(prompt)]
        max_tokens = body.get("max_tokens", 16)
        logprobs = body.get("logprobs")
        temperature = body.get("temperature", 1.0)
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
            raise _BadRequest(400, "max_tokens must be an int in [1, 4096]")
        if logprobs is not None and (not isinstance(logprobs, int) or not 0 <= logprobs <= self.top_k_max):
            raise _BadRequest(400, f"logprobs must be an int in [0, {self.top_k_max}]")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise _BadRequest(400, "temperature must be a number >= 0")
        if body.get("echo"):
            raise _BadRequest(400, "echo=true is not supported")
        if body.get("stop"):
            raise _BadRequest(400, "stop is not supported")
        as_ids = bool(body.get("return_tokens_as_token_ids", False))
        generator = None
        if body.get("seed") is not None:
            generator = torch.Generator().manual_seed(int(body["seed"]))
        eos = getattr(self.tokenizer, "eos_token_id", None)
        device = next(self.model.parameters()).device
        choices = []
        for index, ids in enumerate(prompts):
            if not ids:
                raise _BadRequest(400, "empty prompt")
            tokens, chosen_lp, tops = [], [], []
            finish = "length"
            seq = list(ids)
            for _ in range(max_tokens):
                with self._lock:
                    logits = self.model(input_ids=torch.tensor([seq], device=device)).logits[0, -1].float().cpu()
                lp = torch.log_softmax(logits, dim=-1)
                if temperature == 0:
                    token = int(lp.argmax())
                else:
                    probs = torch.softmax(logits / float(temperature), dim=-1)
                    token = int(torch.multinomial(probs, 1, generator=generator))
                tokens.append(token)
                chosen_lp.append(float(lp[token]))
                if logprobs:
                    values, top_ids = lp.topk(min(logprobs, lp.shape[0]))
                    tops.append({self._key(int(i), as_ids): float(v) for v, i in zip(values, top_ids)})
                seq.append(token)
                if eos is not None and token == eos:
                    finish = "stop"
                    break
            choice = {"index": index, "text": self.tokenizer.decode(tokens), "finish_reason": finish, "logprobs": None}
            if logprobs is not None:
                choice["logprobs"] = {
                    "tokens": [self._key(t, as_ids) for t in tokens],
                    "token_logprobs": chosen_lp,
                    "top_logprobs": tops if logprobs else None,
                    "text_offset": [0] * len(tokens),
                }
            choices.append(choice)
        n_prompt = sum(len(p) for p in prompts)
        n_out = sum(len(c["logprobs"]["tokens"]) if c["logprobs"] else 0 for c in choices)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out},
        }

    def _count_request(self) -> None:
        self.requests_served += 1
        if self.max_requests is not None and self.requests_served >= self.max_requests:
            threading.Thread(target=self.shutdown, daemon=True).start()


class _Handler(BaseHTTPRequestHandler):
    server: CompletionServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: no request lines on stderr
        pass

    def _send(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

    def do_GET(self) -> None:  # noqa: N802
        try:
            path = self.path.split("?")[0].rstrip("/")
            if path == "/health":
                self._send(200, {"status": "ok"})
            elif path == "/v1/models":
                self._send(200, {"object": "list", "data": [
                    {"id": self.server.model_name, "object": "model", "owned_by": "logitfuse",
                     "max_logprobs": self.server.top_k_max}]})
            else:
                self._error(404, f"no route {path}")
        finally:
            self.server._count_request()

    def do_POST(self) -> None:  # noqa: N802
        try:
            path = self.path.split("?")[0].rstrip("/")
            length = int(self.headers.get("Content-Length") or 0)
            if length > _MAX_BODY:
                self._error(413, "request body too large")
                return
            raw = self.rfile.read(length)
            if self.server.log_requests:
                self.server.received.append(raw)
            if path != "/v1/completions":
                self._error(404, f"no route {path}")
                return
            try:
                body = json.loads(raw.decode("utf-8"))
                if not isinstance(body, dict):
                    raise ValueError("not an object")
            except (UnicodeDecodeError, ValueError):
                self._error(400, "the request body must be a JSON object")
                return
            try:
                reply = self.server.complete(body)
            except _BadRequest as err:
                self._error(err.status, str(err))
                return
            except Exception as err:  # noqa: BLE001 - a server must answer, not die
                self._error(500, f"internal error: {type(err).__name__}")
                return
            self._send(200, reply)
        finally:
            self.server._count_request()


def serve_in_thread(model: Any, tokenizer: Any, host: str = "127.0.0.1", port: int = 0, *,
                    model_name: str = "logitfuse-local", top_k_max: int = 20,
                    log_requests: bool = False) -> tuple[CompletionServer, str]:
    """Start a :class:`CompletionServer` in a daemon thread; returns ``(server, base_url)``.

    Stop it with ``server.shutdown(); server.server_close()``.

    >>> import sys; sys.path.insert(0, "tests")
    >>> from tiny_models import byte_level_tokenizer, tiny_llama
    >>> tok = byte_level_tokenizer()
    >>> server, url = serve_in_thread(tiny_llama(len(tok)), tok)
    >>> url.startswith("http://127.0.0.1:")
    True
    >>> server.shutdown(); server.server_close()
    """
    server = CompletionServer((host, port), model, tokenizer, model_name=model_name, top_k_max=top_k_max,
                              log_requests=log_requests)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                              name="logitfuse-serve")
    thread.start()
    return server, server.url
