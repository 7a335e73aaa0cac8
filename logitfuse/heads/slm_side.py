"""What a fusion head or a call gate may read from the SLM alone, besides its distribution.

Three optional feature groups (:data:`SLM_FEATURE_GROUPS`), the ones token-routing work (Co-LLM,
CITER, R2R) reads:

- ``"hidden"``: the SLM's last hidden state at the position, the input of its output layer (after
  the final norm), ``(batch_size, d_model)``, projected down by a small ``Linear`` (d_model -> p);
- ``"token"``: the SLM token generated just before the position (:data:`NO_TOKEN` at the first
  one), hashed into a small learned table (no ``vocabulary x d`` table: the head stays small);
- ``"position"``: the position in the response (0 = the first generated token), as a few scalars.

The hidden state is captured during decoding without a second forward by
:class:`HiddenStateCapture`, a forward pre-hook on the model's output layer
(``model.get_output_embeddings()``). In transformers' Llama/Qwen2 code the decoder applies its final
norm, slices the positions to keep (``logits_to_keep``) and hands the result to ``lm_head``: the
output layer's input is the final norm's output at exactly the positions the logits are for, and
logits processors (which only see ``input_ids`` and scores) cannot get it any other way.

>>> import torch
>>> from logitfuse.heads.slm_side import SLMSideEncoder
>>> encoder = SLMSideEncoder(("hidden", "token", "position"), slm_hidden_size=16)
>>> encoder(2, 'cpu', slm_hidden=torch.randn(2, 16), last_tokens=torch.tensor([-1, 7]), positions=torch.tensor([0, 1])).shape
torch.Size([2, 43])
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from logitfuse import reference

Tensor = torch.Tensor

__all__ = ["NO_TOKEN", "SLM_FEATURE_GROUPS", "CallGate", "HiddenStateCapture", "SLMSideEncoder", "SLMSideRows", "check_slm_hidden",
           "check_feature_groups", "position_features", "slm_distribution_features"]

SLM_FEATURE_GROUPS = ("hidden", "token", "position")
#: ``last_tokens`` entry at the first position (no token generated yet)
NO_TOKEN = -1
TOKEN_DIM = 8
N_POSITION_FEATURES = 3
_POSITION_SCALE = 1024.0
_HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash: spreads neighbouring ids over the buckets
_LOG_FLOOR = -50.0  # as the head's features: a masked token gives a finite feature


def check_feature_groups(value: Any, *, slm_hidden_size: int | None = None, name: str = "slm_features") -> tuple[str, ...]:
    """``value`` (a sequence of group names, or a comma-separated string) as a tuple in canonical order;
    with ``slm_hidden_size``, also that it is given (> 0) exactly when the ``"hidden"`` group is."""
    if value is None:
        value = ()
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a list of group names from {SLM_FEATURE_GROUPS}, got {value!r}")
    unknown = sorted(set(value) - set(SLM_FEATURE_GROUPS))
    if unknown:
        raise ValueError(f"{name}={list(value)!r}: {unknown} not among the SLM-side feature groups "
                         f"{SLM_FEATURE_GROUPS}; pick some of those (or none)")
    groups = tuple(g for g in SLM_FEATURE_GROUPS if g in value)
    if slm_hidden_size is not None and ("hidden" in groups) != (slm_hidden_size > 0):
        raise ValueError(f"{name}={list(groups)} with slm_hidden_size={slm_hidden_size}: the 'hidden' group needs the "
                         "SLM's hidden size (config.hidden_size), and only it does; pass both or neither")
    return groups


def position_features(positions: Tensor) -> Tensor:
    """``(N, 3)`` float32 encodings of response positions ``(N,)``: ``log1p(t) / log1p(1024)``,
    ``min(t, 1024) / 1024`` and whether ``t == 0``."""
    t = positions.float().clamp(min=0)
    return torch.stack([torch.log1p(t) / math.log1p(_POSITION_SCALE), t.clamp(max=_POSITION_SCALE) / _POSITION_SCALE,
                        (t == 0).float()], dim=-1)


def slm_distribution_features(slm_logits: Tensor, k: int) -> Tensor:
    """``(N, 2 + k)`` float32: the SLM's entropy, max log-probability and top-``k`` log-probabilities
    at temperature 1, the SLM half of :func:`logitfuse.reference.fusion_features` (the first
    ``2 + k`` columns of a :class:`~logitfuse.FusionHead`'s features)."""
    stats = reference.row_stats_reference(slm_logits.float(), k)
    top = stats.topk_logprobs.clamp(min=_LOG_FLOOR)
    if top.shape[-1] < k:
        top = nn.functional.pad(top, (0, k - top.shape[-1]), value=_LOG_FLOOR)
    return torch.cat([stats.entropy[:, None], stats.max_logprob.clamp(min=_LOG_FLOOR)[:, None], top], dim=-1)


def _as_row_tensor(name: str, value: Any, batch: int, device: torch.device, fix: str) -> Tensor:
    if value is None:
        raise ValueError(f"this head reads {name} (batch_size,); {fix}")
    value = torch.as_tensor(value, device=device)
    if value.shape != (batch,) or value.is_floating_point():
        raise ValueError(f"{name} must be an integer tensor of shape ({batch},), got {tuple(value.shape)} "
                         f"({value.dtype}); {fix}")
    return value


class SLMSideEncoder(nn.Module):
    """The SLM-side feature groups of a head or gate as one ``(batch_size, width)`` float32 tensor.

    Args:
        groups: some of :data:`SLM_FEATURE_GROUPS`.
        slm_hidden_size: the SLM's ``d_model`` (``config.hidden_size``); needed with ``"hidden"``.
        projection: width ``p`` the hidden state is projected to.
        token_buckets: rows of the hashed token table (``"token"``; row 0 is "no token yet").
    """

    def __init__(self, groups: Sequence[str], *, slm_hidden_size: int = 0, projection: int = 32, token_buckets: int = 4096):
        super().__init__()
        self.groups = check_feature_groups(groups, slm_hidden_size=slm_hidden_size)
        self.slm_hidden_size, self.token_buckets = slm_hidden_size, token_buckets
        self.project_hidden = nn.Linear(slm_hidden_size, projection) if "hidden" in self.groups else None
        self.token_table = nn.Embedding(token_buckets, TOKEN_DIM) if "token" in self.groups else None
        self.width = self.output_width(self.groups, projection)

    @staticmethod
    def output_width(groups: Sequence[str], projection: int) -> int:
        """Columns the encoder gives for these groups."""
        return sum({"hidden": projection, "token": TOKEN_DIM, "position": N_POSITION_FEATURES}[g] for g in groups)

    @staticmethod
    def n_parameters(groups: Sequence[str], slm_hidden_size: int, projection: int, token_buckets: int) -> int:
        """How many parameters an encoder of these sizes has (checked before anything is allocated)."""
        return ((slm_hidden_size + 1) * projection if "hidden" in groups else 0) + (
            token_buckets * TOKEN_DIM if "token" in groups else 0)

    def forward(self, batch: int, device: torch.device, *, slm_hidden: Tensor | None = None, last_tokens: Any = None,
                positions: Any = None) -> Tensor:
        """``(batch, width)`` float32 on ``device``; a ``ValueError`` names a missing or misshapen input."""
        parts = []
        if self.project_hidden is not None:
            expected = (batch, self.slm_hidden_size)
            if slm_hidden is None:
                raise ValueError(
                    f"this head reads the SLM's last hidden state (slm_features includes 'hidden'): pass slm_hidden= "
                    f"{expected}, the input of the SLM's output layer at this position (logitfuse.heads.slm_side."
                    "HiddenStateCapture; CoGenesisLogitsProcessor(..., slm=model) captures it for you)")
            if tuple(slm_hidden.shape) != expected:
                raise ValueError(
                    f"slm_hidden has shape {tuple(slm_hidden.shape)}, expected {expected}: this head was trained on "
                    f"an SLM with hidden size {self.slm_hidden_size} (slm_hidden_size); use that SLM, or train a head "
                    "for this one")
            parts.append(self.project_hidden(slm_hidden.to(self.project_hidden.weight.dtype)))
        if self.token_table is not None:
            tokens = _as_row_tensor("last_tokens", last_tokens, batch, device,
                                    "pass the SLM token generated just before each row's position (-1 at the first)")
            parts.append(self.token_table(self.bucket(tokens)))
        if "position" in self.groups:
            pos = _as_row_tensor("positions", positions, batch, device,
                                 "pass each row's position in the response (0 = the first generated token)")
            parts.append(position_features(pos))
        return torch.cat(parts, dim=-1) if parts else torch.zeros(batch, 0, device=device)

    def bucket(self, tokens: Tensor) -> Tensor:
        """Row of the token table: 0 for :data:`NO_TOKEN` (or any negative id), else a hash in [1, buckets)."""
        hashed = (tokens.long().clamp(min=0) * _HASH_MULTIPLIER) % max(self.token_buckets - 1, 1) + 1
        return torch.where(tokens < 0, 0, hashed)


class CallGate(nn.Module):
    """Predicts, before the LLM is called, what the call will gain at this position: the expected
    drop in NLL (nats) of the fused distribution below the SLM's alone. Reads SLM-side signals only:
    the SLM's entropy, max and top-k log-probabilities (:func:`slm_distribution_features`), and the
    feature groups of its own :class:`SLMSideEncoder`. A small MLP; its output is unbounded."""

    def __init__(self, groups: Sequence[str], *, top_k: int, width: int, slm_hidden_size: int = 0,
                 projection: int = 32, token_buckets: int = 4096):
        super().__init__()
        self.top_k = top_k
        self.encoder = SLMSideEncoder(groups, slm_hidden_size=slm_hidden_size, projection=projection,
                                      token_buckets=token_buckets)
        inputs = 2 + top_k + self.encoder.width
        self.mlp = nn.Sequential(nn.Linear(inputs, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    @staticmethod
    def n_parameters(groups: Sequence[str], *, top_k: int, width: int, slm_hidden_size: int, projection: int,
                     token_buckets: int) -> int:
        encoder = SLMSideEncoder.n_parameters(groups, slm_hidden_size, projection, token_buckets)
        inputs = 2 + top_k + SLMSideEncoder.output_width(groups, projection)
        return encoder + inputs * width + width * width + 3 * width + 1

    def forward(self, slm_features: Tensor, **slm_side: Any) -> Tensor:
        """Predicted gain ``(batch_size,)`` from the SLM's distribution features ``(batch_size, 2 + k)``
        and the encoder's inputs (``slm_hidden``, ``last_tokens``, ``positions``)."""
        encoded = self.encoder(slm_features.shape[0], slm_features.device, **slm_side)
        x = torch.cat([slm_features.float() / 10.0, encoded], dim=-1)
        return self.mlp(x).squeeze(-1)


class HiddenStateCapture:
    """Keeps the SLM's last hidden state from its own forward passes: a forward pre-hook on the
    model's output layer records the layer's input at the last position, ``(batch_size, d_model)``,
    in :attr:`latest` (detached; :attr:`forwards` counts the passes). With ``keep_all=True`` it
    keeps every position instead, ``(batch_size, positions, d_model)`` (teacher-forced scoring).

    Use as a context manager, or call :meth:`remove` when done.
    """

    def __init__(self, model: Any, *, keep_all: bool = False):
        get_output = getattr(model, "get_output_embeddings", None)
        layer = get_output() if callable(get_output) else None
        if not isinstance(layer, nn.Module):
            raise TypeError(f"slm must be a transformers causal LM with an output layer (get_output_embeddings()), got "
                            f"{type(model).__name__}")
        self.hidden_size = operator.index(getattr(layer, "in_features", None) or layer.weight.shape[1])
        self.keep_all = keep_all
        self.latest: Tensor | None = None
        self.forwards = 0
        self._handle = layer.register_forward_pre_hook(self._record)

    @classmethod
    def for_head(cls, model: Any, head: Any) -> HiddenStateCapture:
        """A capture on ``model`` for ``head`` (one that reads the hidden state): ``ValueError``, with no
        hook left behind, when the model's hidden size is not the head's ``slm_hidden_size``."""
        capture = cls(model)
        if capture.hidden_size != head.slm_hidden_size:
            capture.remove()
            raise ValueError(f"slm has hidden size {capture.hidden_size} but the head was trained on an SLM with "
                             f"slm_hidden_size={head.slm_hidden_size}; use that SLM, or train a head for this one")
        return capture

    def _record(self, module: nn.Module, args: tuple) -> None:
        hidden = args[0].detach()
        self.latest = hidden if self.keep_all else hidden[:, -1]
        self.forwards += 1

    def remove(self) -> None:
        """Detach the hook from the model (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> HiddenStateCapture:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def check_slm_hidden(head: Any, slm_hidden: Tensor | None) -> None:
    """``ValueError`` when ``head`` reads the SLM's last hidden state and ``slm_hidden`` is ``None``:
    raised before a decoding step sends anything."""
    if slm_hidden is None and head is not None and head.needs_slm_hidden:
        raise ValueError(
            f"this head reads the SLM's last hidden state (slm_features {head.slm_features}): pass slm_hidden= "
            f"(batch_size, {head.slm_hidden_size}) to FusionSession.step/complete, the input of the SLM's output layer "
            "(HiddenStateCapture); CoGenesisLogitsProcessor(..., slm=model) captures it for you")


class SLMSideRows:
    """Per-row bookkeeping of a fused generation for SLM-side features: the SLM token each row
    generated last (:data:`NO_TOKEN` before the first) and the position being decided."""

    def __init__(self, batch_size: int = 0):
        self.last_tokens = [NO_TOKEN] * batch_size

    def reorder(self, rows: Sequence[int]) -> None:
        """Row ``r`` continues former row ``rows[r]`` (beam search)."""
        self.last_tokens = [self.last_tokens[s] for s in rows]

    def inputs(self, appended: Sequence[Sequence[int]], position: int,
               device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """``last_tokens`` and ``positions`` ``(batch_size,)`` of the position after ``appended``
        (the tokens each row kept since the previous step), as a head reads them."""
        return self._as_inputs(self._last_after(appended), position, device)

    def advance(self, appended: Sequence[Sequence[int]], position: int, *, inputs: bool = True) -> dict[str, Tensor] | None:
        """Remember each row's last token, and return :meth:`inputs` (on the CPU) when ``inputs``."""
        self.last_tokens = self._last_after(appended)
        return self._as_inputs(self.last_tokens, position, "cpu") if inputs else None

    def _last_after(self, appended: Sequence[Sequence[int]]) -> list[int]:
        return [int(a[-1]) if len(a) else last for a, last in zip(appended, self.last_tokens)]

    @staticmethod
    def _as_inputs(tokens: list[int], position: int, device: torch.device | str) -> dict[str, Tensor]:
        return dict(last_tokens=torch.tensor(tokens, device=device),
                    positions=torch.full((len(tokens),), position, device=device))
