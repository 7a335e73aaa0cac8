"""Teacher-forced scoring by a served LLM: :meth:`logitfuse.OpenAICompatibleLLM.score`, from the
server's prompt log-probabilities, and the one-time probe that finds how the server gives them.

:class:`ServedScoring` is a mixin of :class:`logitfuse.OpenAICompatibleLLM`: it works on that
class's rows (``_ids``, ``_answer``, ``_format``, ``_append``, ``_prompt_upto``, ``_text_upto``,
``_take_results``) and sends through :class:`logitfuse.backends.completions.CompletionsWire`. The
replies are read by :mod:`logitfuse.backends.prompt_scores`.

>>> import logitfuse
>>> llm = logitfuse.OpenAICompatibleLLM("http://127.0.0.1:8000", "m", vocab_size=100, score_method="none")
>>> llm.supports_score  # "none" turns scoring off without asking the server
False
"""

from __future__ import annotations

import time
from typing import Any

import torch

from logitfuse.backends.base import LLMBackendError, LLMOutput
from logitfuse.backends.completions import padded_topk
from logitfuse.backends.prompt_scores import (echo_positions_by_count, echo_positions_by_offset,
                                              prompt_logprobs_positions, single_position_reply)
from logitfuse.types import TopK

__all__ = ["PROBE_TEXT", "ServedScoring"]

#: what the scoring probe sends (a fixed text, so that no user's text is ever used to probe)
PROBE_TEXT = "One, two, three, four, five, six."


class ServedScoring:
    """:meth:`score`, :attr:`supports_score` and :meth:`probe_score` (a mixin; see the module docstring)."""

    @property
    def supports_score(self) -> bool:
        """Whether :meth:`score` works with this server. With ``score_method="auto"`` the first look
        probes the server once (:meth:`probe_score`) and keeps the verdict."""
        if self._score_method is None:
            self._score_method = self.probe_score()
            self.stats["score_method"] = self._score_method
        return self._score_method in ("echo", "prompt_logprobs")

    def probe_score(self) -> str | None:
        """Which scoring method the server supports: ``"echo"`` (``echo`` + ``logprobs``: llama.cpp's
        server started with ``logits_all``, ``logitfuse serve``, vLLM), else ``"prompt_logprobs"``
        (vLLM's extra parameter, token-id prompts only), else ``"none"``; ``None`` when the server
        could not be reached (asked again at the next look).

        Sends a fixed text (:data:`PROBE_TEXT`, nothing of any user's): first, when
        ``prompt_format="auto"`` has not decided yet, one plain request to learn whether the server
        takes token ids; then one scoring request per method tried. A method counts when the reply
        scores the text's positions."""
        deadline = time.monotonic() + self.step_budget()
        ids = (list(self.tokenizer.encode(PROBE_TEXT, add_special_tokens=False)) if self.tokenizer is not None
               else [i % self.vocab_size for i in range(1, 8)])
        try:
            if self._format is None:
                self._format = self._probe_format(ids, deadline)
                self.stats["prompt_format"] = self._format
            for method in ("echo", "prompt_logprobs"):
                if self._format == "text" and method == "prompt_logprobs":
                    continue
                prompt = ids if self._format == "ids" else PROBE_TEXT
                found = self._probe_method(prompt, method, deadline)
                if found:
                    return method
        except LLMBackendError:
            return None
        return "none"

    def _probe_format(self, ids: list[int], deadline: float) -> str:
        body = self.payload(ids)
        self._log_request(body)
        try:
            self.post(body, deadline=deadline)
            return "ids"
        except LLMBackendError as err:
            if err.validation and self.tokenizer is not None:
                return "text"
            raise

    def _probe_method(self, prompt: list[int] | str, method: str, deadline: float) -> bool:
        """Whether one scoring request with ``method`` scores every position of ``prompt`` (ids) or
        at least one prompt position and the last (text). Raises only when the server is unreachable."""
        body = self._score_body(prompt, method)
        self._log_request(body)
        try:
            reply = self.post(body, deadline=deadline)
            found = self._positions(reply, prompt, method)
        except LLMBackendError as err:
            if err.status is None and not err.validation:
                raise
            return False
        except ValueError:
            return False
        if isinstance(prompt, str):
            return len(prompt) in found and len(found) >= 2
        return all(j in found for j in range(1, len(prompt) + 1))

    def _score_body(self, prompt: list[int] | str, method: str) -> bytes:
        return self.payload(prompt, echo=method == "echo",
                            prompt_logprobs=self.top_k if method == "prompt_logprobs" else None)

    @staticmethod
    def _positions(reply: Any, prompt: list[int] | str, method: str) -> dict[int, dict]:
        """``{position: top dict}`` of a scoring reply, its layout checked (``ValueError``: malformed)."""
        if isinstance(prompt, str):
            return echo_positions_by_offset(reply, len(prompt))
        if method == "echo":
            return echo_positions_by_count(reply, len(prompt))
        return prompt_logprobs_positions(reply, len(prompt))

    def score(self, new_tokens: list[list[int]], need: list[bool] | None = None) -> LLMOutput:
        """Append each row's new tokens and return the top-k at every appended position, from one
        scoring request per row (the server's prompt log-probabilities, teacher-forced).

        The contract is :meth:`logitfuse.HFLLM.score`'s, with top-k: ``next`` is a
        :class:`logitfuse.TopK` of ``(B, 1 + W, k)`` tensors, ``W`` the most new tokens of a row, each
        row's positions right-aligned (``next[r, W - n_r + i]``: after its first ``i`` new tokens;
        ``i = 0`` is what :meth:`advance` would have returned). ``ok`` is per row: rows not in
        ``need``, and rows whose request failed under ``on_failure="fallback"``, are not ok (their
        tokens are appended all the same).

        What is sent is what :meth:`advance` sends (the row's ids, or its text), with ``echo`` (or
        vLLM's ``prompt_logprobs``) added. With text prompts the server re-tokenizes; a position whose
        boundary no echoed token starts at (the server merged tokens across it) is asked for with
        one plain request, as per-step fusion would (``stats["score_extra_requests"]``); a row whose
        text would end inside a UTF-8 character there fails. Raises ``RuntimeError`` when the
        server cannot score (:attr:`supports_score` False).
        """
        deadline = time.monotonic() + self.step_budget()
        rows, need = self.check_new_tokens(new_tokens, need)
        if not self.supports_score:
            raise RuntimeError(f"{self.url} cannot score tokens (score_method={self._score_method!r}); check "
                               "supports_score first (llama.cpp's server needs logits_all; vLLM prompt_logprobs)")
        counts = [len(row) for row in rows]
        starts = [len(self._ids[r]) for r in range(len(rows))]
        self._append(rows)
        cached = {r: [self._answer[r]] for r in range(len(rows)) if need[r] and self._answer[r] is not None}
        todo = [r for r in range(len(rows)) if need[r] and r not in cached]
        # a text row ending inside a UTF-8 character cannot be sent: it fails here, unlogged and uncounted
        unsendable = {r: LLMBackendError(f"{self.url}: the row's text ends inside a UTF-8 character; it cannot be "
                                         "scored until the character is complete")
                      for r in todo if self._prompt_upto(r, len(self._ids[r])) is None}
        todo = [r for r in todo if r not in unsendable]
        requests = {r: self._score_request(r, starts[r]) for r in todo}
        self.stats["score_requests"] += len(todo)
        results = unsendable | self._send(todo, {r: requests[r][0] for r in todo},
                                          lambda r: self._score_row(r, starts[r], *requests[r], deadline))
        self._take_results({r: res for r, res in results.items() if isinstance(res, LLMBackendError)})
        answers = {**cached, **{r: res for r, res in results.items() if not isinstance(res, LLMBackendError)}}
        for r, positions in answers.items():
            self._answer[r] = positions[-1]
        width = max(counts)
        per_position: list[list[tuple[int, float]] | None] = []
        for r in range(len(rows)):
            pad = width - counts[r] if r in answers else width + 1
            per_position += [None] * pad + list(answers.get(r, []))
        top = padded_topk(per_position)
        shape = (len(rows), width + 1, top.ids.shape[-1])
        return LLMOutput(TopK(top.ids.view(shape), top.logprobs.view(shape)),
                         torch.tensor([r in answers for r in range(len(rows))]))

    def _score_request(self, r: int, start: int) -> tuple[bytes, dict[int, int]]:
        """Row ``r``'s scoring request body and ``{position j: key of j in the reply}`` for the
        positions ``start..len(ids)`` (text prompts: character offsets; positions inside a
        character are absent)."""
        ids, method = self._ids[r], self._score_method
        if (self._format or "ids") == "ids":
            return self._score_body(ids, method), {j: j for j in range(start, len(ids) + 1)}
        where = {j: len(t) for j in range(start, len(ids) + 1) if (t := self._text_upto(r, j)) is not None}
        return self._score_body(self._text_upto(r, len(ids)), "echo"), where

    def _score_row(self, r: int, start: int, body: bytes, where: dict[int, int],
                   deadline: float) -> list[list[tuple[int, float]]]:
        """Send row ``r``'s scoring request; the top-k at each position ``start..len(ids)``."""
        ids = self._ids[r]
        prompt = self._prompt_upto(r, len(ids))  # not None: score() kept such rows back

        def parse(reply: Any) -> dict[int, list[tuple[int, float]]]:
            # the whole reply is read inside post(): a malformed one (layout, NaN, an id out of range or
            # named twice, a positive logprob, probabilities above 1) is retried, then the row's failure
            found = self._positions(reply, prompt, self._score_method)
            read = {}
            for j in range(start, len(ids) + 1):
                top = found.get(where[j]) if j in where else None
                if top is not None:
                    read[j] = self._parse(single_position_reply(top))[: self.top_k]
                elif not isinstance(prompt, str):  # token ids: every position is in a well-formed reply
                    raise ValueError(f"the scoring reply holds no distribution after prompt token {j}")
            return read

        read = self.post(body, parse=parse, deadline=deadline)
        out = []
        for j in range(start, len(ids) + 1):
            pairs = read[j] if j in read else self._score_one_position(r, j, deadline)
            if not pairs:
                raise LLMBackendError(f"{self.url}: a scored position held no token of the tokenizer", 200)
            out.append(pairs)
        return out

    def _score_one_position(self, r: int, j: int, deadline: float) -> list[tuple[int, float]]:
        """The top-k after row ``r``'s first ``j`` ids by one plain request (what :meth:`advance`
        sends), for a position the scoring reply did not hold."""
        prompt = self._prompt_upto(r, j)
        if prompt is None:
            raise LLMBackendError(f"{self.url}: a scored position ends inside a UTF-8 character, which the server "
                                  "cannot be asked about (per-step fusion holds such a position back)")
        body = self.payload(prompt)
        self._log_request(body)
        with self._lock:
            self.stats["score_extra_requests"] += 1
        return self._request_row(body, deadline)
