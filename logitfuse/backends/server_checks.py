"""Checks of a served LLM before generating: :meth:`logitfuse.OpenAICompatibleLLM.check_server`.

A server that is up but does not match the backend's settings fails every step the same way, and
under ``on_failure="fallback"`` quietly gives the SLM's text alone (or, with the wrong tokenizer,
garbage that half the steps fall back from). :class:`ServerChecks` (a mixin of
:class:`logitfuse.OpenAICompatibleLLM`, reading its ``url``, ``model``, ``top_k``, ``tokenizer`` and
sending through :class:`logitfuse.backends.completions.CompletionsWire`) asks once, before any user
text is sent:

- ``GET /v1/models``: the ``model`` is one the server lists, and ``top_k`` is at most the
  ``max_logprobs`` it advertises (``logitfuse serve``); a server without the route is not
  checked there;
- where ``/v1/models`` does not say (vLLM), ``top_k`` by one completion of the fixed probe text that
  asks for ``top_k`` log-probabilities: a 400 that names ``logprobs`` (vLLM: "Requested sample logprobs
  of 21, which is greater than max allowed: 20") is a mismatch;
- the tokenizer: the server tokenizes the fixed :data:`~logitfuse.backends.served_scoring.PROBE_TEXT`
  (never any user's text) as the local tokenizer does: by its ``/tokenize`` route (vLLM;
  llama-cpp-python's ``/extras/tokenize``), else by echoing the probe text's tokens (``echo`` with
  ``logprobs``: token ids or token strings), else by echoing the text of the probe's local token ids.

A mismatch is a :class:`ServerMismatchError` (a ``ValueError``: the caller's settings are wrong)
naming the argument and the fix; a server that cannot be reached is an
:class:`~logitfuse.backends.base.LLMBackendError`.

>>> import logitfuse
>>> llm = logitfuse.OpenAICompatibleLLM("http://127.0.0.1:8000", "m", vocab_size=100)
>>> callable(llm.check_server)
True
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
from dataclasses import dataclass
from typing import Any

from logitfuse.backends.base import LLMBackendError
from logitfuse.backends.served_scoring import PROBE_TEXT
from logitfuse.backends.strings import TOKEN_ID_KEY, render_token_bytes
from logitfuse.backends.transport import MAX_REPLY_BYTES, DeadlineRequest
from logitfuse.vocab.retokenize import token_bytes

__all__ = ["ServerCheck", "ServerChecks", "ServerMismatchError"]


class ServerMismatchError(ValueError):
    """The server is up but does not match the backend: ``argument`` names the setting to fix
    (``"model"``, ``"top_k"`` or ``"tokenizer"``)."""

    def __init__(self, message: str, argument: str):
        super().__init__(message)
        self.argument = argument


@dataclass(frozen=True)
class ServerCheck:
    """What :meth:`ServerChecks.check_server` found.

    ``models``: the names ``/v1/models`` lists (``None``: the server has no such route);
    ``max_logprobs``: the most log-probabilities it gives per position, where it says (else ``None``);
    ``tokenizer``: how the tokenizer was checked (``"tokenize"``, ``"echo"``, ``"echo-text"``), or
    ``None`` when no check was possible (no tokenizer, or the server answered none of the probes)."""

    models: tuple[str, ...] | None
    max_logprobs: int | None
    tokenizer: str | None


class ServerChecks:
    """:meth:`check_server` (a mixin; see the module docstring)."""

    def check_server(self, *, timeout: float | None = None) -> ServerCheck:
        """Check the server against this backend's ``model``, ``top_k`` and ``tokenizer`` before any
        user text is sent (the requests hold the fixed probe text only; each is in :attr:`audit_log`).

        Raises :class:`ServerMismatchError` (a ``ValueError`` whose ``argument`` says which setting to
        fix) for a model the server does not list, a ``top_k`` above its ``max_logprobs``, or a
        tokenizer that splits the probe text differently from the server; ``LLMBackendError`` when the
        server cannot be reached. ``timeout``: seconds for all of it (default :meth:`step_budget`)."""
        deadline = time.monotonic() + (self.step_budget() if timeout is None else float(timeout))
        models, max_logprobs = self._check_models(deadline)
        if models is not None and max_logprobs is None:
            self._check_top_k(deadline)
        how = self._check_tokenizer(deadline) if self.tokenizer is not None else None
        return ServerCheck(models, max_logprobs, how)

    # ------------------------------------------------------------------ /v1/models
    def _check_models(self, deadline: float) -> tuple[tuple[str, ...] | None, int | None]:
        models_url = self.url[: -len("/completions")] + "/models"
        reply = self._exchange(models_url, None, deadline)
        entries = reply.get("data") if isinstance(reply, dict) else None
        if not isinstance(entries, list):
            return None, None
        listed = {entry["id"]: entry for entry in entries if isinstance(entry, dict) and isinstance(entry.get("id"), str)}
        if self.model not in listed:
            names = ", ".join(repr(name) for name in list(listed)[:5]) or "no model"
            raise ServerMismatchError(f"{models_url} lists {names}, not model={self.model!r}: pass the served model's "
                                      "name", "model")
        limit = listed[self.model].get("max_logprobs")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            return tuple(listed), None
        if self.top_k > limit:
            raise ServerMismatchError(f"top_k={self.top_k} is above the max_logprobs={limit} that {models_url} "
                                      f"advertises for {self.model!r}: ask for at most {limit}", "top_k")
        return tuple(listed), limit

    def _check_top_k(self, deadline: float) -> None:
        refusal = self._exchange(self.url, self.payload(PROBE_TEXT, logprobs=self.top_k), deadline, refusals=True)
        if isinstance(refusal, _Refusal) and refusal.status in (400, 422) and "logprobs" in refusal.detail:
            raise ServerMismatchError(f"{self.url} refuses top_k={self.top_k} log-probabilities for {self.model!r} "
                                      f"(HTTP {refusal.status}: {refusal.detail[:200]}): ask for fewer (--top-k), or "
                                      "start the server with a larger limit (vLLM: --max-logprobs)", "top_k")

    # ------------------------------------------------------------------ the tokenizer
    def _check_tokenizer(self, deadline: float) -> str | None:
        local = list(self.tokenizer.encode(PROBE_TEXT, add_special_tokens=False))
        root = self.url[: -len("/completions")]
        root = root[: -len("/v1")] if root.endswith("/v1") else root
        for url, body in ((root + "/tokenize", {"model": self.model, "prompt": PROBE_TEXT, "add_special_tokens": False}),
                          (root + "/extras/tokenize", {"input": PROBE_TEXT})):
            reply = self._exchange(url, body, deadline)
            tokens = reply.get("tokens") if isinstance(reply, dict) else None
            if isinstance(tokens, list) and tokens and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                if not _holds(tokens, local):
                    self._mismatch(f"its {url} gives ids {tokens[:8]}", f"ids {local[:8]}")
                return "tokenize"
        # the probe text, echoed as the server tokenized it
        choice = self._echo_choice(PROBE_TEXT, deadline)
        tokens = _echoed_tokens(choice)
        if tokens is not None and PROBE_TEXT in str(choice.get("text", "")):
            if all(isinstance(t, str) and t.startswith(TOKEN_ID_KEY) for t in tokens):
                server: list = [int(t[len(TOKEN_ID_KEY):]) for t in tokens if t[len(TOKEN_ID_KEY):].isdigit()]
                ours: list = local
            else:
                server, ours = tokens, [render_token_bytes(token_bytes(self.tokenizer, [i])) for i in local]
            if not _holds(server, ours):
                self._mismatch(f"it splits it into {server[:8]}", f"{ours[:8]}")
            return "echo"
        # the probe's local ids, echoed as the server decodes them
        choice = self._echo_choice(local, deadline)
        tokens = _echoed_tokens(choice)
        if tokens is not None and len(tokens) > len(local):
            text = str(choice.get("text", ""))
            if PROBE_TEXT not in text:
                self._mismatch(f"it reads the local tokenizer's ids for it as {text[:40]!r}", "the text itself")
            return "echo-text"
        return None

    def _mismatch(self, theirs: str, ours: str) -> None:
        raise ServerMismatchError(
            f"the tokenizer passed as tokenizer= is not the served model's ({self.model!r} at {self.url}): for the "
            f"probe text {PROBE_TEXT!r} {theirs}, the local tokenizer {ours}; pass the served model's own tokenizer",
            "tokenizer")

    def _echo_choice(self, prompt: list[int] | str, deadline: float) -> dict:
        reply = self._exchange(self.url, self.payload(prompt, logprobs=1, echo=True), deadline)
        try:
            choice = reply["choices"][0]
        except (KeyError, IndexError, TypeError):
            return {}
        return choice if isinstance(choice, dict) else {}

    # ------------------------------------------------------------------ HTTP
    def _exchange(self, url: str, body: dict | bytes | None, deadline: float, *, refusals: bool = False) -> Any:
        """The JSON reply of ``GET url`` (``body`` None) or ``POST url`` with ``body``, logged in the
        audit log; ``None`` for an HTTP error (a route or request shape the server does not have; with
        ``refusals``, a :class:`_Refusal` with its status and message) or a reply that is not JSON;
        ``LLMBackendError`` when the server cannot be reached."""
        if isinstance(body, dict):
            body = json.dumps(body, separators=(",", ":")).encode("utf-8")
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
            self._log_request(body)
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        left = deadline - time.monotonic()
        if left <= 0:
            raise LLMBackendError(f"{url}: timed out: the server check ran out of time before this request")
        request = DeadlineRequest(url, data=body, headers=headers, method="GET" if body is None else "POST",
                                  deadline=time.monotonic() + min(self.timeout, left))
        try:
            with self._opener.open(request, timeout=min(self.timeout, left)) as response:
                raw = response.read(MAX_REPLY_BYTES + 1)
        except urllib.error.HTTPError as err:
            try:
                detail = err.read(2000).decode("utf-8", "replace") if refusals else ""
            except OSError:
                detail = ""
            err.close()
            if err.code in (401, 403):
                raise LLMBackendError(f"{url}: HTTP {err.code} {err.reason}: check the API key", err.code) from None
            return _Refusal(err.code, _error_message(detail)) if refusals else None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException, OSError) as err:
            reason = getattr(err, "reason", err)
            raise LLMBackendError(f"{url}: the server could not be reached ({type(reason).__name__}: {reason}); is it "
                                  "up at that address?") from None
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None


@dataclass(frozen=True)
class _Refusal:
    status: int
    detail: str


def _error_message(body: str) -> str:
    """The message of an OpenAI-style error body (``{"error": {"message": ...}}``), else the body."""
    try:
        error = json.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        return str(message) if message else body.strip()
    except (ValueError, AttributeError):
        return body.strip()


def _echoed_tokens(choice: dict) -> list | None:
    logprobs = choice.get("logprobs")
    tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
    return tokens if isinstance(tokens, list) else None


def _holds(server: list, local: list) -> bool:
    """Whether ``local`` appears in ``server`` as one run (a server may add a BOS token before it and
    the generated token after it)."""
    n = len(local)
    return any(server[i:i + n] == local for i in range(len(server) - n + 1))
