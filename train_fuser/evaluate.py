"""Held-out evaluation: per-token NLL of the reference responses under each way of decoding.

Rows, per LLM input (dense, and its top-k under each tail rule): the SLM with context (α = 1), the
LLM without context (α = 0), fixed α, the trained head, and the per-token best α (an oracle bound);
once, the LLM *with* the private context (a privacy-violating upper bound, for reference only) and
the paper's head when one is given. All in linear mode, over the positions both tokenizations align on.

Call schedules (:func:`call_fraction_rows`): NLL against the fraction of positions at which the LLM is
called (the others use the SLM alone), for the head's learned gate (``head_gate(tau)``, tau chosen per
fraction on the same cache), the entropy gate (threshold chosen likewise), ``periodic(0, K, T)`` at
the matched fractions and an oracle gate that knows each call's true gain (a bound, not a schedule).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

import logitfuse
from logitfuse.fileio import atomic_write, atomic_write_text
from logitfuse.heads import FusionHead, PaperFusionHead
from logitfuse.decoding.schedules import Periodic
from logitfuse.train_fuser.data import Example
from logitfuse.train_fuser.scoring import Pair, Variant, linear_nll, score_example
from logitfuse.train_fuser.train import slm_side_inputs

FIXED_ALPHAS = (0.25, 0.5, 0.75)
CALL_FRACTIONS = (0.25, 0.5, 0.75)
#: ``periodic(0, K, T)`` calling at T of every K + T steps: the matched schedule per call fraction
PERIODIC_AT = {0.25: Periodic(0, 3, 1), 0.5: Periodic(0, 1, 1), 0.75: Periodic(0, 1, 3)}
CURVE_FRACTIONS = tuple(round(0.05 * i, 2) for i in range(1, 21))
ORACLE_GRID = torch.linspace(0, 1, 101)


def _row(setting: str, method: str, nll: torch.Tensor, alpha: torch.Tensor | None = None) -> dict[str, Any]:
    mean = nll.double().mean().item()
    row = {"llm_input": setting, "method": method, "nll": mean, "ppl": math.exp(mean), "tokens": int(nll.numel())}
    if alpha is not None:
        row["mean_alpha"] = alpha.double().mean().item()
    return row


def grid_nll(terms: torch.Tensor) -> torch.Tensor:
    """``(len(ORACLE_GRID), N)``: each position's NLL at each fixed α of the 0.01 grid."""
    return torch.stack([linear_nll(torch.full((len(terms),), a.item()), terms) for a in ORACLE_GRID])


def oracle_nll(terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position best α on a 0.01 grid: ``(nll (N,), alpha (N,))``."""
    best = grid_nll(terms).min(dim=0)
    return best.values, ORACLE_GRID[best.indices]


def best_fixed_alpha(terms: torch.Tensor) -> float:
    """The fixed α (on a 0.01 grid) with the lowest mean NLL over these positions' ``terms``: what a
    fixed-α deployment would pick on its training data (``logitfuse train`` records it per variant).

    Two positions, one the SLM predicts (0.9 against 0.1) and one the LLM does (0.6 against 0.2):
    ``-log(0.1 + 0.8 α) - log(0.6 - 0.4 α)`` is lowest at α = 0.6875.

    >>> best_fixed_alpha(torch.tensor([[0.9, 0.1, 1.0], [0.2, 0.6, 1.0]]).log())
    0.69
    """
    return round(ORACLE_GRID[grid_nll(terms).double().mean(dim=1).argmin()].item(), 2)


def paired_difference(nll: torch.Tensor, baseline: torch.Tensor, example: torch.Tensor) -> dict[str, float]:
    """``nll - baseline`` averaged over positions, with a standard error that treats each example as
    one unit (positions of one text are not independent: cluster-robust, ``sqrt(E/(E-1))``-corrected),
    and how many examples' mean NLL is lower than the baseline's.

    >>> d = paired_difference(torch.tensor([1., 1., 2., 4.]), torch.tensor([2., 2., 2., 3.]), torch.tensor([0, 0, 1, 1]))
    >>> d["diff"], round(d["se"], 4), d["better"], d["examples"]
    (-0.25, 0.75, 1, 2)
    """
    diff = nll.double() - baseline.double()
    ids, index = example.unique(return_inverse=True)
    sums = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, index, diff)
    counts = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, index, torch.ones_like(diff))
    mean = diff.mean().item()
    e = len(ids)
    se = ((sums - counts * mean).pow(2).sum().sqrt() / len(diff) * math.sqrt(e / (e - 1))).item() if e > 1 else math.nan
    return {"diff": mean, "se": se, "better": int((sums < 0).sum()), "examples": e}


def evaluate_cached(cache: dict[str, torch.Tensor], variants: list[Variant], heads: dict[str, FusionHead | None],
                    chosen_alpha: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """The table's rows from a scored cache (see :mod:`.scoring`); ``heads`` maps variant name -> head;
    ``chosen_alpha`` maps variant name -> the fixed α chosen on the training splits (a row each: the
    honest fixed-α baseline, where "fixed alpha=0.75" rows let the test set pick); the trained head's
    row then carries ``vs_chosen_alpha``, its :func:`paired_difference` from that baseline."""
    chosen_alpha = chosen_alpha or {}
    rows = []
    first = variants[0].name
    slm_only = linear_nll(torch.ones(len(cache["targets"])), cache[f"{first}.terms"])
    rows.append(_row("-", "SLM with context (alpha=1)", slm_only))
    if "llm_context.terms" in cache:
        rows.append(_row("dense", "LLM with context (upper bound, leaks context)",
                         linear_nll(torch.zeros(len(slm_only)), cache["llm_context.terms"])))
    for variant in variants:
        terms = cache[f"{variant.name}.terms"]
        rows.append(_row(variant.name, "LLM without context (alpha=0)", linear_nll(torch.zeros(len(terms)), terms)))
        for alpha in FIXED_ALPHAS:
            rows.append(_row(variant.name, f"fixed alpha={alpha}", linear_nll(torch.full((len(terms),), alpha), terms)))
        chosen = None
        if variant.name in chosen_alpha:
            alpha = chosen_alpha[variant.name]
            chosen = linear_nll(torch.full((len(terms),), alpha), terms)
            rows.append(_row(variant.name, f"fixed alpha={alpha:g} (chosen on the training splits)", chosen))
        head = heads.get(variant.name)
        if head is not None:
            alpha = head_alpha(cache, variant, head)
            nll = linear_nll(alpha, terms)
            rows.append(_row(variant.name, "trained head", nll, alpha))
            if chosen is not None:
                rows[-1]["vs_chosen_alpha"] = paired_difference(nll, chosen, cache["example"])
        nll, alpha = oracle_nll(terms)
        rows.append(_row(variant.name, "per-token best alpha (oracle)", nll, alpha))
    return rows


@torch.no_grad()
def head_alpha(cache: dict[str, torch.Tensor], variant: Variant, head: FusionHead) -> torch.Tensor:
    """The head's α at every cached position (with the SLM-side inputs it reads)."""
    return head.alpha_from_features(cache[f"{variant.name}.features"], **slm_side_inputs(cache, head))


def _gated_nll(call: torch.Tensor, fused: torch.Tensor, slm: torch.Tensor) -> torch.Tensor:
    return torch.where(call, fused, slm)


def _top_fraction(score: torch.Tensor, fraction: float) -> tuple[torch.Tensor, float]:
    """``(call, threshold)``: call at the ``round(fraction * N)`` positions of highest ``score`` (ties
    broken by position, so a score that is flat, e.g. a zero gain wherever the head sets α = 1, still
    calls that fraction), the threshold being the lowest score called.

    >>> _top_fraction(torch.tensor([0.0, 3.0, 0.0, 0.0]), 0.5)
    (tensor([ True,  True, False, False]), 0.0)
    """
    n = round(fraction * len(score))
    call = torch.zeros(len(score), dtype=torch.bool)
    if n == 0:
        return call, float("inf")
    order = torch.sort(score.double(), descending=True, stable=True).indices[:n]
    call[order] = True
    return call, score[order[-1]].item()


@torch.no_grad()
def _gate_inputs(cache: dict[str, torch.Tensor], variant: Variant, head: FusionHead):
    """``(slm_nll, fused_nll, alpha, scores)``: per-position NLL of the SLM alone and fused with the
    head's α, and each gate's ranking score (call where it is highest)."""
    terms, features = cache[f"{variant.name}.terms"], cache[f"{variant.name}.features"]
    alpha = head_alpha(cache, variant, head)
    slm_nll, fused_nll = linear_nll(torch.ones(len(terms)), terms), linear_nll(alpha, terms)
    scores = {"entropy_gate": features[:, 0], "oracle gate (knows the gain)": slm_nll - fused_nll}
    if head.gate is not None:
        gain = head.gain_from_slm_features(features[:, : 2 + head.top_k], **slm_side_inputs(cache, head))
        scores = {"head_gate": gain, **scores}
    return slm_nll, fused_nll, alpha, scores


def _periodic_calls(cache: dict[str, torch.Tensor], schedule: Periodic) -> torch.Tensor:
    return torch.tensor([bool(schedule.should_call(int(t), None)) for t in cache["positions"].tolist()], dtype=torch.bool)


def gate_curves(cache: dict[str, torch.Tensor], variant: Variant, head: FusionHead,
                fractions: tuple[float, ...] = CURVE_FRACTIONS) -> dict[str, list[tuple[float, float]]]:
    """``{schedule: [(fraction of calls, NLL), ...]}`` for the learned gate, the entropy gate and the
    oracle gate at each target fraction, and ``periodic`` at its matched fractions."""
    slm_nll, fused_nll, _, scores = _gate_inputs(cache, variant, head)
    calls = {name: [_top_fraction(score, f)[0] for f in fractions] for name, score in scores.items()}
    calls["periodic"] = [_periodic_calls(cache, schedule) for schedule in PERIODIC_AT.values()]
    return {name: [(c.double().mean().item(), _gated_nll(c, fused_nll, slm_nll).double().mean().item()) for c in cs]
            for name, cs in calls.items()}


def call_fraction_rows(cache: dict[str, torch.Tensor], variant: Variant, head: FusionHead,
                       fractions: tuple[float, ...] = CALL_FRACTIONS) -> list[dict[str, Any]]:
    """Table rows at each fraction of LLM calls: ``head_gate(tau)`` and ``entropy_gate(h)`` with tau
    and h chosen on this cache, ``periodic(0, K, T)``, and the oracle gate; each row says the fraction
    of positions it actually called."""
    slm_nll, fused_nll, alpha, scores = _gate_inputs(cache, variant, head)
    rows = []
    for fraction in fractions:
        schedules = {}
        for name, score in scores.items():
            call, threshold = _top_fraction(score, fraction)
            schedules[name if name.startswith("oracle") else f"{name}({threshold:.4g})"] = call
        if fraction in PERIODIC_AT:
            schedules[PERIODIC_AT[fraction].spec] = _periodic_calls(cache, PERIODIC_AT[fraction])
        for name, call in schedules.items():
            share = call.double().mean().item()
            row = _row(variant.name, f"{name}: {share:.1%} calls (target {fraction:.0%})",
                       _gated_nll(call, fused_nll, slm_nll), torch.where(call, alpha, 1.0))
            rows.append(dict(row, calls=round(share, 4), target_calls=fraction))
    return rows


def plot_call_curves(path: str | os.PathLike, curves: dict[str, list[tuple[float, float]]], title: str) -> Path | None:
    """A PNG of NLL against the fraction of LLM calls, one line per schedule; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        xs, ys = zip(*points) if points else ((), ())
        ax.plot(xs, ys, marker="o" if name == "periodic" else ".", linestyle="none" if name == "periodic" else "-",
                label=name)
    ax.set_xlabel("fraction of positions with an LLM call")
    ax.set_ylabel("NLL (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return Path(path)


def write_call_report(out_dir: str | os.PathLike, cache: dict[str, torch.Tensor], variants: list[Variant],
                      heads: dict[str, FusionHead], info: dict[str, Any]) -> Path:
    """``calls.md`` / ``calls.json`` (:func:`call_fraction_rows` of each variant's head) and one
    ``call_fraction-VARIANT.png`` per variant (:func:`gate_curves`) in ``out_dir``."""
    out_dir = Path(out_dir)
    rows = []
    for variant in variants:
        rows += call_fraction_rows(cache, variant, heads[variant.name])
        plot_call_curves(out_dir / f"call_fraction-{variant.name}.png", gate_curves(cache, variant, heads[variant.name]),
                         f"NLL vs LLM calls, {variant.name} ({info.get('slm')} + {info.get('llm')})")
    atomic_write_text(out_dir / "calls.json", json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    note = ("NLL when the LLM is called at a fraction of the positions (the SLM alone elsewhere); thresholds "
            "chosen on this cache; the oracle gate knows each call's true gain (a bound).")
    atomic_write_text(out_dir / "calls.md", f"{note}\n\n{markdown_table(rows)}")
    return out_dir / "calls.md"


def first_examples(cache: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """``cache`` restricted to the positions of its first ``n`` examples (what a streaming row scores)."""
    keep = cache["example"] < n
    return {key: value[keep] for key, value in cache.items()}


@torch.no_grad()
def evaluate_streaming(head: PaperFusionHead | FusionHead, pair: Pair, examples: list[Example], variant: Variant,
                       method: str = "paper head", max_history: int | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """NLL of a head that needs full logits (the paper's), running both models on ``examples`` (a
    progress bar with an ETA on stderr unless ``progress`` is False)."""
    from tqdm.auto import tqdm

    losses, alphas = [], []
    for example in tqdm(examples, desc=f"scoring ({method})", unit="example", disable=not progress):
        scored = score_example(pair, example, max_history=max_history)
        llm = variant.llm_input(scored.llm_logits)
        alpha = head(scored.slm_logits, llm, pair.vocab_map)
        losses.append(logitfuse.fused_cross_entropy(scored.slm_logits, llm, scored.targets, alpha=alpha,
                                                    vocab_map=pair.vocab_map, mode=head.mode, tail=head.tail))
        alphas.append(alpha)
    return _row(variant.name, f"{method} (mode={head.mode}, tail={head.tail})", torch.cat(losses), torch.cat(alphas))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| LLM input | method | NLL (nats/token) | perplexity | mean α | tokens |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        alpha = f"{row['mean_alpha']:.3f}" if "mean_alpha" in row else ""
        lines.append(f"| {row['llm_input']} | {row['method']} | {row['nll']:.4f} | {row['ppl']:.2f} | {alpha} | {row['tokens']} |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | os.PathLike, rows: list[dict[str, Any]], info: dict[str, Any]) -> Path:
    """``results.md`` and ``results.json`` in ``out_dir``."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "results.json", json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    header = "\n".join(f"- {key}: {value}" for key, value in info.items())
    paired = "".join(f"- {row['llm_input']}: {d['diff']:+.4f} (SE {d['se']:.4f}); the head is better in {d['better']} "
                     f"of {d['examples']} examples\n" for row in rows if (d := row.get("vs_chosen_alpha")))
    if paired:
        paired = ("\nTrained head − fixed α chosen on the training splits, nats/token over the positions above "
                  "(SE over examples):\n\n" + paired)
    atomic_write_text(out_dir / "results.md", f"{header}\n\n{markdown_table(rows)}{paired}")
    return out_dir / "results.md"


def plot_alpha_trace(path: str | os.PathLike, tokens: list[str], alpha: torch.Tensor, title: str) -> Path | None:
    """A PNG of α per response token for one example; ``None`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(max(6, len(tokens) * 0.12), 3))
    ax.plot(range(len(tokens)), alpha.tolist(), marker=".", linewidth=1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("response token")
    ax.set_ylabel("α (1 = SLM only)")
    ax.set_title(title)
    if len(tokens) <= 80:
        ax.set_xticks(range(len(tokens)), [t.replace("\n", "\\n") for t in tokens], rotation=90, fontsize=6)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return Path(path)
