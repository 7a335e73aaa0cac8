"""What `logitfuse demo`, `generate` and `judge` share (CLI-only code, kept in one place).

- the weight of a fused run: a head folder, a fixed α, or the head shipped for the pair
  (:func:`choose_weight` before anything loads, :func:`load_weight` once the vocabulary map is known);
- the flags and checks common to demo and generate (:func:`add_shared_arguments`, :func:`check_shared`);
- loading the SLM on either engine (:func:`load_slm`: transformers, or llama.cpp from the zoo's GGUF
  file) and the vocabulary map (:func:`vocab_map_for`);
- one run through the one engine, :func:`logitfuse.generate` (:func:`run_engine`), given the
  :class:`logitfuse.FusionConfig` and :class:`logitfuse.SamplingConfig` built here
  (:func:`fusion_config`, :func:`sampling_config`): fused, or the SLM alone at α = 1 with no LLM at
  all (:func:`slm_alone`); the result is a :class:`logitfuse.FusedGeneration`. The LLM alone is plain
  ``model.generate`` (:func:`llm_alone`);
- torch's CPU threads (``--threads``, :func:`apply_threads`);
- fusion rules over N models (``--rule``, ``--input``: :func:`add_rule_arguments`, :func:`check_rule`).

Printing a run (the text coloured by α, the LLM-silence warning) is :mod:`logitfuse.cli.printing`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logitfuse import FusedGeneration, generate, zoo
from logitfuse.backends import LLMBackend, LLMBackendError
from logitfuse.cli.progress import generation_bar
from logitfuse.config import FusionConfig, SamplingConfig
from logitfuse.decoding.llama_cpp import LlamaCppSLM, llama_cpp_python_missing
from logitfuse.decoding.schedules import parse as parse_schedule
from logitfuse.errors import UsageError, check_device, check_range
from logitfuse.heads import load_head
from logitfuse.prompts import render_prompt, shipped_path
from logitfuse.rules import Mix, Mixture, Rule, parse_rule
from logitfuse.vocab import VocabMap

__all__ = ["BUILT_IN_INPUTS", "DEFAULT_ALPHA", "Plan", "add_rule_arguments", "add_shared_arguments", "check_rule", "apply_threads", "free_cores", "bundled_head_dir", "check_shared", "check_slm", "check_url",
           "choose_weight", "chosen_alpha", "fusion_config", "is_url", "llm_alone",
           "load_slm", "load_weight", "response", "run_engine", "run_interruptible", "sampling_config",
           "slm_alone", "speculation",
           "vocab_map_for"]

# The fixed α for a pair with nothing shipped (no head, no recorded α) when --alpha is not given: the
# median of the α each measured pair chose on its own training data with the dense LLM (0.25, 0.51,
# 0.68, 0.85: train_fuser/RESULTS.md, the chosen_alpha.json files beside the shipped heads), rounded.
# docs/concepts.md, "Why these defaults", says more; tests/cli/test_default_weight.py holds it to the records.
DEFAULT_ALPHA = 0.6
CHOSEN_ALPHA_FILE = "chosen_alpha.json"  # beside a shipped head's config.json: the fixed α its training data chose


# ------------------------------------------------------------------------------------ the weight
def bundled_head_dir(slm_name: str, llm_name: str, variant: str = "dense") -> Path | None:
    """The head shipped for a model pair, trained with `logitfuse train` (``None`` when there is none)."""
    folder = shipped_path("heads", f"{slm_name}__{llm_name}", variant)
    return folder if (folder / "config.json").is_file() else None


def chosen_alpha(folder: Path) -> float | None:
    """The fixed α recorded beside a head (``folder/chosen_alpha.json``, key ``chosen_alpha``: the α with
    the lowest NLL on the head's own training positions), or ``None`` where nothing is recorded. A record
    that is there but unreadable, not a JSON object, or without a number in [0, 1] is a
    :class:`UsageError` naming the file."""
    path = Path(folder) / CHOSEN_ALPHA_FILE
    if not path.is_file():
        return None
    fix = "re-create it from the run's train.json (heads.<variant>.best_fixed_alpha), or pass --alpha A"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"{path} is not readable JSON ({err}); {fix}") from None
    value = record.get("chosen_alpha") if isinstance(record, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        got = repr(value) if isinstance(record, dict) else f"a {type(record).__name__}, not an object"
        raise UsageError(f"{path} records no fixed α: 'chosen_alpha' must be a number in [0, 1] (1 = SLM alone), "
                         f"got {got}; {fix}")
    return float(value)


def _pair_alpha(slm_name: str, llm_name: str | None, variant: str) -> tuple[float, str]:
    """The fixed α for a pair: the one recorded for it (``variant``'s, else the dense one), else DEFAULT_ALPHA;
    with a few words on where it comes from."""
    if llm_name:
        for name in dict.fromkeys((variant, "dense")):
            recorded = chosen_alpha(shipped_path("heads", f"{slm_name}__{llm_name}", name))
            if recorded is not None:
                return recorded, f"chosen on the training data of the {name} head of {slm_name} + {llm_name}"
    return DEFAULT_ALPHA, f"the default: nothing is recorded for {slm_name} + {llm_name or 'this LLM'}"


@dataclass
class Plan:
    """What the checked arguments ask for, worked out before anything is loaded (``args.plan``)."""

    slm_name: str
    llm_name: str | None  # the name heads record for the LLM (None: unknown, a URL without a zoo tokenizer)
    head_dir: Path | None = None  # the head to load, or None for a fixed α
    alpha: float | None = None  # the fixed α (None with a head)
    head_named: bool = False  # the user named the head: a head that does not fit is an error, not a fallback
    note: str = ""  # why a fixed α was chosen where a head could have been
    fallback: tuple[float, str] = (DEFAULT_ALPHA, "the default")  # the fixed α if the shipped head does not fit, and why
    public: str = ""  # generate: what the cloud LLM may see
    context: str = ""  # generate: the private context
    example: Any = None  # demo: the test-split example


def head_folder(value: str, variant: str = "dense") -> Path:
    """--head as users give it: a head folder (``RUN/heads/dense``), or the ``--out`` folder of
    `logitfuse train` (``RUN``) or its ``heads/`` folder, meaning their ``variant`` head there."""
    folder = Path(value).expanduser()
    if not (folder / "config.json").is_file():
        for candidate in (folder / "heads" / variant, folder / variant):
            if (candidate / "config.json").is_file():
                return candidate
    return folder


def check_head(value: str, slm_name: str, llm_name: str | None, variant: str = "dense") -> Path:
    """A head given with --head (:func:`head_folder`): it exists, has a readable config, and names this
    pair if it names one."""
    folder = head_folder(value, variant)
    config = folder / "config.json"
    if not config.is_file():
        what = "does not exist" if not folder.exists() else f"has no config.json (nor heads/{variant}/config.json)"
        raise UsageError(f"--head {value!r} {what}; pass a head folder written by `logitfuse train` "
                         f"(RUN/heads/{variant}) or its --out folder (RUN), or --head none for a fixed --alpha")
    try:
        recorded = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        recorded = f"unreadable ({err})"
    if not isinstance(recorded, dict):
        raise UsageError(f"--head {value!r}: its config.json is not a JSON object: {recorded!s:.200}; "
                         "re-save the head with save_pretrained")
    for side, ours in (("slm", slm_name), ("llm", llm_name)):
        theirs = recorded.get(f"{side}_name")
        if theirs and ours and theirs != ours:
            raise UsageError(f"--head {value!r} was trained for --{side} {theirs!r}, not {ours!r}; train a head for "
                             "this pair (`logitfuse train`) or pass --alpha A for a fixed weight")
    return folder


def choose_weight(args: argparse.Namespace, plan: Plan, variant: str) -> None:
    """Fill ``plan``'s head/α: --head DIR, else --alpha (or --head none), else the head shipped for the
    pair. A head that reads the SLM's hidden state is refused with --slm-engine llama.cpp (it does not
    expose it), from the head's config.json, before anything loads."""
    _choose_weight(args, plan, variant)
    if plan.head_dir is not None and getattr(args, "slm_engine", "transformers") == "llama.cpp":
        try:
            features = json.loads((plan.head_dir / "config.json").read_text(encoding="utf-8")).get("slm_features")
        except (OSError, ValueError, AttributeError):
            features = None  # loading it says what is wrong
        if isinstance(features, list) and "hidden" in features:
            raise UsageError(f"--head {str(plan.head_dir)!r} reads the SLM's hidden state, which llama.cpp does not "
                             "expose: use --slm-engine transformers, or a head trained without it (logitfuse train "
                             "--slm-features token,position)")


def _choose_weight(args: argparse.Namespace, plan: Plan, variant: str) -> None:
    if args.head not in (None, "none"):
        if args.alpha is not None:
            raise UsageError(f"--alpha {args.alpha:g} and --head {args.head!r} both given: a head predicts α per token, "
                             "a fixed --alpha replaces it; pass one of them")
        plan.head_dir, plan.head_named = check_head(args.head, plan.slm_name, plan.llm_name, variant), True
        return
    if args.alpha is not None:
        plan.alpha = args.alpha
        return
    plan.fallback = _pair_alpha(plan.slm_name, plan.llm_name, variant)
    if args.head == "none":
        plan.alpha, plan.note = plan.fallback
        return
    plan.head_dir = bundled_head_dir(plan.slm_name, plan.llm_name, variant) if plan.llm_name else None
    if plan.head_dir is None:
        plan.alpha = plan.fallback[0]
        recorded = not plan.fallback[1].startswith("the default")
        plan.note = f"no head is shipped for {plan.slm_name} + {plan.llm_name or args.llm}; " + (
            plan.fallback[1] if recorded else "the default")


def load_weight(plan: Plan, vmap: VocabMap) -> tuple[Any, float | None, str]:
    """``(head, alpha, label)``: the planned head loaded for ``vmap`` (or the fixed α)."""
    if plan.head_dir is None:
        return None, plan.alpha, f"fixed α {plan.alpha:g}" + (f" ({plan.note})" if plan.note else "")
    try:
        head = load_head(plan.head_dir, vocab_map=vmap)
    except ValueError as err:
        if plan.head_named:
            raise UsageError(f"--head {str(plan.head_dir)!r} does not fit these models: {err}") from None
        alpha, source = plan.fallback
        print(f"(the shipped head does not fit these models, using a fixed α {alpha:g}, {source}: {err})", file=sys.stderr)
        return None, alpha, f"fixed α {alpha:g} (the shipped head does not fit)"
    return head, None, f"trained head {plan.head_dir.parent.name}/{plan.head_dir.name}"


# ------------------------------------------------------------------------------------ flags and checks
_HEAD_HELP = ("head folder RUN/heads/dense (predicts α per token), or the --out folder RUN of `logitfuse train`; "
              "default: the head shipped for the pair, when there is one; 'none': a fixed --alpha")
_ALPHA_HELP = (f"fixed α instead of a head (1 = SLM alone, 0 = LLM alone). Default where no head fits (or with "
               f"--head none): the α recorded beside the pair's shipped head ({CHOSEN_ALPHA_FILE}), else "
               f"{DEFAULT_ALPHA:g}, the median α chosen on the training data of the measured pairs "
               "(docs: Concepts, why these defaults)")


def add_shared_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `demo` and `generate` (after each one's --slm and --llm)."""
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder (`logitfuse finetune --out`) for the SLM")
    parser.add_argument("--head", default=None, help=_HEAD_HELP)
    parser.add_argument("--alpha", type=float, default=None, help=_ALPHA_HELP)
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate (default 48)")
    parser.add_argument("--schedule", default="always",
                        help='when to ask the LLM: "always" (default), "periodic(P, K, T)", "entropy_gate(h)" or '
                             '"head_gate(tau)" (a head with a call gate: logitfuse train --gate-hidden)')
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="torch device for the local models (default cpu)")
    parser.add_argument("--slm-engine", default="transformers", choices=["transformers", "llama.cpp"],
                        help="run the SLM in transformers, or in llama.cpp from a GGUF file: the zoo's, or --slm "
                             "FILE.gguf")
    parser.add_argument("--color", default="auto", choices=["auto", "always", "never"], help="colour the fused text by α")
    parser.add_argument("--threads", default="auto",
                        help="torch CPU threads: a number, or auto (default): the cores other processes leave free "
                             "now (at least 1; on a busy machine fewer threads than cores is faster: docs/cli.md)")
    parser.add_argument("--speculate", type=int, default=0,
                        help="draft tokens per LLM call, where both models share a tokenizer (opt-in: the LLM then "
                             "also sees the SLM's drafts that get rejected, counted in the summary; 4 is a good "
                             "value); default 0, per-step fusion")


def is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def check_url(flag: str, value: str) -> None:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as err:
        raise UsageError(f"{flag} {value!r} is not a valid URL ({err}); e.g. http://127.0.0.1:8000") from None
    if not parts.hostname:
        raise UsageError(f"{flag} {value!r} has no host; e.g. http://127.0.0.1:8000")


def is_gguf(value: str) -> bool:
    """A --slm given as a GGUF file of the user's (a path ending in .gguf), for --slm-engine llama.cpp."""
    return value.lower().endswith(".gguf")


def check_slm(args: argparse.Namespace) -> str:
    """--slm: a zoo name or model folder (:func:`logitfuse.zoo.check_model`), or with --slm-engine
    llama.cpp a GGUF file (checked by :func:`check_slm_engine`); the name a head records for it."""
    if getattr(args, "slm_engine", "transformers") == "llama.cpp" and is_gguf(args.slm):
        return Path(args.slm).stem
    return zoo.check_model("--slm", args.slm)


def check_slm_engine(args: argparse.Namespace) -> None:
    """--slm-engine llama.cpp runs a GGUF file on the CPU, as it is: a zoo model's, or any FILE.gguf."""
    if args.slm_engine != "llama.cpp":
        if is_gguf(args.slm):
            raise UsageError(f"--slm {args.slm!r} is a GGUF file: run it with --slm-engine llama.cpp (transformers "
                             "takes a zoo name or a model folder)")
        return
    missing = llama_cpp_python_missing()
    if missing:
        raise UsageError(f"--slm-engine llama.cpp {missing} (or use --slm-engine transformers)")
    gguf_models = [spec.name for spec in zoo.list_models()]
    if is_gguf(args.slm):
        if not Path(args.slm).expanduser().is_file():
            raise UsageError(f"--slm {args.slm!r} is not a file; pass a GGUF file (FILE.gguf) or a zoo model "
                             f"({', '.join(gguf_models)})")
    elif args.slm not in gguf_models:
        raise UsageError(f"--slm-engine llama.cpp runs a GGUF file: a zoo model's ({', '.join(gguf_models)}) or "
                         f"one of yours (--slm FILE.gguf), and --slm {args.slm!r} is none of them; pass one, or use "
                         "--slm-engine transformers")
    if args.adapter is not None:
        raise UsageError("--adapter is a LoRA adapter for the transformers SLM; llama.cpp runs the GGUF file as it "
                         "is: drop --adapter, or use --slm-engine transformers")
    if args.device != "cpu":
        raise UsageError(f"--device {args.device}: --slm-engine llama.cpp runs on the CPU; pass --device cpu (the "
                         "default), or use --slm-engine transformers")


def check_shared(args: argparse.Namespace) -> None:
    """The checks of :func:`add_shared_arguments`' flags (``UsageError``), before anything loads."""
    check_range("--max-new-tokens", args.max_new_tokens, low=1)
    check_range("--speculate", args.speculate, low=0, meaning="draft tokens per LLM call; 0 = per-step fusion")
    check_slm_engine(args)
    if args.adapter is not None:  # a LoRA adapter folder: its files are there
        try:
            zoo.adapter_sha256(args.adapter)
        except zoo.ZooError as err:
            raise UsageError(f"--adapter {args.adapter!r}: {err}") from None
    check_range("--alpha", args.alpha, low=0, high=1, meaning="1 = the SLM alone, 0 = the LLM alone")
    try:
        parse_schedule(args.schedule)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--schedule {args.schedule!r}: {err}") from None
    check_device("--device", args.device)
    if args.threads != "auto" and not (args.threads.isdigit() and int(args.threads) >= 1):
        raise UsageError(f"--threads {args.threads!r} must be a number of threads >= 1, or auto")


def free_cores(interval: float = 0.2) -> float:
    """Cores that other processes leave idle now: the machine's idle share over ``interval`` seconds
    (``/proc/stat``) times the cores this process may use; all of them where ``/proc/stat`` is missing."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return ticks[3] + (ticks[4] if len(ticks) > 4 else 0), sum(ticks)  # idle + iowait, all

    try:
        idle0, total0 = sample()
        time.sleep(interval)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return float(cores)
    share = (idle1 - idle0) / (total1 - total0) if total1 > total0 else 1.0
    return max(0.0, min(1.0, share)) * cores


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU threads from ``--threads``: a number, or ``auto``, on the CPU the cores other
    processes leave free (:func:`free_cores`, at least 1). Measured with the demo on 2 cores (docs/cli.md):
    idle, 2 threads beat 1 (34 s against 41 s); with one core busy elsewhere, 1 beats 2 (44-46 s against
    55-64 s): OpenMP threads that wait for a busy core stall every forward."""
    if args.threads != "auto":
        torch.set_num_threads(int(args.threads))
    elif args.device == "cpu":
        torch.set_num_threads(max(1, round(free_cores())))


# ------------------------------------------------------------------------------------ fusion rules
#: the inputs every --rule may read: the SLM (private prompt), the SLM over the public prompt (on this
#: device) and the LLM; --input NAME=MODEL adds more (over the public prompt), as `logitfuse eval` does
BUILT_IN_INPUTS = ("slm", "slm_public", "llm")


def add_rule_arguments(parser: argparse.ArgumentParser) -> None:
    """--rule and --input (`generate`)."""
    parser.add_argument("--rule", default="mix",
                        help="how to fuse (docs: Fusion rules): mix (default: the two-model mix, --alpha or --head), "
                             "mixture(W_SLM,W_LLM), geometric(...), steer(BETA) (the LLM steered by the SLM with "
                             "minus without the context), arithmetic(BETA) (the LLM + BETA (expert - anti)), "
                             "contrastive(LAMBDA[,TAU]) (the LLM - LAMBDA x the SLM over the public prompt)")
    parser.add_argument("--input", action="append", default=None, metavar="NAME=MODEL",
                        help="with --rule: an extra input NAME that MODEL (zoo name, folder or Hub id) gives over the "
                             "public prompt, repeatable (arithmetic(1) reads expert= and anti=); slm and slm_public "
                             "(--slm over each prompt) and llm (--llm) are built in")


def check_rule(args: argparse.Namespace) -> Rule:
    """--rule parsed and checked against the other flags, before anything loads (``UsageError``, one line);
    ``args.inputs`` gets --input as ``{name: model}``. The inputs the rule reads are built in
    (:data:`BUILT_IN_INPUTS`) or given by --input, each --input is read, and the two-model mix's settings
    (--alpha, --mode, --tail, --schedule, --speculate) are left alone by the other rules. A
    ``mixture(NAME,...)`` takes its head from --head."""
    try:
        rule = parse_rule(args.rule)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--rule: {err}") from None
    args.inputs = {}
    for item in args.input or []:
        name, eq, model = item.partition("=")
        if not eq or not name.isidentifier() or not model:
            raise UsageError(f"--input {item!r} must be NAME=MODEL, e.g. --input expert=smollm2-135m-cogenesis")
        if name in BUILT_IN_INPUTS or name in args.inputs:
            raise UsageError(f"--input {name}= is given twice (or is built in: {', '.join(BUILT_IN_INPUTS)})")
        args.inputs[name] = model
    unread = [n for n in args.inputs if n not in rule.inputs]
    if unread:
        raise UsageError(f"--input {unread[0]}= is not read by --rule {args.rule!r} (it reads {', '.join(rule.inputs)}); "
                         "drop it")
    missing = [n for n in rule.inputs if n not in BUILT_IN_INPUTS and n not in args.inputs]
    if missing:
        raise UsageError(f"--rule {args.rule!r} reads the input {missing[0]!r}: pass --input {missing[0]}=MODEL (zoo "
                         "name, folder or Hub id)")
    for name, model in args.inputs.items():
        zoo.check_model(f"--input {name}=", model)
    if isinstance(rule, Mix):
        return rule
    for flag, value, default in (("--alpha", getattr(args, "alpha", None), None), ("--mode", getattr(args, "mode", None), None),
                                 ("--tail", getattr(args, "tail", None), None),
                                 ("--schedule", getattr(args, "schedule", "always"), "always"),
                                 ("--speculate", getattr(args, "speculate", 0), 0)):
        if value != default:
            raise UsageError(f"{flag} {value} shapes the two-model mix; --rule {args.rule!r} brings its own weights: "
                             f"drop {flag} (or use --rule mix)")
    if "slm_public" in rule.inputs and getattr(args, "slm_engine", "transformers") != "transformers":
        raise UsageError(f"--rule {args.rule!r} reads the SLM over the public prompt, a second transformers run of "
                         "the SLM: use --slm-engine transformers")
    head = getattr(args, "head", None)
    if isinstance(rule, Mixture) and rule.needs_head:
        if head in (None, "none"):
            raise UsageError(f"--rule {args.rule!r} takes its weights from a mixture head: pass --head FOLDER (the --out "
                             "folder of `logitfuse train --rule`), or weights, e.g. mixture(0.6,0.4)")
        if not Path(head).expanduser().is_dir():
            raise UsageError(f"--head {head!r} is not a folder; pass the --out folder of `logitfuse train --rule`")
    elif head not in (None, "none"):
        raise UsageError(f"--head {head!r} weighs the two-model mix or a mixture(NAME,...) rule; --rule {args.rule!r} "
                         "has its own weights: drop --head")
    return rule


# ------------------------------------------------------------------------------------ loading
def load_slm(name: str, messages: list[dict[str, str]], *, engine: str = "transformers", max_new_tokens: int,
             dtype: str = "float32", device: str = "cpu", adapter: str | None = None,
             torch_llm: bool = True) -> tuple[Any, Any, list[int]]:
    """``(slm, tokenizer, private prompt ids)`` for zoo model or folder ``name``.

    ``engine="transformers"``: the transformers model (``dtype``, ``device``, LoRA ``adapter``).
    ``engine="llama.cpp"``: a :class:`logitfuse.LlamaCppSLM` on the zoo's GGUF file, its context sized
    for the prompt and ``max_new_tokens`` (of the transformers folder only the tokenizer is loaded).
    With a torch LLM in the same process (``torch_llm``) llama.cpp takes half the cores and torch at
    most the rest.
    """
    if engine == "transformers":
        slm, tokenizer, _ = zoo.load(name, dtype=dtype, device=device, adapter=adapter)
        return slm, tokenizer, render_prompt(tokenizer, messages)
    from transformers import AutoTokenizer

    if is_gguf(name):  # a GGUF file of the user's: its tokenizer from the file's own metadata
        gguf = Path(name).expanduser()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except (OSError, ValueError, KeyError, ImportError) as err:
            raise zoo.ZooError(f"--slm {name!r}: transformers could not read the tokenizer of this GGUF file "
                               f"({' '.join(str(err).split())[:200]})") from None
    else:
        tokenizer, gguf = AutoTokenizer.from_pretrained(zoo.resolve(name, install=True)), zoo.gguf_path(name)
    ids = render_prompt(tokenizer, messages)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    threads = max(1, cores // 2)
    if torch_llm:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - threads)))
    slm = LlamaCppSLM(gguf, tokenizer=tokenizer, n_ctx=len(ids) + max_new_tokens + 8, n_threads=threads)
    return slm, tokenizer, ids


def speculation(llm: Any, vocab_map: VocabMap, schedule: str, speculate: int, head: Any = None) -> tuple[int, str]:
    """``(drafts, why)``: ``speculate`` drafts per LLM call where both sides share one tokenizer, the
    schedule is ``"always"``, ``head`` reads no SLM-side features and the backend scores drafts
    (``llm.supports_score``, asked only then: a server is probed once); else 0 (per-step fusion) and why."""
    if not speculate:
        return 0, ""
    blocked = ("the two tokenizers differ" if not vocab_map.is_identity else
               f"--schedule {schedule} is not 'always'" if schedule != "always" else
               "the head reads SLM-side features" if head is not None and head.reads_slm_side else
               f"{type(llm).__name__} cannot score a draft" if not getattr(llm, "supports_score", False) else "")
    return (0, f"speculation off: {blocked}") if blocked else (speculate, "")


def slm_vocab_size(slm: Any) -> int:
    """The size of the SLM's logits (a transformers model or a :class:`logitfuse.LlamaCppSLM`)."""
    return slm.vocab_size if isinstance(slm, LlamaCppSLM) else int(slm.get_output_embeddings().weight.shape[0])


def vocab_map_for(slm: Any, slm_tokenizer: Any, llm_vocab_size: int, llm_tokenizer: Any) -> VocabMap:
    """Identity for one tokenizer on both sides, else the exact-text map between the two (``slm``: the
    transformers model or a :class:`logitfuse.LlamaCppSLM`)."""
    v_slm = slm_vocab_size(slm)
    if slm_tokenizer.get_vocab() == llm_tokenizer.get_vocab():
        return VocabMap.identity(v_slm, llm_vocab_size, n_shared=min(len(slm_tokenizer), v_slm, llm_vocab_size))
    return VocabMap.from_tokenizers(slm_tokenizer, llm_tokenizer, v_slm=v_slm, v_llm=llm_vocab_size)


# ------------------------------------------------------------------------------------ the engine
def fusion_config(*, head: Any = None, alpha: float | None = None, vocab_map: VocabMap | None = None,
                  mode: str | None = None, tail: str | None = None, schedule: str = "always",
                  speculate: int = 0) -> FusionConfig:
    """The :class:`logitfuse.FusionConfig` of a CLI run (overlap on: the LLM's request runs beside the SLM's forward)."""
    return FusionConfig(head=head, alpha=alpha, vocab_map=vocab_map, mode=mode, tail=tail, schedule=schedule,
                        speculate=speculate, overlap=True)


def sampling_config(slm: Any, tokenizer: Any, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                    repetition_penalty: float = 1.0, seed: int | None = None) -> SamplingConfig:
    """The :class:`logitfuse.SamplingConfig` of a CLI run: the SLM's own end-of-generation ids (a
    transformers SLM: those of its generation config, where ``slm.generate`` stops), draws from a
    generator seeded with ``seed`` (default: a :class:`logitfuse.LlamaCppSLM`'s own seed, else 0)."""
    if isinstance(slm, LlamaCppSLM):
        eos, pad = sorted(slm.eos_token_ids), 0
    else:
        eos = getattr(getattr(slm, "generation_config", None), "eos_token_id", None)
        eos = tokenizer.eos_token_id if eos is None else eos
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seed = (slm.seed if isinstance(slm, LlamaCppSLM) else 0) if seed is None else int(seed)
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          repetition_penalty=repetition_penalty, seed=seed, eos_token_id=eos, pad_token_id=pad)


def run_engine(slm: Any, tokenizer: Any, private_ids: list[int], llm: LLMBackend | None, public_prompt: Any,
               fusion: FusionConfig, sampling: SamplingConfig) -> tuple[FusedGeneration, float]:
    """``(result, seconds)`` of one row through :func:`logitfuse.generate`, the one loop that chooses
    fused tokens (the SLM alone too, at α = 1: the LLM is never asked)."""
    started = time.perf_counter()
    out = generate(slm, llm, [private_ids], public_prompt, fusion, sampling, slm_tokenizer=tokenizer)
    return out, time.perf_counter() - started


def run_interruptible(slm: Any, tokenizer: Any, private_ids: list[int], llm: LLMBackend | None, public_prompt: Any,
                      fusion: FusionConfig, sampling: SamplingConfig) -> tuple[FusedGeneration, float, bool]:
    """:func:`run_engine`, but Ctrl-C keeps the text so far: ``(result, seconds, interrupted)``, the
    tokens chosen until Ctrl-C with ``interrupted`` True. Ctrl-C before the first step could start
    is raised as it is. An LLM that fails under ``--on-failure raise`` prints the text so far, then
    its error goes on (the subcommand makes it one line, exit status 1)."""
    started = time.perf_counter()
    try:
        with generation_bar(slm, sampling.max_new_tokens, "generating" if llm is None else "fusing"):
            out, seconds = run_engine(slm, tokenizer, private_ids, llm, public_prompt, fusion, sampling)
    except KeyboardInterrupt as interrupt:
        partial = getattr(interrupt, "partial", None)  # logitfuse.generate attaches what it generated
        if partial is None:
            raise
        return partial, time.perf_counter() - started, True
    except LLMBackendError as err:
        partial = getattr(err, "partial", None)
        if partial is not None and partial.sequences[0]:
            print(response(slm, tokenizer, partial)[2], flush=True)
        raise
    return out, seconds, False


def slm_alone(slm: Any, tokenizer: Any, private_ids: list[int], sampling: SamplingConfig) -> tuple[FusedGeneration, float]:
    """The SLM alone: :func:`run_engine` at α = 1 with no LLM at all (nothing loaded, nothing sent)."""
    return run_engine(slm, tokenizer, private_ids, None, None, FusionConfig(alpha=1.0), sampling)


def response(slm: Any, tokenizer: Any, out: FusedGeneration) -> tuple[list[int], list[float], str]:
    """``(ids, α per id, text)`` of row 0 without its end-of-generation id (a transformers SLM: any
    trailing special ids, as ``slm.generate``'s output was read)."""
    ids = list(out.sequences[0])
    if isinstance(slm, LlamaCppSLM):
        ids = ids[:-1] if out.stopped[0] == "eos" else ids
        return ids, out.alpha[0][: len(ids)], slm.detokenize(ids)
    ids = _strip_special(ids, tokenizer)
    return ids, out.alpha[0][: len(ids)], tokenizer.decode(ids, skip_special_tokens=True)


def _strip_special(ids: list[int], tokenizer: Any) -> list[int]:
    special = set(tokenizer.all_special_ids)
    while ids and ids[-1] in special:
        ids = ids[:-1]
    return ids


def llm_alone(model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int,
              **sampling: Any) -> tuple[list[int], str, float]:
    """``(ids, text, seconds)`` of plain ``model.generate`` (the LLM alone: nothing is fused)."""
    inputs = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.perf_counter()
    with torch.no_grad(), generation_bar(model, max_new_tokens, "LLM alone"):
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                             pad_token_id=pad, **sampling)
    seconds = time.perf_counter() - started
    ids = _strip_special(out[0, inputs.shape[1]:].tolist(), tokenizer)
    return ids, tokenizer.decode(ids, skip_special_tokens=True), seconds
