"""`logitfuse train`: fit fusion heads on CoGenesis data (one per LLM input), beside their scoring caches.

    logitfuse train --slm SLM --llm LLM --out runs/pair            # scores dev, fits one head per LLM input
    logitfuse train ... --split train_wo_profile --split dev --slm-features hidden,token,position

SLM and LLM are zoo names (``logitfuse models list``) or transformers model folders; the LLM can also
be a server that returns prompt log-probabilities (``--llm http://HOST:PORT/v1 --llm-model NAME
[--llm-tokenizer NAME]``, train_fuser/served.py): it then scores the LLM side, top-k only.
`logitfuse eval` (logitfuse.cli.evaluate) shares this module's arguments, checks and scoring
(:func:`add_common_arguments`, :func:`check_common`, :func:`load_pair`, :func:`score_split`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from logitfuse import zoo
from logitfuse.fileio import atomic_write_text
from logitfuse.errors import UsageError, check_device, check_out_dir, check_range
from logitfuse.zoo import check_model
from logitfuse.heads import FusionHead, PaperFusionHead
from logitfuse.train_fuser.data import SPLITS, bundled_split, load_examples
from logitfuse.heads.slm_side import check_feature_groups
from logitfuse.train_fuser.evaluate import best_fixed_alpha
from logitfuse.train_fuser.scoring import (
    Pair, Variant, cache_example, default_variants, read_shards, score_example, shard_metadata, write_shard,
)
from logitfuse.train_fuser.served import check_served, is_url
from logitfuse.train_fuser.train import TrainConfig, fit_cached, fit_gate, fit_streaming, slm_side_inputs

__all__ = ["HEADS_DIR", "HELP", "add_arguments", "add_common_arguments", "check_common", "load_pair", "run",
           "score_split", "split_path", "validate", "variants_for"]

HELP = "fit fusion heads on the CoGenesis dev split"
HEADS_DIR = "heads"
TRAIN_SPLITS = ("train_wo_profile", "dev")  # the test split stays held out


def load_pair(args: argparse.Namespace) -> Pair:
    slm, slm_tok, slm_name = zoo.load(args.slm, dtype=args.dtype, device=args.device, adapter=args.adapter)
    if getattr(args, "served", None) is not None:  # --llm URL: scored by the server (train_fuser/served.py)
        return Pair.build(slm, slm_tok, args.served, args.served.tokenizer, slm_name, args.served.name)
    llm, llm_tok, llm_name = zoo.load(args.llm, dtype=args.dtype, device=args.device)
    return Pair.build(slm, slm_tok, llm, llm_tok, slm_name, llm_name)


def split_path(data: str | None, split: str) -> Path:
    return bundled_split(split) if data is None else Path(data) / SPLITS[split]


def check_data(args: argparse.Namespace, split: str, flag: str = "") -> None:
    """The split's data file (--data, or the bundled copy) exists, parses and has every field, before any model loads."""
    file = split_path(args.data, split)
    if args.data is not None and not file.is_file():
        raise UsageError(f"--data {args.data!r} has no {SPLITS[split]}{flag}; pass the folder that holds it "
                         f"(context_aware_{{dev,test}}.json), or leave --data out for the bundled copy")
    try:
        load_examples(file)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UsageError(f"--data {args.data or str(file.parent)!r}: {SPLITS[split]} is not usable CoGenesis data: "
                         f"{' '.join(str(err).split())[:300]}; fix or replace the file") from None


def check_common(args: argparse.Namespace, split: str) -> None:
    """The arguments `train` and `eval` share, checked before any model loads (``UsageError``)."""
    check_model("--slm", args.slm)
    if not is_url(args.llm):
        check_model("--llm", args.llm)
    if args.adapter is not None:  # a LoRA adapter folder: its files are there
        try:
            zoo.adapter_sha256(args.adapter)
        except zoo.ZooError as err:
            raise UsageError(f"--adapter {args.adapter!r}: {err}") from None
    splits = [split] if split == "test" else [s for s in (getattr(args, "split", None) or ["dev"]) if s in TRAIN_SPLITS]
    for name in splits:  # train: each --split (an unknown one is refused in validate)
        check_data(args, name, "" if split == "test" else f" (--split {name})" if getattr(args, "split", None) else "")
    check_range("--max-examples", args.max_examples, low=2 if split == "dev" else 1,
                meaning="training needs 2: one to fit on, one to validate on" if split == "dev" else "")
    check_range("--llm-top-k", args.llm_top_k, low=1)
    check_range("--max-history", args.max_history, low=0)
    check_range("--paper-examples", args.paper_examples, low=1)
    check_device("--device", args.device)
    if args.cache is not None:
        check_out_dir("--cache", args.cache)
    if is_url(args.llm) and getattr(args, "paper_head", False):
        raise UsageError("--paper-head needs the LLM's full logits, which a server does not give; leave it out "
                         "with --llm URL")
    args.served = check_served(args)  # last: it probes the server


def variants_for(args: argparse.Namespace) -> list[Variant]:
    """The LLM inputs to train or evaluate: all, or only the top-k ones for a served LLM."""
    variants = default_variants(args.llm_top_k)
    return [v for v in variants if v.top_k is not None] if is_url(args.llm) else variants


def validate(args: argparse.Namespace) -> None:
    """Every check before a model loads (``UsageError``); a served --llm is probed here (``args.served``)."""
    check_common(args, "dev")
    check_out_dir("--out", args.out)
    check_range("--feature-k", args.feature_k, low=1)
    check_range("--lr", args.lr, low=0, low_open=True)
    check_range("--max-epochs", args.max_epochs, low=1)
    check_range("--patience", args.patience, low=1)
    check_range("--paper-epochs", args.paper_epochs, low=1)
    check_range("--seed", args.seed, low=0)
    check_range("--hidden-projection", args.hidden_projection, low=1)
    check_range("--gate-hidden", args.gate_hidden, low=0)
    try:
        args.slm_features = list(check_feature_groups(args.slm_features, name="--slm-features"))
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None
    check_rule_arguments(args, head_rule=True)
    args.split = args.split or ["dev"]
    for split in args.split:
        if split not in TRAIN_SPLITS:
            held_out = "the test split is held out for `logitfuse eval`" if split == "test" else "not a split"
            raise UsageError(f"--split {split}: {held_out}; train on {' and/or '.join(TRAIN_SPLITS)}")


def check_rule_arguments(args: argparse.Namespace, *, head_rule: bool) -> None:
    """--rule (``args.rules``: the parsed rules) and --input (``args.inputs``: ``{name: model}``), before any
    model loads. ``head_rule``: `train`, whose one --rule must be a mixture head's ``mixture(NAME,...)``."""
    from logitfuse.rules import parse_rule
    from logitfuse.train_fuser.rules_eval import needs_head, parse_inputs, rules_study

    specs = [] if args.rule is None else [args.rule] if isinstance(args.rule, str) else list(args.rule)
    args.rules, args.inputs = [], {}
    if not specs:
        if args.input:
            raise UsageError("--input names an input of a --rule; give a --rule that reads it, or leave --input out")
        return
    if is_url(args.llm) or args.adapter is not None:
        flag = "--llm URL" if is_url(args.llm) else "--adapter"
        raise UsageError(f"--rule scores every input locally from the zoo; {flag} is not supported with it "
                         "(merge an adapter with `logitfuse finetune` and name the folder as --slm)")
    try:
        args.rules = [parse_rule(spec) for spec in specs]
        args.inputs = parse_inputs(args.input)
        rules_study(args.rules, args.slm, args.llm, args.inputs, max_history=args.max_history)
    except ValueError as err:
        flag = "--input" if str(err).startswith("--input") else "--rule"
        raise UsageError(str(err) if str(err).startswith("--") else f"{flag}: {err}") from None
    if head_rule and not (len(args.rules) == 1 and needs_head(args.rules[0]) and args.rules[0].kind == "linear"):
        raise UsageError(f"--rule {specs[0]!r}: `logitfuse train --rule` trains a mixture head: give "
                         "mixture(NAME,NAME,...) with input names only, e.g. 'mixture(slm,llm,small)'")
    if getattr(args, "paper_head", False):
        raise UsageError("--paper-head trains the two-model paper head; leave it out with --rule")
    for name, model in args.inputs.items():
        check_model(f"--input {name}=", model)


def score_split(pair: Pair, examples, cache_dir: Path, variants: list[Variant], *, feature_k: int,
                llm_with_context: bool, max_history: int | None = None, shard_size: int = 32,
                progress: bool = True, slm_hidden: bool = False) -> tuple[dict, dict]:
    """Score ``examples`` into ``cache_dir``, one shard per ``shard_size`` examples; ``slm_hidden``:
    keep the SLM's hidden states too (float16).

    A shard already there with the same setting and the same examples is kept, so an interrupted
    run, or a longer one over the same examples in the same order, scores only what is missing. A
    cache that kept the hidden states also serves a run that does not read them (and is extended
    with them)."""
    setting = dict(slm=pair.slm_name, llm=pair.llm_name, vocab_map=pair.vocab_map.hash, feature_k=feature_k,
                   variants=[v.name for v in variants], llm_with_context=llm_with_context, max_history=max_history,
                   slm_hidden=slm_hidden)
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = {}
    for path in cache_dir.glob("shard-*.safetensors"):
        try:
            found[path.name] = shard_metadata(path)
        except Exception:  # an unreadable shard (a foreign or damaged file) is scored again
            found[path.name] = {}
    if not slm_hidden and any(meta.get("setting") == dict(setting, slm_hidden=True) for meta in found.values()):
        setting = dict(setting, slm_hidden=True)
    starts = range(0, len(examples), shard_size)
    names = [f"shard-{start // shard_size:05d}.safetensors" for start in starts]
    for name in set(found) - set(names):
        (cache_dir / name).unlink()
    # one bar over every example of the split, with an ETA; the shards already scored count as done
    bar = tqdm(total=len(examples), desc=f"scoring {cache_dir.name}", unit="example", disable=not progress)
    with bar:
        for start, name in zip(starts, names):
            chunk = examples[start : start + shard_size]
            tids = [e.tid for e in chunk]
            if found.get(name, {}).get("setting") == setting and found[name].get("tids") == tids:
                bar.update(len(chunk))
                continue
            scored_chunk, positions = [], 0
            for example in chunk:
                scored = score_example(pair, example, llm_with_context=llm_with_context, max_history=max_history)
                positions += scored.n_positions
                scored_chunk.append(cache_example(pair, scored, variants, feature_k, slm_hidden=setting["slm_hidden"]))
                bar.update(1)
            write_shard(cache_dir / name, scored_chunk, {"setting": setting, "tids": tids, "positions": positions})
    return read_shards(cache_dir)


def training_examples(args: argparse.Namespace) -> list[tuple[str, list]]:
    """``[(split, examples), ...]`` in ``--split`` order; ``--max-examples`` caps the run's total,
    taken in that order (the first split first)."""
    chosen, left = [], args.max_examples
    for split in args.split:
        examples = load_examples(split_path(args.data, split), max_examples=left)
        chosen.append((split, examples))
        left = None if left is None else left - len(examples)
        if left is not None and left <= 0:
            break
    return chosen


def score_training_splits(pair: Pair, splits: list[tuple[str, list]], out: Path, variants: list[Variant], *,
                          feature_k: int, max_history: int | None, slm_hidden: bool) -> tuple[dict, dict]:
    """Score each split into ``out/cache-SPLIT`` (reused as :func:`score_split` does) and concatenate
    them; example ids run on across splits (the validation split for early stopping draws from all)."""
    caches, offset, tids, positions = [], 0, [], 0
    for split, examples in splits:
        cache, metadata = score_split(pair, examples, out / f"cache-{split}", variants, feature_k=feature_k,
                                      llm_with_context=False, max_history=max_history, slm_hidden=slm_hidden)
        caches.append(dict(cache, example=cache["example"] + offset))
        offset, tids, positions = offset + len(metadata["tids"]), tids + metadata["tids"], positions + metadata["positions"]
    merged = {key: torch.cat([c[key] for c in caches]) for key in caches[0]}
    return merged, {"setting": metadata["setting"], "tids": tids, "positions": positions}


def run(args: argparse.Namespace) -> int:
    if args.rules:
        return run_mixture_head(args)
    out = Path(args.out)
    pair = load_pair(args)
    splits = training_examples(args)
    examples = [example for _, chunk in splits for example in chunk]
    variants = variants_for(args)
    started = time.perf_counter()
    cache, metadata = score_training_splits(pair, splits, Path(args.cache or out), variants, feature_k=args.feature_k,
                                            max_history=args.max_history, slm_hidden="hidden" in args.slm_features)
    config = TrainConfig(lr=args.lr, max_epochs=args.max_epochs, patience=args.patience, seed=args.seed)
    summary = {"slm": pair.slm_name, "llm": pair.llm_name, "examples": len(examples), "positions": len(cache["targets"]),
               "splits": {split: len(chunk) for split, chunk in splits}, "slm_features": args.slm_features,
               "vocab_map_coverage": pair.vocab_map.coverage, "heads": {}}
    hidden_size = pair.slm.config.hidden_size if "hidden" in args.slm_features else 0
    torch.manual_seed(args.seed)
    for variant in variants:
        head = FusionHead(pair.vocab_map.v_slm, pair.vocab_map.v_llm, mode="linear", tail=variant.tail,
                          top_k=args.feature_k, slm_name=pair.slm_name, llm_name=pair.llm_name,
                          vocab_map_hash=pair.vocab_map.hash, llm_top_k=variant.top_k, slm_features=args.slm_features,
                          slm_hidden_size=hidden_size, hidden_projection=args.hidden_projection, gate_hidden=args.gate_hidden)
        data = (cache[f"{variant.name}.features"], cache[f"{variant.name}.terms"], cache["example"], config)
        fit = fit_cached(head, *data, slm_side=slm_side_inputs(cache, head))
        summary["heads"][variant.name] = {"best_epoch": fit.best_epoch, "val_nll": min(fit.val_nll), "train_nll": fit.train_nll[fit.best_epoch],
                                          "best_fixed_alpha": best_fixed_alpha(cache[f"{variant.name}.terms"])}
        print(f"{variant.name}: validation NLL {min(fit.val_nll):.4f} (epoch {fit.best_epoch})")
        if head.gate is not None:  # target: NLL(SLM alone) - NLL(fused with this head's α), per position
            gate_fit = fit_gate(head, *data, slm_side=slm_side_inputs(cache, head))
            summary["heads"][variant.name]["gate_val_mse"] = min(gate_fit.val_nll)
        head.save_pretrained(out / HEADS_DIR / variant.name)
    if args.paper_head:
        paper = PaperFusionHead(pair.vocab_map.v_slm, pair.vocab_map.v_llm, slm_name=pair.slm_name, llm_name=pair.llm_name,
                                vocab_map_hash=pair.vocab_map.hash)
        fit = fit_streaming(paper, pair, examples[: args.paper_examples], variants[0],
                            TrainConfig(lr=1e-4, max_epochs=args.paper_epochs, patience=2, seed=args.seed),
                            max_history=args.max_history)
        paper.save_pretrained(out / HEADS_DIR / "paper-dense")
        summary["heads"]["paper-dense"] = {"best_epoch": fit.best_epoch, "val_nll": min(fit.val_nll)}
    summary["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_text(out / "train.json", json.dumps(summary, indent=2) + "\n")
    print(f"heads saved under {out / HEADS_DIR}")
    return 0


def run_mixture_head(args: argparse.Namespace) -> int:
    """`train --rule mixture(NAME,...)`: score the training splits for those inputs, fit a MixtureHead on the
    cached terms, and record the fixed weights chosen on the same positions (the baseline it must beat)."""
    from logitfuse.heads.mixture import MixtureHead
    from logitfuse.train_fuser.rules_eval import (best_mixture_weights, concat_caches, input_logprobs, rules_study,
                                                  score_study)
    from logitfuse.train_fuser.train import fit_mixture

    out, rule = Path(args.out), args.rules[0]
    started = time.perf_counter()
    study = rules_study(args.rules, args.slm, args.llm, args.inputs, max_history=args.max_history,
                        feature_k=args.feature_k)
    splits = dict(training_examples(args))
    caches = score_study(study, splits, Path(args.cache or out), dtype=args.dtype)
    cache = concat_caches(list(caches.values()))
    torch.manual_seed(args.seed)
    head = MixtureHead(rule.inputs, top_k=args.feature_k)
    config = TrainConfig(lr=args.lr, max_epochs=args.max_epochs, patience=args.patience, seed=args.seed)
    fit = fit_mixture(head, cache["features"], input_logprobs(cache, rule.inputs), cache["example"], config)
    head.save_pretrained(out / HEADS_DIR / "mixture")
    fixed = best_mixture_weights(cache, rule.inputs)
    summary = {"rule": str(rule), "inputs": {i.name: f"{i.model} ({i.prompt} prompt)" for i in study.inputs if i.name in rule.inputs},
               "examples": sum(len(e) for e in splits.values()), "splits": {k: len(v) for k, v in splits.items()},
               "positions": len(cache["targets"]), "best_epoch": fit.best_epoch, "val_nll": min(fit.val_nll),
               "train_nll": fit.train_nll[fit.best_epoch], "fixed_weights": list(fixed),
               "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_text(out / "train.json", json.dumps(summary, indent=2) + "\n")
    print(f"mixture head over {', '.join(rule.inputs)}: validation NLL {min(fit.val_nll):.4f} (epoch {fit.best_epoch}); "
          f"fixed weights chosen on the same data: {fixed}")
    print(f"head saved under {out / HEADS_DIR / 'mixture'}")
    return 0


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments `train` and `eval` share."""
    parser.add_argument("--slm", required=True, help="on-device model: zoo name, transformers folder or Hugging Face Hub id (ORG/NAME)")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder (`logitfuse finetune --out`) for the SLM")
    parser.add_argument("--llm", required=True, help="cloud model: zoo name, transformers folder or Hugging Face Hub id, or a server "
                        "http://HOST:PORT/v1 that returns prompt log-probabilities (scored there, top-k only)")
    parser.add_argument("--llm-model", default=None, help="with --llm URL: the served model's name")
    parser.add_argument("--llm-tokenizer", default=None,
                        help="with --llm URL: the served LLM's tokenizer, a zoo name, folder or hub id (default: --slm's)")
    parser.add_argument("--data", default=None, help="folder with context_aware_{dev,test}.json (default: the bundled copy)")
    parser.add_argument("--max-examples", type=int, default=None, help="use only the first N examples (quick runs)")
    parser.add_argument("--llm-top-k", type=int, default=20, help="K of the top-k LLM inputs (what a cloud API returns)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="model weights' dtype (default float32: faster than bf16 on most CPUs)")
    parser.add_argument("--max-history", type=int, default=None,
                        help="keep only the first N writing-history items in the private prompt (shorter prompts, faster on CPU)")
    parser.add_argument("--paper-examples", type=int, default=8, help="examples for the paper's head (it runs the models each pass)")
    parser.add_argument("--cache", default=None, help="folder of the scoring caches (cache-SPLIT/), shared by runs that "
                        "score the same examples, e.g. ablations (default: the output folder)")
    parser.add_argument("--input", action="append", default=None, metavar="NAME=MODEL",
                        help="with --rule: an extra input NAME that MODEL (zoo name, folder or hub id) gives over the public "
                        "prompt, repeatable; slm and slm_public (--slm over each prompt) and llm (--llm) are built in")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder (heads/, cache-dev/, train.json)")
    parser.add_argument("--feature-k", type=int, default=4, help="top-k log-probabilities per model among the head's features")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-epochs", type=int, default=300)
    parser.add_argument("--patience", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paper-head", action="store_true", help="also train the paper's 2V-input head (slow)")
    parser.add_argument("--paper-epochs", type=int, default=2)
    parser.add_argument("--split", action="append", default=None,
                        help="a training split, repeatable (default: dev); --max-examples caps the total, in this order")
    parser.add_argument("--slm-features", default="", help="SLM-side feature groups of the heads and gates, comma-"
                        "separated: hidden (last hidden state), token (last generated token), position (default: none)")
    parser.add_argument("--hidden-projection", type=int, default=32, help="width the SLM's hidden state is projected to")
    parser.add_argument("--gate-hidden", type=int, default=32,
                        help="width of each head's call gate (schedule head_gate(tau)); 0: no gate")
    parser.add_argument("--rule", default=None, metavar="SPEC",
                        help="train an N-weight mixture head instead: mixture(NAME,NAME,...) over named inputs (--input), "
                        "e.g. 'mixture(slm,llm,small)'; writes heads/mixture and the fixed weights chosen on the same data")
