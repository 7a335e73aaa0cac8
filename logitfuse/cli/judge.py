"""`logitfuse judge`: generate a response per system for CoGenesis examples, then score them.

    logitfuse judge --slm smollm2-135m --llm qwen2.5-coder-0.5b --max-examples 20 --out runs/judged \\
        --judge-url http://127.0.0.1:8080 --judge-model qwen2.5-coder-1.5b
    logitfuse judge --generations runs/judged/generations.jsonl --out runs/judged \\
        --judge-url http://127.0.0.1:8080 --judge-model qwen2.5-coder-1.5b     # score existing texts only

Systems: the SLM with the private context (logitfuse.generate at α = 1), the LLM without it, the LLM with it (it leaks the context:
a reference only), the sketch variant, fused with a fixed α, fused with the trained head (plus any
--extra-alpha / --extra-schedule). Same decoding for all (greedy with a repetition penalty of 1.1 by default) and the same max length.

The judge sees the private profile: it must be a model you control. A judge URL that is not on this
machine (loopback) is refused unless --allow-remote-judge is given. The evaluated LLM sees only the
public task title, as in `logitfuse generate`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from logitfuse.backends.transport import is_loopback_url
from logitfuse.errors import UsageError, check_device, check_out_dir, check_range
from logitfuse.zoo import ZooError, check_adapter, check_model
from logitfuse.fileio import atomic_write_text
from logitfuse.prompts import SPLITS, Example, bundled_split, load_examples

__all__ = ["BASE_SYSTEMS", "HELP", "Models", "add_arguments", "generate_records", "judged_pairs", "run", "system_notes",
           "validate"]

HELP = "generate per system and score with an LLM judge (quality, personalization, pairwise, ROUGE-L)"

#: the systems a generation run can produce, and what each is
BASE_SYSTEMS = {
    "slm": "SLM with the private context",
    "llm": "LLM, public task only",
    "llm+context": "leaks context, reference only",
    "sketch": "LLM outline from the public task, SLM writes with the context",
    "fused-alpha": "logit fusion, fixed α",
    "fused-head": "logit fusion, trained head",
    "reference": "the dataset's response (--sanity)",
    "off-task": "another user's reference response (--sanity: should score low)",
}


def system_notes(names: list[str]) -> dict[str, str]:
    """The label results.md gives each system (``fused-alpha0.25`` -> the fixed-α note, ...)."""
    notes = {}
    for name in names:
        base = next((b for b in sorted(BASE_SYSTEMS, key=len, reverse=True) if name.startswith(b)), None)
        notes[name] = BASE_SYSTEMS.get(name) or (BASE_SYSTEMS[base] if base else "")
    return notes


# ------------------------------------------------------------------------------------ generation
@dataclass
class Models:
    """The loaded pair: ``llm`` is the backend the fused and sketch systems talk to (public prompt only)."""

    slm: Any
    slm_tok: Any
    llm_model: Any
    llm_tok: Any
    llm: Any
    vocab_map: Any
    head: Any = None


def _context_text(example: Example, max_history: int) -> str:
    """The private context (profile and history) as the SLM's prompt shows it, without the task."""
    user = example.private_messages(max_history)[1]["content"]
    return user.rsplit("\n\n## Task\n", 1)[0]


def _one(system: str, example: Example, models: Models, max_new_tokens: int, max_history: int,
         sampling: dict[str, Any], alpha: float | None, schedule: str, seed: int) -> tuple[str, int]:
    from logitfuse.cli.common import fusion_config, llm_alone, response, run_engine, sampling_config, slm_alone
    from logitfuse.decoding.sketch import sketch_generate
    from logitfuse.prompts import render_prompt

    private_ids = render_prompt(models.slm_tok, example.private_messages(max_history))
    public_ids = render_prompt(models.llm_tok, example.public_messages())
    if system in ("llm", "llm+context"):  # the LLM alone, plain model.generate
        # llm+context: the local LLM reads the private prompt: an upper bound that leaks
        prompt = public_ids if system == "llm" else render_prompt(models.llm_tok, example.private_messages(max_history))
        ids, text, _ = llm_alone(models.llm_model, models.llm_tok, prompt, max_new_tokens, **sampling)
        return text.strip(), len(ids)
    if system == "sketch":
        sketch = sketch_generate(models.llm, models.slm, example.public_instruction, _context_text(example, max_history),
                                 slm_tokenizer=models.slm_tok, max_new_tokens=max_new_tokens, **sampling)
        return sketch.text.strip(), len(sketch.output_ids)
    config = sampling_config(models.slm, models.slm_tok, max_new_tokens, temperature=sampling.get("temperature", 0.0),
                             top_p=sampling.get("top_p", 1.0), repetition_penalty=sampling["repetition_penalty"],
                             seed=seed)
    if system == "slm":  # the SLM alone: logitfuse.generate at α = 1 (the LLM is never asked)
        out, _ = slm_alone(models.slm, models.slm_tok, private_ids, config)
    else:  # fused, with the head (alpha None) or a fixed α
        fusion = fusion_config(head=models.head if alpha is None else None, alpha=alpha, vocab_map=models.vocab_map,
                               schedule=schedule)
        out, _ = run_engine(models.slm, models.slm_tok, private_ids, models.llm, public_ids, fusion, config)
    ids, _, text = response(models.slm, models.slm_tok, out)
    return text.strip(), len(ids)


def generate_records(examples: list[Example], models: Models, systems: dict[str, tuple[float | None, str]], *,
                     max_new_tokens: int, max_history: int = 2, temperature: float = 0.0, top_p: float = 1.0,
                     repetition_penalty: float = 1.0, seed: int = 0, progress: bool = True, on_example=None,
                     done: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """One record ``{"tid", "system", "text", "tokens"}`` per example and system.

    ``systems``: name -> ``(alpha, schedule)``; ``alpha`` is the fused systems' fixed α (``None``:
    the head; ignored by the others). The SLM alone and the fused systems come from
    :func:`logitfuse.generate`, the LLM alone from plain ``model.generate``. Greedy at
    ``temperature`` 0, else sampled from ``seed`` + the example's index (reset per example and
    system, so a system's text does not depend on which systems ran before it).
    ``on_example(records)`` is called after each example (to save progress). Records in ``done``
    (an interrupted run's) are kept and their (tid, system) not generated again.
    """
    import torch
    from tqdm.auto import tqdm

    sampling: dict[str, Any] = {"do_sample": temperature > 0, "repetition_penalty": repetition_penalty}
    if temperature > 0:
        sampling.update(temperature=temperature, top_p=top_p)
    records = list(done)
    have = {(r["tid"], r["system"]) for r in records}
    for index, example in enumerate(tqdm(examples, desc="generating", unit="example", disable=not progress)):
        for name, (alpha, schedule) in systems.items():
            if (example.tid, name) in have:
                continue
            torch.manual_seed(seed + index)  # the LLM alone and the sketch sample from torch's generator
            system = name.split("@", 1)[0]  # a --tag names the run, not the system
            text, tokens = _one(system, example, models, max_new_tokens, max_history, sampling, alpha, schedule,
                                seed + index)
            records.append({"tid": example.tid, "system": name, "text": text, "tokens": tokens})
        if on_example is not None:
            on_example(records)
    return records


def judged_pairs(names: list[str]) -> list[tuple[str, str]]:
    """The pairwise comparisons: each fused system against the SLM of its own run (same ``@tag``) and
    against the LLM without context (the LLM is the same whichever SLM a run used).

    >>> judged_pairs(["slm", "llm", "fused-head", "slm@tuned", "fused-head@tuned"])
    [('fused-head', 'slm'), ('fused-head', 'llm'), ('fused-head@tuned', 'slm@tuned'), ('fused-head@tuned', 'llm')]
    """
    pairs = []
    for name in names:
        if name.startswith("fused"):
            tag = name[name.index("@"):] if "@" in name else ""
            pairs += [(name, single) for single in (f"slm{tag}", "llm" if "llm" in names else f"llm{tag}")
                      if single in names]
    return pairs


def sanity_records(tids: list[str], examples: dict[str, Example]) -> list[dict[str, Any]]:
    """Two judge checks per example: ``reference`` (the dataset's response) and ``off-task`` (the
    dataset's response to the next example's task, another user's: a good text that answers the
    wrong task; a judge worth using rates it lower)."""
    records = []
    for i, tid in enumerate(tids):
        other = examples[tids[(i + 1) % len(tids)]].response
        records += [{"tid": tid, "system": "reference", "text": examples[tid].response},
                    {"tid": tid, "system": "off-task", "text": other}]
    return records


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ------------------------------------------------------------------------------------ checks
def _check_judge(args: argparse.Namespace) -> None:
    if args.judge_url is None:
        if args.judge_model is not None:
            raise UsageError("--judge-model without --judge-url; pass the judge's address too")
        return
    try:
        parts = urlsplit(args.judge_url)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as err:
        raise UsageError(f"--judge-url {args.judge_url!r} is not a valid URL ({err}); e.g. http://127.0.0.1:8080") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--judge-url {args.judge_url!r} needs http(s):// and a host; e.g. http://127.0.0.1:8080")
    if not is_loopback_url(args.judge_url) and not args.allow_remote_judge:
        raise UsageError(f"--judge-url {args.judge_url!r} is not on this machine, and the judge sees the private "
                         "profiles: serve the judge locally (127.0.0.1), or pass --allow-remote-judge if you control "
                         "that machine")
    if not args.judge_model:
        raise UsageError("--judge-url needs --judge-model NAME (the served judge model's name, see GET /v1/models)")
    check_range("--judge-timeout", args.judge_timeout, low=0, low_open=True)
    check_range("--judge-retries", args.judge_retries, low=0)
    from logitfuse.evaluation.judge import JudgmentCache

    try:  # an existing file that is not a judgment cache would be rewritten: refuse it
        JudgmentCache.read(Path(args.cache or Path(args.out) / "judgments.jsonl").expanduser())
    except ValueError as err:
        raise UsageError(f"{'--cache' if args.cache else '--out'}: {err}") from None


def _read_generations(value: str) -> list[dict[str, Any]]:
    path = Path(value).expanduser()
    if not path.is_file():
        raise UsageError(f"--generations {value!r} is not a file; pass a generations.jsonl written by `logitfuse judge`")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (UnicodeDecodeError, OSError) as err:
        raise UsageError(f"--generations {value!r} is not readable UTF-8 text ({type(err).__name__}); pass a "
                         "generations.jsonl written by `logitfuse judge`") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not all(isinstance(record[k], str) for k in ("tid", "system", "text")):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"--generations {value!r}, line {number}: expected a JSON object with string fields "
                             "tid, system, text") from None
        records.append(record)
    if not records:
        raise UsageError(f"--generations {value!r} holds no records")
    return records


def _examples(args: argparse.Namespace) -> list[Example]:
    path = bundled_split(args.split) if args.data is None else Path(args.data).expanduser() / SPLITS[args.split]
    if not path.is_file():
        raise UsageError(f"--data {args.data!r} has no {SPLITS[args.split]}; pass the folder that holds it, or leave "
                         "--data out for the bundled copy")
    try:
        return load_examples(path)
    except ValueError as err:
        raise UsageError(f"--data: {err}") from None


def _systems(args: argparse.Namespace) -> dict[str, tuple[float | None, str]]:
    """name -> (α, schedule) of the systems to generate."""
    from logitfuse.decoding.schedules import parse as parse_schedule

    chosen = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in BASE_SYSTEMS or s in ("reference", "off-task")]
    if unknown or not chosen:
        raise UsageError(f"--systems {args.systems!r}: {unknown or 'empty'}; pick from {','.join(list(BASE_SYSTEMS)[:6])}")
    systems = {s: (None, "always") for s in chosen if not s.startswith("fused")}
    alphas = ([args.alpha] if "fused-alpha" in chosen else []) + list(args.extra_alpha)
    for alpha in alphas:
        check_range("--alpha/--extra-alpha", alpha, low=0, high=1, meaning="1 = the SLM alone, 0 = the LLM alone")
        systems[f"fused-alpha{alpha:g}"] = (alpha, "always")
    if "fused-head" in chosen:
        systems["fused-head"] = (None, "always")
    for schedule in args.extra_schedule:
        try:
            parse_schedule(schedule)
        except (TypeError, ValueError) as err:
            raise UsageError(f"--extra-schedule {schedule!r}: {err}") from None
        systems[f"fused-head:{schedule}"] = (None, schedule)
    return systems


def validate(args: argparse.Namespace) -> None:
    """Everything checked before a model loads or a request is sent (``UsageError``); ``args.plan`` is
    ``(examples, records, systems)`` (``records`` read from --generations, else ``None`` and the
    ``systems`` to generate)."""
    args.plan = _check(args)


def _check(args: argparse.Namespace) -> tuple[list[Example], list[dict[str, Any]] | None, dict[str, Any]]:
    _check_judge(args)
    check_out_dir("--out", args.out)
    check_range("--max-examples", args.max_examples, low=1)
    check_range("--max-history", args.max_history, low=0)
    examples = _examples(args)
    if args.tag is not None and (not args.tag or not all(c.isalnum() or c in "-_." for c in args.tag)):
        raise UsageError(f"--tag {args.tag!r}: use letters, digits, '-', '_' or '.' (e.g. --tag tuned)")
    if args.generations:
        if args.tag is not None:
            raise UsageError("--tag names the systems of a generation run; with --generations the names are those "
                             "in the files (drop --tag)")
        records = [r for value in args.generations for r in _read_generations(value)]
        twice = sorted(k for k, n in Counter((r["tid"], r["system"]) for r in records).items() if n > 1)
        if twice:
            raise UsageError(f"--generations: {len(twice)} (tid, system) pairs appear more than once (e.g. {twice[0]}); "
                             "generate the runs to merge with different --tag")
        missing = sorted({r["tid"] for r in records} - {e.tid for e in examples})
        if missing:
            raise UsageError(f"--generations has tids not in the {args.split} split of --data ({missing[:3]}...); "
                             "pass the --data/--split the generations were made from")
        return examples, records, {}
    if not args.slm or not args.llm:
        raise UsageError("pass --slm and --llm to generate, or --generations FILE to judge existing texts")
    check_model("--slm", args.slm)
    check_model("--llm", args.llm)
    check_range("--max-new-tokens", args.max_new_tokens, low=1)
    check_range("--temperature", args.temperature, low=0, meaning="0 = greedy")
    check_range("--top-p", args.top_p, low=0, high=1, low_open=True)
    check_range("--repetition-penalty", args.repetition_penalty, low=0, low_open=True, meaning="1 = none")
    check_device("--device", args.device)
    if args.resume and not (Path(args.out).expanduser() / "generations.jsonl").is_file():
        raise UsageError(f"--resume: {args.out!r} has no generations.jsonl to continue; drop --resume")
    if args.adapter is not None:
        try:
            check_adapter(args.adapter)
        except ZooError as err:
            raise UsageError(f"--adapter {args.adapter!r}: {err}") from None
    if args.head is not None and not (Path(args.head).expanduser() / "config.json").is_file():
        raise UsageError(f"--head {args.head!r} is not a head folder (no config.json); pass one written by "
                         "`logitfuse train`, or leave --head out for the head shipped with the pair")
    systems = _systems(args)
    if args.tag is not None:
        systems = {f"{name}@{args.tag}": value for name, value in systems.items()}
    return examples[: args.max_examples], None, systems


# ------------------------------------------------------------------------------------ the run
def _load_models(args: argparse.Namespace, systems: dict[str, Any]) -> Models:
    from logitfuse import zoo
    from logitfuse.backends import HFLLM
    from logitfuse.cli.common import bundled_head_dir, vocab_map_for
    from logitfuse.heads import load_head

    slm, slm_tok, slm_name = zoo.load(args.slm, dtype=args.dtype, device=args.device, adapter=args.adapter)
    llm_model, llm_tok, llm_name = zoo.load(args.llm, dtype=args.dtype, device=args.device)
    llm = HFLLM(llm_model, llm_tok)
    models = Models(slm, slm_tok, llm_model, llm_tok, llm, vocab_map_for(slm, slm_tok, llm.vocab_size, llm_tok))
    if any(alpha is None and name.startswith("fused") for name, (alpha, _) in systems.items()):
        head_dir = Path(args.head).expanduser() if args.head else bundled_head_dir(slm_name, llm_name)
        if head_dir is None:
            raise UsageError(f"no head is shipped for {slm_name} + {llm_name}: pass --head DIR, or drop fused-head "
                             "from --systems")
        try:
            models.head = load_head(head_dir, vocab_map=models.vocab_map)
        except ValueError as err:
            raise UsageError(f"--head {str(head_dir)!r} does not fit these models: {err}") from None
    return models


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ZooError, OSError) as err:  # a model that does not load, a file that cannot be written
        print(f"logitfuse judge: error: {err}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from logitfuse.evaluation.judge import (RUBRICS, Judge, JudgeClient, JudgeError, JudgmentCache, compare_ratings,
                                            judge_records, render_markdown)
    from logitfuse.evaluation.plot import plot_results

    examples, records, systems = args.plan
    out = Path(args.out).expanduser()
    if records is None:
        done = _read_generations(str(out / "generations.jsonl")) if args.resume else []
        models = _load_models(args, systems)
        print(f"logitfuse judge: generating {len(systems)} systems x {len(examples)} examples "
              f"(the LLM backend sees only the public task titles)", file=sys.stderr, flush=True)
        records = generate_records(examples, models, systems, max_new_tokens=args.max_new_tokens,
                                   max_history=args.max_history, temperature=args.temperature, top_p=args.top_p,
                                   repetition_penalty=args.repetition_penalty, seed=args.seed, done=done,
                                   on_example=lambda so_far: _write_jsonl(out / "generations.jsonl", so_far))
    judge = None
    if args.judge_url is not None:
        client = JudgeClient(args.judge_url, args.judge_model, timeout=args.judge_timeout, retries=args.judge_retries,
                             max_tokens=256 if args.explain else 16)
        judge = Judge(client.chat, args.judge_model, JudgmentCache(args.cache or out / "judgments.jsonl"))
    by_tid = {e.tid: e for e in examples}
    if args.sanity:
        records = [r for r in records if r["system"] not in ("reference", "off-task")]
        records += sanity_records(list(dict.fromkeys(r["tid"] for r in records)), by_tid)
    names = list(dict.fromkeys(r["system"] for r in records))
    pairs = [] if args.no_pairwise else judged_pairs(names)
    try:
        results = judge_records(records, by_tid, judge, pairs=pairs,
                                max_history=args.max_history, explain=args.explain)
    except JudgeError as err:
        print(f"logitfuse judge: error: {err} (the answers so far are cached; run again to resume)", file=sys.stderr)
        return 1
    if judge and args.sanity:
        results["sanity"] = {rubric: compare_ratings(results["ratings"], "reference", "off-task", rubric)
                             for rubric in RUBRICS}
    results["judge"] = {"url": args.judge_url, "model": args.judge_model} if judge else None
    results["notes"] = system_notes(names)
    results["arguments"] = {k: v for k, v in vars(args).items() if k not in ("command", "plan")}
    asked = "a justification, then the verdict" if args.explain else "the verdict line only"
    header = "# Judged evaluation\n\n" + (f"Judge: {args.judge_model} at temperature 0, asked for {asked}; "
                                         "mean ± standard error."
                                         if judge else "No judge: reference-based scores only.")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    atomic_write_text(out / "results.md", render_markdown(results, results["notes"], header))
    note = plot_results(results, out / "results.png")
    if note:
        print(f"logitfuse judge: {note}", file=sys.stderr)
    print(render_markdown(results, results["notes"]))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for generations.jsonl, results.{md,json,png}, judgments.jsonl")
    parser.add_argument("--generations", action="append", default=[],
                        help="judge this generations.jsonl instead of generating (repeatable: the runs are merged)")
    parser.add_argument("--tag", default=None, help="append @TAG to the names of the systems this run generates "
                        "(e.g. --tag tuned for a run with a tuned SLM), so runs can be merged with --generations")
    parser.add_argument("--slm", default=None, help="on-device model: zoo name or folder")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder for the SLM")
    parser.add_argument("--llm", default=None, help="cloud model: zoo name or folder (run locally)")
    parser.add_argument("--head", default=None, help="head folder for fused-head (default: the one shipped for the pair)")
    parser.add_argument("--alpha", type=float, default=0.25, help="α of fused-alpha (default 0.25)")
    parser.add_argument("--extra-alpha", type=float, action="append", default=[], help="another fixed-α system (repeatable)")
    parser.add_argument("--extra-schedule", action="append", default=[],
                        help='another fused-head system with this LLM schedule, e.g. "periodic(4, 1, 0)" (repeatable)')
    generated = ",".join(list(BASE_SYSTEMS)[:6])
    parser.add_argument("--systems", default=generated, help=f"which of {generated} (default all)")
    parser.add_argument("--data", default=None, help="folder with the CoGenesis split files (default: the bundled copy)")
    parser.add_argument("--split", default="test", choices=sorted(SPLITS), help="split (default test)")
    parser.add_argument("--max-examples", type=int, default=20, help="examples to generate for (default 20)")
    parser.add_argument("--max-history", type=int, default=2, help="writing-history items in the prompts (default 2)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="max length of every response (default 128)")
    parser.add_argument("--resume", action="store_true", help="keep OUT/generations.jsonl (an interrupted run with "
                        "the same settings) and generate only what it lacks")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.1, help="for every system, as in `logitfuse "
                        "demo` (default 1.1; 1 = none: small models then often repeat a line until the length limit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--judge-url", default=None, help="OpenAI-compatible chat server of the judge, e.g. "
                        "http://127.0.0.1:8080 (without it: ROUGE-L and length only)")
    parser.add_argument("--judge-model", default=None, help="the served judge model's name")
    parser.add_argument("--allow-remote-judge", action="store_true",
                        help="allow a judge URL that is not loopback: the judge sees the private profiles, so it "
                             "must be a machine you control (refused by default)")
    parser.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per judge request (default 120)")
    parser.add_argument("--judge-retries", type=int, default=2, help="retries per judge request (default 2)")
    parser.add_argument("--cache", default=None, help="judgment cache, JSONL (default OUT/judgments.jsonl)")
    parser.add_argument("--explain", action="store_true", help="ask the judge for a sentence of justification before "
                        "each verdict (a strong judge may judge better; ~10x slower, and a small one drifts into "
                        "doing the task). Default: the verdict line only")
    parser.add_argument("--no-pairwise", action="store_true", help="skip the pairwise preferences")
    parser.add_argument("--sanity", action="store_true", help="also rate the dataset's response (reference) and "
                        "another user's (off-task): a check of the judge itself")
