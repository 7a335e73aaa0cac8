"""Token strings, as servers print them in ``top_logprobs``, back to LLM token ids."""

from __future__ import annotations

import functools
import math
from typing import Any

from logitfuse.vocab.retokenize import token_bytes_table

__all__ = ["TOKEN_ID_KEY", "TOPK_SUM_TOLERANCE", "TokenStringMap", "parse_top_logprobs", "render_token_bytes"]


def render_token_bytes(data: bytes) -> str:
    """How llama.cpp's server (llama-cpp-python) renders one token as a ``top_logprobs`` key: its
    bytes decoded as UTF-8 with invalid or incomplete sequences *dropped*
    (``bytes.decode("utf-8", errors="ignore")``), so a lone byte token ``b"\\xe2"`` is ``""`` and
    ``b" \\xe2"`` is ``" "``. Checked against the real server in tests/backends/test_engine.py.

    >>> render_token_bytes(b" caf\\xc3\\xa9"), render_token_bytes(b" \\xe2")
    (' café', ' ')
    """
    return data.decode("utf-8", errors="ignore")


class TokenStringMap:
    """Token strings, as a server prints them in ``top_logprobs``, back to LLM token ids.

    Built once per tokenizer (cached): each id's raw bytes (:func:`logitfuse.vocab.retokenize.token_bytes_table`:
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
    def for_tokenizer(cls, tokenizer: Any, *, ties: str = "split") -> TokenStringMap:
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


#: the prefix of a ``top_logprobs`` key that names a token id (``return_tokens_as_token_ids``)
TOKEN_ID_KEY = "token_id:"
#: how far above 1 the probabilities of one position's ``top_logprobs`` may sum (servers round each
#: logprob; a float32 rounding of 20 entries is ~1e-6) before the reply counts as malformed
TOPK_SUM_TOLERANCE = 1e-3


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
    raise ``ValueError``, as does any malformed reply (an id named twice, a NaN or positive logprob,
    probabilities summing to more than ``1 +`` :data:`TOPK_SUM_TOLERANCE` included).
    ``counts`` (a dict), when given, is incremented: ``"topk_entries"`` (keys read) and
    ``"topk_mapped"`` (keys that became ids).

    >>> reply = {"choices": [{"logprobs": {"top_logprobs": [{"token_id:3": -2.5, "token_id:7": -0.1}]}}]}
    >>> parse_top_logprobs(reply, vocab_size=10)
    [(7, -0.1), (3, -2.5)]
    """
    try:
        top = reply["choices"][0]["logprobs"]["top_logprobs"][0]
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(f"reply has no choices[0].logprobs.top_logprobs[0] ({type(err).__name__})") from None
    if not isinstance(top, dict) or not top:
        raise ValueError("top_logprobs[0] is not a non-empty object of token -> logprob")
    by_id = all(isinstance(k, str) and k.startswith(TOKEN_ID_KEY) for k in top)
    pairs: list[tuple[int, float]] = []
    if by_id or token_strings is None:
        seen: set[int] = set()
        for key, value in top.items():
            if not isinstance(key, str) or not key.startswith(TOKEN_ID_KEY):
                raise ValueError(
                    "top_logprobs keys are not 'token_id:N'; the server must honour return_tokens_as_token_ids "
                    "(vLLM, SGLang and logitfuse serve do), or give the backend the LLM's tokenizer= so token "
                    "strings (llama.cpp's server) can be mapped to ids"
                )
            try:
                token = int(key[len(TOKEN_ID_KEY):])
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
    total = math.fsum(math.exp(value) for value in (_check_logprob(v) for v in top.values()))
    if total > 1 + TOPK_SUM_TOLERANCE:
        raise ValueError(f"top_logprobs' probabilities sum to {total:.4g}, more than 1 (+ {TOPK_SUM_TOLERANCE:g} for "
                         "rounding): not log-probabilities")
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
