"""`logitfuse eval`: held-out NLL table of trained heads on the CoGenesis test split.

    logitfuse eval --head runs/pair --slm SLM --llm LLM             # scores test, writes results.md/json/png

--head is the --out folder of `logitfuse train` (or its heads/ folder, or a head in it); the models and the LLM inputs
are given as to `logitfuse train` (the arguments, checks and scoring are shared: logitfuse.cli.train).
Also writes calls.{md,json}: how the call schedules trade LLM calls for NLL.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from logitfuse.cli.train import HEADS_DIR, add_common_arguments, check_common, load_pair, score_split, split_path, variants_for
from logitfuse.errors import UsageError, check_out_dir
from logitfuse.heads import FusionHead, load_head
from logitfuse.train_fuser.data import load_examples
from logitfuse.train_fuser.evaluate import (evaluate_cached, evaluate_streaming, first_examples, head_alpha,
                                            plot_alpha_trace, write_call_report, write_report)
from logitfuse.train_fuser.scoring import default_variants

__all__ = ["HELP", "add_arguments", "heads_root", "run", "validate"]

HELP = "held-out NLL table of trained heads on the CoGenesis test split"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--head", required=True, help="a `logitfuse train` output folder RUN (or RUN/heads, or a head "
                        "folder in it, RUN/heads/dense: the heads beside it are evaluated too)")
    parser.add_argument("--out", default=None, help="where results go (default: beside the heads)")
    parser.add_argument("--no-llm-context", action="store_true", help="skip the LLM-with-context upper bound (saves time)")


def heads_root(value: str) -> Path:
    """--head: a `logitfuse train` output folder, its heads/ folder, or one head folder in it
    (``RUN/heads/dense``, as `logitfuse generate --head` takes it): the heads/ folder."""
    root = Path(value).expanduser()
    if (root / "config.json").is_file():  # one head: evaluate the heads beside it
        return root.parent
    return root / HEADS_DIR if (root / HEADS_DIR).is_dir() else root


def validate(args: argparse.Namespace) -> None:
    """Every check before a model loads (``UsageError``); the folder of the heads goes to ``args.heads_root``."""
    check_common(args, "test")
    root = heads_root(args.head)
    names = [v.name for v in default_variants(args.llm_top_k)]
    if not any((root / name / "config.json").is_file() for name in names):
        what = "does not exist" if not root.exists() else "holds no trained heads"
        raise UsageError(f"--head {args.head!r} {what} (expected folders named {names} with a config.json); pass "
                         "the --out folder of `logitfuse train` (with the same --llm-top-k)")
    check_out_dir("--out", args.out or str(root.parent))
    args.heads_root = root


def run(args: argparse.Namespace) -> int:
    heads_root = args.heads_root
    out = Path(args.out or heads_root.parent)
    pair = load_pair(args)
    variants = variants_for(args)
    heads = {}
    for variant in variants:
        if (heads_root / variant.name).is_dir():
            heads[variant.name] = FusionHead.from_pretrained(heads_root / variant.name, vocab_map=pair.vocab_map, tail=variant.tail)
    examples = load_examples(split_path(args.data, "test"), max_examples=args.max_examples)
    cache, metadata = score_split(pair, examples, Path(args.cache or out) / "cache-test", variants, feature_k=next(iter(heads.values())).top_k,
                                  llm_with_context=not args.no_llm_context and args.served is None,
                                  max_history=args.max_history,
                                  slm_hidden=any(head.needs_slm_hidden for head in heads.values()))
    trained = heads_root.parent / "train.json"  # the fixed α each variant's training data chose, if recorded
    chosen = {name: head["best_fixed_alpha"] for name, head in json.loads(trained.read_text())["heads"].items()
              if "best_fixed_alpha" in head} if trained.is_file() else {}
    rows = evaluate_cached(cache, variants, heads, {name: a for name, a in chosen.items() if name in heads})
    if (heads_root / "paper-dense").is_dir() and args.served is None:
        # the paper's head runs both models again, on fewer examples: the other rows on those same
        # positions come first, so that it compares like with like
        paper = load_head(heads_root / "paper-dense", vocab_map=pair.vocab_map)
        n = min(args.paper_examples, len(examples))
        label = f"{variants[0].name}, first {n} examples"
        rows += [dict(row, llm_input=label) for row in evaluate_cached(first_examples(cache, n), variants[:1], heads)]
        paper_row = evaluate_streaming(paper, pair, examples[:n], variants[0], max_history=args.max_history)
        rows.append(dict(paper_row, llm_input=label))
    info = {"slm": pair.slm_name, "llm": pair.llm_name, "test examples": len(examples),
            "aligned positions": len(cache["targets"]), "vocab map coverage": round(pair.vocab_map.coverage, 4)}
    info["aligned share of SLM response tokens"] = round(len(cache["targets"]) / max(metadata["positions"], 1), 4)
    report = write_report(out, rows, info)
    first = cache["example"] == 0
    dense = variants[0].name
    if dense in heads:
        alpha = head_alpha(cache, variants[0], heads[dense])[first]
        tokens = pair.slm_tokenizer.convert_ids_to_tokens(cache["targets"][first].tolist())
        plotted = plot_alpha_trace(out / "alpha_trace.png", tokens, alpha, f"α per token, test example {metadata['tids'][0]}")
        if plotted is None:  # as bench says it
            print("logitfuse eval: no α-trace plot (alpha_trace.png) nor call-fraction plots: matplotlib is not "
                  "installed (pip install matplotlib)", file=sys.stderr)
    print(report.read_text())
    calls = write_call_report(out, cache, [v for v in variants if v.name in heads], heads, info)
    print(calls.read_text())
    return 0
