"""The LLM backend interface: the cloud side of fused decoding.

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
``score(new_tokens, need=None) -> LLMOutput`` (optional, ``supports_score``)
    Like ``advance``, but the next-token information at every appended position, in one call:
    speculative fusion scores a whole SLM draft at once (:func:`logitfuse.generate`).
``reorder(order)``
    Row ``r`` becomes a copy of former row ``order[r]`` (beam search).
``reset()``, ``audit_log``, ``tokenizer``, ``vocab_size``.
``output_kind``
    ``"dense"`` or ``"topk"``: what ``advance(...).next`` holds, declared by each backend class.

Privacy: a backend only ever receives what the processor gives it, the public prompt and the
generated tokens. ``audit_log`` records every payload exactly as sent (for :class:`HFLLM` the
token-id lists fed to the model; for :class:`OpenAICompatibleLLM` the JSON request bodies), so a
test or an auditor can check that nothing private left the device. Error messages carry only the
URL, status and the server's reply, never the request.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any
from collections.abc import Sequence

import torch

from logitfuse.types import TopK

Tensor = torch.Tensor

__all__ = ["OUTPUT_KINDS", "LLMBackend", "LLMBackendError", "LLMOutput", "check_prompts"]


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


@dataclass
class LLMOutput:
    """Next-token information for every row.

    Attributes:
        next: dense logits ``(batch_size, vocab_size)`` float32, or ``TopK(ids, logprobs)`` with
            ``(batch_size, k)`` tensors.
        ok: ``(batch_size,)`` bool: rows whose information is valid. False where the row was not
            asked for (``need``) or its request failed under ``on_failure="fallback"``; those rows
            hold placeholder values that must not be used.
        ok_rows: ``ok`` as host booleans, where the backend knows them without reading a tensor (so
            the session does not read ``ok`` back from the device); ``None``: read ``ok``.
    """

    next: Tensor | TopK
    ok: Tensor
    ok_rows: list[bool] | None = None


def check_prompts(public_prompts: Any) -> list[str | list[int]]:
    """``public_prompts`` checked: one str or one list of int token ids per row (tensors become lists)."""
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


#: what ``LLMBackend.advance(...).next`` holds: dense logits over the whole vocabulary, or the top-k
OUTPUT_KINDS = ("dense", "topk")


class LLMBackend(abc.ABC):
    """Base class of LLM backends; see the module docstring for the interface.

    A subclass declares what its :meth:`advance` returns in the class attribute ``output_kind``:
    ``"dense"`` (``LLMOutput.next`` is ``(batch_size, vocab_size)`` logits, e.g. :class:`HFLLM`) or
    ``"topk"`` (a :class:`logitfuse.TopK` of log-probabilities, e.g. :class:`OpenAICompatibleLLM`).
    Callers read it instead of testing the backend's class (a temperature on the LLM's logits, for
    one, needs them dense). A subclass that does not declare it cannot be instantiated.
    """

    tokenizer: Any = None
    vocab_size: int
    add_special_tokens: bool = True

    def __init__(self) -> None:
        if self.output_kind not in OUTPUT_KINDS:
            raise TypeError(f"{type(self).__name__}.output_kind={self.output_kind!r} must be one of {OUTPUT_KINDS}")
        self.audit_log: list[Any] = []

    @property
    @abc.abstractmethod
    def output_kind(self) -> str:
        """``"dense"`` or ``"topk"``: what ``advance(...).next`` holds (a subclass sets a class attribute)."""

    @abc.abstractmethod
    def start(self, public_prompts: list[str] | list[list[int]]) -> None:
        """Start one row per public prompt (text, or LLM token ids); forgets earlier rows."""

    @abc.abstractmethod
    def advance(self, new_tokens: list[list[int]], need: list[bool] | None = None) -> LLMOutput:
        """Append each row's new LLM token ids; the next-token information of the rows in ``need``."""

    @abc.abstractmethod
    def rollback(self, n: list[int]) -> None:
        """Drop the last ``n[r]`` tokens of row ``r``."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget the rows (the audit log is kept)."""

    @property
    @abc.abstractmethod
    def batch_size(self) -> int:
        """The number of rows (0 before :meth:`start`)."""

    #: whether :meth:`score` is implemented (speculative fusion needs it)
    supports_score: bool = False

    def score(self, new_tokens: list[list[int]], need: list[bool] | None = None) -> LLMOutput:
        """Append each row's new tokens and return the next-token information at every appended
        position (speculative fusion: one call scores a whole draft). ``next`` is ``(B, 1 + W, ...)``,
        ``W`` the most new tokens of a row, each row's positions right-aligned (see
        :meth:`logitfuse.HFLLM.score`). Backends that cannot set :attr:`supports_score` False."""
        raise NotImplementedError(f"{type(self).__name__} cannot score several positions in one call")

    def reorder(self, order: list[int]) -> None:
        """Make row ``r`` a copy of former row ``order[r]`` (beam search reordering its beams)."""
        raise NotImplementedError(f"{type(self).__name__} cannot follow beam reordering")

    # checks shared by the backends
    def encode_prompts(self, public_prompts: Any) -> list[list[int]]:
        """The public prompts as LLM token ids (text encoded with :attr:`tokenizer`), checked:
        one non-empty row per prompt, every id inside the vocabulary."""
        rows = []
        for row, prompt in enumerate(check_prompts(public_prompts)):
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

    def check_new_tokens(self, new_tokens: Any, need: Any) -> tuple[list[list[int]], list[bool]]:
        """:meth:`advance`'s arguments checked against the rows: ``(new_tokens as int lists, need as
        one bool per row)`` (``need=None``: every row)."""
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
            if self.output_kind == "topk":
                token = int(step.next.ids[0, int(step.next.logprobs[0].argmax())])
            else:
                token = int(step.next[0].argmax())
            if token in stop_ids:
                break
            out.append(token)
            new = [token]
        self.reset()
        return out
