"""Fusion rules measured on real models: teacher-forced NLL of the CoGenesis references under N-input rules.

Each example is scored once per input (a model and a prompt: ``private`` = profile, history and task;
``public`` = the task title only), with teacher forcing on the reference response. Every input is put
on one **pivot vocabulary**, the first input's: an input with another tokenizer is pulled onto it as
the two-model fusion does (:func:`logitfuse.reference.llm_logprobs_on_slm_vocab`, each of its tokens
handing its probability to the pivot token it starts with; the mass of its tokens without a pivot
counterpart spread over the pivot tokens without one in proportion to ``tail_from``'s distribution, an
input on the pivot vocabulary with the same prompt, so a public input never depends on the private
prompt), then renormalized. Only the response positions where every tokenization has a boundary at
the same byte are scored (as :mod:`.scoring` does for two models).

What is kept per position (so that choosing parameters never runs a model again):

- ``lp.NAME``: ``log p_NAME(y)`` of each input at the reference token: any mixture ``log Σ w_i p_i(y)``
  of normalized inputs follows exactly, for every weight vector (:func:`mixture_nll`);
- ``features``: :func:`logitfuse.heads.mixture.mixture_features` of the mixture's inputs (what a
  :class:`~logitfuse.heads.mixture.MixtureHead` reads);
- ``grid.NAME`` ``(T, G)``: ``log p(y)`` under a log-linear rule at each value of its parameter grid
  (:class:`Grid`), computed by :func:`logitfuse.rules.combine.combine` on the full distributions, the
  same function decoding uses. Under a plausibility cut a reference token outside the kept set has
  ``-inf`` (NLL +inf); :func:`cut_rows` reports the NLL over the positions the cut keeps and its coverage.

:func:`run_study` scores the dev and test examples into a cache (one file per example, reused when the
setting matches), chooses each rule's parameters on dev, and writes the table (``results.md`` and
``results.json``) on test with paired differences against each row's baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from logitfuse import reference
from logitfuse.fileio import atomic_write, atomic_write_text
from logitfuse.heads.mixture import mixture_features
from logitfuse.train_fuser.data import Example, bundled_split, load_examples, render_prompt
from logitfuse.train_fuser.evaluate import paired_difference
from logitfuse.train_fuser.scoring import align_response, next_token_logits
from logitfuse.vocab import VocabMap

PROMPTS = ("private", "public")


@dataclass(frozen=True)
class RuleInput:
    """One input of a rule: a model (zoo name or folder) reading the ``private`` or the ``public`` prompt.

    ``tail_from``: for a model on another tokenizer than the pivot's, the pivot input whose distribution
    shapes the mass of this model's tokens that have no pivot counterpart (same prompt side, so that a
    public input stays public); ``None`` for inputs on the pivot tokenizer.
    """

    name: str
    model: str
    prompt: str
    tail_from: str | None = None

    def __post_init__(self):
        if self.prompt not in PROMPTS:
            raise ValueError(f"RuleInput {self.name!r}: prompt must be one of {PROMPTS}; got {self.prompt!r}")


@dataclass(frozen=True)
class Grid:
    """A log-linear rule over a parameter grid: ``kind`` ``"arithmetic"`` has coefficients ``(1, β, -β)``
    over its three inputs (base, expert, anti-expert), ``"contrastive"`` ``(1, -λ)`` over (expert,
    amateur); ``plausibility`` τ cuts the first input's tokens below τ·max p (``None``: no cut)."""

    name: str
    kind: str
    inputs: tuple[str, ...]
    values: tuple[float, ...]
    plausibility: float | None = None

    def coef(self, value: float) -> tuple[float, ...]:
        if self.kind == "arithmetic":
            return (1.0, value, -value)
        if self.kind == "contrastive":
            return (1.0, -value)
        raise ValueError(f"Grid {self.name!r}: kind must be 'arithmetic' or 'contrastive'; got {self.kind!r}")


@dataclass(frozen=True)
class Study:
    """What :func:`run_study` scores: the inputs (the first one's tokenizer is the pivot), the inputs of the
    mixture rows and head features, and the log-linear grids."""

    inputs: tuple[RuleInput, ...]
    mixture: tuple[str, ...]
    grids: tuple[Grid, ...] = ()
    feature_k: int = 4
    max_history: int | None = 1
    rules: tuple[Any, ...] = ()  # logitfuse.rules rules with fixed coefficients: log p(y) kept as ``rule.SPEC``

    def input(self, name: str) -> RuleInput:
        return next(i for i in self.inputs if i.name == name)

    @property
    def setting(self) -> dict[str, Any]:
        setting = {"inputs": [asdict(i) for i in self.inputs], "mixture": list(self.mixture),
                   "grids": [asdict(g) for g in self.grids], "feature_k": self.feature_k, "max_history": self.max_history}
        return dict(setting, rules=[str(r) for r in self.rules]) if self.rules else setting


BETAS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0)
LAMBDAS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
SLM, BASE_SLM, LLM, SMALL_LLM = "smollm2-135m-cogenesis", "smollm2-135m", "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"

#: issue 25's study: the tuned SLM with the context; it, the untuned SLM and both Qwen models on the public prompt
ISSUE25 = Study(
    inputs=(
        RuleInput("slm", SLM, "private"),
        RuleInput("slm_public", SLM, "public"),
        RuleInput("base_public", BASE_SLM, "public", tail_from="slm_public"),  # tail_from: as `--input` gives it
        RuleInput("llm", LLM, "public", tail_from="slm_public"),
        RuleInput("small", SMALL_LLM, "public", tail_from="slm_public"),
        RuleInput("llm_shipped", LLM, "public", tail_from="slm"),  # today's 2-way mix: tail shaped by the private SLM
    ),
    mixture=("slm", "llm", "small"),
    grids=(
        Grid("steer", "arithmetic", ("llm", "slm", "slm_public"), BETAS),  # context steering
        Grid("proxy", "arithmetic", ("llm", "slm_public", "base_public"), BETAS),  # proxy-tuning, public prompts only
        Grid("cd", "contrastive", ("llm", "small"), LAMBDAS),  # contrastive decoding without the cut
        Grid("cd-tau0.1", "contrastive", ("llm", "small"), LAMBDAS, plausibility=0.1),  # Li et al.'s τ
    ),
)


# ------------------------------------------------------------------------------------ scoring
class Vocabularies:
    """The study's tokenizers (``tokenizer_of(model) -> (tokenizer, vocab_size)``) and the vocabulary map
    from the pivot's vocabulary to each model on another tokenizer (``None`` for the pivot's)."""

    def __init__(self, study: Study, tokenizer_of: Callable[[str], tuple[Any, int]]):
        self.study = study
        self.tokenizers = {name: tokenizer_of(name) for name in dict.fromkeys(i.model for i in study.inputs)}
        pivot_tok, self.v_pivot = self.tokenizers[study.inputs[0].model]
        pivot_vocab = pivot_tok.get_vocab()
        self.maps: dict[str, VocabMap | None] = {}
        for name, (tokenizer, v) in self.tokenizers.items():
            same = tokenizer.get_vocab() == pivot_vocab
            self.maps[name] = None if same else VocabMap.from_tokenizers(pivot_tok, tokenizer, v_slm=self.v_pivot, v_llm=v)
        names = {i.name: i for i in study.inputs}
        for item in study.inputs:
            if self.maps[item.model] is None:
                continue
            shaper = names.get(item.tail_from)
            if shaper is None or self.maps[shaper.model] is not None:
                raise ValueError(f"input {item.name!r} ({item.model}) is on another tokenizer than the pivot's: its "
                                 f"tail_from={item.tail_from!r} must name an input on the pivot's tokenizer (one over "
                                 f"the same prompt, {item.prompt}, keeps a public input public)")

    def tokenizer(self, model: str) -> Any:
        return self.tokenizers[model][0]

    def align(self, example: Example) -> tuple[dict[str, list[int]], dict[str, torch.Tensor], torch.Tensor]:
        """``(ids, rows, targets)``: each model's response ids, the row of its next-token logits at each scored
        position, and the pivot's reference tokens there (positions where every tokenization has a boundary)."""
        pivot_tok = self.tokenizer(self.study.inputs[0].model)
        ids, index = {}, {}
        for name in self.tokenizers:
            pivot_ids, ids[name], index[name] = align_response(pivot_tok, self.tokenizer(name), example.response)
        aligned = torch.stack([index[name] >= 0 for name in self.tokenizers]).all(dim=0)
        return ids, {name: index[name][aligned] for name in index}, torch.tensor(pivot_ids)[aligned]


def _input_file(work: Path, split: str, i: int, example: Example, name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in example.tid)
    return work / f"{split}-{i:04d}-{safe}.{name}.safetensors"


WORK_SETTINGS = "inputs.json"


def check_work_settings(study: Study, work: Path, dtype: str) -> None:
    """``work/inputs.json`` records what each input's files were scored with (model, prompt, tail, history,
    dtype); an input scored otherwise before has its files removed, so a name never reuses another's numbers."""
    path = work / WORK_SETTINGS
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    for item in study.inputs:
        setting = dict(asdict(item), max_history=study.max_history, dtype=dtype)
        if recorded.get(item.name) not in (None, setting):
            for stale in work.glob(f"*.{item.name}.safetensors"):
                stale.unlink()
        recorded[item.name] = setting
    atomic_write_text(path, json.dumps(recorded, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def score_inputs(vocab: Vocabularies, splits: dict[str, Sequence[Example]], work: str | Path,
                 load_model: Callable[[str], Any], *, dtype: str = "float32", progress: bool = True) -> None:
    """Phase 1: every input's normalized log-probabilities on the pivot vocabulary at the scored positions,
    ``(T, V_pivot)`` float32, one file per (split, example, input) in ``work`` (kept when present). One
    model is in memory at a time, loaded once for all ``splits`` ``{split: examples}``; the pivot
    tokenizer's models run first (the others' tails read them)."""
    import gc

    from tqdm.auto import tqdm

    study, work = vocab.study, Path(work)
    work.mkdir(parents=True, exist_ok=True)
    check_work_settings(study, work, dtype)
    prompts_of = {"private": lambda e: e.private_messages(study.max_history), "public": lambda e: e.public_messages()}
    order = sorted(dict.fromkeys(i.model for i in study.inputs), key=lambda m: vocab.maps[m] is not None)
    for model_name in order:
        inputs = [i for i in study.inputs if i.model == model_name]
        todo = [(split, k, e) for split, examples in splits.items() for k, e in enumerate(examples)
                if not all(_input_file(work, split, k, e, i.name).is_file() for i in inputs)]
        if not todo:
            continue
        model = load_model(model_name)
        tok = vocab.tokenizer(model_name)
        for split, k, example in tqdm(todo, desc=model_name, unit="example", disable=not progress):
            ids, rows, targets = vocab.align(example)
            for prompt in dict.fromkeys(i.prompt for i in inputs):
                logits = next_token_logits(model, render_prompt(tok, prompts_of[prompt](example)), ids[model_name])
                logits = logits[rows[model_name]]
                for item in (i for i in inputs if i.prompt == prompt):
                    if vocab.maps[model_name] is None:
                        lp = torch.log_softmax(logits, dim=-1)
                    else:
                        vmap, ones = vocab.maps[model_name], torch.ones(len(targets))
                        shaper = load_file(str(_input_file(work, split, k, example, item.tail_from)))["lp"]
                        pulled, _ = reference.llm_logprobs_on_slm_vocab(
                            shaper, logits, vmap.slm_to_llm, v_llm=vmap.v_llm, tail="slm", llm_temperature=ones,
                            llm_to_slm=vmap.llm_to_slm)
                        lp = torch.log_softmax(pulled, dim=-1)
                    tensors = {"lp": lp.contiguous(), "targets": targets}
                    path = _input_file(work, split, k, example, item.name)
                    atomic_write(path, lambda tmp, tensors=tensors: save_file(tensors, tmp))
        del model
        gc.collect()


@torch.no_grad()
def summarize_example(study: Study, logprobs: dict[str, torch.Tensor], targets: torch.Tensor,
                      combine: Callable[..., torch.Tensor]) -> dict[str, torch.Tensor]:
    """Phase 2: one example's cached per-position tensors (see the module docstring) from its inputs'
    log-probabilities on the pivot vocabulary ``{name: (T, V)}`` and the reference tokens ``(T,)``."""
    rows = torch.arange(len(targets))
    out = {"targets": targets}
    for name, lp in logprobs.items():
        out[f"lp.{name}"] = lp[rows, targets]
    out["features"] = mixture_features(torch.stack([logprobs[n] for n in study.mixture]), study.feature_k)
    for grid in study.grids:
        stacked = torch.stack([logprobs[n] for n in grid.inputs])
        columns = []
        for value in grid.values:
            coef = torch.tensor(grid.coef(value)).expand(len(targets), -1).contiguous()
            fused = combine(stacked, coef, rule="sum", plausibility=grid.plausibility)
            columns.append(fused[rows, targets])
        out[f"grid.{grid.name}"] = torch.stack(columns, dim=-1)
    for rule in study.rules:
        stacked = torch.stack([logprobs[n] for n in rule.inputs])
        fused = combine(stacked, rule.coefficients(stacked).contiguous(), rule=rule.combine_rule,
                        plausibility=rule.plausibility)
        out[f"rule.{rule}"] = fused[rows, targets]
    return out


def summarize_split(study: Study, split: str, examples: Sequence[Example], work: str | Path, cache_dir: str | Path,
                    combine: Callable[..., torch.Tensor], progress: bool = True) -> dict[str, torch.Tensor]:
    """Phase 2 over a split: each example's summary in ``cache_dir`` (kept when its setting matches), concatenated,
    with ``example`` ``(T,)`` numbering the examples."""
    from tqdm.auto import tqdm

    cache_dir, work = Path(cache_dir), Path(work)
    cache_dir.mkdir(parents=True, exist_ok=True)
    setting = json.dumps(study.setting, sort_keys=True)
    digest = hashlib.sha256(setting.encode()).hexdigest()[:8]
    parts = []
    for k, example in enumerate(tqdm(examples, desc=f"rules on {split}", unit="example", disable=not progress)):
        path = _input_file(cache_dir, split, k, example, f"summary-{digest}")
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("setting") == setting:
                    parts.append(load_file(str(path)))
                    continue
        files = {i.name: load_file(str(_input_file(work, split, k, example, i.name))) for i in study.inputs}
        tensors = summarize_example(study, {n: f["lp"] for n, f in files.items()}, files[study.inputs[0].name]["targets"],
                                    combine)
        meta = {"setting": setting, "tid": example.tid}
        atomic_write(path, lambda tmp, tensors=tensors, meta=meta: save_file(
            {key: v.contiguous() for key, v in tensors.items()}, tmp, metadata=meta))
        parts.append(tensors)
    merged = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    merged["example"] = torch.cat([torch.full((len(p["targets"]),), i) for i, p in enumerate(parts)])
    return merged


# ------------------------------------------------------------------------------------ the rules' NLL
def mixture_nll(cache: dict[str, torch.Tensor], names: Sequence[str], weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Per-position ``-log Σ_i w_i p_i(y)`` of normalized inputs ``names``; ``weights`` ``(N,)`` or ``(T, N)``.

    >>> cache = {"lp.a": torch.tensor([0.5, 0.1]).log(), "lp.b": torch.tensor([0.1, 0.3]).log()}
    >>> [round(p, 4) for p in mixture_nll(cache, ("a", "b"), [0.5, 0.5]).neg().exp().tolist()]  # float64
    [0.3, 0.2]
    """
    lp = torch.stack([cache[f"lp.{n}"].double() for n in names], dim=-1)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    return -torch.logsumexp(lp + weights.log(), dim=-1)


def simplex_grid(n: int, step: float) -> torch.Tensor:
    """``(M, n)`` weight vectors on a grid of ``step`` that sum to 1 (every corner included).

    >>> simplex_grid(3, 0.5).tolist()
    [[0.0, 0.0, 1.0], [0.0, 0.5, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]
    """
    units = round(1 / step)
    rows = [c + (units - sum(c),) for c in itertools.product(range(units + 1), repeat=n - 1) if sum(c) <= units]
    return torch.tensor(rows, dtype=torch.float64) / units


def best_mixture_weights(cache: dict[str, torch.Tensor], names: Sequence[str], step: float = 0.01) -> tuple[float, ...]:
    """The fixed weights (on a ``step`` simplex grid) with the lowest mean NLL over ``cache``'s positions."""
    grid = simplex_grid(len(names), step)
    lp = torch.stack([cache[f"lp.{n}"].double() for n in names], dim=-1)  # (T, N)
    best, best_nll = None, math.inf
    for chunk in grid.split(512):
        nll = -torch.logsumexp(lp[None] + chunk[:, None].log(), dim=-1).mean(dim=1)  # (M,)
        value, where = nll.min(dim=0)
        if value.item() < best_nll:
            best_nll, best = value.item(), chunk[where]
    return tuple(round(w, 4) for w in best.tolist())


def cut_rows(nll: torch.Tensor) -> torch.Tensor:
    """The positions a plausibility cut keeps (finite NLL)."""
    return torch.isfinite(nll)


def grid_nll(cache: dict[str, torch.Tensor], grid: Grid, value: float) -> torch.Tensor:
    """Per-position NLL of ``grid``'s rule at one of its values (+inf where a plausibility cut removed the reference)."""
    return -cache[f"grid.{grid.name}"][:, grid.values.index(value)].double()


def best_grid_value(cache: dict[str, torch.Tensor], grid: Grid) -> float:
    """The value of ``grid`` with the lowest mean NLL over the positions its cut keeps (all without a cut)."""
    nll = -cache[f"grid.{grid.name}"].double()
    kept = torch.isfinite(nll)
    means = torch.where(kept, nll, 0.0).sum(0) / kept.sum(0).clamp(min=1)
    return grid.values[int(means.argmin())]


def steered_mixture_nll(cache: dict[str, torch.Tensor], grid: Grid, beta: float, private: str, alpha: float) -> torch.Tensor:
    """NLL of the mixture ``α·p_private + (1-α)·p_steered(β)`` (the 2-way mix with the steered LLM in the LLM's place)."""
    lp = torch.stack([cache[f"lp.{private}"].double(), cache[f"grid.{grid.name}"][:, grid.values.index(beta)].double()], -1)
    weights = torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
    return -torch.logsumexp(lp + weights.log(), dim=-1)


def best_steered_mixture(cache: dict[str, torch.Tensor], grid: Grid, private: str) -> tuple[float, float]:
    """``(β, α)`` with the lowest mean NLL of :func:`steered_mixture_nll` (α on a 0.01 grid)."""
    best, best_nll = (grid.values[0], 1.0), math.inf
    for beta in grid.values:
        for alpha in torch.linspace(0, 1, 101).tolist():
            nll = steered_mixture_nll(cache, grid, beta, private, round(alpha, 2)).mean().item()
            if nll < best_nll:
                best_nll, best = nll, (beta, round(alpha, 2))
    return best


# ------------------------------------------------------------------------------------ the table
def _row(method: str, params: str, nll: torch.Tensor, example: torch.Tensor, baseline: tuple[str, torch.Tensor] | None,
         kept: torch.Tensor | None = None) -> dict[str, Any]:
    """A table row: mean NLL over the kept positions (all by default), its coverage, and the paired
    difference against ``baseline`` ``(name, nll)`` over the same positions."""
    kept = torch.ones(len(nll), dtype=torch.bool) if kept is None else kept
    row = {"method": method, "params": params, "nll": nll[kept].mean().item(), "tokens": int(kept.sum()),
           "coverage": kept.double().mean().item()}
    if baseline is not None:
        name, base = baseline
        row["baseline"] = name
        row["baseline_nll"] = base[kept].mean().item()
        row["vs_baseline"] = paired_difference(nll[kept], base[kept], example[kept])
    return row


def study_rows(study: Study, dev: dict[str, torch.Tensor], test: dict[str, torch.Tensor],
               head_weights: torch.Tensor | None = None, head_label: str = "") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The table's rows on ``test`` with every parameter chosen on ``dev``; and the chosen parameters.

    ``head_weights`` ``(T_test, N)``: a :class:`~logitfuse.heads.mixture.MixtureHead`'s weights on the
    test positions (its row is compared with the fixed weights chosen on dev)."""
    grids = {g.name: g for g in study.grids}
    ex = test["example"]
    slm, llm, small = study.mixture
    chosen: dict[str, Any] = {}
    single = {name: mixture_nll(test, (name,), [1.0]) for name in (slm, llm, small, "llm_shipped")}
    rows = [_row("SLM alone (tuned, private prompt)", "", single[slm], ex, None),
            _row("LLM alone (1.5B, public prompt)", "", single[llm], ex, None),
            _row("small LLM alone (0.5B, public prompt)", "", single[small], ex, None)]
    # the 2-way mix: today's (LLM tail shaped by the private SLM), and with the public-shaped tail all rows share
    a_shipped = best_mixture_weights(dev, (slm, "llm_shipped"))
    rows.append(_row("2-way mix, as decoding does today (tail from the private SLM)", f"α={a_shipped[0]:g}",
                     mixture_nll(test, (slm, "llm_shipped"), a_shipped), ex, ("SLM alone", single[slm])))
    a2 = best_mixture_weights(dev, (slm, llm))
    chosen["mix2"] = a2
    mix2 = mixture_nll(test, (slm, llm), a2)
    rows.append(_row("2-way mix (SLM + LLM)", f"α={a2[0]:g}", mix2, ex, ("SLM alone", single[slm])))
    w3 = best_mixture_weights(dev, study.mixture)
    chosen["mix3"] = w3
    mix3 = mixture_nll(test, study.mixture, w3)
    rows.append(_row("3-way mixture (SLM + LLM + small LLM)", "w=(" + ", ".join(f"{w:g}" for w in w3) + ")", mix3, ex,
                     ("2-way mix", mix2)))
    if head_weights is not None:
        lp = torch.stack([test[f"lp.{n}"].double() for n in study.mixture], -1)
        head = -torch.logsumexp(lp + head_weights.double().log(), dim=-1)
        mean_w = ", ".join(f"{w:.3f}" for w in head_weights.double().mean(0).tolist())
        rows.append(_row(f"3-way mixture, {head_label or 'MixtureHead'}", f"mean w=({mean_w})", head, ex,
                         ("3-way mixture, fixed w", mix3)))
    steer = grids["steer"]
    beta = best_grid_value(dev, steer)
    chosen["steer"] = beta
    rows.append(_row("context steering alone: LLM + β(SLM − SLM public)", f"β={beta:g}", grid_nll(test, steer, beta), ex,
                     ("SLM alone", single[slm])))
    rows[-1]["vs_llm"] = paired_difference(grid_nll(test, steer, beta), single[llm], ex)
    beta_m, alpha_m = best_steered_mixture(dev, steer, slm)
    chosen["steer+mix"] = (beta_m, alpha_m)
    rows.append(_row("steering + mix: α·SLM + (1−α)·steered LLM", f"β={beta_m:g}, α={alpha_m:g}",
                     steered_mixture_nll(test, steer, beta_m, slm, alpha_m), ex, ("2-way mix", mix2)))
    proxy = grids["proxy"]
    beta_p = best_grid_value(dev, proxy)
    chosen["proxy"] = beta_p
    rows.append(_row("proxy-tuning: LLM + β(tuned SLM − SLM), public prompts", f"β={beta_p:g}",
                     grid_nll(test, proxy, beta_p), ex, ("LLM alone", single[llm])))
    rows.append(_row("proxy-tuning at β=1 (the paper's)", "β=1", grid_nll(test, proxy, 1.0), ex, ("LLM alone", single[llm])))
    for name in ("cd", "cd-tau0.1"):
        grid = grids[name]
        lam = best_grid_value(dev, grid)
        chosen[name] = lam
        nll = grid_nll(test, grid, lam)
        tau = grid.plausibility
        label = f"contrastive: LLM − λ·small LLM{'' if tau is None else f', τ={tau:g}'}"
        rows.append(_row(label, f"λ={lam:g}", nll, ex, ("LLM alone", single[llm]), kept=cut_rows(nll)))
        if tau is not None:  # the cut alone (λ = 0): how much of the change is the truncation
            cut = grid_nll(test, grid, 0.0)
            rows.append(_row(f"LLM truncated at τ={tau:g} (λ=0)", "λ=0", cut, ex, ("LLM alone", single[llm]),
                             kept=cut_rows(cut)))
    return rows, chosen


def markdown_table(rows: list[dict[str, Any]], params: str = "parameters (chosen on dev)") -> str:
    """The rows as a markdown table: NLL (nats/token) over the kept positions, the paired difference from the
    row's baseline over the same positions (SE over examples), in how many examples the rule is better, and
    the share of positions kept (below 100% only under a plausibility cut)."""
    with_llm = any("vs_llm" in row for row in rows)
    lines = [f"| rule | {params} | NLL | baseline | baseline NLL | difference (SE) | better in |"
             + (" − LLM alone (SE) |" if with_llm else "") + " coverage |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: |" + (" ---: |" if with_llm else "") + " ---: |"]
    for row in rows:
        d, v = row.get("vs_baseline"), row.get("vs_llm")
        diff = f"{d['diff']:+.4f} ({d['se']:.4f})" if d else ""
        better = f"{d['better']} of {d['examples']}" if d else ""
        base = f"{row['baseline_nll']:.4f}" if d else ""
        llm = (f" {v['diff']:+.4f} ({v['se']:.4f}) |" if v else " |") if with_llm else ""
        lines.append(f"| {row['method']} | {row['params']} | {row['nll']:.4f} | {row.get('baseline', '')} | {base} | "
                     f"{diff} | {better} |{llm} {row['coverage']:.1%} |")
    return "\n".join(lines) + "\n"


def rules_markdown(out: str | Path, rows: list[dict[str, Any]], info: dict[str, Any]) -> Path:
    """``results.md`` (the settings, then :func:`markdown_table`) and ``results.json`` in ``out``."""
    out = Path(out)
    atomic_write_text(out / "results.json", json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    header = "\n".join(f"- {key}: {value}" for key, value in info.items())
    atomic_write_text(out / "results.md", f"{header}\n\n{markdown_table(rows, 'parameters')}")
    return out / "results.md"


# ------------------------------------------------------------------------------------ `logitfuse train/eval --rule`
#: the inputs every rule may name without --input: the SLM over each prompt, the LLM over the public one
BUILTIN_INPUTS = ("slm", "slm_public", "llm")


def parse_inputs(values: Sequence[str] | None) -> dict[str, str]:
    """``--input NAME=MODEL`` values as ``{name: model}`` (read over the public prompt); ``ValueError`` naming
    the bad value and the fix.

    >>> parse_inputs(["small=qwen2.5-coder-0.5b"])
    {'small': 'qwen2.5-coder-0.5b'}
    """
    out: dict[str, str] = {}
    for value in values or ():
        name, eq, model = value.partition("=")
        name, model = name.strip(), model.strip()
        if not eq or not name.isidentifier() or not model:
            raise ValueError(f"--input {value!r} is not NAME=MODEL; e.g. --input small=qwen2.5-coder-0.5b")
        if name in BUILTIN_INPUTS or name in out:
            what = "is built in (slm, slm_public: --slm; llm: --llm)" if name in BUILTIN_INPUTS else "is given twice"
            raise ValueError(f"--input {value!r}: the name {name!r} {what}; give each extra input its own name")
        out[name] = model
    return out


def needs_head(rule: Any) -> bool:
    """Whether ``rule`` takes its weights from a mixture head (``mixture(NAME,...)``)."""
    return rule.fixed_coefficients() is None and getattr(rule, "needs_head", False)


def rules_study(rules: Sequence[Any], slm: str, llm: str, extra: dict[str, str], *, max_history: int | None,
                feature_k: int = 4) -> Study:
    """The :class:`Study` behind ``logitfuse train/eval --rule``: ``slm`` (the SLM, private prompt, the pivot),
    ``slm_public`` and ``llm`` (public prompt) and each ``--input`` (public prompt); the rules with fixed
    coefficients are kept per position, and a mixture-head rule's inputs give the features."""
    inputs = [RuleInput("slm", slm, "private"), RuleInput("slm_public", slm, "public"),
              RuleInput("llm", llm, "public", tail_from="slm_public")]
    inputs += [RuleInput(name, model, "public", tail_from="slm_public") for name, model in extra.items()]
    known = {i.name for i in inputs}
    for rule in rules:
        missing = [n for n in rule.inputs if n not in known]
        if missing:
            raise ValueError(f"rule {str(rule)!r} reads {', '.join(missing)}, which no flag gives: name extra inputs "
                             f"with --input NAME=MODEL (known: {', '.join(sorted(known))})")
        if rule.fixed_coefficients() is None and not needs_head(rule):
            raise ValueError(f"rule {str(rule)!r} takes α from the two-model fusion settings; evaluate the two-model "
                             "mix with `logitfuse eval --head RUN` (no --rule), or write it as mixture(ALPHA,1-ALPHA)")
    head_rules = [r for r in rules if needs_head(r)]
    if len({r.inputs for r in head_rules}) > 1:
        raise ValueError("give at most one mixture-head rule (mixture(NAME,...)) per run")
    mixture = head_rules[0].inputs if head_rules else ("slm", "llm")
    fixed = tuple(r for r in rules if not needs_head(r))
    return Study(tuple(inputs), mixture, (), feature_k, max_history, fixed)


def score_study(study: Study, splits: dict[str, Sequence[Example]], root: str | Path, *, dtype: str = "float32",
                progress: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Score ``splits`` for ``study`` with the zoo's models: inputs in ``root/work``, summaries in ``root/cache``
    (both reused where they match); ``{split: cache}``."""
    from transformers import AutoConfig, AutoTokenizer

    from logitfuse import zoo
    from logitfuse.rules.combine import combine

    def tokenizer_of(name: str) -> tuple[Any, int]:
        folder = zoo.resolve(name)
        return AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder).vocab_size

    root = Path(root)
    vocab = Vocabularies(study, tokenizer_of)
    score_inputs(vocab, splits, root / "work", lambda name: zoo.load(name, dtype=dtype)[0], dtype=dtype,
                 progress=progress)
    return {split: summarize_split(study, split, examples, root / "work", root / "cache", combine, progress=progress)
            for split, examples in splits.items()}


def concat_caches(caches: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Caches of several splits as one, ``example`` ids running on."""
    offset, parts = 0, []
    for cache in caches:
        parts.append(dict(cache, example=cache["example"] + offset))
        offset += int(cache["example"].max()) + 1 if len(cache["example"]) else 0
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def input_logprobs(cache: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """``(T, N)``: each input's ``log p(y)``, in ``names`` order (what a mixture head is trained on)."""
    return torch.stack([cache[f"lp.{n}"] for n in names], dim=-1)


def rule_rows(study: Study, cache: dict[str, torch.Tensor], head: Any = None,
              fixed_weights: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """Rows of ``logitfuse eval --rule``: the SLM and the LLM alone, then each rule with its paired difference
    from the SLM alone (``vs_baseline``) and from the LLM alone (``vs_llm``); a mixture head's row against the
    fixed weights chosen on its training data (``fixed_weights``, from its ``train.json``) where given."""
    ex = cache["example"]
    slm, llm = mixture_nll(cache, ("slm",), [1.0]), mixture_nll(cache, ("llm",), [1.0])
    rows = [_row("SLM alone (private prompt)", "", slm, ex, None), _row("LLM alone (public prompt)", "", llm, ex, None)]
    for rule in study.rules:
        nll = -cache[f"rule.{rule}"].double()
        kept = cut_rows(nll)
        rows.append(dict(_row(str(rule), "", nll, ex, ("SLM alone", slm), kept=kept),
                         vs_llm=paired_difference(nll[kept], llm[kept], ex[kept])))
    if head is not None:
        with torch.no_grad():
            weights = head.weights_from_features(cache["features"])
        nll = mixture_nll(cache, head.input_names, weights)
        mean_w = ", ".join(f"{w:.3f}" for w in weights.double().mean(0).tolist())
        spec = f"mixture({','.join(head.input_names)}) with the mixture head"
        if fixed_weights is not None:
            fixed = mixture_nll(cache, head.input_names, fixed_weights)
            label = "(" + ", ".join(f"{w:g}" for w in fixed_weights) + ")"
            rows.append(_row(f"mixture({','.join(head.input_names)}), fixed weights chosen on the training data",
                             f"w={label}", fixed, ex, ("SLM alone", slm)))
            rows.append(_row(spec, f"mean w=({mean_w})", nll, ex, ("fixed weights", fixed)))
        else:
            rows.append(_row(spec, f"mean w=({mean_w})", nll, ex, ("SLM alone", slm)))
        rows[-1]["vs_llm"] = paired_difference(nll, llm, ex)
    return rows


# ------------------------------------------------------------------------------------ the study's command
def run_study(args: argparse.Namespace, study: Study = ISSUE25) -> Path:
    from transformers import AutoConfig, AutoTokenizer

    from logitfuse import zoo
    from logitfuse.rules.combine import combine

    out = Path(args.out)
    work = Path(args.work or out / "work")
    started = time.perf_counter()

    def tokenizer_of(name: str) -> tuple[Any, int]:
        folder = zoo.resolve(name)
        return AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder).vocab_size

    vocab = Vocabularies(study, tokenizer_of)
    splits = {"dev": load_examples(bundled_split("dev"), max_examples=args.dev_examples),
              "test": load_examples(bundled_split("test"), max_examples=args.test_examples)}
    score_inputs(vocab, splits, work, lambda name: zoo.load(name, dtype=args.dtype)[0], dtype=args.dtype)
    caches = {split: summarize_split(study, split, examples, work, out / "cache", combine)
              for split, examples in splits.items()}
    seconds = time.perf_counter() - started
    dev, test = caches["dev"], caches["test"]
    rows, chosen = study_rows(study, dev, test)
    info = {"dev examples": len(splits["dev"]), "dev positions": len(dev["targets"]),
            "test examples": len(splits["test"]), "test positions": len(test["targets"]),
            "pivot vocabulary": study.inputs[0].model, "inputs": study.setting["inputs"], "chosen on dev": chosen,
            "seconds (this run)": round(seconds, 1)}
    atomic_write_text(out / "results.json", json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    atomic_write_text(out / "results.md", markdown_table(rows))
    print(markdown_table(rows))
    return out / "results.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m logitfuse.train_fuser.rules_eval", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for cache/, results.md and results.json")
    parser.add_argument("--dev-examples", type=int, default=40)
    parser.add_argument("--test-examples", type=int, default=40)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--work", default=None, help="folder for the inputs' log-probabilities on the pivot vocabulary "
                        "(about 40 MB per example and input; default OUT/work)")
    args = parser.parse_args(argv)
    run_study(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
