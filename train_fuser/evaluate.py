"""Held-out evaluation: per-token NLL of the reference responses under each way of decoding.

Rows, per LLM input (dense, and its top-k under each tail rule): the SLM with context (α = 1), the
LLM without context (α = 0), fixed α, the trained head, and the per-token best α (an oracle bound);
once, the LLM *with* the private context (a privacy-violating upper bound, for reference only) and
the paper's head when one is given. All in linear mode, over the positions both tokenizations align on.
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
from logitfuse.train_fuser.data import Example
from logitfuse.train_fuser.scoring import Pair, Variant, linear_nll, score_example

FIXED_ALPHAS = (0.25, 0.5, 0.75)
ORACLE_GRID = torch.linspace(0, 1, 101)


def _row(setting: str, method: str, nll: torch.Tensor, alpha: torch.Tensor | None = None) -> dict[str, Any]:
    mean = nll.double().mean().item()
    row = {"llm_input": setting, "method": method, "nll": mean, "ppl": math.exp(mean), "tokens": int(nll.numel())}
    if alpha is not None:
        row["mean_alpha"] = alpha.double().mean().item()
    return row


def oracle_nll(terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position best α on a 0.01 grid: ``(nll (N,), alpha (N,))``."""
    losses = torch.stack([linear_nll(torch.full((len(terms),), a.item()), terms) for a in ORACLE_GRID])
    best = losses.min(dim=0)
    return best.values, ORACLE_GRID[best.indices]


def evaluate_cached(cache: dict[str, torch.Tensor], variants: list[Variant],
                    heads: dict[str, FusionHead | None]) -> list[dict[str, Any]]:
    """The table's rows from a scored cache (see :mod:`.scoring`); ``heads`` maps variant name -> head."""
    rows = []
    first = variants[0].name
    slm_only = linear_nll(torch.ones(len(cache["targets"])), cache[f"{first}.terms"])
    rows.append(_row("-", "SLM with context (alpha=1)", slm_only))
    if "llm_context.terms" in cache:
        rows.append(_row("dense", "LLM with context (upper bound, leaks context)",
                         linear_nll(torch.zeros(len(slm_only)), cache["llm_context.terms"])))
    for variant in variants:
        terms, features = cache[f"{variant.name}.terms"], cache[f"{variant.name}.features"]
        rows.append(_row(variant.name, "LLM without context (alpha=0)", linear_nll(torch.zeros(len(terms)), terms)))
        for alpha in FIXED_ALPHAS:
            rows.append(_row(variant.name, f"fixed alpha={alpha}", linear_nll(torch.full((len(terms),), alpha), terms)))
        head = heads.get(variant.name)
        if head is not None:
            with torch.no_grad():
                alpha = head.alpha_from_features(features)
            rows.append(_row(variant.name, "trained head", linear_nll(alpha, terms), alpha))
        nll, alpha = oracle_nll(terms)
        rows.append(_row(variant.name, "per-token best alpha (oracle)", nll, alpha))
    return rows


def first_examples(cache: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """``cache`` restricted to the positions of its first ``n`` examples (what a streaming row scores)."""
    keep = cache["example"] < n
    return {key: value[keep] for key, value in cache.items()}


@torch.no_grad()
def evaluate_streaming(head: PaperFusionHead | FusionHead, pair: Pair, examples: list[Example], variant: Variant,
                       method: str = "paper head", max_history: int | None = None) -> dict[str, Any]:
    """NLL of a head that needs full logits (the paper's), running both models on ``examples``."""
    losses, alphas = [], []
    for example in examples:
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
    atomic_write_text(out_dir / "results.md", f"{header}\n\n{markdown_table(rows)}")
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
