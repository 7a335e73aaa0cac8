"""Teacher-forced scoring: both models' next-token information on the reference responses.

The SLM reads private prompt + response, the LLM reads public prompt + response (and, for the
privacy-violating upper bound only, private prompt + response). Positions are SLM response tokens;
the LLM's information at SLM position ``t`` is its next-token distribution after the same text. With
two tokenizers the response is cut at different places: a position is *aligned* when both
tokenizations have a token boundary at the same byte, and only aligned positions are scored (their
share is reported). With one tokenizer every position is aligned.

Two ways to feed training (``logitfuse train`` caches for its FusionHeads and streams for ``--paper-head``):

- ``cache`` (default): per position, the fusion-head features and the three numbers that give the
  linear-mode loss exactly for any α — ``log p_S(y)``, ``log p_L(y)`` and ``log Σ_i p_L(i)`` over the
  SLM vocabulary (:func:`linear_nll`) — for the dense LLM and for its top-k under each tail rule
  (what a cloud API gives), written to safetensors shards. Training then never runs a model again.
- ``stream``: the models run on every pass and their logits go straight through
  :func:`logitfuse.fused_cross_entropy`; needed for the geometric/logit modes and the paper's head,
  whose input is the full logit vectors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from logitfuse import reference
from logitfuse.fileio import atomic_write
from logitfuse.vocab.retokenize import token_bytes_table
from logitfuse.heads.slm_side import NO_TOKEN, HiddenStateCapture
from logitfuse.types import TopK
from logitfuse.train_fuser.data import Example, render_prompt
from logitfuse.train_fuser.served import ServedScorer
from logitfuse.vocab import VocabMap


@dataclass(frozen=True)
class Variant:
    """How the LLM's information reaches the fusion: dense logits, or its top-k with a tail rule."""

    top_k: int | None
    tail: str

    @property
    def name(self) -> str:
        return "dense" if self.top_k is None else f"top{self.top_k}-{self.tail}"

    def llm_input(self, llm_logits: torch.Tensor | TopK) -> torch.Tensor | TopK:
        if isinstance(llm_logits, TopK):  # a served LLM's top-k (train_fuser/served.py)
            return TopK(llm_logits.ids[:, : self.top_k], llm_logits.logprobs[:, : self.top_k])
        if self.top_k is None:
            return llm_logits
        top = torch.log_softmax(llm_logits.float(), dim=-1).topk(min(self.top_k, llm_logits.shape[-1]), dim=-1)
        return TopK(top.indices, top.values)


def default_variants(top_k: int = 20) -> list[Variant]:
    return [Variant(None, "slm")] + [Variant(top_k, tail) for tail in ("slm", "uniform", "zero")]


@dataclass
class Pair:
    """The two models and everything that ties them together."""

    slm: Any
    slm_tokenizer: Any
    llm: Any
    llm_tokenizer: Any
    vocab_map: VocabMap
    slm_name: str | None = None
    llm_name: str | None = None

    @classmethod
    def build(cls, slm, slm_tokenizer, llm, llm_tokenizer, slm_name=None, llm_name=None) -> Pair:
        v_slm = slm.get_output_embeddings().weight.shape[0]
        v_llm = llm.vocab_size if isinstance(llm, ServedScorer) else llm.get_output_embeddings().weight.shape[0]
        if slm_tokenizer.get_vocab() == llm_tokenizer.get_vocab():
            vmap = VocabMap.identity(v_slm, v_llm, n_shared=min(len(slm_tokenizer), v_slm, v_llm))
        else:
            vmap = VocabMap.from_tokenizers(slm_tokenizer, llm_tokenizer, v_slm=v_slm, v_llm=v_llm)
        return cls(slm, slm_tokenizer, llm, llm_tokenizer, vmap, slm_name, llm_name)


def _byte_starts(tokenizer: Any, ids: list[int], text: str) -> list[int]:
    """Byte offset in ``text`` where each token starts (``-1`` where that is not a clean boundary)."""
    pieces = token_bytes_table(tokenizer)
    starts, offset = [], 0
    for idx in ids:
        starts.append(offset)
        offset += len(pieces[idx])
    joined = b"".join(pieces[idx] for idx in ids)
    target = text.encode()
    if joined == target:
        return starts
    if joined == b" " + target:  # sentencepiece adds a leading space to a text it encodes alone
        return [max(s - 1, 0) if i else 0 for i, s in enumerate(starts)]
    return [0] + [-1] * (len(ids) - 1)  # cannot tell where tokens fall: align only the start


def align_response(slm_tokenizer: Any, llm_tokenizer: Any, response: str) -> tuple[list[int], list[int], torch.Tensor]:
    """Tokenize ``response`` for both models; for each SLM token, the index of the LLM token that
    starts at the same byte (``-1`` when none does)."""
    slm_ids = slm_tokenizer(response, add_special_tokens=False)["input_ids"]
    llm_ids = llm_tokenizer(response, add_special_tokens=False)["input_ids"]
    if slm_tokenizer is llm_tokenizer or slm_ids == llm_ids:
        return slm_ids, llm_ids, torch.arange(len(slm_ids))
    llm_at = {}
    for j, start in enumerate(_byte_starts(llm_tokenizer, llm_ids, response)):
        if start >= 0:
            llm_at.setdefault(start, j)
    index = [llm_at.get(start, -1) if start >= 0 else -1 for start in _byte_starts(slm_tokenizer, slm_ids, response)]
    return slm_ids, llm_ids, torch.tensor(index, dtype=torch.long)


@torch.no_grad()
def next_token_logits(model: Any, prompt_ids: list[int], continuation_ids: list[int]) -> torch.Tensor:
    """``(len(continuation), V)`` float32 logits: row ``t`` predicts ``continuation_ids[t]``."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + continuation_ids], device=device)
    n = len(continuation_ids)
    logits = model(input_ids=ids, logits_to_keep=n + 1).logits[0, :-1]
    return logits.float().cpu()


@torch.no_grad()
def next_token_logits_and_hidden(model: Any, prompt_ids: list[int], continuation_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`next_token_logits` and, from the same forward, the SLM's last hidden state at each of those
    positions ``(len(continuation), d_model)`` float32: the output layer's input, as decoding captures it."""
    with HiddenStateCapture(model, keep_all=True) as capture:
        logits = next_token_logits(model, prompt_ids, continuation_ids)
    return logits, capture.latest[0, :-1].float().cpu()


@dataclass
class Scored:
    """One example's aligned positions: targets and both models' logits (SLM vocabulary for the SLM)."""

    targets: torch.Tensor  # (T,) SLM ids
    slm_logits: torch.Tensor  # (T, V_S)
    llm_logits: torch.Tensor | TopK  # (T, V_L), public prompt; a served LLM's top-k (T, k)
    llm_context_logits: torch.Tensor | None  # (T, V_L), private prompt (upper bound only)
    n_positions: int  # SLM response tokens before alignment
    slm_hidden: torch.Tensor | None = None  # (T, d_model): the SLM's last hidden state at each position
    last_tokens: torch.Tensor | None = None  # (T,) the SLM token before each position (-1 at the first)
    positions: torch.Tensor | None = None  # (T,) each position's index among the SLM response tokens


def score_example(pair: Pair, example: Example, *, llm_with_context: bool = False, max_history: int | None = None) -> Scored:
    """Run both models on one example (teacher forcing) and keep the aligned positions."""
    slm_ids, llm_ids, llm_index = align_response(pair.slm_tokenizer, pair.llm_tokenizer, example.response)
    aligned = llm_index >= 0
    private = example.private_messages(max_history)
    slm_logits, slm_hidden = next_token_logits_and_hidden(pair.slm, render_prompt(pair.slm_tokenizer, private), slm_ids)
    public, rows = render_prompt(pair.llm_tokenizer, example.public_messages()), llm_index[aligned]
    if isinstance(pair.llm, ServedScorer):  # a served LLM: its top-k per position; the public prompt only
        top = pair.llm.score_topk(public, llm_ids)
        llm_info, llm_with_context = TopK(top.ids[rows], top.logprobs[rows]), False
    else:
        llm_info = next_token_logits(pair.llm, public, llm_ids)[rows]
    context = None
    if llm_with_context:
        context = next_token_logits(pair.llm, render_prompt(pair.llm_tokenizer, private), llm_ids)
        context = context[llm_index[aligned]]
    return Scored(
        targets=torch.tensor(slm_ids)[aligned],
        slm_logits=slm_logits[aligned],
        llm_logits=llm_info,
        llm_context_logits=context,
        n_positions=len(slm_ids),
        slm_hidden=slm_hidden[aligned],
        last_tokens=torch.tensor([NO_TOKEN] + slm_ids[:-1], dtype=torch.long)[aligned],
        positions=torch.arange(len(slm_ids))[aligned],
    )


def linear_terms(slm_logits: torch.Tensor, llm: torch.Tensor | TopK, targets: torch.Tensor, vocab_map: VocabMap,
                 tail: str, feature_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (T, F), terms (T, 3))`` with terms ``[log p_S(y), log p_L(y), log Σ_i p_L(i)]``."""
    ones = torch.ones(slm_logits.shape[0])
    lp_slm = reference.slm_logprobs(slm_logits, ones)
    lp_llm, _ = reference.llm_logprobs_on_slm_vocab(
        lp_slm, llm, vocab_map.slm_to_llm, v_llm=vocab_map.v_llm, tail=tail, llm_temperature=ones,
        llm_to_slm=vocab_map.llm_to_slm,
    )
    rows = torch.arange(len(targets))
    terms = torch.stack([lp_slm[rows, targets], lp_llm[rows, targets], lp_llm.logsumexp(dim=-1)], dim=-1)
    return reference.fusion_features(lp_slm, lp_llm, feature_k), terms


def linear_nll(alpha: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """Exact linear-mode ``-log p_fused(y)`` from :func:`linear_terms`, for any α (differentiable).

    ``p_fused(y) = (α p_S(y) + (1-α) p_L(y)) / (α + (1-α) Σ_i p_L(i))``.
    """
    log_ps, log_pl, log_mass = terms.unbind(-1)
    return -reference.log_mixture(alpha, log_ps, log_pl) + reference.log_mixture(alpha, torch.zeros_like(log_mass), log_mass)


# ------------------------------------------------------------------------------ cache shards
def cache_example(pair: Pair, scored: Scored, variants: list[Variant], feature_k: int,
                  slm_hidden: bool = False) -> dict[str, torch.Tensor]:
    """The tensors kept per example in ``cache`` mode; the SLM's hidden states (float16: 2·d_model
    bytes per position) only with ``slm_hidden``."""
    out = {"targets": scored.targets}
    slm_side = {"last_tokens": scored.last_tokens, "positions": scored.positions,
                "slm_hidden": scored.slm_hidden.half() if slm_hidden else None}
    out.update({key: value for key, value in slm_side.items() if value is not None})
    for variant in variants:
        features, terms = linear_terms(scored.slm_logits, variant.llm_input(scored.llm_logits), scored.targets,
                                       pair.vocab_map, variant.tail, feature_k)
        out[f"{variant.name}.features"], out[f"{variant.name}.terms"] = features, terms
    if scored.llm_context_logits is not None:
        _, out["llm_context.terms"] = linear_terms(scored.slm_logits, scored.llm_context_logits, scored.targets,
                                                   pair.vocab_map, "slm", feature_k)
    return out


def write_shard(path: str | os.PathLike, examples: list[dict[str, torch.Tensor]], metadata: dict[str, Any]) -> None:
    """Concatenate per-example tensors (positions along dim 0) into one safetensors shard."""
    keys = examples[0].keys()
    tensors = {key: torch.cat([e[key] for e in examples]).contiguous() for key in keys}
    tensors["example"] = torch.cat([torch.full((len(e["targets"]),), i) for i, e in enumerate(examples)])
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"logitfuse": json.dumps(metadata)}))


def shard_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """One shard's ``{"setting", "tids", "positions"}`` (``{}`` for a file without it), read without its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("logitfuse", "{}"))


def read_shards(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All shards of a cache folder, concatenated; ``example`` ids are renumbered across shards.

    Each shard's metadata is ``{"setting": ..., "tids": [...], "positions": n}``; the result's is the
    common setting, all tids, and the total number of SLM response positions before alignment.
    """
    paths = sorted(Path(directory).glob("shard-*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no shard-*.safetensors in {directory}; run `logitfuse train` (it scores the data first)")
    parts, setting, tids, positions = [], None, [], 0
    for path in paths:
        meta = shard_metadata(path)
        if setting is not None and meta.get("setting") != setting:
            raise ValueError(f"{path} was scored with another setting than the shards before it; delete the cache")
        setting = meta.get("setting")
        shard = load_file(str(path))
        shard["example"] = shard["example"] + len(tids)
        tids += meta.get("tids", [])
        positions += meta.get("positions", 0)
        parts.append(shard)
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}, {"setting": setting, "tids": tids, "positions": positions}
