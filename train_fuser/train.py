"""Fit fusion heads by minimizing the NLL of reference responses under the fused distribution.

Two loops share one recipe (AdamW, early stopping on held-out dev examples, a fixed seed):

- :func:`fit_cached` trains a :class:`~logitfuse.FusionHead` in linear mode on cached features and
  loss terms (:mod:`.scoring`), and the SLM-side inputs its groups read: seconds on a CPU, however
  large the models were; :func:`fit_gate` then trains the head's call gate on the same cache;
- :func:`fit_streaming` runs both models on every pass and trains any head (the paper's too, or
  another mode) through :func:`logitfuse.fused_cross_entropy`;
- :func:`fit_mixture` trains an N-weight :class:`~logitfuse.heads.mixture.MixtureHead` on cached
  features and each input's ``log p_i(y)`` (:mod:`.rules_eval`).

Both work unchanged under ``torchrun``: with ``torch.distributed`` initialized, each rank takes every
``world_size``-th training example and the head is wrapped in DistributedDataParallel.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

import logitfuse
from logitfuse.heads import BaseFusionHead, FusionHead
from logitfuse.heads.mixture import MixtureHead
from logitfuse.train_fuser.data import Example
from logitfuse.train_fuser.scoring import Pair, Variant, linear_nll, score_example


@dataclass
class TrainConfig:
    lr: float = 3e-3
    weight_decay: float = 0.01
    max_epochs: int = 300
    patience: int = 20
    batch_size: int = 2048
    val_fraction: float = 0.2
    seed: int = 0


@dataclass
class FitResult:
    head: BaseFusionHead | MixtureHead
    train_nll: list[float] = field(default_factory=list)
    val_nll: list[float] = field(default_factory=list)
    best_epoch: int = 0


def split_examples(n_examples: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split of example indices into (train, validation); at least one of each when n ≥ 2."""
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed))
    n_val = min(max(1, round(n_examples * val_fraction)), n_examples - 1) if n_examples > 1 else 0
    return order[n_val:], order[:n_val]


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _wrap(module: torch.nn.Module) -> torch.nn.Module:
    _, world = _distributed()
    return torch.nn.parallel.DistributedDataParallel(module) if world > 1 else module


class _FromFeatures(torch.nn.Module):
    """``head.alpha_from_features`` (or, ``gate=True``, the gate's predicted gain from the SLM's
    columns) as a module's forward, so DDP can wrap it."""

    def __init__(self, head: FusionHead, gate: bool = False):
        super().__init__()
        self.head, self.gate = head, gate

    def forward(self, features: torch.Tensor, **slm_side: torch.Tensor) -> torch.Tensor:
        if self.gate:
            return self.head.gain_from_slm_features(features[:, : 2 + self.head.top_k], **slm_side)
        return self.head.alpha_from_features(features, **slm_side)


#: cache key of each SLM-side input, by the feature group that reads it
SLM_SIDE_KEYS = {"hidden": "slm_hidden", "token": "last_tokens", "position": "positions"}


def slm_side_inputs(cache: dict[str, torch.Tensor], head: FusionHead) -> dict[str, torch.Tensor]:
    """The cached SLM-side inputs ``head`` reads (keyword arguments of ``alpha_from_features``);
    ``ValueError`` when the cache lacks one (scored without hidden states: score it again)."""
    keys = [SLM_SIDE_KEYS[group] for group in head.slm_features]
    missing = [key for key in keys if key not in cache]
    if missing:
        raise ValueError(f"the scoring cache lacks {missing}, which this head reads (slm_features {head.slm_features}); "
                         "score the data again with them (logitfuse train/eval rescore when --slm-features asks)")
    return {key: cache[key] for key in keys}


def _rows(slm_side: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {key: value[rows] for key, value in slm_side.items()}


def _fit(head: BaseFusionHead, config: TrainConfig, train_epoch: Callable[[int], float],
         validate: Callable[[], float | None], desc: str, progress: bool) -> FitResult:
    """Epochs of ``train_epoch`` (returns the mean training NLL) with early stopping on
    ``validate()`` (``None``: no validation data, the training NLL stands in); keeps the best state."""
    result, best, best_state, stale = FitResult(head), float("inf"), copy.deepcopy(head.state_dict()), 0
    bar = tqdm(range(config.max_epochs), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        head.train()
        result.train_nll.append(train_epoch(epoch))
        head.eval()
        with torch.no_grad():
            val = validate()
        val = result.train_nll[-1] if val is None else val
        result.val_nll.append(val)
        bar.set_postfix(train=f"{result.train_nll[-1]:.4f}", val=f"{val:.4f}")
        if val < best - 1e-5:
            best, best_state, stale, result.best_epoch = val, copy.deepcopy(head.state_dict()), 0, epoch
        else:
            stale += 1
            if stale >= config.patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    return result


def fit_cached(head: FusionHead, features: torch.Tensor, terms: torch.Tensor, example: torch.Tensor,
               config: TrainConfig | None = None, progress: bool = True,
               slm_side: dict[str, torch.Tensor] | None = None) -> FitResult:
    """Train ``head`` (linear mode) on cached ``features`` ``(N, F)`` and ``terms`` ``(N, 3)``;
    ``example`` ``(N,)`` says which example each position belongs to (for the validation split);
    ``slm_side``: the SLM-side inputs the head reads (:func:`slm_side_inputs`), ``(N, ...)`` each."""
    config = config or TrainConfig()
    if head.mode != "linear":
        raise ValueError(f"cached training computes the linear-mode loss; this head has mode={head.mode!r} (train it with fit_streaming)")
    model = _FromFeatures(head)
    return _fit_on_positions(head, model, head.parameters(), features, terms, example, config, slm_side or {},
                             loss=lambda out, t: linear_nll(out, t), desc=f"fit {head.tail}", progress=progress)


def fit_gate(head: FusionHead, features: torch.Tensor, terms: torch.Tensor, example: torch.Tensor,
             config: TrainConfig | None = None, progress: bool = True,
             slm_side: dict[str, torch.Tensor] | None = None) -> FitResult:
    """Train ``head``'s call gate (after the head) on the same cache: its target at each position is
    what fusing with the head's α gains over the SLM alone, ``NLL(α = 1) - NLL(α_head)`` (nats;
    negative where fusing hurts), fit by squared error, so that the gate predicts the expected gain
    from SLM-side signals. Only the gate's weights change."""
    config = config or TrainConfig()
    if head.gate is None:
        raise ValueError("fit_gate: this head has no call gate (gate_hidden=0); build it with gate_hidden=32")
    with torch.no_grad():
        alpha = torch.cat([head.alpha_from_features(features[i : i + 65536], **_rows(slm_side or {}, slice(i, i + 65536)))
                           for i in range(0, len(features), 65536)])
        gain = linear_nll(torch.ones_like(alpha), terms) - linear_nll(alpha, terms)
    model = _FromFeatures(head, gate=True)
    return _fit_on_positions(head, model, head.gate.parameters(), features, gain, example, config, slm_side or {},
                             loss=lambda out, target: (out - target) ** 2, desc=f"gate {head.tail}", progress=progress)


def _fit_on_positions(head: FusionHead, module: torch.nn.Module, parameters: Any, features: torch.Tensor,
                      targets: torch.Tensor, example: torch.Tensor, config: TrainConfig,
                      slm_side: dict[str, torch.Tensor], *, loss: Callable, desc: str, progress: bool) -> FitResult:
    """Minibatch AdamW on cached positions (what :func:`fit_cached` and :func:`fit_gate` share): the
    mean of ``loss(module(features, **slm_side), targets)``, early stopping on held-out examples."""
    torch.manual_seed(config.seed)
    rank, world = _distributed()
    train_ids, val_ids = split_examples(int(example.max()) + 1, config.val_fraction, config.seed)
    in_train = torch.isin(example, train_ids[rank::world])
    in_val = torch.isin(example, val_ids)
    model = _wrap(module)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    x_train, t_train, side_train = features[in_train], targets[in_train], _rows(slm_side, in_train)

    def train_epoch(epoch: int) -> float:
        order = torch.randperm(len(x_train), generator=generator)
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            value = loss(model(x_train[batch], **_rows(side_train, batch)), t_train[batch]).mean()
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            total += value.item() * len(batch)
        return total / max(len(order), 1)

    def validate() -> float | None:
        if not in_val.any():
            return None
        return loss(module(features[in_val], **_rows(slm_side, in_val)), targets[in_val]).mean().item()

    return _fit(head, config, train_epoch, validate, desc, progress)


class _MixtureLogWeights(torch.nn.Module):
    """A mixture head's log-weights ``(B, N)`` from cached features, as a module's forward (for DDP)."""

    def __init__(self, head: MixtureHead):
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.head.logits_from_features(features), dim=-1)


def mixture_head_nll(log_weights: torch.Tensor, input_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-position ``-log Σ_i w_i p_i(y)`` from log-weights ``(T, N)`` and each input's ``log p_i(y)`` ``(T, N)``
    (the inputs normalized on one vocabulary, so the mixture needs no renormalization).

    >>> w = torch.tensor([[0.5, 0.5]]).log(); lp = torch.tensor([[0.2, 0.4]]).log()
    >>> round(mixture_head_nll(w, lp).exp().item(), 4)  # 1 / 0.3
    3.3333
    """
    return -torch.logsumexp(log_weights + input_logprobs, dim=-1)


def fit_mixture(head: MixtureHead, features: torch.Tensor, input_logprobs: torch.Tensor, example: torch.Tensor,
                config: TrainConfig | None = None, progress: bool = True) -> FitResult:
    """Train ``head`` on cached ``features`` ``(T, F)`` (:func:`logitfuse.heads.mixture.mixture_features`)
    and ``input_logprobs`` ``(T, N)``, each input's ``log p_i(y)`` at the reference token, minimizing the
    mixture's NLL (:func:`mixture_head_nll`); early stopping on held-out examples as :func:`fit_cached`.
    The features are standardized by their mean and deviation over these positions first."""
    config = config or TrainConfig()
    if input_logprobs.shape[-1] != head.n_inputs:
        raise ValueError(f"input_logprobs has {input_logprobs.shape[-1]} columns for a head of {head.n_inputs} inputs "
                         f"{head.input_names}; give one column per input, in the head's order")
    head.set_feature_scale(features)
    return _fit_on_positions(head, _MixtureLogWeights(head), head.parameters(), features, input_logprobs.float(), example,
                             config, {}, loss=mixture_head_nll, desc="fit mixture", progress=progress)


def fit_streaming(head: BaseFusionHead, pair: Pair, examples: list[Example], variant: Variant,
                  config: TrainConfig | None = None, progress: bool = True, max_history: int | None = None) -> FitResult:
    """Train any head through :func:`logitfuse.fused_cross_entropy`, running both models each epoch
    (one example per step; no logits are cached)."""
    config = config or TrainConfig()
    torch.manual_seed(config.seed)
    rank, world = _distributed()
    train_ids, val_ids = split_examples(len(examples), config.val_fraction, config.seed)
    model = _wrap(head)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def nll(index: int) -> torch.Tensor:
        scored = score_example(pair, examples[index], max_history=max_history)
        llm = variant.llm_input(scored.llm_logits)
        alpha = model(scored.slm_logits, llm, pair.vocab_map)
        return logitfuse.fused_cross_entropy(scored.slm_logits, llm, scored.targets, alpha=alpha,
                                             vocab_map=pair.vocab_map, mode=head.mode, tail=head.tail)

    def train_epoch(epoch: int) -> float:
        losses = []
        for index in tqdm(train_ids[rank::world].tolist(), desc=f"epoch {epoch}", disable=not progress, leave=False):
            loss = nll(index)
            optimizer.zero_grad()
            loss.mean().backward()
            optimizer.step()
            losses.append(loss.detach())
        return torch.cat(losses).mean().item()

    def validate() -> float | None:
        return torch.cat([nll(i) for i in val_ids.tolist()]).mean().item() if len(val_ids) else None

    return _fit(head, config, train_epoch, validate, "fit (streaming)", progress)
