"""The bar plot of a judged evaluation (``logitfuse judge`` writes it as results.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from logitfuse.fileio import atomic_write

__all__ = ["plot_results"]


def plot_results(results: dict[str, Any], path: Path) -> str:
    """A bar plot of mean ± SE per system and rubric (ROUGE-L without a judge); a note when it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    systems = list(results["systems"])
    metrics = [m for m in ("quality", "personalization") if any(m in s for s in results["systems"].values())]
    metrics = metrics or ["rouge_l"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(systems)), 4))
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        stats = [results["systems"][s].get(metric) or {"mean": 0.0, "se": 0.0} for s in systems]
        ax.bar([x + i * width for x in range(len(systems))], [s["mean"] for s in stats], width,
               yerr=[s["se"] for s in stats], capsize=3, label=metric)
    ax.set_xticks([x + width * (len(metrics) - 1) / 2 for x in range(len(systems))], systems, rotation=20, ha="right")
    ax.set_ylabel("judge rating (1-10)" if metrics != ["rouge_l"] else "ROUGE-L F1")
    ax.set_ylim(0, 10 if metrics != ["rouge_l"] else 1)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return ""
