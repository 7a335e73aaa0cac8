"""SLM runners: what :func:`logitfuse.generate` drives on the SLM side, one small interface.

A runner holds the private prompt in the SLM's KV cache and gives the logits of the next position:

``prefill() -> logits (B, V)``
    Evaluate the private prompt; the logits for the first new position.
``append(tokens (B,)) -> logits (B, V)``
    Feed one token per row; the logits for the position after it.
``drop(n)``
    Forget each row's last ``n[r]`` tokens (speculative drafts that were rejected).
``last_hidden``
    The SLM's last hidden state of the latest forward ``(B, d_model)``, where the runner
    :attr:`~SLMRunner.supports_hidden` and :meth:`~SLMRunner.watch_hidden` was called (else ``None``).

Two implementations: :class:`TransformersRunner` (a transformers causal LM, batched, over the same
KV-cache driver as :class:`logitfuse.HFLLM`, :class:`logitfuse.backends.hf.KVCacheDriver`) and
:class:`logitfuse.decoding.llama_cpp.LlamaCppRunner` (llama.cpp, one row). An SLM object that is not a
transformers model makes its own runner through ``open_runner(...)`` (:class:`RunnerSource`), so the
engine needs no import of any SLM library. Nothing a runner holds is ever sent anywhere.

>>> import torch
>>> from logitfuse.decoding.runners import TransformersRunner, SLMRunner
>>> from logitfuse.testing import tiny_llama
>>> runner = TransformersRunner(tiny_llama(50, seed=0), torch.tensor([[0, 5, 6], [7, 8, 9]]),
...                             attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
>>> isinstance(runner, SLMRunner), runner.prefill().shape, runner.append(torch.tensor([3, 4])).shape
(True, torch.Size([2, 50]), torch.Size([2, 50]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from logitfuse.backends.hf import KVCacheDriver
from logitfuse.heads.slm_side import HiddenStateCapture

Tensor = torch.Tensor

__all__ = ["RunnerSource", "SLMRunner", "TransformersRunner", "check_private_ids"]


@runtime_checkable
class SLMRunner(Protocol):
    """The SLM side of :func:`logitfuse.generate` (see the module docstring).

    Attributes:
        batch_size, device, vocab_size: rows, where the logits live, their width.
        ids, mask: the private prompt ``(B, L)`` (left padded) and its attention mask, on :attr:`device`
            (the repetition penalty reads them).
        name: what the runner is, in error messages (``"the llama.cpp SLM"``).
        tokenizer: the SLM's transformers tokenizer when the runner knows it (else ``None``).
        eos_token_ids: the ids that end a row by default (empty: the session's default).
        pad_token_id: fed to rows that have stopped.
        supports_hidden: whether :meth:`watch_hidden` can give :attr:`last_hidden`.
        last_hidden: the SLM's last hidden state of the latest forward, once watched.
    """

    batch_size: int
    device: torch.device
    vocab_size: int
    ids: Tensor
    mask: Tensor
    name: str
    tokenizer: Any
    eos_token_ids: frozenset[int]
    pad_token_id: int
    supports_hidden: bool
    last_hidden: Tensor | None

    def prefill(self) -> Tensor:
        """The logits ``(B, V)`` for the first new position."""

    def append(self, tokens: Tensor) -> Tensor:
        """Feed one token per row ``(B,)``; the logits ``(B, V)`` for the position after it."""

    def drop(self, n: Sequence[int]) -> None:
        """Forget the last ``n[r]`` tokens of each row."""

    def watch_hidden(self, head: Any) -> None:
        """Record the last hidden state of each forward from now on, for ``head`` (checks its size)."""

    def decode(self, ids: Sequence[int]) -> str | None:
        """The text of generated ids without special tokens (``None`` when the runner has no tokenizer)."""

    def close(self) -> None:
        """Release what the runner attached to the model (hooks)."""


@runtime_checkable
class RunnerSource(Protocol):
    """An SLM that makes its own :class:`SLMRunner` (e.g. :class:`logitfuse.LlamaCppSLM`)."""

    def open_runner(self, private_input_ids: Any, *, attention_mask: Any, max_new_tokens: int,
                    pad_token_id: int | None) -> SLMRunner:
        """A runner over ``private_input_ids`` with room for ``max_new_tokens``."""


def check_private_ids(private_input_ids: Any, attention_mask: Any, pad_id: int, vocab: int,
                      device: torch.device) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` ``(B, L)`` on ``device``, left padded, checked: a ``(B, L)`` (or
    ``(L,)``) integer tensor with its mask, or a list of non-empty id lists (left padded here with
    ``pad_id``); ids in ``[0, vocab)``. ``TypeError``/``ValueError`` naming the argument otherwise."""
    if isinstance(private_input_ids, Tensor):
        ids = private_input_ids
        if ids.dim() == 1:
            ids = ids[None]
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
    elif isinstance(private_input_ids, Sequence) and private_input_ids and all(
            isinstance(row, Sequence) and not isinstance(row, str) and row for row in private_input_ids):
        if attention_mask is not None:
            raise ValueError("attention_mask goes with private_input_ids as a tensor; lists of ids are left padded here")
        width = max(len(row) for row in private_input_ids)
        ids = torch.full((len(private_input_ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(private_input_ids):
            ids[r, width - len(row):] = torch.tensor([int(i) for i in row])
            mask[r, width - len(row):] = 1
    else:
        raise TypeError("private_input_ids must be a (batch, length) tensor of SLM token ids, or a list of non-empty "
                        "lists of ids (one per row)")
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"private_input_ids must be a (batch, length) integer tensor, got {tuple(ids.shape)} {ids.dtype}")
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but private_input_ids has {tuple(ids.shape)}")
    mask = mask.long()
    # argument checks, once before decoding (not per step)
    if bool(((mask != 0) & (mask != 1)).any()) or bool((mask.sum(1) == 0).any()):
        raise ValueError("attention_mask must hold 0s and 1s with at least one 1 per row")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("private_input_ids must be left padded (attention_mask 0...0 1...1 per row); "
                         "tokenize with padding_side='left'")
    live = ids[mask.bool()]
    if bool(((live < 0) | (live >= vocab)).any()):
        raise ValueError(f"private_input_ids holds ids outside the SLM's vocabulary [0, {vocab})")
    return ids.long().to(device), mask.to(device)


class TransformersRunner:
    """A transformers causal LM as an :class:`SLMRunner`: its KV cache over left-padded private prompts
    (:class:`~logitfuse.backends.hf.KVCacheDriver`, shared with :class:`logitfuse.HFLLM`), one column
    appended per forward; dropped positions are masked out (and cropped where every row dropped them).
    Positions come from each row's count of live tokens, so every row's logits are those of a plain
    forward over its own tokens.

    Args:
        model: a transformers causal LM (``AutoModelForCausalLM``) in eval mode.
        private_input_ids, attention_mask: as :func:`check_private_ids`.
        pad_token_id: for left padding lists and for rows that stopped; default the model config's, or 0.
        tokenizer: the model's tokenizer, if known (cross-tokenizer decoding needs it).
    """

    name = "the transformers SLM"
    supports_hidden = True
    eos_token_ids: frozenset[int] = frozenset()

    def __init__(self, model: Any, private_input_ids: Any, *, attention_mask: Any = None,
                 pad_token_id: int | None = None, tokenizer: Any = None):
        if not callable(model) or not hasattr(model, "config") or not hasattr(model, "get_output_embeddings"):
            raise TypeError(f"slm must be a transformers causal LM (AutoModelForCausalLM) or a logitfuse.LlamaCppSLM, "
                            f"got {type(model).__name__}")
        if pad_token_id is None:
            pad_token_id = getattr(model.config, "pad_token_id", None)
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else 0
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.device = next(model.parameters()).device
        self.ids, self.mask = check_private_ids(private_input_ids, attention_mask, self.pad_token_id, self.vocab_size,
                                                self.device)
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = self.ids.shape[0]
        self.kv = KVCacheDriver(model)
        self.lengths = self.mask.sum(dim=1)
        self._capture: HiddenStateCapture | None = None

    @property
    def last_hidden(self) -> Tensor | None:
        return None if self._capture is None else self._capture.latest

    def watch_hidden(self, head: Any) -> None:
        if self._capture is None:
            self._capture = HiddenStateCapture.for_head(self.model, head)

    def decode(self, ids: Sequence[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def close(self) -> None:
        if self._capture is not None:
            self._capture.remove()

    def prefill(self) -> Tensor:
        positions = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 0)  # as transformers' generate
        return self.kv.forward(self.ids, self.mask, positions)  # live columns read from the mask, once

    def append(self, tokens: Tensor) -> Tensor:
        logits = self.kv.forward(tokens[:, None], torch.ones_like(self.mask[:, :1]), self.lengths[:, None].clone(),
                                 live=[1] * self.batch_size)
        self.lengths = self.lengths + 1
        return logits

    def drop(self, n: Sequence[int]) -> None:
        if any(n):
            self.kv.drop(n, who="logitfuse.generate")
            self.lengths = self.lengths - torch.tensor(n, device=self.lengths.device)
