"""What a fusion head declares (:class:`FusionHeadProtocol`), and the one refusal of heads whose SLM-side
inputs an engine cannot give (:func:`check_slm_side_inputs`).

Decoding code reads these declarations directly (``head.reads_slm_side``, ``head.gate``...), never
probes a head with ``getattr``: :func:`check_head` checks once, where a head enters a
:class:`logitfuse.FusionSession`, that it declares them all. A head computes its features once per
step from what it is given (an :class:`~logitfuse.types.Aligned` view, or the logits) and never calls
back into :mod:`logitfuse.functional`'s entry points.

>>> import logitfuse
>>> from logitfuse.heads.protocol import FusionHeadProtocol
>>> isinstance(logitfuse.FusionHead(10, 10), FusionHeadProtocol), isinstance(object(), FusionHeadProtocol)
(True, False)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from logitfuse.types import Aligned, FeatureStats, TopK

Tensor = torch.Tensor

__all__ = ["FusionHeadProtocol", "check_head", "check_slm_side_inputs"]


@runtime_checkable
class FusionHeadProtocol(Protocol):
    """A fusion head as the decoding layer uses it (:class:`logitfuse.FusionHead` and
    :class:`logitfuse.PaperFusionHead` follow it).

    Attributes:
        mode, tail: the fusion mode and tail rule it was trained with (the session's defaults).
        v_slm, v_llm: the vocabulary sizes it was trained for.
        needs_aligned_view: its input is the whole ``(batch_size, v_slm)`` pulled-back LLM view (the
            paper's head), rather than per-row statistics a kernel computes without that tensor.
        slm_features: the SLM-side feature groups it reads (``"hidden"``, ``"token"``, ``"position"``).
        reads_slm_side: whether α needs SLM-side inputs (``slm_hidden``, ``last_tokens``, ``positions``).
        needs_slm_hidden: whether it (or its gate) reads the SLM's last hidden state.
        slm_hidden_size: the SLM hidden size the ``"hidden"`` group was trained on (0 without it).
        gate: its call gate (``None``: none; the ``head_gate(tau)`` schedule needs one), read through
            :meth:`call_gain`.
        stats_top_k: without ``needs_aligned_view``, the k of the per-row statistics
            (:class:`~logitfuse.types.FeatureStats`) it reads through :meth:`alpha_from_stats`.

    A fused step computes what the head reads once (the aligned view, or the statistics) and hands it
    over: the head never calls back into :mod:`logitfuse.functional` during the step.
    """

    mode: str
    tail: str
    v_slm: int
    v_llm: int
    needs_aligned_view: bool
    slm_features: Sequence[str]
    reads_slm_side: bool
    needs_slm_hidden: bool
    slm_hidden_size: int
    gate: Any
    stats_top_k: int | None

    def __call__(self, slm_logits: Tensor, llm: Tensor | TopK, vocab_map: Any = None, slm_hidden: Tensor | None = None,
                 *, check_finite: bool = True, **slm_side: Any) -> Tensor:
        """α ``(batch_size,)`` in ``(0, 1)`` from the logits (``ValueError`` where it is not finite, unless
        not ``check_finite``: that check reads the device, and a decode loop makes it from the ids it reads)."""

    def alpha_from_aligned(self, aligned: Aligned, *, check_finite: bool = True, **slm_side: Any) -> Tensor:
        """α ``(batch_size,)`` from an aligned view of the step (computed once, shared with the mix)."""

    def alpha_from_stats(self, stats: FeatureStats, slm_hidden: Tensor | None = None, *, check_finite: bool = True,
                         **slm_side: Any) -> Tensor:
        """α ``(batch_size,)`` from the step's per-row statistics (heads without ``needs_aligned_view``)."""

    def aligned(self, slm_logits: Tensor, llm: Tensor | TopK, vocab_map: Any = None) -> Aligned:
        """The step as this head reads it (temperature 1, its own tail)."""

    def call_gain(self, slm_logits: Tensor, slm_hidden: Tensor | None = None, **slm_side: Any) -> Tensor:
        """What an LLM call is predicted to gain ``(batch_size,)`` (needs :attr:`gate`)."""

    def check_compatible(self, **setting: Any) -> None:
        """``ValueError`` listing how ``setting`` differs from the head's own."""

    def check_vocab_sizes(self, v_slm: int, v_llm: int) -> None:
        """``ValueError`` unless the head was trained for these vocabulary sizes."""


def check_head(head: Any) -> FusionHeadProtocol:
    """``head`` if it declares everything :class:`FusionHeadProtocol` lists; ``TypeError`` naming what
    it lacks otherwise."""
    if not isinstance(head, FusionHeadProtocol):
        missing = sorted(name for name in FusionHeadProtocol.__protocol_attrs__ if not hasattr(head, name)) \
            if hasattr(FusionHeadProtocol, "__protocol_attrs__") else []
        raise TypeError(f"head must be a logitfuse.FusionHead or PaperFusionHead (or follow "
                        f"logitfuse.heads.protocol.FusionHeadProtocol), got {type(head).__name__}"
                        + (f" lacking {', '.join(missing)}" if missing else ""))
    return head


def check_slm_side_inputs(head: Any, *, hidden: bool, side: bool, where: str, fix: str) -> None:
    """The one refusal of a head whose SLM-side inputs an engine cannot give, before anything is sent:
    ``hidden`` says whether ``where`` can give the SLM's last hidden state, ``side`` whether it can give
    the other SLM-side inputs (last token, position). ``ValueError`` naming ``where`` and the ``fix``.
    ``head=None`` (a fixed α) always passes.

    >>> import logitfuse
    >>> head = logitfuse.FusionHead(10, 10, slm_hidden_size=8, slm_features=["hidden"])
    >>> check_slm_side_inputs(head, hidden=False, side=True, where="the llama.cpp SLM", fix="use another head")
    Traceback (most recent call last):
    ...
    ValueError: this head reads the SLM's last hidden state (slm_features ['hidden']), which the llama.cpp SLM does not expose; use another head
    """
    if head is None:
        return
    if not side and head.reads_slm_side:
        raise ValueError(f"{where} cannot give the head its SLM-side features ({list(head.slm_features)}); {fix}")
    if not hidden and head.needs_slm_hidden:
        raise ValueError(f"this head reads the SLM's last hidden state (slm_features {list(head.slm_features)}), which "
                         f"{where} does not expose; {fix}")
