"""`logitfuse eval`: held-out NLL table of trained heads on the CoGenesis test split.

    logitfuse eval --head runs/pair --slm SLM --llm LLM             # scores test, writes results.md/json/png
    logitfuse eval --rule 'steer(0.3)' --rule 'contrastive(0.2,0.1,amateur=small)' --input small=MODEL \
        --slm SLM --llm LLM --out runs/rules                         # fusion rules (logitfuse.rules specs)

--head is the --out folder of `logitfuse train` (or its heads/ folder, or a head in it); the models and the LLM inputs
are given as to `logitfuse train` (the arguments, checks and scoring are shared: logitfuse.cli.train).
Also writes calls.{md,json}: how the call schedules trade LLM calls for NLL. With --rule (repeatable) the table
is of fusion rules over named inputs instead (logitfuse.train_fuser.rules_eval); a mixture-head rule
mixture(NAME,...) reads its head from --head, the --out folder of `logitfuse train --rule`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from logitfuse.cli.train import (HEADS_DIR, add_common_arguments, check_common, check_rule_arguments, load_pair,
                                 score_split, split_path, variants_for)
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
    parser.add_argument("--head", default=None, help="a `logitfuse train` output folder RUN (or RUN/heads, or a head "
                        "folder in it, RUN/heads/dense: the heads beside it are evaluated too); required without --rule, "
                        "and for a mixture-head rule (the --out folder of `logitfuse train --rule`)")
    parser.add_argument("--out", default=None, help="where results go (default: beside the heads; required with --rule "
                        "and no --head)")
    parser.add_argument("--rule", action="append", default=None, metavar="SPEC",
                        help="a fusion rule to evaluate instead of the two-model heads, repeatable: 'steer(0.3)', "
                        "'arithmetic(1,expert=slm_public,anti=base)', 'contrastive(0.2,0.1,amateur=small)', "
                        "'mixture(slm=0.5,llm=0.3,small=0.2)', or 'mixture(slm,llm,small)' for a mixture head (--head)")
    parser.add_argument("--no-llm-context", action="store_true", help="skip the LLM-with-context upper bound (saves time)")


def heads_root(value: str) -> Path:
    """--head: a `logitfuse train` output folder, its heads/ folder, or one head folder in it
    (``RUN/heads/dense``, as `logitfuse generate --head` takes it): the heads/ folder."""
    root = Path(value).expanduser()
    if (root / "config.json").is_file():  # one head: evaluate the heads beside it
        return root.parent
    return root / HEADS_DIR if (root / HEADS_DIR).is_dir() else root


def mixture_head_dir(value: str) -> Path:
    """--head with a mixture-head rule: the --out folder of `logitfuse train --rule` (RUN), RUN/heads or RUN/heads/mixture."""
    root = Path(value).expanduser()
    for folder in (root, root / "mixture", root / HEADS_DIR / "mixture"):
        if (folder / "config.json").is_file():
            return folder
    return root / HEADS_DIR / "mixture"


def validate_rules(args: argparse.Namespace) -> None:
    """--rule: the rules and inputs (:func:`logitfuse.cli.train.check_rule_arguments`), and --head where a rule needs one."""
    from logitfuse.heads.mixture import load_mixture_head
    from logitfuse.train_fuser.rules_eval import needs_head

    check_rule_arguments(args, head_rule=False)
    args.mixture_head = None
    head_rules = [rule for rule in args.rules if needs_head(rule)]
    if head_rules:
        if args.head is None:
            raise UsageError(f"--rule {str(head_rules[0])!r} takes its weights from a mixture head: pass --head RUN, "
                             "the --out folder of `logitfuse train --rule` (or give fixed weights, mixture(slm=0.5,...))")
        folder = mixture_head_dir(args.head)
        try:
            args.mixture_head = load_mixture_head(folder)
        except (OSError, ValueError) as err:
            raise UsageError(f"--head {args.head!r}: {err}") from None
        if args.mixture_head.input_names != head_rules[0].inputs:
            raise UsageError(f"--head {args.head!r} was trained for the inputs {args.mixture_head.input_names}; the rule "
                             f"mixes {head_rules[0].inputs}: name them as the head does")
        args.head_train_json = folder.parent.parent / "train.json"
    elif args.head is not None:
        raise UsageError("--head with --rule is for a mixture-head rule, mixture(NAME,...); leave --head out")
    if args.out is None and args.head is None:
        raise UsageError("--rule needs --out (where results.md and results.json go)")
    check_out_dir("--out", args.out or str(mixture_head_dir(args.head).parent.parent))


def validate(args: argparse.Namespace) -> None:
    """Every check before a model loads (``UsageError``); the folder of the heads goes to ``args.heads_root``."""
    check_common(args, "test")
    if args.rule:
        return validate_rules(args)
    if args.input:
        raise UsageError("--input names an input of a --rule; give a --rule that reads it, or leave --input out")
    if args.head is None:
        raise UsageError("--head is required (the --out folder of `logitfuse train`), unless you evaluate fusion "
                         "rules with --rule")
    root = heads_root(args.head)
    names = [v.name for v in default_variants(args.llm_top_k)]
    if not any((root / name / "config.json").is_file() for name in names):
        what = "does not exist" if not root.exists() else "holds no trained heads"
        raise UsageError(f"--head {args.head!r} {what} (expected folders named {names} with a config.json); pass "
                         "the --out folder of `logitfuse train` (with the same --llm-top-k)")
    check_out_dir("--out", args.out or str(root.parent))
    args.heads_root = root


def run_rules(args: argparse.Namespace) -> int:
    """`eval --rule`: score the test examples for the rules' inputs and write the rules' table."""
    from logitfuse.train_fuser.rules_eval import rule_rows, rules_markdown, rules_study, score_study

    out = Path(args.out or mixture_head_dir(args.head).parent.parent)
    head = args.mixture_head
    study = rules_study(args.rules, args.slm, args.llm, args.inputs, max_history=args.max_history,
                        feature_k=head.top_k if head is not None else 4)
    examples = load_examples(split_path(args.data, "test"), max_examples=args.max_examples)
    cache = score_study(study, {"test": examples}, Path(args.cache or out), dtype=args.dtype)["test"]
    fixed = None
    if head is not None and args.head_train_json.is_file():
        fixed = json.loads(args.head_train_json.read_text()).get("fixed_weights")
    rows = rule_rows(study, cache, head, fixed)
    info = {"slm": args.slm, "llm": args.llm, "inputs": {i.name: f"{i.model} ({i.prompt} prompt)" for i in study.inputs},
            "test examples": len(examples), "positions": len(cache["targets"])}
    print(rules_markdown(out, rows, info).read_text())
    return 0


def run(args: argparse.Namespace) -> int:
    if args.rule:
        return run_rules(args)
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
