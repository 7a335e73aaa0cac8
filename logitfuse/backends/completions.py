"""The wire side of :class:`logitfuse.OpenAICompatibleLLM`: request bodies, POSTs with retries under
one deadline, rows requested in parallel, and replies read into ``(id, logprob)`` pairs and a
padded :class:`logitfuse.TopK`.

:class:`CompletionsWire` is a mixin: it keeps no state of its own and reads the attributes that
``OpenAICompatibleLLM.__init__`` sets (``url``, ``model``, ``top_k``, ``temperature``, ``timeout``,
``retries``, ``backoff``, ``max_concurrency``, ``tokenizer``, ``vocab_size``, ``ties``, ``stats``,
``audit_log`` and the private ``_api_key``, ``_opener``, ``_lock``, ``_pool``, ``_string_map``).
The transport beneath it (deadlines, no redirects) is :mod:`logitfuse.backends.transport`.

>>> top = padded_topk([[(7, -0.5), (2, -2.0)], None, [(0, -0.25)]])  # rows' (id, logprob) pairs
>>> top.ids.tolist(), top.logprobs[2].tolist()
([[7, 2], [0, 1], [0, 1]], [-0.25, -inf])
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from logitfuse.backends.base import LLMBackendError
from logitfuse.backends.strings import TOKEN_ID_KEY, TokenStringMap, parse_top_logprobs
from logitfuse.backends.transport import (MAX_REPLY_BYTES, TRANSIENT_HTTP, DeadlineRequest, backoff_total,
                                          is_validation_error)
from logitfuse.types import TopK

__all__ = ["CompletionsWire", "UnmappedReplyError", "padded_topk"]


class UnmappedReplyError(LLMBackendError):
    """A reply whose token strings map to no token of the tokenizer (likely the wrong ``tokenizer=``)."""


class CompletionsWire:
    """Requests to an OpenAI-compatible ``/v1/completions`` endpoint and their replies (a mixin of
    :class:`logitfuse.OpenAICompatibleLLM`; see the module docstring for what it reads)."""

    def payload(self, token_ids: list[int] | str, *, max_tokens: int = 1, logprobs: int | None = None,
                temperature: float | None = None, echo: bool = False, prompt_logprobs: int | None = None) -> bytes:
        """The exact request body for one row (``token_ids``: LLM ids, or the prompt text).

        ``echo=True`` asks for the prompt's log-probabilities too (scoring,
        :meth:`logitfuse.OpenAICompatibleLLM.score`);
        ``prompt_logprobs=k`` is vLLM's extra parameter for the same."""
        body = {
            "model": self.model,
            "prompt": token_ids,
            "max_tokens": max_tokens,
            "logprobs": self.top_k if logprobs is None else logprobs,
            "temperature": self.temperature if temperature is None else temperature,
            "echo": bool(echo),
            "return_tokens_as_token_ids": True,
        }
        if prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs
        return json.dumps(body, separators=(",", ":")).encode("utf-8")

    def _post_once(self, body: bytes, deadline: float) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = DeadlineRequest(self.url, data=body, headers=headers, method="POST", deadline=deadline)
        with self._opener.open(request, timeout=max(deadline - time.monotonic(), 1e-3)) as response:
            raw = response.read(MAX_REPLY_BYTES + 1)
        if len(raw) > MAX_REPLY_BYTES:
            raise ValueError(f"the reply is larger than {MAX_REPLY_BYTES >> 20} MiB")
        try:
            return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise ValueError("the reply is not JSON") from None

    def step_budget(self) -> float:
        """The most seconds one :meth:`advance` (or one :meth:`post`) takes, whatever the number of
        rows: ``timeout × (retries + 1)`` plus the backoff sleeps between attempts."""
        return self.timeout * (self.retries + 1) + backoff_total(self.retries, self.backoff)

    def post(self, body: bytes, parse: Any = None, *, deadline: float | None = None) -> Any:
        """POST ``body`` with retries; returns the parsed JSON reply (passed through ``parse`` when
        given; a ``ValueError`` from it counts as a malformed reply and is retried) or raises
        :class:`LLMBackendError`.

        Each attempt must be answered in full (connect, send, the whole reply) within ``timeout``
        seconds, and all attempts end by ``deadline`` (a :func:`time.monotonic` time; default:
        :meth:`step_budget` from now). Redirects are not followed (the request carries the API
        key): a 3xx is an error, not retried. The error message names the URL, the attempt count
        and what went wrong (status, timeout, connection error, malformed reply), never the
        request body.
        """
        deadline = time.monotonic() + self.step_budget() if deadline is None else deadline
        problem = f"timed out: the step's time budget ({self.step_budget():g} s) ran out before this request was sent"
        status, validation, made = None, False, 0
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 2.0))
            left = deadline - time.monotonic()
            if left <= 0:
                break
            made += 1
            with self._lock:
                self.stats["attempts"] += 1
            try:
                reply = self._post_once(body, time.monotonic() + min(self.timeout, left))
                return parse(reply) if parse is not None else reply
            except urllib.error.HTTPError as err:
                problem, status, validation = self._http_problem(err)
                if err.code not in TRANSIENT_HTTP or validation:  # a refused request shape stays refused
                    break
            except TimeoutError:
                problem, status = self._timed_out(), None
            except urllib.error.URLError as err:
                reason = err.reason
                status = None
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    problem = self._timed_out()
                else:
                    problem = f"connection failed ({type(reason).__name__}: {reason})"
            except (ConnectionError, http.client.HTTPException, OSError) as err:
                problem, status = f"connection failed ({type(err).__name__})", None
            except ValueError as err:
                problem, status = f"malformed reply ({err})", None
        raise LLMBackendError(f"{self.url}: {problem} (after {made} attempt{'' if made == 1 else 's'})", status,
                              validation)

    def _timed_out(self) -> str:
        return f"timed out: no complete reply within the deadline of timeout={self.timeout:g} s"

    @staticmethod
    def _http_problem(err: urllib.error.HTTPError) -> tuple[str, int, bool]:
        """``(problem, status, validation)`` of an HTTP error reply."""
        if 300 <= err.code < 400:
            location = str(err.headers.get("Location", "") if err.headers else "")[:200] or "an unnamed address"
            return (f"the server answered with a redirect (HTTP {err.code}) to {location}; redirects are not "
                    "followed (the request carries the API key): point base_url at the final address"), err.code, False
        detail = ""
        try:
            detail = err.read(300).decode("utf-8", "replace").strip()
        except Exception:  # noqa: BLE001 - the body is only for the message
            pass
        finally:
            err.close()
        problem = f"HTTP {err.code} {err.reason}" + (f": {detail}" if detail else "")
        return problem, err.code, is_validation_error(err.code, detail)

    def _token_strings(self) -> TokenStringMap | None:
        if self._string_map is None and self.tokenizer is not None:
            self._string_map = TokenStringMap.for_tokenizer(self.tokenizer, ties=self.ties)
        return self._string_map

    def _parse(self, reply: Any) -> list[tuple[int, float]]:
        counts: dict = {}
        try:
            top = reply["choices"][0]["logprobs"]["top_logprobs"][0]
            by_id = isinstance(top, dict) and all(isinstance(k, str) and k.startswith(TOKEN_ID_KEY) for k in top)
        except (KeyError, IndexError, TypeError):
            by_id = True  # parse_top_logprobs says what is wrong
        pairs = parse_top_logprobs(reply, vocab_size=self.vocab_size,
                                   token_strings=None if by_id else self._token_strings(), counts=counts)
        with self._lock:
            self.stats["topk_entries"] += counts.get("topk_entries", 0)
            self.stats["topk_mapped"] += counts.get("topk_mapped", 0)
            self.stats["topk_mapped_share"] = self.stats["topk_mapped"] / max(self.stats["topk_entries"], 1)
        strings = [key for key in top if key] if not by_id else []
        if strings and not counts.get("topk_mapped", 0):
            # "" keys (control tokens, cut characters) never map; real strings always do with the
            # right tokenizer, so when none of them does, the tokenizer is not the server's
            examples = ", ".join(repr(key[:20]) for key in strings[:3])
            raise UnmappedReplyError(
                f"{self.url}: none of the {len(strings)} token strings in the reply ({examples}) is a token of "
                "the tokenizer passed as tokenizer=; pass the served LLM's own tokenizer", 200)
        return pairs

    def _request_row(self, body: bytes, deadline: float) -> list[tuple[int, float]]:
        # a split token string can yield more than top_k pairs: the least likely ones beyond top_k
        # are cut (their probability joins the tail), as for any server that returns extra entries
        return self.post(body, parse=self._parse, deadline=deadline)[: self.top_k]

    def _log_request(self, body: bytes) -> None:
        with self._lock:
            self.audit_log.append(body.decode("utf-8"))
            self.stats["requests"] += 1

    def _send(self, todo: list[int], bodies: dict[int, bytes], request: Any) -> dict[int, Any]:
        """Log the rows' request ``bodies`` (before sending, in row order), then ``{r: request(r)}``
        (:meth:`_each_row`)."""
        for r in todo:
            self._log_request(bodies[r])
        return self._each_row(todo, request)

    def _each_row(self, todo: list[int], request: Any) -> dict[int, Any]:
        """``{r: request(r)}`` for the rows of ``todo``, in parallel (``max_concurrency``); a
        :class:`LLMBackendError` becomes the row's result."""

        def run(r: int):
            try:
                return request(r)
            except LLMBackendError as err:
                return err

        if len(todo) <= 1:
            return {r: run(r) for r in todo}
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="logitfuse-llm")
        return dict(zip(todo, self._pool.map(run, todo)))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object as a dict; ``ValueError`` when it names a key twice (``json`` would keep the last
    silently: in ``top_logprobs`` that is one token given two log-probabilities)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"the reply names the key {twice[:40]!r} twice in one object")
    return out


def padded_topk(answers: list[list[tuple[int, float]] | None]) -> TopK:
    """One ``TopK`` for all rows: each row's ``(id, logprob)`` pairs, padded to the longest row
    with the smallest ids the row does not hold, at logprob ``-inf`` (ids stay distinct within
    a row; padding carries no probability). Rows without an answer (``None``) get placeholders
    (ids ``0..k-1``, uniform), which the caller marks not ok."""
    k = max((len(a) for a in answers if a is not None), default=1)
    ids = torch.arange(k).repeat(len(answers), 1)
    logprobs = torch.full((len(answers), k), -math.log(k) if k > 1 else 0.0)
    for r, pairs in enumerate(answers):
        if pairs is None:
            continue
        held = {p[0] for p in pairs}
        pad = [i for i in range(k + len(pairs)) if i not in held][: k - len(pairs)]
        ids[r] = torch.tensor([p[0] for p in pairs] + pad)
        logprobs[r] = torch.tensor([p[1] for p in pairs] + [-math.inf] * len(pad))
    return TopK(ids, logprobs)
