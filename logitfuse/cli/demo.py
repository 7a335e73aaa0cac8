"""`logitfuse demo`: fused generation on one user of the CoGenesis test split, side by side.

    logitfuse demo                       # SmolLM2-135M (on-device, private) + Qwen2.5-Coder-0.5B (cloud, public)
    logitfuse demo --example TID --speculate 4 --slm-engine llama.cpp

It prints what the cloud LLM saw, then the SLM alone (with the private context), the LLM alone
(without it) and the two fused, the fused text coloured by α per token. The SLM alone and the fused
run both come from logitfuse.generate (α = 1 for the SLM alone: the LLM is never asked).
"""

from __future__ import annotations

import argparse
import sys

from logitfuse import zoo
from logitfuse.backends import HFLLM, LLMBackendError
from logitfuse.config import FusionConfig
from logitfuse.cli.common import (
    Plan, add_shared_arguments, apply_threads, check_shared, check_slm, choose_weight, fusion_config, llm_alone, load_slm, load_weight, response, run_interruptible, sampling_config, speculation, vocab_map_for,
)
from logitfuse.cli.printing import colour_by_alpha, legend, llm_silence, use_color
from logitfuse.errors import UsageError, check_range
from logitfuse.prompts import bundled_split, load_examples, render_prompt
from logitfuse.zoo import check_model

__all__ = ["DEFAULT_LLM", "DEFAULT_SLM", "HELP", "add_arguments", "run", "speculation", "validate"]

HELP = "fused generation on one user of the CoGenesis test split, side by side"
DEFAULT_SLM = "smollm2-135m"
DEFAULT_LLM = "qwen2.5-coder-0.5b"
INTERRUPTED = ", interrupted by Ctrl-C: the text so far"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slm", default=DEFAULT_SLM, help=f"on-device model: zoo name, folder, Hugging Face Hub id (ORG/NAME) or, with --slm-engine llama.cpp, FILE.gguf (default {DEFAULT_SLM})")
    parser.add_argument("--llm", default=DEFAULT_LLM, help=f"cloud model: zoo name, folder or Hugging Face Hub id (default {DEFAULT_LLM})")
    parser.add_argument("--example", default=None, help="tid of a test-split example (default: the first)")
    parser.add_argument("--max-history", type=int, default=2, help="writing-history items in the private prompt")
    parser.add_argument("--repetition-penalty", type=float, default=1.1,
                        help="on the SLM's logits before fusion (default 1.1), where slm.generate applies it")
    add_shared_arguments(parser)


def validate(args: argparse.Namespace) -> None:
    """Every check before anything loads (``UsageError``); what they work out goes to ``args.plan``."""
    check_shared(args)
    check_range("--max-history", args.max_history, low=0)
    check_range("--repetition-penalty", args.repetition_penalty, low=0, low_open=True, meaning="1 = none")
    plan = Plan(check_slm(args), check_model("--llm", args.llm))
    examples = load_examples(bundled_split("test"))
    plan.example = next((e for e in examples if e.tid == args.example), None) if args.example else examples[0]
    if plan.example is None:
        raise UsageError(f"--example {args.example!r} is not a tid of the bundled test split; e.g. {examples[0].tid!r}")
    choose_weight(args, plan, "dense")
    args.plan = plan


def _section(title: str, body: str) -> str:
    return f"\n\033[1m{title}\033[0m\n{body.strip()}\n" if sys.stdout.isatty() else f"\n== {title} ==\n{body.strip()}\n"


def run(args: argparse.Namespace) -> int:
    """The demo, after :func:`validate`; a model that cannot be installed is one line and exit status 1."""
    try:
        return _run(args, args.plan)
    except (zoo.ZooError, LLMBackendError) as err:
        print(f"logitfuse demo: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside the fused steps (loading, the LLM alone): what is printed stays
        print("logitfuse demo: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, plan: Plan) -> int:
    color = use_color(args.color)
    print(f"logitfuse demo: on-device SLM {args.slm} in {args.slm_engine} (sees the private context), cloud LLM "
          f"{args.llm} (sees only the public task title)", flush=True)
    example = plan.example
    apply_threads(args)
    slm, slm_tok, private_ids = load_slm(args.slm, example.private_messages(args.max_history), engine=args.slm_engine,
                                         max_new_tokens=args.max_new_tokens, dtype=args.dtype, device=args.device,
                                         adapter=args.adapter)
    llm_model, llm_tok, _ = zoo.load(args.llm, dtype=args.dtype, device=args.device)
    llm = HFLLM(llm_model, llm_tok)
    vmap = vocab_map_for(slm, slm_tok, llm.vocab_size, llm_tok)
    public_ids = render_prompt(llm_tok, example.public_messages())
    head, alpha, weight = load_weight(plan, vmap)
    sampling = sampling_config(slm, slm_tok, args.max_new_tokens, repetition_penalty=args.repetition_penalty)

    print(_section("What the cloud LLM saw (all of it)", llm_tok.decode(public_ids)))
    print(_section("Kept on the device (not shown in full)",
                   f"profile of {len(example.additional_profile)} characters, {len(example.profile)} writing samples, "
                   f"the full instruction: {example.instruction!r}"))
    alone, seconds, stopped = run_interruptible(slm, slm_tok, private_ids, None, None, FusionConfig(alpha=1.0), sampling)
    print(_section(f"SLM alone, with the private context ({seconds:.1f} s{INTERRUPTED if stopped else ''})",
                   response(slm, slm_tok, alone)[2]), flush=True)
    if stopped:
        print(f"\n{alone.stats.steps} steps of the SLM alone; interrupted (Ctrl-C) before the LLM alone and the fused run")
        return 130
    _, llm_text, seconds = llm_alone(llm_model, llm_tok, public_ids, args.max_new_tokens, do_sample=False,
                                     repetition_penalty=args.repetition_penalty)
    print(_section(f"LLM alone, without it ({seconds:.1f} s)", llm_text), flush=True)
    drafts, why = speculation(llm, vmap, args.schedule, args.speculate, head)
    if why:
        print(f"(fused run: {why})", file=sys.stderr)
    fusion = fusion_config(head=head, alpha=alpha, vocab_map=vmap, schedule=args.schedule, speculate=drafts)
    fused, seconds, stopped = run_interruptible(slm, slm_tok, private_ids, llm, public_ids, fusion, sampling)
    ids, alphas, _ = response(slm, slm_tok, fused)
    print(_section(f"Fused, {weight} ({seconds:.1f} s{INTERRUPTED if stopped else ''})",
                   colour_by_alpha(slm_tok, ids, alphas, color)))
    print(legend(color), end="")
    mean_alpha = sum(alphas) / max(len(alphas), 1)
    silence = llm_silence(fused.stats, args.llm)
    stats = fused.stats
    sent = (f", {stats.draft_tokens_sent} draft tokens sent ({stats.draft_tokens_discarded} discarded: seen by the "
            "LLM, not in the output)" if stats.draft_tokens_sent else "")
    how = f"fused by logitfuse.generate ({f'speculate {drafts}' if drafts else 'per step, overlap'})"
    print(f"\n{stats.steps} steps, {stats.llm_calls} LLM calls, {stats.llm_calls / max(stats.steps, 1):.2f} "
          f"LLM calls per generated token{sent}, {stats.saved_calls} saved by the schedule, {stats.fallbacks} "
          f"fallbacks; {how}; mean α {mean_alpha:.2f}; vocabulary map coverage {vmap.coverage:.1%}{silence}"
          f"{'; interrupted (Ctrl-C): the text so far' if stopped else ''}")
    print(f"reference response (from the dataset): {example.response[:300]}{'...' if len(example.response) > 300 else ''}")
    return 130 if stopped else 0

