"""`logitfuse demo` and `logitfuse generate`: fused generation with real models, from the command line.

    logitfuse demo                       # SmolLM2-135M (on-device, private) + Qwen2.5-Coder-0.5B (cloud, public)
    logitfuse generate --slm smollm2-135m --llm qwen2.5-coder-0.5b \\
        --context profile.txt --instruction "Write a toast for my sister's wedding: mention our trip to Rome"
    logitfuse generate ... --llm http://127.0.0.1:8000 --llm-tokenizer qwen2.5-coder-0.5b   # a served LLM
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logitfuse import zoo
from logitfuse.backends import HFLLM, LLMBackendError, OpenAICompatibleLLM
from logitfuse.errors import UsageError, check_device, check_range
from logitfuse.zoo import check_model
from logitfuse.cli.generation import (
    colour_by_alpha,
    fast_path,
    fuse_on_engine,
    generate_alone,
    legend,
    load_slm,
    slm_alone,
    use_color,
    vocab_map_for,
)
from logitfuse.heads import load_head
from logitfuse.decoding.llama_cpp import LlamaCppSLM, llama_cpp_python_missing
from logitfuse.prompts import (
    bundled_split,
    load_examples,
    private_messages,
    public_instruction,
    public_messages,
    render_prompt,
    shipped_path,
)
from logitfuse.decoding.schedules import parse as parse_schedule
from logitfuse.vocab import VocabMap

DEFAULT_SLM = "smollm2-135m"
DEFAULT_LLM = "qwen2.5-coder-0.5b"


def bundled_head_dir(slm_name: str, llm_name: str, variant: str = "dense") -> Path | None:
    """The head shipped for a model pair, trained with `logitfuse train` (``None`` when there is none)."""
    folder = shipped_path("heads", f"{slm_name}__{llm_name}", variant)
    return folder if (folder / "config.json").is_file() else None


def _section(title: str, body: str) -> str:
    return f"\n\033[1m{title}\033[0m\n{body.strip()}\n" if sys.stdout.isatty() else f"\n== {title} ==\n{body.strip()}\n"


# ------------------------------------------------------------------------------------ checks
DEFAULT_ALPHA = 0.25  # the fixed α when neither --alpha nor a fitting head is there


@dataclass
class _Plan:
    """What the checked arguments ask for, worked out before anything is loaded."""

    slm_name: str
    llm_name: str | None  # the name heads record for the LLM (None: unknown, a URL without a zoo tokenizer)
    head_dir: Path | None  # the head to load, or None for a fixed α
    alpha: float | None  # the fixed α (None with a head)
    head_named: bool  # the user named the head: a head that does not fit is an error, not a fallback
    note: str = ""  # why a fixed α was chosen where a head could have been
    public: str = ""  # generate: what the cloud LLM may see
    context: str = ""  # generate: the private context
    example: Any = None  # demo: the test-split example


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def _check_url(flag: str, value: str) -> None:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as err:
        raise UsageError(f"{flag} {value!r} is not a valid URL ({err}); e.g. http://127.0.0.1:8000") from None
    if not parts.hostname:
        raise UsageError(f"{flag} {value!r} has no host; e.g. http://127.0.0.1:8000")


def _check_head(value: str, slm_name: str, llm_name: str | None) -> Path:
    """A head folder given with --head: it exists, has a readable config, and names this pair if it names one."""
    folder = Path(value).expanduser()
    config = folder / "config.json"
    if not config.is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise UsageError(f"--head {value!r} {what}; pass a head folder written by `logitfuse train` "
                         "(e.g. RUN/heads/dense), or --head none for a fixed --alpha")
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


def _choose_weight(args: argparse.Namespace, plan: _Plan, variant: str) -> None:
    """Fill ``plan``'s head/α: --head DIR, else --alpha (or --head none), else the head shipped for the pair."""
    if args.head not in (None, "none"):
        if args.alpha is not None:
            raise UsageError(f"--alpha {args.alpha:g} and --head {args.head!r} both given: a head predicts α per token, "
                             "a fixed --alpha replaces it; pass one of them")
        plan.head_dir, plan.head_named = _check_head(args.head, plan.slm_name, plan.llm_name), True
        return
    if args.head == "none" or args.alpha is not None:
        plan.alpha = DEFAULT_ALPHA if args.alpha is None else args.alpha
        return
    plan.head_dir = bundled_head_dir(plan.slm_name, plan.llm_name, variant) if plan.llm_name else None
    if plan.head_dir is None:
        plan.alpha = DEFAULT_ALPHA
        plan.note = f"no head is shipped for {plan.slm_name} + {plan.llm_name or args.llm}"


def _check_slm_engine(args: argparse.Namespace) -> None:
    """--slm-engine llama.cpp runs a zoo model's GGUF file on the CPU, as it is."""
    if args.slm_engine != "llama.cpp":
        return
    missing = llama_cpp_python_missing()
    if missing:
        raise UsageError(f"--slm-engine llama.cpp {missing} (or use --slm-engine transformers)")
    gguf_models = [spec.name for spec in zoo.list_models()]
    if args.slm not in gguf_models:
        raise UsageError(f"--slm-engine llama.cpp runs a zoo model's GGUF file, and --slm {args.slm!r} is none of "
                         f"{', '.join(gguf_models)}; pass one of them, or --slm-engine transformers")
    if args.adapter is not None:
        raise UsageError("--adapter is a LoRA adapter for the transformers SLM; llama.cpp runs the GGUF file as it "
                         "is: drop --adapter, or use --slm-engine transformers")
    if args.device != "cpu":
        raise UsageError(f"--device {args.device}: --slm-engine llama.cpp runs on the CPU; pass --device cpu (the "
                         "default), or use --slm-engine transformers")


def _check_common(args: argparse.Namespace) -> None:
    check_range("--max-new-tokens", args.max_new_tokens, low=1)
    _check_slm_engine(args)
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


def _check_demo(args: argparse.Namespace) -> _Plan:
    _check_common(args)
    check_range("--max-history", args.max_history, low=0)
    check_range("--repetition-penalty", args.repetition_penalty, low=0, low_open=True, meaning="1 = none")
    check_range("--speculate", args.speculate, low=0, meaning="draft tokens per LLM call; 0 = per-step fusion")
    if args.speculate and args.fused_engine == "processor":
        raise UsageError(f"--speculate {args.speculate} needs logitfuse.generate: drop --fused-engine processor")
    plan = _Plan(check_model("--slm", args.slm), check_model("--llm", args.llm), None, None, False)
    examples = load_examples(bundled_split("test"))
    plan.example = next((e for e in examples if e.tid == args.example), None) if args.example else examples[0]
    if plan.example is None:
        raise UsageError(f"--example {args.example!r} is not a tid of the bundled test split; e.g. {examples[0].tid!r}")
    _choose_weight(args, plan, "dense")
    return plan


def _public_prompt(args: argparse.Namespace) -> str:
    """What the cloud LLM may see: --public, else the instruction before its first ': '."""
    if args.public is not None:
        if not args.public.strip():
            raise UsageError("--public is empty; pass the part of the task the cloud LLM may see")
        return args.public.strip()
    if ": " not in args.instruction:
        raise UsageError("--instruction has no ': ', so nothing marks what is private: the part before ': ' goes to "
                         "the cloud LLM, the rest stays on this machine; pass --public TEXT to say exactly what the "
                         "cloud LLM may see")
    return public_instruction(args.instruction)


def _read_context(value: str | None) -> str:
    if value is None:
        return ""
    file = Path(value).expanduser()
    if not file.is_file():
        raise UsageError(f"--context {value!r} is not a file; pass a text file with the private context")
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--context {value!r} could not be read as UTF-8 text ({err})") from None


def _check_generate(args: argparse.Namespace) -> _Plan:
    _check_common(args)
    check_range("--temperature", args.temperature, low=0, meaning="0 = greedy")
    check_range("--top-p", args.top_p, low=0, high=1, low_open=True)
    check_range("--top-k", args.top_k, low=1, meaning="log-probabilities asked of a served LLM")
    check_range("--seed", args.seed, low=0)
    if not args.instruction.strip():
        raise UsageError("--instruction is empty; pass the task for the SLM")
    if _is_url(args.llm):
        _check_url("--llm", args.llm)
        if not args.llm_tokenizer:
            raise UsageError("--llm is a URL: pass --llm-tokenizer NAME|FOLDER (the served model's tokenizer)")
        llm_name = check_model("--llm-tokenizer", args.llm_tokenizer)
    else:
        llm_name = check_model("--llm", args.llm)
    plan = _Plan(check_model("--slm", args.slm), llm_name, None, None, False,
                 public=_public_prompt(args), context=_read_context(args.context))
    _choose_weight(args, plan, f"top{args.top_k}-slm" if _is_url(args.llm) else "dense")
    if (args.mode is not None or args.tail is not None) and args.alpha is None and args.head != "none":
        raise UsageError("--mode and --tail shape a fixed α; a head brings its own: pass --alpha A (or --head none) "
                         "with them")
    return plan


def _weight(plan: _Plan, vmap: VocabMap) -> tuple[Any, float | None, str]:
    """``(head, alpha, label)``: the planned head loaded for ``vmap`` (or the fixed α)."""
    if plan.head_dir is None:
        return None, plan.alpha, f"fixed α {plan.alpha:g}" + (f" ({plan.note})" if plan.note else "")
    try:
        head = load_head(plan.head_dir, vocab_map=vmap)
    except ValueError as err:
        if plan.head_named:
            raise UsageError(f"--head {str(plan.head_dir)!r} does not fit these models: {err}") from None
        print(f"(the shipped head does not fit these models, using a fixed α {DEFAULT_ALPHA:g}: {err})", file=sys.stderr)
        return None, DEFAULT_ALPHA, f"fixed α {DEFAULT_ALPHA:g} (the shipped head does not fit)"
    return head, None, f"trained head {plan.head_dir.parent.name}/{plan.head_dir.name}"


def _llm_silence(stats: dict[str, int], where: str) -> str:
    """Warn on stderr when the LLM answered none of the steps it was asked; the summary's note ('' otherwise)."""
    asked = stats.get("llm_row_calls", stats.get("llm_calls", 0))
    if asked == 0 or stats.get("fallbacks", 0) < asked:
        return ""
    print(f"warning: the LLM answered none of {asked} steps ({where} unreachable?): this text is the SLM alone",
          file=sys.stderr, flush=True)
    return "; the LLM answered none: SLM alone"


_LOOPS = {"processor": "fused by slm.generate + CoGenesisLogitsProcessor", "llama.cpp": "fused in llama.cpp's loop",
          "generate": "fused by logitfuse.generate ({k})"}


def _fused_loop(args: argparse.Namespace, slm: Any, llm: Any, vmap: VocabMap, head: Any, sampling: dict[str, Any],
                speculate: int = 0) -> tuple[str, int, str]:
    """``(loop, speculate, label)`` of the fused run: :func:`fast_path`'s choice (logitfuse.generate where
    it gives the processor's tokens), or each engine's reference loop with --fused-engine processor; why
    the fast path (or speculation) is off goes to stderr where the user asked for it."""
    if getattr(head, "needs_slm_hidden", False) and isinstance(slm, LlamaCppSLM):
        raise UsageError("--head reads the SLM's hidden state, which llama.cpp does not expose: use --slm-engine "
                         "transformers, or a head trained without it (logitfuse train --slm-features token,position)")
    loop, drafts, why = fast_path(slm, llm, vmap, args.schedule, sampling, speculate, head=head)
    if args.fused_engine == "processor" and loop == "generate":  # the reference loop of each engine
        loop = "llama.cpp" if isinstance(slm, LlamaCppSLM) else "processor"
    if why and (args.fused_engine == "generate" or speculate):
        print(f"(fused run: {why})", file=sys.stderr)
    return loop, drafts, _LOOPS[loop].format(k=f"speculate {drafts}" if drafts else "per step, overlap")


# ------------------------------------------------------------------------------------ demo


def run_demo(args: argparse.Namespace) -> int:
    plan = _check_demo(args)
    color = use_color(args.color)
    print(f"logitfuse demo: on-device SLM {args.slm} in {args.slm_engine} (sees the private context), cloud LLM "
          f"{args.llm} (sees only the public task title)", flush=True)
    example = plan.example
    slm, slm_tok, private_ids = load_slm(args.slm, example.private_messages(args.max_history), engine=args.slm_engine,
                                         max_new_tokens=args.max_new_tokens, dtype=args.dtype, device=args.device,
                                         adapter=args.adapter)
    llm_model, llm_tok, _ = zoo.load(args.llm, dtype=args.dtype, device=args.device)
    llm = HFLLM(llm_model, llm_tok)
    vmap = vocab_map_for(slm, slm_tok, llm.vocab_size, llm_tok)
    public_ids = render_prompt(llm_tok, example.public_messages())
    head, alpha, weight = _weight(plan, vmap)
    greedy = dict(do_sample=False, repetition_penalty=args.repetition_penalty)
    sampling = dict(repetition_penalty=args.repetition_penalty) if isinstance(slm, LlamaCppSLM) else greedy

    print(_section("What the cloud LLM saw (all of it)", llm_tok.decode(public_ids)))
    print(_section("Kept on the device (not shown in full)",
                   f"profile of {len(example.additional_profile)} characters, {len(example.profile)} writing samples, "
                   f"the full instruction: {example.instruction!r}"))
    alone = slm_alone(slm, slm_tok, private_ids, args.max_new_tokens, **sampling)
    print(_section(f"SLM alone, with the private context ({alone.seconds:.1f} s)", alone.text), flush=True)
    llm_alone = generate_alone(llm_model, llm_tok, public_ids, args.max_new_tokens, **greedy)
    print(_section(f"LLM alone, without it ({llm_alone.seconds:.1f} s)", llm_alone.text), flush=True)
    loop, speculate, how = _fused_loop(args, slm, llm, vmap, head, sampling, args.speculate)
    fused = fuse_on_engine(slm, slm_tok, private_ids, llm, public_ids, args.max_new_tokens, sampling, head=head,
                           alpha=alpha, vocab_map=vmap, schedule=args.schedule, loop=loop, speculate=speculate)
    print(_section(f"Fused, {weight} ({fused.seconds:.1f} s)", colour_by_alpha(slm_tok, fused.token_ids, fused.alpha, color)))
    print(legend(color), end="")
    mean_alpha = sum(fused.alpha) / max(len(fused.alpha), 1)
    silence = _llm_silence(fused.stats, args.llm)
    stats = fused.stats
    drafts = (f", {stats['draft_tokens_sent']} draft tokens sent ({stats['draft_tokens_discarded']} discarded: seen by "
              "the LLM, not in the output)" if stats.get("draft_tokens_sent") else "")
    print(f"\n{stats['steps']} steps, {stats['llm_calls']} LLM calls, {stats['llm_calls'] / max(stats['steps'], 1):.2f} "
          f"LLM calls per generated token{drafts}, {stats['saved_calls']} saved by the schedule, {stats['fallbacks']} "
          f"fallbacks; {how}; mean α {mean_alpha:.2f}; vocabulary map coverage "
          f"{vmap.coverage:.1%}{silence}")
    print(f"reference response (from the dataset): {example.response[:300]}{'...' if len(example.response) > 300 else ''}")
    return 0


# ------------------------------------------------------------------------------------ generate
def _llm_backend(args: argparse.Namespace, served_model: str | None) -> tuple[Any, Any]:
    """``(backend, llm tokenizer)`` for --llm: a URL (a served model) or a zoo name / folder."""
    if _is_url(args.llm):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(zoo.resolve(args.llm_tokenizer, install=True))
        backend = OpenAICompatibleLLM(args.llm, served_model, top_k=args.top_k, tokenizer=tokenizer,
                                      on_failure=args.on_failure)
        return backend, tokenizer
    model, tokenizer, _ = zoo.load(args.llm, dtype=args.dtype, device=args.device)
    return HFLLM(model, tokenizer), tokenizer


def served_model_name(base_url: str, timeout: float = 10.0) -> str:
    """The first model an OpenAI-compatible server lists at ``/v1/models``."""
    import urllib.request

    root = base_url.rstrip("/")
    url = (root if root.endswith("/v1") else root + "/v1") + "/models"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return json.load(reply)["data"][0]["id"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise UsageError(f"could not read the served model's name from {url} ({err}); check --llm, or pass "
                         "--served-model NAME") from None


def _sampling(args: argparse.Namespace, slm: Any) -> dict[str, Any]:
    """Greedy at --temperature 0, else sampling with --temperature and --top-p from --seed, for the SLM's engine."""
    if isinstance(slm, LlamaCppSLM):
        return {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    sampling: dict[str, Any] = {"do_sample": args.temperature > 0}
    if args.temperature > 0:
        torch.manual_seed(args.seed)
        sampling.update(temperature=args.temperature, top_p=args.top_p)
    return sampling


def run_generate(args: argparse.Namespace) -> int:
    plan = _check_generate(args)
    slm_only, served = plan.head_dir is None and plan.alpha == 1.0, None
    if slm_only:
        print("logitfuse generate: --alpha 1 is the SLM alone: the cloud LLM is neither loaded nor contacted",
              file=sys.stderr, flush=True)
    else:
        served = args.served_model or (served_model_name(args.llm) if _is_url(args.llm) else None)
        print(f"logitfuse generate: the cloud LLM ({args.llm}) will see: {plan.public!r}, then the text generated "
              "so far; the context and the rest of the instruction stay here", file=sys.stderr, flush=True)
    slm, slm_tok, private_ids = load_slm(args.slm, private_messages(args.instruction, plan.context),
                                         engine=args.slm_engine, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                                         device=args.device, adapter=args.adapter,
                                         torch_llm=not (slm_only or _is_url(args.llm)))
    if slm_only:
        alone = slm_alone(slm, slm_tok, private_ids, args.max_new_tokens, **_sampling(args, slm))
        print(alone.text)
        print(f"[{len(alone.token_ids)} tokens, SLM alone (--alpha 1), no LLM calls, {alone.seconds:.1f} s; "
              "the LLM saw nothing]", file=sys.stderr)
        return 0
    llm, llm_tok = _llm_backend(args, served)
    vmap = vocab_map_for(slm, slm_tok, llm.vocab_size, llm_tok)
    head, alpha, weight = _weight(plan, vmap)
    sampling = _sampling(args, slm)
    loop, _, how = _fused_loop(args, slm, llm, vmap, head, sampling)
    fused = fuse_on_engine(slm, slm_tok, private_ids, llm, render_prompt(llm_tok, public_messages(plan.public)),
                           args.max_new_tokens, sampling, head=head, alpha=alpha, vocab_map=vmap,
                           mode=None if head else (args.mode or "linear"), tail=None if head else (args.tail or "slm"),
                           schedule=args.schedule, loop=loop)
    print(colour_by_alpha(slm_tok, fused.token_ids, fused.alpha, use_color(args.color)))
    silence = _llm_silence(fused.stats, args.llm)
    print(f"[{fused.stats['steps']} steps, {fused.stats['llm_calls']} LLM calls, {fused.stats['fallbacks']} fallbacks, "
          f"{fused.seconds:.1f} s; {weight}; {how}; the LLM saw: {plan.public!r}{silence}]", file=sys.stderr)
    return 0


def _one_line_errors(run):
    """A model that cannot be installed, or an LLM that fails with --on-failure raise, is one line on
    stderr and exit status 1, not a traceback."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (zoo.ZooError, LLMBackendError) as err:
            print(f"logitfuse {args.command}: error: {err}", file=sys.stderr)
            return 1

    wrapped.__name__ = wrapped.__qualname__ = run.__name__
    return wrapped


# ------------------------------------------------------------------------------------ CLI
def _shared(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate (default 48)")
    parser.add_argument("--schedule", default="always", help='"always", "periodic(P, K, T)" or "entropy_gate(h)"')
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="torch device for the local models (default cpu)")
    parser.add_argument("--slm-engine", default="transformers", choices=["transformers", "llama.cpp"],
                        help="run the SLM in transformers, or in llama.cpp from the zoo's GGUF file")
    parser.add_argument("--fused-engine", default="auto", choices=["auto", "generate", "processor"],
                        help="the fused run's loop: logitfuse.generate where it gives the processor's tokens (auto, "
                             "default: greedy, per step with overlap), or slm.generate with CoGenesisLogitsProcessor "
                             "(with --slm-engine llama.cpp: LlamaCppSLM's own loop)")
    parser.add_argument("--color", default="auto", choices=["auto", "always", "never"], help="colour the fused text by α")


_HEAD_HELP = ("head folder (predicts α per token); default: the head shipped for the pair, when there is one; "
              "'none': a fixed --alpha")
_ALPHA_HELP = f"fixed α instead of a head (1 = SLM alone, 0 = LLM alone; default {DEFAULT_ALPHA} where no head fits)"


def add_subcommands(subparsers: Any) -> None:
    """Register `demo` and `generate` on an argparse subparsers object."""
    demo = subparsers.add_parser("demo", help="fused generation on one user of the CoGenesis test split, side by side",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--slm", default=DEFAULT_SLM, help=f"on-device model: zoo name or folder (default {DEFAULT_SLM})")
    demo.add_argument("--adapter", default=None, help="a LoRA adapter folder (`logitfuse finetune --out`) for the SLM")
    demo.add_argument("--llm", default=DEFAULT_LLM, help=f"cloud model: zoo name or folder (default {DEFAULT_LLM})")
    demo.add_argument("--head", default=None, help=_HEAD_HELP)
    demo.add_argument("--alpha", type=float, default=None, help=_ALPHA_HELP)
    demo.add_argument("--example", default=None, help="tid of a test-split example (default: the first)")
    demo.add_argument("--max-history", type=int, default=2, help="writing-history items in the private prompt")
    demo.add_argument("--repetition-penalty", type=float, default=1.1,
                      help="on the SLM's logits before fusion (default 1.1), as slm.generate applies it; "
                           "logitfuse.generate applies it the same way (the same tokens as the processor)")
    demo.add_argument("--speculate", type=int, default=0,
                      help="draft tokens per LLM call with logitfuse.generate, where both models share a tokenizer "
                           "(opt-in: the LLM then also sees the SLM's drafts that get rejected, counted in the "
                           "summary; 4 is a good value); default 0, per-step fusion")
    _shared(demo)
    demo.set_defaults(func=_one_line_errors(run_demo))

    gen = subparsers.add_parser("generate", help="fused generation for your own models and context",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("--slm", required=True, help="on-device model: zoo name or folder")
    gen.add_argument("--adapter", default=None, help="a LoRA adapter folder (`logitfuse finetune --out`) for the SLM")
    gen.add_argument("--llm", required=True, help="cloud model: zoo name, folder, or URL of an OpenAI-compatible server")
    gen.add_argument("--llm-tokenizer", default=None, help="with a URL: the served model's tokenizer (zoo name or folder)")
    gen.add_argument("--served-model", default=None, help="with a URL: the model name the server expects (default: the first of /v1/models)")
    gen.add_argument("--top-k", type=int, default=20, help="with a URL: logprobs to request (default 20)")
    gen.add_argument("--on-failure", default="fallback", choices=["fallback", "raise"],
                     help="when the LLM does not answer a step: use the SLM alone for it (default), or stop")
    gen.add_argument("--context", default=None, help="file with the private context (stays on this machine)")
    gen.add_argument("--instruction", required=True, help="the full instruction (the SLM sees it whole)")
    gen.add_argument("--public", default=None,
                     help="what the cloud LLM may see (default: the instruction before its first ': '; required when "
                          "the instruction has none)")
    gen.add_argument("--head", default=None, help=_HEAD_HELP)
    gen.add_argument("--alpha", type=float, default=None, help=_ALPHA_HELP)
    gen.add_argument("--mode", default=None, choices=["linear", "geometric", "logit"], help="with --alpha: how to mix (default linear)")
    gen.add_argument("--tail", default=None, choices=["slm", "uniform", "zero"], help="with --alpha: the LLM's missing tail (default slm)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1] (default 1)")
    gen.add_argument("--seed", type=int, default=0)
    _shared(gen)
    gen.set_defaults(func=_one_line_errors(run_generate))
