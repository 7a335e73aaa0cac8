"""``logitfuse serve``: a small OpenAI-compatible completions server for a local transformers model.

It stands in for a cloud LLM on a laptop and lets the remote path be tested end to end on loopback.
Endpoints (a subset of the OpenAI / vLLM API, standard library only):

- ``POST /v1/completions``: ``prompt`` as text, a list of token ids, or a list of either (a batch);
  ``max_tokens`` (default 16), ``logprobs`` (top-k per generated token, at most ``top_k_max``),
  ``temperature`` (0 = greedy, else sampling; below 1e-5 decodes greedily; ``seed`` optional),
  ``echo`` (with ``logprobs``: the prompt's tokens and their log-probabilities come first, the first
  token's ``null``, as OpenAI's legacy API and vLLM answer; one forward over the prompt scores every
  position, which is what :meth:`logitfuse.OpenAICompatibleLLM.score` asks for),
  ``return_tokens_as_token_ids`` (top-logprob keys ``"token_id:123"``, as vLLM writes them), ``stop``
  is not supported. Log-probabilities are the model's raw next-token log-softmax. A prompt plus
  ``max_tokens`` must fit the model's context.
- ``GET /v1/models``, ``GET /health``.

Every error is a JSON body ``{"error": {"message", "type", "code"}}`` with a 4xx/5xx status (400 a
malformed request or parameter, naming the field; 401 a missing or wrong bearer token; 408 a body
that did not arrive in time; 411 no ``Content-Length``; 413 a body over the limit; 503 too many
connections). Error messages never quote the request.

Limits: each request must arrive within ``read_timeout`` seconds (headers and body together; slow
senders are cut off), at most ``max_connections`` connections are served at once (more get 503 at
once), bodies are at most ``max_body_bytes``. With ``api_key`` set, every request needs
``Authorization: Bearer <api_key>``. A host other than loopback needs an API key (or
``allow_insecure_remote=True``).

Each request is one forward pass over its prompt per generated token (no cache shared between
requests, so nothing of one request can reach another). For tests, :func:`serve_in_thread` starts a
server on a free port and records what it receives (``log_requests=True``).
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import json
import math
import re
import socket
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

__all__ = ["CompletionServer", "is_loopback_host", "serve_in_thread", "valid_api_key"]

_MAX_BODY = 16 * 1024 * 1024
_MAX_TOKENS = 4096
_GREEDY_BELOW = 1e-5  # temperatures under this decode greedily (as vLLM does): logits / T would overflow
_API_KEY = re.compile(r"[!-~]+")  # visible ASCII: it travels in an HTTP header
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_ROUTES = "this server serves POST /v1/completions, GET /v1/models and GET /health"


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def is_loopback_host(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "" / "0.0.0.0" style wildcards are addresses; other names may resolve anywhere
        return False


def valid_api_key(key: Any) -> bool:
    """Whether ``key`` can be a bearer token: a non-empty string of visible ASCII characters."""
    return isinstance(key, str) and _API_KEY.fullmatch(key) is not None


def _context_length(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for name in _CONTEXT_KEYS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return value


# -------------------------------------------------------------------------- request fields
def _int_field(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _BadRequest(400, f"{name} must be an int in [{low}, {high}]")
    return value


def _temperature_field(body: dict) -> float:
    value = body.get("temperature")
    if value is None:
        return 1.0
    # NaN fails the comparison; the bound also refuses ints too large for a float
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e300:
        raise _BadRequest(400, "temperature must be a finite number >= 0 (0 = greedy)")
    return float(value)


def _flag_field(body: dict, name: str, *, supported: bool = True) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _BadRequest(400, f"{name} must be true or false")
    if value and not supported:
        raise _BadRequest(400, f"{name}=true is not supported")
    return bool(value)


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
        api_key (`str`, optional): when set, every request must carry ``Authorization: Bearer <api_key>``
            (else 401; compared in constant time). Visible ASCII, no spaces.
        allow_insecure_remote (`bool`, defaults to False): allow a non-loopback ``host`` without
            ``api_key`` (anyone who can reach the port can then use the model).
        read_timeout (`float`, defaults to 10.0): seconds a client has to send one whole request
            (headers and body; also the idle time allowed between keep-alive requests) and the
            timeout of each write.
        max_connections (`int`, defaults to 32): connections served at once; more are answered 503.
        max_body_bytes (`int`, defaults to 16 MiB): the largest request body (else 413).
        max_context (`int`, optional): the longest prompt plus ``max_tokens`` (else 400); defaults to the
            model config's ``max_position_embeddings`` (or ``n_positions``, ...), no limit if it has none.

    Raises:
        ValueError: a bad argument, or a non-loopback host without ``api_key`` or ``allow_insecure_remote``.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], model: Any, tokenizer: Any, *, model_name: str = "logitfuse-local",
                 top_k_max: int = 20, log_requests: bool = False, max_requests: int | None = None,
                 api_key: str | None = None, allow_insecure_remote: bool = False, read_timeout: float = 10.0,
                 max_connections: int = 32, max_body_bytes: int = _MAX_BODY, max_context: int | None = None):
        _positive_int("top_k_max", top_k_max)
        if api_key is not None and not valid_api_key(api_key):
            raise ValueError("api_key must be a non-empty string of visible ASCII characters (no spaces), or None")
        if not is_loopback_host(address[0]) and api_key is None and not allow_insecure_remote:
            raise ValueError(
                f"host {address[0]!r} is reachable from other machines: pass api_key=... (clients then send "
                "Authorization: Bearer <key>), bind 127.0.0.1, or pass allow_insecure_remote=True to serve without auth")
        if isinstance(read_timeout, bool) or not isinstance(read_timeout, (int, float)) \
                or not 0 < read_timeout < math.inf:
            raise ValueError(f"read_timeout={read_timeout!r} must be a positive number of seconds")
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.top_k_max = top_k_max
        self.log_requests = log_requests
        self.received: list[bytes] = []
        self.max_requests = max_requests
        self.requests_served = 0
        self.api_key = api_key
        self.read_timeout = float(read_timeout)
        self.max_connections = _positive_int("max_connections", max_connections)
        self.max_body_bytes = _positive_int("max_body_bytes", max_body_bytes)
        self.max_context = _context_length(model) if max_context is None else _positive_int("max_context", max_context)
        self.stats = {"refused_busy": 0, "connection_errors": 0}
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.vocab_size = int(out_emb.weight.shape[0]) if out_emb is not None else int(model.config.vocab_size)
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ connections
    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """One thread per connection, at most ``max_connections`` at once; beyond that a 503 at once."""
        if not self._slots.acquire(blocking=False):
            self._refuse_busy(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse_busy(self, request: socket.socket) -> None:
        self.stats["refused_busy"] += 1
        try:
            request.setblocking(False)
            try:  # take what the client already sent, so that closing does not reset the reply away
                request.recv(1 << 16)
            except OSError:
                pass
            request.settimeout(1.0)
            request.sendall(_BUSY_REPLY)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that broke (the client left mid-reply): counted, never printed."""
        self.stats["connection_errors"] += 1

    # ------------------------------------------------------------------ the model
    def _encode(self, prompt: Any, max_tokens: int) -> list[int]:
        if isinstance(prompt, str):
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=True))
        elif isinstance(prompt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            if any(not 0 <= i < self.vocab_size for i in prompt):
                raise _BadRequest(400, f"prompt token ids must lie in [0, {self.vocab_size})")
            ids = list(prompt)
        else:
            raise _BadRequest(400, "prompt must be a string, a list of token ids, or a list of those")
        if not ids:
            raise _BadRequest(400, "prompt must not be empty")
        if self.max_context is not None and len(ids) + max_tokens > self.max_context:
            raise _BadRequest(400, f"prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds this model's "
                                   f"context of {self.max_context} tokens; shorten the prompt or lower max_tokens")
        return ids

    def _key(self, token: int, as_ids: bool) -> str:
        return f"token_id:{token}" if as_ids else self.tokenizer.decode([token])

    @torch.inference_mode()
    def complete(self, body: dict) -> dict:
        """The reply object for one completions request body (raises ``_BadRequest`` naming the field)."""
        if body.get("model") not in (None, self.model_name):
            raise _BadRequest(404, f"model: this server serves `{self.model_name}` only (see /v1/models)")
        max_tokens = _int_field(body, "max_tokens", 16, 1, _MAX_TOKENS)
        logprobs = _int_field(body, "logprobs", None, 0, self.top_k_max)
        temperature = _temperature_field(body)
        seed = _int_field(body, "seed", None, 0, 2 ** 63 - 1)
        echo = _flag_field(body, "echo")
        if echo and not logprobs:
            raise _BadRequest(400, "echo=true is supported with logprobs >= 1 only (the prompt's log-probabilities)")
        as_ids = _flag_field(body, "return_tokens_as_token_ids")
        if body.get("stop") not in (None, "", []):
            raise _BadRequest(400, "stop is not supported")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            prompts = [self._encode(p, max_tokens) for p in prompt]
        else:
            prompts = [self._encode(prompt, max_tokens)]
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        device = next(self.model.parameters()).device
        choices = []
        for index, ids in enumerate(prompts):
            tokens, chosen_lp, tops = [], [], []
            finish = "length"
            seq = list(ids)
            echoed = None
            for _ in range(max_tokens):
                with self._lock:
                    logits = self.model(input_ids=torch.tensor([seq], device=device)).logits[0].float().cpu()
                if echo and echoed is None:
                    echoed = self._echo(ids, torch.log_softmax(logits[:-1], dim=-1), logprobs, as_ids)
                lp = torch.log_softmax(logits[-1], dim=-1)
                if temperature < _GREEDY_BELOW:
                    token = int(lp.argmax())
                else:
                    probs = torch.softmax(logits[-1] / temperature, dim=-1)
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
            if echoed is not None:
                choice["text"] = self.tokenizer.decode(ids) + choice["text"]
                prompt_end = len(self.tokenizer.decode(ids))
                choice["logprobs"] = {
                    "tokens": echoed["tokens"] + choice["logprobs"]["tokens"],
                    "token_logprobs": echoed["token_logprobs"] + chosen_lp,
                    "top_logprobs": echoed["top_logprobs"] + tops,
                    "text_offset": echoed["text_offset"] + [prompt_end] * len(tokens),
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

    def _echo(self, ids: list[int], prompt_lp: torch.Tensor, logprobs: int, as_ids: bool) -> dict:
        """The echoed prompt's ``logprobs`` fields: ``prompt_lp`` ``(len(ids) - 1, V)`` holds the
        log-probabilities after each prompt prefix; the first token has none (``null``)."""
        values, top_ids = prompt_lp.topk(min(logprobs, prompt_lp.shape[-1]), dim=-1)
        tops: list[dict | None] = [None]
        chosen: list[float | None] = [None]
        for j in range(1, len(ids)):
            tops.append({self._key(int(i), as_ids): float(v) for v, i in zip(values[j - 1], top_ids[j - 1])})
            chosen.append(float(prompt_lp[j - 1, ids[j]]))
        return {"tokens": [self._key(t, as_ids) for t in ids], "token_logprobs": chosen, "top_logprobs": tops,
                "text_offset": [len(self.tokenizer.decode(ids[:j])) for j in range(len(ids))]}

    def _count_request(self) -> None:
        self.requests_served += 1
        if self.max_requests is not None and self.requests_served >= self.max_requests:
            threading.Thread(target=self.shutdown, daemon=True).start()


def _error_body(status: int, message: str) -> bytes:
    kind = "authentication_error" if status == 401 else "server_error" if status >= 500 else "invalid_request_error"
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode("utf-8")


_BUSY_BODY = _error_body(503, "too many connections; retry shortly")
_BUSY_REPLY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
               b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class _DeadlineReader(io.RawIOBase):
    """Reads a socket under one deadline per request, so a client sending slowly is cut off too."""

    def __init__(self, sock: socket.socket, seconds: float):
        self._sock, self._seconds = sock, seconds
        self.restart()

    def restart(self) -> None:
        self.deadline = time.monotonic() + self._seconds

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._seconds)  # writes get the whole timeout


class _Handler(BaseHTTPRequestHandler):
    server: CompletionServer
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # a malformed request line still gets a status line and headers

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.read_timeout)
        self.rfile.close()  # the plain socket file, replaced by one under a deadline
        self._reader = _DeadlineReader(self.connection, self.server.read_timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        self._reader.restart()
        self._body_pending = False
        super().handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: no request lines on stderr
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's errors (bad request line, headers too long, unknown method) as JSON, and
        without its message, which quotes the request line."""
        self.close_connection = True
        try:
            self._send(code, _error_body(code, HTTPStatus(code).description or HTTPStatus(code).phrase))
        except OSError:
            pass

    def _send(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="logitfuse"')
        if self.close_connection or self._body_pending:
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self._post)

    def _answer(self, route: Any) -> None:
        """Run ``route(path)`` and send its reply, or the error as JSON; never raises."""
        self._body_pending = "Content-Length" in self.headers or "Transfer-Encoding" in self.headers
        try:
            self._check_auth()
            status, data = 200, json.dumps(route(self.path.split("?")[0].rstrip("/"))).encode("utf-8")
        except _BadRequest as err:
            status, data = err.status, _error_body(err.status, str(err))
        except Exception as err:  # noqa: BLE001 - a server must answer, not die; never quote the request
            self.close_connection = True
            status, data = 500, _error_body(500, f"internal error: {type(err).__name__}")
        try:
            self._send(status, data)
        except OSError:  # the client left
            self.close_connection = True
        finally:
            self.server._count_request()

    def _check_auth(self) -> None:
        if self.server.api_key is None:
            return
        given = (self.headers.get("Authorization") or "").encode("latin-1", "replace")
        if not hmac.compare_digest(given, b"Bearer " + self.server.api_key.encode("ascii")):
            raise _BadRequest(401, "this server needs an API key: send the header Authorization: Bearer <key>")

    def _get(self, path: str) -> dict:
        if path == "/health":
            return {"status": "ok"}
        if path == "/v1/models":
            return {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                "owned_by": "logitfuse", "max_logprobs": self.server.top_k_max}]}
        raise _BadRequest(404, f"no such route; {_ROUTES}")

    def _post(self, path: str) -> dict:
        raw = self._read_body()
        if self.server.log_requests:
            self.server.received.append(raw)
        if path != "/v1/completions":
            raise _BadRequest(404, f"no such route; {_ROUTES}")
        try:
            body = json.loads(raw.decode("utf-8"))
        except RecursionError:
            raise _BadRequest(400, "the request body is nested too deeply") from None
        except ValueError:  # not UTF-8, not JSON, or an integer with too many digits
            raise _BadRequest(400, "the request body must be a JSON object") from None
        if not isinstance(body, dict):
            raise _BadRequest(400, "the request body must be a JSON object")
        return self.server.complete(body)

    def _read_body(self) -> bytes:
        """The body, exactly ``Content-Length`` bytes of it, read before ``read_timeout`` runs out."""
        if "Transfer-Encoding" in self.headers:
            raise _BadRequest(411, "Transfer-Encoding is not supported; send the body with a Content-Length header")
        values = {value.strip() for value in self.headers.get_all("Content-Length") or []}
        if not values:
            raise _BadRequest(411, "a POST needs a Content-Length header")
        digits = values.pop()
        if values or not re.fullmatch(r"[0-9]+", digits):
            raise _BadRequest(400, "Content-Length must be one non-negative integer")
        digits = digits.lstrip("0") or "0"
        limit = self.server.max_body_bytes
        if len(digits) > len(str(limit)) or int(digits) > limit:
            raise _BadRequest(413, f"the request body is over the limit of {limit} bytes")
        length = int(digits)
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            raise _BadRequest(408, f"the request body did not arrive within {self.server.read_timeout:g} s") from None
        if len(raw) < length:
            raise _BadRequest(400, "the request body ended before Content-Length bytes")
        self._body_pending = False
        return raw


def serve_in_thread(model: Any, tokenizer: Any, host: str = "127.0.0.1", port: int = 0, *,
                    model_name: str = "logitfuse-local", top_k_max: int = 20,
                    log_requests: bool = False, **options: Any) -> tuple[CompletionServer, str]:
    """Start a :class:`CompletionServer` in a daemon thread; returns ``(server, base_url)``.

    ``options`` go to :class:`CompletionServer` (``api_key``, ``read_timeout``, ``max_connections``, ...).
    Stop it with ``server.shutdown(); server.server_close()``.

        >>> from logitfuse.testing import byte_level_tokenizer, tiny_llama
    >>> tok = byte_level_tokenizer()
    >>> server, url = serve_in_thread(tiny_llama(len(tok)), tok)
    >>> url.startswith("http://127.0.0.1:")
    True
    >>> server.shutdown(); server.server_close()
    """
    server = CompletionServer((host, port), model, tokenizer, model_name=model_name, top_k_max=top_k_max,
                              log_requests=log_requests, **options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                              name="logitfuse-serve")
    thread.start()
    return server, server.url
