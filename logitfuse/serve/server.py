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
connections, or the server shutting down). Error messages never quote the request.

Limits: each request must arrive within ``read_timeout`` seconds (headers and body together; slow
senders are cut off), at most ``max_connections`` connections are served at once (more get 503 at
once), bodies are at most ``max_body_bytes``, and one request may ask for at most
``max_request_tokens`` tokens: its prompts' tokens plus ``max_tokens`` for each prompt, summed over its
prompts (else 400). A client that closes its connection (or ends its sending side) while its
completion is computed is gone: the work stops before the next forward pass and it gets no answer.
:meth:`CompletionServer.finish_work` stops the completions in progress the same way (each answered
503), for a clean shutdown. With ``api_key`` set, every request needs
``Authorization: Bearer <api_key>``. A host other than loopback needs an API key (or
``allow_insecure_remote=True``).

Each request is one forward pass over its prompt per generated token (no cache shared between
requests, so nothing of one request can reach another). For tests, :func:`serve_in_thread` starts a
server on a free port and records what it receives (``log_requests=True``). The HTTP side (reading
requests under the deadline, auth, routes, JSON errors) is :mod:`logitfuse.serve.http`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import re
import socket
import threading
import time
import uuid
from http.server import ThreadingHTTPServer
from typing import Any

import torch

from logitfuse.serve.http import BUSY_REPLY, BadRequest, CompletionsHandler, RequestCancelled

__all__ = ["CompletionServer", "check_bindable", "is_loopback_host", "serve_in_thread", "valid_api_key"]

_MAX_BODY = 16 * 1024 * 1024
_MAX_TOKENS = 4096
_MAX_REQUEST_TOKENS = 16384
_OFFSET_WINDOW = 8  # tokens decoded before each one for its echo text offset (the decode's local context)
_GREEDY_BELOW = 1e-5  # temperatures under this decode greedily (as vLLM does): logits / T would overflow
_API_KEY = re.compile(r"[!-~]+")  # visible ASCII: it travels in an HTTP header
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


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


def _address_family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_bindable(host: str, port: int) -> None:
    """Bind ``(host, port)`` as :class:`CompletionServer` would, and let go at once: raises ``OSError``
    when it cannot be (the port is in use, ``host`` is no address of this machine or does not resolve)."""
    with socket.socket(_address_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server: TIME_WAIT is no conflict
        sock.bind((host, port))


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
        raise BadRequest(400, f"{name} must be an int in [{low}, {high}]")
    return value


def _temperature_field(body: dict) -> float:
    value = body.get("temperature")
    if value is None:
        return 1.0
    # NaN fails the comparison; the bound also refuses ints too large for a float
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e300:
        raise BadRequest(400, "temperature must be a finite number >= 0 (0 = greedy)")
    return float(value)


def _flag_field(body: dict, name: str, *, supported: bool = True) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(400, f"{name} must be true or false")
    if value and not supported:
        raise BadRequest(400, f"{name}=true is not supported")
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
        max_request_tokens (`int`, defaults to 16384): the most tokens one request may ask for, its
            prompts' tokens plus ``max_tokens`` per prompt, summed over its prompts (else 400).

    Raises:
        ValueError: a bad argument, or a non-loopback host without ``api_key`` or ``allow_insecure_remote``.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], model: Any, tokenizer: Any, *, model_name: str = "logitfuse-local",
                 top_k_max: int = 20, log_requests: bool = False, max_requests: int | None = None,
                 api_key: str | None = None, allow_insecure_remote: bool = False, read_timeout: float = 10.0,
                 max_connections: int = 32, max_body_bytes: int = _MAX_BODY, max_context: int | None = None,
                 max_request_tokens: int = _MAX_REQUEST_TOKENS):
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
        self.max_request_tokens = _positive_int("max_request_tokens", max_request_tokens)
        self.stats = {"refused_busy": 0, "connection_errors": 0, "cancelled": 0}
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._idle = threading.Condition()
        self._busy = 0
        self.address_family = _address_family(address[0])
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.vocab_size = int(out_emb.weight.shape[0]) if out_emb is not None else int(model.config.vocab_size)
        super().__init__(address, CompletionsHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

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
            request.sendall(BUSY_REPLY)
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
                raise BadRequest(400, f"prompt token ids must lie in [0, {self.vocab_size})")
            ids = list(prompt)
        else:
            raise BadRequest(400, "prompt must be a string, a list of token ids, or a list of those")
        if not ids:
            raise BadRequest(400, "prompt must not be empty")
        if self.max_context is not None and len(ids) + max_tokens > self.max_context:
            raise BadRequest(400, f"prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds this model's "
                                  f"context of {self.max_context} tokens; shorten the prompt or lower max_tokens")
        return ids

    def _key(self, token: int, as_ids: bool) -> str:
        return f"token_id:{token}" if as_ids else self.tokenizer.decode([token])

    def finish_work(self, timeout: float) -> bool:
        """Stop the completions in progress before their next forward pass (each is answered 503, as is
        every later one) and wait up to ``timeout`` seconds for them to end; returns whether none is
        left. For a clean shutdown, after ``shutdown()`` (or once ``serve_forever`` has returned)."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def _go_on(self, cancelled: Any) -> None:
        """Before each forward pass: stop when the server shuts down or the client has gone."""
        if self._stopping.is_set():
            raise BadRequest(503, "the server is shutting down; retry on another server or later")
        if cancelled is not None and cancelled():
            self.stats["cancelled"] += 1
            raise RequestCancelled("the client closed the connection")

    def complete(self, body: dict, cancelled: Any = None) -> dict:
        """The reply object for one completions request body (raises
        :class:`logitfuse.serve.http.BadRequest` naming the field). ``cancelled()``, when given, is
        asked before each forward pass: true stops the work (:class:`logitfuse.serve.http.RequestCancelled`)."""
        return self._complete(body, cancelled)

    @contextlib.contextmanager
    def answering(self) -> Any:
        """Count one request from its parsing to the last byte of its reply: :meth:`finish_work` waits
        for these, so a shutdown never cuts a reply (a 503 included) short."""
        with self._idle:
            self._busy += 1
        try:
            yield
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def _prompts(self, prompt: Any, max_tokens: int) -> list[list[int]]:
        """The request's prompts as ids, refused (400) once they ask for over ``max_request_tokens``."""
        batch = prompt if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt) \
            else [prompt]
        limit = self.max_request_tokens
        refusal = (f"this request asks for over {limit} tokens (prompt tokens plus max_tokens, for each of its "
                   f"{len(batch)} prompt(s)), this server's limit (--max-request-tokens); send fewer or shorter "
                   "prompts per request, or a lower max_tokens")
        if len(batch) * (1 + max_tokens) > limit:  # every prompt has a token at least
            raise BadRequest(400, refusal)
        prompts, total = [], 0
        for item in batch:
            prompts.append(self._encode(item, max_tokens))
            total += len(prompts[-1]) + max_tokens
            if total > limit:
                raise BadRequest(400, refusal)
        return prompts

    @torch.inference_mode()
    def _complete(self, body: dict, cancelled: Any) -> dict:
        if body.get("model") not in (None, self.model_name):
            raise BadRequest(404, f"model: this server serves `{self.model_name}` only (see /v1/models)")
        max_tokens = _int_field(body, "max_tokens", 16, 1, _MAX_TOKENS)
        logprobs = _int_field(body, "logprobs", None, 0, self.top_k_max)
        temperature = _temperature_field(body)
        seed = _int_field(body, "seed", None, 0, 2 ** 63 - 1)
        echo = _flag_field(body, "echo")
        if echo and not logprobs:
            raise BadRequest(400, "echo=true is supported with logprobs >= 1 only (the prompt's log-probabilities)")
        as_ids = _flag_field(body, "return_tokens_as_token_ids")
        if body.get("stop") not in (None, "", []):
            raise BadRequest(400, "stop is not supported")
        prompts = self._prompts(body.get("prompt"), max_tokens)
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
                    self._go_on(cancelled)
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
                "text_offset": self._text_offsets(ids)}

    def _text_offsets(self, ids: list[int]) -> list[int]:
        """``len(decode(ids[:j]))`` for each ``j``, in time linear in ``len(ids)``: each step adds what
        token ``j - 1`` adds to the text decoded from the few tokens before it (a decode's context is local:
        a split character, a leading space)."""
        decode = self.tokenizer.decode
        offsets = [0]
        for j in range(1, len(ids)):
            start = max(0, j - 1 - _OFFSET_WINDOW)
            offsets.append(offsets[-1] + len(decode(ids[start:j])) - len(decode(ids[start:j - 1])))
        return offsets

    def count_request(self) -> None:
        """Count one answered request; the last of ``max_requests`` shuts the server down."""
        self.requests_served += 1
        if self.max_requests is not None and self.requests_served >= self.max_requests:
            threading.Thread(target=self.shutdown, daemon=True).start()


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
