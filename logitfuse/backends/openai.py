"""LLM backends: the cloud side of fused decoding.

A backend holds one sequence per batch row: the public prompt, then the tokens the SLM generated,
in the LLM's vocabulary. It is all :class:`logitfuse.CoGenesisLogitsProcessor` talks to. The
interface is small:

``start(public_prompts)``
    One public prompt per row (text, encoded with the backend's tokenizer, or LLM token ids). Prefill.
``advance(new_tokens, need=None) -> LLMOutput``
    Append each row's new LLM token ids (0, 1 or several per row: skipped steps and re-tokenization
    give variable counts) and return the next-token information of every row: dense logits
    ``(batch_size, vocab_size)`` (:class:`HFLLM`) or ``TopK`` (:class:`OpenAICompatibleLLM`).
    ``need`` (a bool per row) says which rows' next-token information will be used; a backend may
    skip the others (the remote one sends no request for them).
``rollback(n)``
    Drop the last ``n[r]`` tokens of row ``r`` (re-tokenization); an ``advance`` with at least one
    token for that row must follow before its next-token information is used.
``reorder(order)``
    Row ``r`` becomes a copy of former row ``order[r]`` (beam search).
``reset()``, ``audit_log``, ``tokenizer``, ``vocab_size``.

Privacy: a backend only ever receives what the processor gives it, the public prompt and the
generated tokens. ``audit_log`` records every payload exactly as sent (for :class:`HFLLM` the
token-id lists fed to the model; for :class:`OpenAICompatibleLLM` the JSON request bodies), so a
test or an auditor can check that nothing private left the device. Error messages carry only the
URL, status and the server's reply, never the request.
"""

from __future__ import annotations

import codecs
import functools
import http.client
import inspect
import io
import json
import math
import socket
import threading
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from logitfuse.types import TopK

Tensor = torch.Tensor

__all__ = ["HFLLM", "LLMBackend", "LLMBackendError", "LLMOutput", "OpenAICompatibleLLM", "TokenStringMap",
           "parse_top_logprobs"]


class LLMBackendError(RuntimeError):
    """The LLM could not be reached or answered something unusable (``on_failure="raise"``).

    ``status`` is the last HTTP status the server answered with (``None`` for a timeout, a
    connection error or a malformed reply).
    """

    def __init__(self, message: str, status: int | None = None, validation: bool = False):
        super().__init__(message)
        self.status = status
        self.validation = validation  # the server refused the request's shape (400/422, or a 500
        # whose body reports a request validation error, as llama-cpp-python's server answers)


class _UnmappedReplyError(LLMBackendError):
    """A reply whose token strings map to no token of the tokenizer (likely the wrong ``tokenizer=``)."""


def _is_validation_error(status: int, detail: str) -> bool:
    return status in (400, 422) or ("validation error" in detail.lower() and "prompt" in detail)


@dataclass
class LLMOutput:
    """Next-token information for every row.

    Attributes:
        next: dense logits ``(batch_size, vocab_size)`` float32, or ``TopK(ids, logprobs)`` with
            ``(batch_size, k)`` tensors.
        ok: ``(batch_size,)`` bool: rows whose information is valid. False where the row was not
            asked for (``need``) or its request failed under ``on_failure="fallback"``; those rows
            hold placeholder values that must not be used.
    """

    next: Tensor | TopK
    ok: Tensor


def _check_prompts(public_prompts: Any) -> list[str | list[int]]:
    if isinstance(public_prompts, (str, bytes)) or not isinstance(public_prompts, Sequence) or not public_prompts:
        raise TypeError("public_prompts must be a non-empty list: one str or one list of token ids per row")
    out = []
    for row, prompt in enumerate(public_prompts):
        if isinstance(prompt, str):
            out.append(prompt)
        elif isinstance(prompt, Tensor):
            out.append([int(i) for i in prompt.reshape(-1).tolist()])
        elif isinstance(prompt, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            out.append([int(i) for i in prompt])
        else:
            raise TypeError(f"public_prompts[{row}] must be a str or a list of int token ids, got {type(prompt).__name__}")
    return out


class LLMBackend:
    """Base class of LLM backends; see the module docstring for the interface."""

    tokenizer: Any = None
    vocab_size: int
    add_special_tokens: bool = True

    def __init__(self) -> None:
        self.audit_log: list[Any] = []

    # subclasses implement these
    def start(self, public_prompts: list[str] | list[list[int]]) -> None:  # pragma: no cover
        raise NotImplementedError

    def advance(self, new_tokens: list[list[int]], need: list[bool] | None = None) -> LLMOutput:  # pragma: no cover
        raise NotImplementedError

    def rollback(self, n: list[int]) -> None:  # pragma: no cover
        raise NotImplementedError

    def reset(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def reorder(self, order: list[int]) -> None:
        """Make row ``r`` a copy of former row ``order[r]`` (beam search reordering its beams)."""
        raise NotImplementedError(f"{type(self).__name__} cannot follow beam reordering")

    @property
    def batch_size(self) -> int:  # pragma: no cover
        raise NotImplementedError

    # shared helpers
    def _encode_prompts(self, public_prompts: Any) -> list[list[int]]:
        rows = []
        for row, prompt in enumerate(_check_prompts(public_prompts)):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError(
                        f"{type(self).__name__} has no tokenizer to encode the text prompt of row {row}; "
                        "pass tokenizer= or give the public prompt as LLM token ids"
                    )
                prompt = list(self.tokenizer.encode(prompt, add_special_tokens=self.add_special_tokens))
            if not prompt:
                raise ValueError(
                    f"the public prompt of row {row} is empty; the LLM needs at least one token "
                    "(e.g. the chat template's header)"
                )
            bad = [i for i in prompt if not 0 <= i < self.vocab_size]
            if bad:
                raise ValueError(f"the public prompt of row {row} holds ids outside [0, {self.vocab_size}): {bad[:5]}")
            rows.append(prompt)
        return rows

    def _check_new_tokens(self, new_tokens: Any, need: Any) -> tuple[list[list[int]], list[bool]]:
        if self.batch_size == 0:
            raise RuntimeError(f"{type(self).__name__}.advance before start(); call start(public_prompts) first")
        if not isinstance(new_tokens, Sequence) or len(new_tokens) != self.batch_size:
            raise ValueError(f"new_tokens must be a list of {self.batch_size} lists of token ids (one per row)")
        rows = [[int(i) for i in row] for row in new_tokens]
        for r, row in enumerate(rows):
            if any(not 0 <= i < self.vocab_size for i in row):
                raise ValueError(f"new_tokens[{r}] holds ids outside the LLM vocabulary [0, {self.vocab_size})")
        need = [True] * self.batch_size if need is None else [bool(x) for x in need]
        if len(need) != self.batch_size:
            raise ValueError(f"need must hold {self.batch_size} booleans (one per row)")
        return rows, need

    def greedy(self, public_prompt: str | list[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy continuation of one public prompt (what the sketch variant's outline uses).

        Built on :meth:`start`/:meth:`advance` so every backend supports it; it resets the
        backend's sequence state.
        """
        self.start([public_prompt])
        out: list[int] = []
        new: list[int] = []
        for _ in range(max_new_tokens):
            step = self.advance([new])
            if not bool(step.ok[0]):
                break
            if isinstance(step.next, TopK):
                token = int(step.next.ids[0, int(step.next.logprobs[0].argmax())])
            else:
                token = int(step.next[0].argmax())
            if token in stop_ids:
                break
            out.append(token)
            new = [token]
        self.reset()
        return out


# ====================================================================================== HFLLM
class HFLLM(LLMBackend):
    """A local transformers causal LM as the LLM side, with its own KV cache.

    The public prompts are prefilled once (left padded); each :meth:`advance` feeds only the new
    tokens (any number per row, in one forward) and never re-reads the prefix. Variable counts are
    left-aligned inside the chunk with masked padding in front, so every row's last token sits in
    the last column; :meth:`rollback` masks the dropped positions out (and crops the cache where
    all rows end in dropped positions). Positions come from the attention mask, so a row's logits
    equal those of a plain forward over its unpadded tokens.

    Args:
        model: a ``transformers`` causal LM (``AutoModelForCausalLM``), in eval mode.
        tokenizer (optional): its tokenizer; needed for text prompts and cross-tokenizer decoding.
        add_special_tokens (`bool`, defaults to `True`): passed to the tokenizer for text prompts
            (set False for text that already went through a chat template).

    Example:

    >>> import sys; sys.path.insert(0, "tests")
    >>> from tiny_models import byte_level_tokenizer, tiny_llama
    >>> import logitfuse
    >>> tok = byte_level_tokenizer(); llm = logitfuse.HFLLM(tiny_llama(len(tok), seed=1), tok)
    >>> llm.start(["Write a short invitation.", "Dear friends,"])
    >>> out = llm.advance([[72], [72, 295]])
    >>> out.next.shape, out.ok.tolist()
    (torch.Size([2, 400]), [True, True])
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, add_special_tokens: bool = True):
        super().__init__()
        if not callable(model) or not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers causal LM (AutoModelForCausalLM), got {type(model).__name__}")
        self.model, self.tokenizer, self.add_special_tokens = model, tokenizer, add_special_tokens
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.vocab_size = int(out_emb.weight.shape[0]) if out_emb is not None else int(model.config.vocab_size)
        params = inspect.signature(model.forward).parameters
        # transformers >= 5.2x calls the cache `cache`; earlier 5.x `past_key_values`
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" in params
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self._pad_id = int(pad) if pad is not None and 0 <= pad < self.vocab_size else 0
        self.reset()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def batch_size(self) -> int:
        return 0 if self._mask is None else int(self._mask.shape[0])

    def reset(self) -> None:
        """Drop the sequences and the KV cache (the audit log is kept)."""
        self._cache = None
        self._mask: Tensor | None = None  # (B, columns) 1 = real token, 0 = padding / rolled back
        self._lengths: list[int] = []  # real tokens per row
        self._last: Tensor | None = None  # (B, V) next-token logits
        self._stale: list[bool] = []

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older signatures
            return DynamicCache()

    @torch.inference_mode()
    def _forward(self, ids: Tensor, chunk_mask: Tensor, positions: Tensor) -> Tensor:
        mask = chunk_mask if self._mask is None else torch.cat([self._mask, chunk_mask], dim=1)
        kwargs = {self._cache_kw: self._cache, "use_cache": True}
        if self._keep_kw:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        self._mask = mask
        return out.logits[:, -1, :].float()

    def start(self, public_prompts: list[str] | list[list[int]]) -> None:
        """Prefill the public prompts (one per row), left padded."""
        rows = self._encode_prompts(public_prompts)
        self.reset()
        self.audit_log.append({"op": "start", "token_ids": [list(r) for r in rows]})
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        device = self.device
        self._cache = self._new_cache()
        self._last = self._forward(ids.to(device), mask.to(device), positions.to(device))
        self._lengths = [len(r) for r in rows]
        self._stale = [False] * len(rows)

    def advance(self, new_tokens: list[list[int]], need: list[bool] | None = None) -> LLMOutput:
        """Append each row's new tokens in one forward; returns dense logits for every row."""
        rows, need = self._check_new_tokens(new_tokens, need)
        counts = [len(r) for r in rows]
        if any(self._stale[r] and counts[r] == 0 and need[r] for r in range(len(rows))):
            raise RuntimeError("HFLLM: a rolled-back row needs at least one new token before its logits are read")
        if max(counts) > 0:
            self.audit_log.append({"op": "advance", "token_ids": [list(r) for r in rows]})
            width = max(counts)
            batch = len(rows)
            ids = torch.full((batch, width), self._pad_id, dtype=torch.long)
            mask = torch.zeros((batch, width), dtype=torch.long)
            positions = torch.zeros((batch, width), dtype=torch.long)
            for r, row in enumerate(rows):
                if row:
                    ids[r, width - len(row):] = torch.tensor(row)
                    mask[r, width - len(row):] = 1
                    positions[r, width - len(row):] = torch.arange(self._lengths[r], self._lengths[r] + len(row))
                positions[r, : width - len(row)] = self._lengths[r]
            device = self.device
            logits = self._forward(ids.to(device), mask.to(device), positions.to(device))
            fed = torch.tensor([c > 0 for c in counts], device=device)
            self._last = torch.where(fed[:, None], logits, self._last)
            for r, c in enumerate(counts):
                self._lengths[r] += c
                if c:
                    self._stale[r] = False
        ok = torch.tensor([not s for s in self._stale], device=self._last.device)
        return LLMOutput(self._last.clone(), ok)

    def reorder(self, order: list[int]) -> None:
        """Row ``r`` becomes former row ``order[r]`` (cache, mask and logits follow the beams)."""
        if len(order) != self.batch_size or any(not 0 <= s < self.batch_size for s in order):
            raise ValueError(f"reorder needs {self.batch_size} row indices in [0, {self.batch_size})")
        self.audit_log.append({"op": "reorder", "rows": [int(s) for s in order]})
        index = torch.tensor(order, device=self._mask.device)
        self._cache.reorder_cache(index)
        self._mask = self._mask.index_select(0, index)
        self._last = self._last.index_select(0, index.to(self._last.device))
        self._lengths = [self._lengths[s] for s in order]
        self._stale = [self._stale[s] for s in order]

    def rollback(self, n: list[int]) -> None:
        """Drop the last ``n[r]`` tokens of each row (masked out; trailing dead columns cropped)."""
        if len(n) != self.batch_size:
            raise ValueError(f"rollback needs one count per row ({self.batch_size})")
        if not any(n):
            return
        self.audit_log.append({"op": "rollback", "n": [int(x) for x in n]})
        mask = self._mask.clone()
        for r, count in enumerate(n):
            if count < 0 or count > self._lengths[r]:
                raise ValueError(f"rollback: row {r} has {self._lengths[r]} tokens, cannot drop {count}")
            if count:
                live = mask[r].nonzero().flatten()
                mask[r, live[-count:]] = 0
                self._lengths[r] -= count
                self._stale[r] = True
        # crop columns that are dead in every row at the end of the cache
        alive = mask.any(dim=0).flatten().nonzero()
        keep = int(alive[-1]) + 1 if alive.numel() else 0
        drop = mask.shape[1] - keep
        if drop > 0:
            before = self._cache.get_seq_length()
            self._cache.crop(-drop)  # a negative argument removes tokens in every transformers 5.x
            if self._cache.get_seq_length() != before - drop:
                raise RuntimeError(f"HFLLM: cropping the KV cache by {drop} left "
                                   f"{self._cache.get_seq_length()} of {before} positions")
            mask = mask[:, :keep]
        self._mask = mask


# ====================================================================================== remote
_TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
#: a top-k reply is a few kB; anything past this is not one
_MAX_REPLY_BYTES = 16 * 1024 * 1024


class _DeadlineSocket:
    """A connected socket (plain or TLS) whose every blocking send and receive ends by ``deadline``
    (a :func:`time.monotonic` time): each call first shrinks the socket timeout to the time left,
    so a server that trickles its reply cannot hold a request past the deadline (a plain socket
    timeout bounds each read, not the reply). ``http.client`` reads the status line, the headers
    and the body through :meth:`makefile`, so all of them are covered."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock, self._deadline = sock, deadline
        self._io_refs, self._closed = 0, False

    def _arm(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline reached")
        self._sock.settimeout(left)

    def recv_into(self, buffer: Any, *args: Any) -> int:
        self._arm()
        return self._sock.recv_into(buffer, *args)

    def sendall(self, data: Any, *args: Any) -> None:
        self._arm()
        self._sock.sendall(data, *args)

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        if mode != "rb":
            raise ValueError(f"_DeadlineSocket.makefile supports mode 'rb' only, not {mode!r}")
        self._io_refs += 1
        return io.BufferedReader(socket.SocketIO(self, "rb"))  # type: ignore[arg-type]

    def _decref_socketios(self) -> None:  # called by socket.SocketIO.close
        self._io_refs -= 1
        if self._closed and self._io_refs <= 0:
            self._sock.close()

    def close(self) -> None:  # the fd stays open while the response still reads from it
        self._closed = True
        if self._io_refs <= 0:
            self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _DeadlineConnection:
    """Mixin for ``http.client`` connections: connect within the time left to ``deadline``, then
    do all I/O through a :class:`_DeadlineSocket`."""

    def __init__(self, *args: Any, deadline: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def connect(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline reached before connecting")
        self.timeout = left
        super().connect()
        self.sock = _DeadlineSocket(self.sock, self._deadline)


class _DeadlineHTTPConnection(_DeadlineConnection, http.client.HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    pass


class _DeadlineRequest(urllib.request.Request):
    """A request that must be answered in full by ``deadline`` (a :func:`time.monotonic` time)."""

    def __init__(self, *args: Any, deadline: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.deadline = deadline


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: _DeadlineRequest) -> Any:
        return self.do_open(functools.partial(_DeadlineHTTPConnection, deadline=req.deadline), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: _DeadlineRequest) -> Any:
        return self.do_open(functools.partial(_DeadlineHTTPSConnection, deadline=req.deadline), req,
                            context=self._context)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: the request carries the API key, which must not travel to another
    address (urllib would resend the headers there, as a GET). The 3xx reaches the caller as an
    ``HTTPError``."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _build_opener() -> urllib.request.OpenerDirector:
    """urllib's usual opener (proxies from the environment included) with whole-request deadlines
    and no redirects."""
    return urllib.request.build_opener(_DeadlineHTTPHandler, _DeadlineHTTPSHandler, _RefuseRedirects)


def _backoff_total(retries: int, backoff: float) -> float:
    """The sleeps between ``retries + 1`` attempts (``min(backoff * 2**i, 2 s)`` before retry ``i + 1``)."""
    return sum(min(backoff * 2 ** i, 2.0) for i in range(retries))


def render_token_bytes(data: bytes) -> str:
    """How llama.cpp's server (llama-cpp-python) renders one token as a ``top_logprobs`` key: its
    bytes decoded as UTF-8 with invalid or incomplete sequences *dropped*
    (``bytes.decode("utf-8", errors="ignore")``), so a lone byte token ``b"\\xe2"`` is ``""`` and
    ``b" \\xe2"`` is ``" "``. Checked against the real server in tests/test_engine.py."""
    return data.decode("utf-8", errors="ignore")


class TokenStringMap:
    """Token strings, as a server prints them in ``top_logprobs``, back to LLM token ids.

    Built once per tokenizer (cached): each id's raw bytes (:func:`logitfuse.retokenize.token_bytes_table`:
    byte-level ``Ġ``/``Ċ`` and sentencepiece ``▁`` undone, ``<0xNN>`` byte tokens, added tokens as
    their string) rendered with ``render`` (default :func:`render_token_bytes`, llama.cpp's rule).

    Several ids can render to the same string: a token that is one complete character and tokens
    holding that character plus a piece of an incomplete one (``" "`` and ``b" \\xe2"``), or two
    spellings of one text. The server's key cannot tell them apart, so ``ties`` says where its
    probability goes (never dropped):

    - ``"split"`` (default): evenly among the *lossless* ids (whose bytes are exactly the key's
      UTF-8; almost always exactly one, the token a tokenizer produces for that text), each getting
      ``logprob - log(n)``; only when no id is lossless, evenly among all ids of that rendering.
      Lossy renderings come from tokens cut inside a character, which only follow specific
      bytes, so the lossless id is the likely one; when it is ambiguous too, an even split
      claims no knowledge the reply does not hold.
    - ``"canonical"``: all of it to one id, the lowest lossless one (else the lowest).

    The empty string is never mapped: every control token and every token made only of bytes of
    an incomplete character renders as ``""`` (hundreds of ids), so such an entry is dropped and
    counted as unmapped; its probability then joins the leftover mass that the fusion's tail
    rule spreads, rather than being attributed to an arbitrary id. Groups larger than
    ``max_split`` ids are treated the same way. Keys in the ``errors="replace"`` rendering
    (U+FFFD for the cut character, as transformers-based servers print them) map too.
    """

    def __init__(self, tokenizer: Any, *, ties: str = "split", render: Any = None, max_split: int = 8):
        if ties not in ("split", "canonical"):
            raise ValueError(f"ties={ties!r} must be 'split' (even share per id) or 'canonical' (one id)")
        from logitfuse.retokenize import token_bytes_table

        render = render_token_bytes if render is None else render
        self.ties, self.max_split = ties, int(max_split)
        table = token_bytes_table(tokenizer)
        groups: dict[str, list[int]] = {}
        lossless: dict[str, list[int]] = {}
        for idx, data in enumerate(table):
            if not data:
                continue
            text = render(data)
            groups.setdefault(text, []).append(idx)
            if text.encode("utf-8") == data:
                lossless.setdefault(text, []).append(idx)
        self._targets: dict[str, list[int]] = {}
        for text, ids in groups.items():
            if not text:
                continue
            chosen = lossless.get(text) or ids
            if ties == "canonical":
                chosen = chosen[:1]
            if len(chosen) <= self.max_split:
                self._targets[text] = chosen
        # servers that decode with errors="replace" (transformers-based ones, e.g. SGLang) print a
        # token cut inside a character with U+FFFD: those renderings are indexed too, where they
        # do not collide with a key of the primary rule
        replaced: dict[str, list[int]] = {}
        for idx, data in enumerate(table):
            if data and render(data).encode("utf-8") != data:
                replaced.setdefault(data.decode("utf-8", errors="replace"), []).append(idx)
        for text, ids in replaced.items():
            if text not in groups and text not in self._targets and len(ids) <= self.max_split:
                self._targets[text] = ids[:1] if ties == "canonical" else ids
        self.ambiguous = sum(1 for ids in self._targets.values() if len(ids) > 1)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, *, ties: str = "split") -> "TokenStringMap":
        """The cached map of ``tokenizer`` (one per tokenizer object and tie rule)."""
        return _string_map(id(tokenizer), tokenizer, ties)

    def lookup(self, key: str) -> list[int]:
        """The ids that share ``key``'s probability (empty: unmapped)."""
        return self._targets.get(key, [])

    def map_pairs(self, top: dict[str, float]) -> tuple[list[tuple[int, float]], int]:
        """``{token string: logprob}`` -> (``[(id, logprob)]``, number of keys that mapped)."""
        pairs: list[tuple[int, float]] = []
        mapped = 0
        for key, value in top.items():
            ids = self.lookup(key)
            if not ids:
                continue
            mapped += 1
            share = value - math.log(len(ids))
            pairs.extend((i, share) for i in ids)
        return pairs, mapped


@functools.lru_cache(maxsize=8)
def _string_map(_key: int, tokenizer: Any, ties: str) -> TokenStringMap:
    return TokenStringMap(tokenizer, ties=ties)


_TOKEN_ID_KEY = "token_id:"


def _check_logprob(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value > 1e-4:
        raise ValueError("top_logprobs values must be log-probabilities (numbers <= 0)")
    return float(min(value, 0.0))


def parse_top_logprobs(reply: Any, *, vocab_size: int | None = None, token_strings: TokenStringMap | None = None,
                       counts: dict | None = None) -> list[tuple[int, float]]:
    """The next-token ``(id, logprob)`` pairs of an OpenAI-compatible completions reply, best first.

    Reads ``choices[0].logprobs.top_logprobs[0]``. Keys ``"token_id:123"`` (vLLM's and
    ``logitfuse serve``'s ``return_tokens_as_token_ids``) are read as ids. Other keys are token
    strings (llama.cpp's server, OpenAI): they need ``token_strings`` (a :class:`TokenStringMap`
    of the LLM's tokenizer), which maps each to its id(s); keys that map to nothing are dropped,
    and keys that map to the same id add their probabilities. Without ``token_strings`` such keys
    raise ``ValueError``, as does any malformed reply (an id named twice included).
    ``counts`` (a dict), when given, is incremented: ``"topk_entries"`` (keys read) and
    ``"topk_mapped"`` (keys that became ids).
    """
    try:
        top = reply["choices"][0]["logprobs"]["top_logprobs"][0]
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(f"reply has no choices[0].logprobs.top_logprobs[0] ({type(err).__name__})") from None
    if not isinstance(top, dict) or not top:
        raise ValueError("top_logprobs[0] is not a non-empty object of token -> logprob")
    by_id = all(isinstance(k, str) and k.startswith(_TOKEN_ID_KEY) for k in top)
    pairs: list[tuple[int, float]] = []
    if by_id or token_strings is None:
        seen: set[int] = set()
        for key, value in top.items():
            if not isinstance(key, str) or not key.startswith(_TOKEN_ID_KEY):
                raise ValueError(
                    "top_logprobs keys are not 'token_id:N'; the server must honour return_tokens_as_token_ids "
                    "(vLLM, SGLang and logitfuse serve do), or give the backend the LLM's tokenizer= so token "
                    "strings (llama.cpp's server) can be mapped to ids"
                )
            try:
                token = int(key[len(_TOKEN_ID_KEY):])
            except ValueError:
                raise ValueError(f"top_logprobs key {key[:40]!r} does not end in an integer") from None
            value = _check_logprob(value)
            if token < 0 or (vocab_size is not None and token >= vocab_size):
                raise ValueError(f"top_logprobs holds token id {token} outside [0, {vocab_size})")
            if token in seen:
                raise ValueError(f"top_logprobs names token id {token} twice")
            seen.add(token)
            pairs.append((token, value))
        mapped = len(pairs)
    else:
        checked = {}
        for key, value in top.items():
            if not isinstance(key, str):
                raise ValueError("top_logprobs keys must be strings")
            checked[key] = _check_logprob(value)
        pairs, mapped = token_strings.map_pairs(checked)
        pairs = _merge_same_ids(p for p in pairs if vocab_size is None or p[0] < vocab_size)
    if counts is not None:
        counts["topk_entries"] = counts.get("topk_entries", 0) + len(top)
        counts["topk_mapped"] = counts.get("topk_mapped", 0) + mapped
    pairs.sort(key=lambda p: -p[1])
    return pairs


def _merge_same_ids(pairs: Any) -> list[tuple[int, float]]:
    """One pair per id (two keys, e.g. two renderings of one token, can map to the same id): their
    probabilities add up."""
    merged: dict[int, float] = {}
    for token, value in pairs:
        if token in merged:
            high, low = max(merged[token], value), min(merged[token], value)
            value = high if low == -math.inf else min(high + math.log1p(math.exp(low - high)), 0.0)
        merged[token] = value
    return list(merged.items())


class OpenAICompatibleLLM(LLMBackend):
    """The cloud LLM over HTTP: an OpenAI-compatible ``/v1/completions`` endpoint with ``logprobs``.

    Each step sends, per row that needs it, ``{"model", "prompt", "max_tokens": 1, "logprobs": top_k,
    "temperature", "echo": false, "return_tokens_as_token_ids": true}`` and reads the top-k
    next-token log-probabilities. The backend is stateless on the wire: it keeps each row's id list
    and sends it whole (the server's prefix cache makes that cheap); rows with nothing new since
    their last answer are not re-sent.

    Two things differ between servers, and both are handled:

    - the prompt: vLLM, SGLang and ``logitfuse serve`` take LLM token ids (``prompt_format="ids"``);
      llama.cpp's server (llama-cpp-python) takes only text, which it re-tokenizes
      (``prompt_format="text"``: the public prompt's text, or its ids' bytes decoded, followed by
      the generated ids' bytes decoded as UTF-8; a row whose generated bytes end inside a
      character is not sent until the character is complete: that step uses the SLM alone and
      counts in ``stats["held_back"]``; the server conditions on its own canonical tokenization
      of that text, which can merge tokens the SLM generated one at a time). ``"auto"`` (default) sends ids first and, if the server
      refuses them with a request validation error (400/422, or llama-cpp-python's 500 whose body
      says "validation error"), switches to text for good (``stats["prompt_format"]`` says
      which was chosen);
    - the ``top_logprobs`` keys: ``"token_id:123"`` where the server honours
      ``return_tokens_as_token_ids`` (vLLM, ``logitfuse serve``), token strings elsewhere
      (llama.cpp): strings are mapped to ids with the tokenizer (:class:`TokenStringMap`; ``ties``
      says how a string shared by several ids is split). ``stats["topk_mapped_share"]`` is the
      share of returned entries that mapped; unmapped ones are dropped and their probability joins
      the tail.

    Args:
        base_url (`str`): server root, e.g. ``"http://127.0.0.1:8000"`` (``/v1`` is added).
        model (`str`): the served model name.
        top_k (`int`, defaults to 20): ``logprobs`` asked for (most servers cap it at 20).
        tokenizer (optional): the LLM's tokenizer, to encode text prompts, for cross-tokenizer
            decoding, text prompts and token-string keys; without it the public prompt must be
            token ids and the server must return ``token_id:N`` keys.
        vocab_size (`int`, optional): the LLM's vocabulary size (default: ``len(tokenizer)``).
        timeout (`float`, defaults to 30): deadline in seconds for one HTTP attempt as a whole:
            connecting, sending and reading the entire reply (a server that trickles its reply
            is cut off at ``timeout``, not at ``timeout`` per byte).
        retries (`int`, defaults to 2): extra attempts after a timeout, connection error, 5xx/429 or
            malformed reply, with exponential backoff from ``backoff`` seconds (``min(backoff ·
            2^i, 2)`` before retry ``i + 1``). One :meth:`advance` never takes longer than
            :meth:`step_budget`: ``timeout × (retries + 1)`` plus those sleeps, whatever the
            number of rows (rows queued behind ``max_concurrency`` share that budget; with
            ``prompt_format="auto"``, a probe that gets no usable answer fails the other rows of
            its step without sending them).
        on_failure (`str`, defaults to ``"fallback"``): ``"fallback"`` marks the row not ok for this
            step (the processor then uses the SLM alone and counts a fallback), ``"raise"`` raises
            :class:`LLMBackendError`. A reply whose token strings map to no token of ``tokenizer``
            (the wrong tokenizer) is such a failure too, never retried; under ``"fallback"`` it is
            counted in ``stats["unmapped_answers"]`` and warned about once.
        temperature (`float`, defaults to 1.0): sent with the request (1 keeps the model's own
            distribution in servers that return processed log-probabilities).
        api_key (`str`, optional): sent as ``Authorization: Bearer``; never logged. Redirects
            are never followed (urllib would resend the key to the new address): a 3xx answer is
            an error that names the address it pointed to, so ``base_url`` can be fixed.
        max_concurrency (`int`, defaults to 8): rows requested in parallel.
        prompt_format (`str`, defaults to ``"auto"``): ``"ids"``, ``"text"`` or ``"auto"`` (above).
        ties (`str`, defaults to ``"split"``): token strings shared by several ids: ``"split"`` or
            ``"canonical"`` (:class:`TokenStringMap`).

    Example (no server needed to build one):

    >>> import logitfuse
    >>> llm = logitfuse.OpenAICompatibleLLM("http://127.0.0.1:8000", "qwen2.5-1.5b", top_k=5, vocab_size=100)
    >>> llm.start([[1, 2, 3]]); llm.audit_log
    []
    """

    def __init__(self, base_url: str, model: str, top_k: int = 20, *, tokenizer: Any = None,
                 vocab_size: int | None = None, timeout: float = 30.0, retries: int = 2, backoff: float = 0.1,
                 on_failure: str = "fallback", temperature: float = 1.0, api_key: str | None = None,
                 add_special_tokens: bool = True, max_concurrency: int = 8, prompt_format: str = "auto",
                 ties: str = "split"):
        super().__init__()
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={base_url!r} must start with http:// or https://, e.g. 'http://127.0.0.1:8000'")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model={model!r} must be the served model's name (see GET {base_url}/v1/models)")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ValueError(f"top_k={top_k!r} must be a positive int (most servers allow up to 20)")
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout={timeout!r} must be a positive number of seconds")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries={retries!r} must be an int >= 0")
        if on_failure not in ("fallback", "raise"):
            raise ValueError(f"on_failure={on_failure!r} must be 'fallback' (SLM-only step) or 'raise'")
        if prompt_format not in ("auto", "ids", "text"):
            raise ValueError(f"prompt_format={prompt_format!r} must be 'auto' (probe), 'ids' (vLLM, SGLang) or "
                             "'text' (llama.cpp's server)")
        if prompt_format == "text" and tokenizer is None:
            raise ValueError("prompt_format='text' needs tokenizer= (the generated ids are sent as their text)")
        if ties not in ("split", "canonical"):
            raise ValueError(f"ties={ties!r} must be 'split' or 'canonical'")
        if vocab_size is None:
            if tokenizer is None:
                raise ValueError("pass vocab_size= (the LLM's vocabulary size) or tokenizer=")
            vocab_size = len(tokenizer)
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size!r} must be a positive int")
        root = base_url.rstrip("/")
        self.url = (root if root.endswith("/v1") else root + "/v1") + "/completions"
        self.model, self.top_k, self.tokenizer, self.vocab_size = model, top_k, tokenizer, vocab_size
        self.timeout, self.retries, self.backoff = float(timeout), retries, float(backoff)
        self.on_failure, self.temperature, self.add_special_tokens = on_failure, float(temperature), add_special_tokens
        self._api_key = api_key
        self.max_concurrency = max(1, int(max_concurrency))
        self._pool: ThreadPoolExecutor | None = None
        self.prompt_format, self.ties = prompt_format, ties
        # "auto" is decided by the first request; None until then
        self._format: str | None = None if prompt_format == "auto" else prompt_format
        self._string_map: TokenStringMap | None = None
        self._lock = threading.Lock()
        self._opener = _build_opener()
        self._warned_unmapped = False
        self.stats = {"requests": 0, "attempts": 0, "failures": 0, "held_back": 0, "topk_entries": 0,
                      "topk_mapped": 0, "topk_mapped_share": 1.0, "empty_answers": 0, "unmapped_answers": 0,
                      "prompt_format": self._format}
        self.reset()

    def __repr__(self) -> str:
        return f"OpenAICompatibleLLM({self.url!r}, model={self.model!r}, top_k={self.top_k})"

    @property
    def batch_size(self) -> int:
        return len(self._ids)

    def reset(self) -> None:
        """Forget the sequences (the audit log and request statistics are kept)."""
        self._ids: list[list[int]] = []
        self._answer: list[list[tuple[int, float]] | None] = []
        self._prompt_text: list[str | None] = []  # the public prompt as given, when it was text
        self._n_prompt: list[int] = []  # its length in LLM ids

    def close(self) -> None:
        """Stop the request thread pool (a later request starts a new one)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def start(self, public_prompts: list[str] | list[list[int]]) -> None:
        """Store the public prompts (one per row); nothing is sent until :meth:`advance`."""
        rows = self._encode_prompts(public_prompts)
        self._ids = [list(r) for r in rows]
        self._answer = [None] * len(rows)
        self._prompt_text = [p if isinstance(p, str) else None for p in _check_prompts(public_prompts)]
        self._n_prompt = [len(r) for r in rows]

    def reorder(self, order: list[int]) -> None:
        """Row ``r`` becomes former row ``order[r]`` (nothing is sent)."""
        if len(order) != self.batch_size or any(not 0 <= s < self.batch_size for s in order):
            raise ValueError(f"reorder needs {self.batch_size} row indices in [0, {self.batch_size})")
        self._ids = [list(self._ids[s]) for s in order]
        self._answer = [self._answer[s] for s in order]
        self._prompt_text = [self._prompt_text[s] for s in order]
        self._n_prompt = [self._n_prompt[s] for s in order]

    def rollback(self, n: list[int]) -> None:
        if len(n) != self.batch_size:
            raise ValueError(f"rollback needs one count per row ({self.batch_size})")
        for r, count in enumerate(n):
            if count:
                if count < 0 or count >= len(self._ids[r]):
                    raise ValueError(f"rollback: row {r} cannot drop {count} of its {len(self._ids[r])} tokens")
                del self._ids[r][-count:]
                self._answer[r] = None

    # ------------------------------------------------------------------ HTTP
    def payload(self, token_ids: list[int] | str, *, max_tokens: int = 1, logprobs: int | None = None,
                temperature: float | None = None) -> bytes:
        """The exact request body for one row (``token_ids``: LLM ids, or the prompt text)."""
        body = {
            "model": self.model,
            "prompt": token_ids,
            "max_tokens": max_tokens,
            "logprobs": self.top_k if logprobs is None else logprobs,
            "temperature": self.temperature if temperature is None else temperature,
            "echo": False,
            "return_tokens_as_token_ids": True,
        }
        return json.dumps(body, separators=(",", ":")).encode("utf-8")

    def _post_once(self, body: bytes, deadline: float) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = _DeadlineRequest(self.url, data=body, headers=headers, method="POST", deadline=deadline)
        with self._opener.open(request, timeout=max(deadline - time.monotonic(), 1e-3)) as response:
            raw = response.read(_MAX_REPLY_BYTES + 1)
        if len(raw) > _MAX_REPLY_BYTES:
            raise ValueError(f"the reply is larger than {_MAX_REPLY_BYTES >> 20} MiB")
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise ValueError("the reply is not JSON") from None

    def step_budget(self) -> float:
        """The most seconds one :meth:`advance` (or one :meth:`post`) takes, whatever the number of
        rows: ``timeout × (retries + 1)`` plus the backoff sleeps between attempts."""
        return self.timeout * (self.retries + 1) + _backoff_total(self.retries, self.backoff)

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
                if err.code not in _TRANSIENT_HTTP or validation:  # a refused request shape stays refused
                    break
            except (TimeoutError, socket.timeout):
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
        return problem, err.code, _is_validation_error(err.code, detail)

    # ------------------------------------------------------------------ prompts and replies
    def row_text(self, r: int) -> str | None:
        """Row ``r``'s prompt as text (what ``prompt_format="text"`` sends), or ``None`` while its
        generated bytes end inside a character (held back until the character is complete).

        The public prompt keeps the text it was given (ids are decoded through their bytes; added
        tokens such as ``<|im_start|>`` as their string, which servers parse as special tokens);
        the generated ids follow as their bytes decoded as UTF-8 (invalid bytes inside become
        U+FFFD, as ``tokenizer.decode`` does). In cross-tokenizer decoding these bytes are exactly
        the text the processor re-tokenized (:class:`logitfuse.retokenize.IncrementalRetokenizer`).
        """
        from logitfuse.retokenize import token_bytes

        ids, n_prompt, prompt_text = self._ids[r], self._n_prompt[r], self._prompt_text[r]
        if prompt_text is None or len(ids) < n_prompt:
            prompt_text, n_prompt = "", 0
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = decoder.decode(token_bytes(self.tokenizer, ids[n_prompt:]), final=False)
        if decoder.getstate()[0]:
            return None
        return prompt_text + text

    def _token_strings(self) -> TokenStringMap | None:
        if self._string_map is None and self.tokenizer is not None:
            self._string_map = TokenStringMap.for_tokenizer(self.tokenizer, ties=self.ties)
        return self._string_map

    def _parse(self, reply: Any) -> list[tuple[int, float]]:
        counts: dict = {}
        try:
            top = reply["choices"][0]["logprobs"]["top_logprobs"][0]
            by_id = isinstance(top, dict) and all(isinstance(k, str) and k.startswith(_TOKEN_ID_KEY) for k in top)
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
            raise _UnmappedReplyError(
                f"{self.url}: none of the {len(strings)} token strings in the reply ({examples}) is a token of "
                "the tokenizer passed as tokenizer=; pass the served LLM's own tokenizer", 200)
        return pairs

    def _request_row(self, body: bytes, deadline: float) -> list[tuple[int, float]]:
        # a split token string can yield more than top_k pairs: the least likely ones beyond top_k
        # are cut (their probability joins the tail), as for any server that returns extra entries
        return self.post(body, parse=self._parse, deadline=deadline)[: self.top_k]

    def _body(self, r: int, fmt: str) -> bytes | None:
        if fmt == "ids":
            return self.payload(self._ids[r])
        text = self.row_text(r)
        return None if text is None else self.payload(text)

    def _send(self, todo: list[int], bodies: dict[int, bytes], deadline: float) -> dict[int, Any]:
        for r in todo:  # logged before sending, in row order
            self.audit_log.append(bodies[r].decode("utf-8"))
        self.stats["requests"] += len(todo)

        def run(r: int):
            try:
                return self._request_row(bodies[r], deadline)
            except LLMBackendError as err:
                return err

        if len(todo) <= 1:
            return {r: run(r) for r in todo}
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="logitfuse-llm")
        return dict(zip(todo, self._pool.map(run, todo)))

    def advance(self, new_tokens: list[list[int]], need: list[bool] | None = None) -> LLMOutput:
        """Append the new tokens; request the top-k next tokens of the rows in ``need``.

        Takes at most :meth:`step_budget` seconds, whatever the number of rows. Rows answer with
        different numbers of entries; each keeps all of its own, and the shorter rows are padded
        to the longest with ids they do not hold at logprob ``-inf`` (no probability).
        """
        deadline = time.monotonic() + self.step_budget()
        rows, need = self._check_new_tokens(new_tokens, need)
        for r, row in enumerate(rows):
            if row:
                self._ids[r].extend(row)
                self._answer[r] = None
        todo = [r for r in range(len(rows)) if need[r] and self._answer[r] is None]
        results: dict[int, Any] = {}
        if todo and self._format is None:
            results = self._probe(todo, deadline)
            todo = [r for r in todo if r not in results]
        fmt = self._format or "ids"
        bodies = {}
        for r in todo:
            body = self._body(r, fmt)
            if body is None:
                self.stats["held_back"] += 1
            else:
                bodies[r] = body
        results.update(self._send([r for r in todo if r in bodies], bodies, deadline))
        self._take_results(results)
        ok = [need[r] and self._answer[r] is not None for r in range(len(rows))]
        return LLMOutput(_padded_topk([self._answer[r] if ok[r] else None for r in range(len(rows))]),
                         torch.tensor(ok))

    def _probe(self, todo: list[int], deadline: float) -> dict[int, Any]:
        """``prompt_format="auto"``'s capability probe: the first row as token ids. A request
        validation error (400/422; llama-cpp-python's server answers 500 with "validation error"
        in the body) means the server wants text, and then every later request is text. Returns
        the results known so far: the probe's row, or every row of ``todo`` when the server did
        not answer usably (timeout, connection error, 429/5xx, malformed reply): those rows share
        its failure instead of waiting out the same timeouts again, and the next step probes anew.
        """
        first = todo[0]
        results = self._send([first], {first: self._body(first, "ids")}, deadline)
        res = results[first]
        if isinstance(res, LLMBackendError) and res.validation and self.tokenizer is not None:
            self._format = "text"
            results = {}
        elif not isinstance(res, LLMBackendError):
            self._format = "ids"
        elif not res.validation and (res.status is None or res.status in _TRANSIENT_HTTP):
            results = {r: res for r in todo}
        self.stats["prompt_format"] = self._format
        return results

    def _take_results(self, results: dict[int, Any]) -> None:
        """Store the answers; count failures and raise the first one under ``on_failure="raise"``."""
        failed = [r for r, res in results.items() if isinstance(res, LLMBackendError)]
        self.stats["failures"] += len(failed)
        unmapped = [results[r] for r in failed if isinstance(results[r], _UnmappedReplyError)]
        self.stats["unmapped_answers"] += len(unmapped)
        if failed and self.on_failure == "raise":
            raise results[failed[0]]
        if unmapped and not self._warned_unmapped:
            self._warned_unmapped = True
            warnings.warn(f"{unmapped[0]}; until then every step uses the SLM alone (counted in "
                          "stats['unmapped_answers']; this warning is shown once)", RuntimeWarning, stacklevel=3)
        for r, res in results.items():
            if isinstance(res, LLMBackendError):
                continue
            if res:
                self._answer[r] = res
            else:  # every returned entry was unmappable (e.g. only "" keys): nothing to fuse
                self.stats["empty_answers"] += 1


def _padded_topk(answers: list[list[tuple[int, float]] | None]) -> TopK:
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
