"""Prompt log-probabilities in OpenAI-compatible completions replies: where each scored position is.

A server scores given tokens (teacher-forced) in one of two ways:

- ``echo: true`` with ``logprobs: k`` (llama.cpp's server, when started with ``logits_all``;
  ``logitfuse serve``; vLLM): ``choices[0].logprobs.top_logprobs`` then holds one entry per prompt
  token (the first ``null``) and one per generated token, with ``text_offset`` giving where each
  token starts in the echoed text;
- vLLM's extra parameter ``prompt_logprobs: k``: ``choices[0].prompt_logprobs`` holds one entry per
  prompt token (the first ``null``), each ``{"<id>": {"logprob", "rank", "decoded_token"}}``; the
  generated token's entry is the usual ``choices[0].logprobs.top_logprobs[0]``.

The helpers here read those replies into ``{position: top_logprobs dict}``, where position ``j``
means "the next-token distribution after the first ``j`` tokens" (by token count for token-id
prompts, by character offset for text prompts); they never raise on a missing position (the caller
asks for it separately), only on a malformed reply (``ValueError``).

>>> reply = {"choices": [{"logprobs": {"top_logprobs": [None, {"token_id:5": -0.2}, {"token_id:1": -0.7}]}}]}
>>> echo_positions_by_count(reply)
{1: {'token_id:5': -0.2}, 2: {'token_id:1': -0.7}}
"""

from __future__ import annotations

from typing import Any

from logitfuse.backends.strings import TOKEN_ID_KEY

__all__ = ["SCORE_METHODS", "echo_positions_by_count", "echo_positions_by_offset", "prompt_logprobs_positions",
           "single_position_reply"]

#: how :class:`logitfuse.OpenAICompatibleLLM` asks a server to score tokens (``"auto"``: probe once)
SCORE_METHODS = ("auto", "echo", "prompt_logprobs", "none")


def _logprobs_block(reply: Any) -> dict:
    try:
        block = reply["choices"][0]["logprobs"]
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(f"reply has no choices[0].logprobs ({type(err).__name__})") from None
    if not isinstance(block, dict) or not isinstance(block.get("top_logprobs"), list):
        raise ValueError("choices[0].logprobs.top_logprobs is not a list")
    return block


def _usable(entry: Any) -> bool:
    return isinstance(entry, dict) and bool(entry)


def single_position_reply(top: dict) -> dict:
    """``top`` (one position's ``{token: logprob}``) as a reply :func:`parse_top_logprobs` reads."""
    return {"choices": [{"logprobs": {"top_logprobs": [top]}}]}


def echo_positions_by_count(reply: Any, n_prompt: int | None = None) -> dict[int, dict]:
    """An ``echo`` reply to a prompt of token ids: entry ``j`` of ``top_logprobs`` is the
    distribution after the first ``j`` tokens (entry 0 is ``null``; the entry after the last prompt
    token is the generated token's). Returns ``{j: top dict}`` for the usable entries. With
    ``n_prompt`` (the prompt's length) the layout is checked: ``n_prompt + 1`` entries (one generated
    token), the first not a distribution; ``ValueError`` otherwise (positions would be misread)."""
    entries = _logprobs_block(reply)["top_logprobs"]
    if n_prompt is not None and (len(entries) != n_prompt + 1 or _usable(entries[0])):
        raise ValueError(f"the echo reply to {n_prompt} prompt tokens has {len(entries)} top_logprobs entries "
                         f"(expected {n_prompt + 1}, the first null): its positions cannot be read")
    return {j: entry for j, entry in enumerate(entries) if j > 0 and _usable(entry)}


def echo_positions_by_offset(reply: Any, text_length: int) -> dict[int, dict]:
    """An ``echo`` reply to a text prompt of ``text_length`` characters: ``{character offset: top
    dict}``, the distribution after ``text[:offset]``, read through ``text_offset``.

    Two layouts exist. The standard one (OpenAI, vLLM, ``logitfuse serve``, and llama.cpp's server
    for models that start with a BOS token) gives each token the distribution that predicts it, so
    an entry belongs to its own token's start offset. llama-cpp-python 0.3.x, for models without a
    BOS token, pairs each prompt token with the distribution *after* it (its entries are one
    position late, and the generated token has none): there an entry belongs to the next token's
    start (the prompt's end for the last one). That layout is recognized by its count: as many
    entries as ``usage.prompt_tokens``, the last starting before the prompt's end. Where two entries
    share an offset (a token inside a character adds no character), the first one is kept: it is
    the distribution after the text up to there.
    """
    block = _logprobs_block(reply)
    entries, offsets = block["top_logprobs"], block.get("text_offset")
    if not isinstance(offsets, list) or len(offsets) != len(entries) or \
            not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets):
        raise ValueError("choices[0].logprobs.text_offset must list one int offset per top_logprobs entry")
    usage = reply.get("usage") if isinstance(reply, dict) else None
    prompt_tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    if any(b < a for a, b in zip(offsets, offsets[1:])) or any(not 0 <= o <= text_length for o in offsets):
        raise ValueError(f"choices[0].logprobs.text_offset must be non-decreasing offsets within the "
                         f"{text_length}-character prompt")
    late = bool(entries) and len(entries) == prompt_tokens and offsets[-1] < text_length
    found: dict[int, dict] = {}
    for idx, entry in enumerate(entries):
        if not _usable(entry):
            continue
        offset = (offsets[idx + 1] if idx + 1 < len(offsets) else text_length) if late else offsets[idx]
        found.setdefault(offset, entry)
    return found


def prompt_logprobs_positions(reply: Any, n_prompt: int | None = None) -> dict[int, dict]:
    """A reply with vLLM's ``prompt_logprobs`` to a prompt of ``n`` token ids: ``{j: top dict}`` with
    ``"token_id:N"`` keys, for ``j`` in ``1..n - 1`` from ``prompt_logprobs[j]`` and ``j = n`` from
    the generated token's ``top_logprobs[0]``. Entries may be ``{"<id>": {"logprob": x, ...}}`` or
    ``{"<id>": x}``; an id named twice (``"5"`` and ``"token_id:5"``) is a ``ValueError``. With
    ``n_prompt`` (the prompt's length) the layout is checked: ``n_prompt`` entries, the first ``null``;
    ``ValueError`` otherwise. Without ``prompt_logprobs`` in the reply: ``{}``."""
    try:
        listed = reply["choices"][0]["prompt_logprobs"]
    except (KeyError, IndexError, TypeError):
        listed = None
    if not isinstance(listed, list):
        return {}
    if n_prompt is not None and (len(listed) != n_prompt or (listed and _usable(listed[0]))):
        raise ValueError(f"prompt_logprobs for {n_prompt} prompt tokens has {len(listed)} entries (expected "
                         f"{n_prompt}, the first null): its positions cannot be read")
    found: dict[int, dict] = {}
    for j, entry in enumerate(listed):
        if j == 0 or not _usable(entry):
            continue
        top = {}
        for key, value in entry.items():
            logprob = value.get("logprob") if isinstance(value, dict) else value
            name = key if str(key).startswith(TOKEN_ID_KEY) else f"{TOKEN_ID_KEY}{key}"
            if name in top:
                raise ValueError(f"prompt_logprobs[{j}] names token {name!r} twice")
            top[name] = logprob
        found[j] = top
    generated = _logprobs_block(reply)["top_logprobs"] if reply["choices"][0].get("logprobs") else []
    if generated and _usable(generated[0]):
        found[len(listed)] = generated[0]
    return found
