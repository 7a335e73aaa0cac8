"""`logitfuse generate`: fused generation for your own models and context.

    logitfuse generate --slm smollm2-135m --llm qwen2.5-coder-0.5b \\
        --context profile.txt --instruction "Write a toast for my sister's wedding: mention our trip to Rome"
    logitfuse generate ... --llm http://127.0.0.1:8000 --llm-tokenizer qwen2.5-coder-0.5b   # a served LLM
    logitfuse generate ... --alpha 1        # the SLM alone: the LLM is neither loaded nor contacted
    logitfuse generate ... --rule "steer(0.5)"   # a fusion rule over N models (docs: Fusion rules)

The text goes to stdout, what the LLM saw and the run's counters to stderr. Tokens are chosen by
logitfuse.generate, greedy at --temperature 0, else sampled from --seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from logitfuse import zoo
from logitfuse.backends import HFLLM, LLMBackendError, OpenAICompatibleLLM, ServerMismatchError
from logitfuse.config import FusionConfig
from logitfuse.cli.common import (
    Plan, add_rule_arguments, add_shared_arguments, apply_threads, check_rule, check_shared, check_slm, check_url, choose_weight, fusion_config, is_url, load_slm, load_weight, response, run_interruptible, sampling_config, speculation, vocab_map_for,
)
from logitfuse.cli.printing import colour_by_alpha, llm_silence, use_color
from logitfuse.errors import UsageError, check_range
from logitfuse.prompts import private_messages, public_instruction, public_messages, render_prompt
from logitfuse.rules import Input, Mix, Mixture, Rule
from logitfuse.zoo import check_model

__all__ = ["HELP", "add_arguments", "check_served_llm", "run", "served_model_name", "validate"]

HELP = "fused generation for your own models and context"
INTERRUPTED = "; interrupted (Ctrl-C): the text so far"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slm", required=True, help="on-device model: zoo name, folder, Hugging Face Hub id "
                        "(ORG/NAME), or with --slm-engine llama.cpp a FILE.gguf")
    parser.add_argument("--llm", required=True, help="cloud model: zoo name, folder, Hugging Face Hub id "
                        "(ORG/NAME), or URL of an OpenAI-compatible server")
    parser.add_argument("--llm-tokenizer", default=None, help="with a URL: the served model's tokenizer (zoo name, "
                        "folder or Hugging Face Hub id)")
    parser.add_argument("--served-model", default=None,
                        help="with a URL: the model name the server expects (default: the first of /v1/models)")
    parser.add_argument("--top-k", type=int, default=20, help="with a URL: logprobs to request (default 20)")
    parser.add_argument("--on-failure", default="fallback", choices=["fallback", "raise"],
                        help="when the LLM does not answer a step: use the SLM alone for it (default), or stop")
    parser.add_argument("--context", default=None, help="file with the private context (stays on this machine)")
    parser.add_argument("--instruction", required=True, help="the full instruction (the SLM sees it whole)")
    parser.add_argument("--public", default=None,
                        help="what the cloud LLM may see (default: the instruction before its first ': '; required "
                             "when the instruction has none)")
    parser.add_argument("--mode", default=None, choices=["linear", "geometric", "logit"],
                        help="with --alpha: how to mix (default linear)")
    parser.add_argument("--tail", default=None, choices=["slm", "uniform", "zero"],
                        help="with --alpha: the LLM's missing tail (default slm)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1] (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    add_shared_arguments(parser)
    add_rule_arguments(parser)


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
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--context {value!r} could not be read as UTF-8 text ({err})") from None
    if not text.strip():
        print(f"logitfuse generate: warning: --context {value!r} is empty: the SLM gets no private context "
              "(the instruction only)", file=sys.stderr, flush=True)
    return text


def validate(args: argparse.Namespace) -> None:
    """Every check before anything loads (``UsageError``); what they work out goes to ``args.plan``."""
    check_shared(args)
    check_range("--temperature", args.temperature, low=0, meaning="0 = greedy")
    check_range("--top-p", args.top_p, low=0, high=1, low_open=True)
    check_range("--top-k", args.top_k, low=1, meaning="log-probabilities asked of a served LLM")
    check_range("--seed", args.seed, low=0)
    if not args.instruction.strip():
        raise UsageError("--instruction is empty; pass the task for the SLM")
    if is_url(args.llm):
        check_url("--llm", args.llm)
        if not args.llm_tokenizer:
            raise UsageError("--llm is a URL: pass --llm-tokenizer NAME|FOLDER (the served model's tokenizer)")
        llm_name = check_model("--llm-tokenizer", args.llm_tokenizer)
    else:
        llm_name = check_model("--llm", args.llm)
    args.rule_object = rule = check_rule(args)
    plan = Plan(check_slm(args), llm_name, public=_public_prompt(args), context=_read_context(args.context))
    if isinstance(rule, Mix):
        choose_weight(args, plan, f"top{args.top_k}-slm" if is_url(args.llm) else "dense")
        if (args.mode is not None or args.tail is not None) and args.alpha is None and args.head != "none":
            raise UsageError("--mode and --tail shape a fixed α; a head brings its own: pass --alpha A (or --head "
                             "none) with them")
    args.plan = plan


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


def check_served_llm(llm: Any, plan: Plan, flags: dict[str, str]) -> None:
    """A served LLM checked against its server before anything is generated (``llm.check_server()``):
    a model it does not list, a --top-k above its max_logprobs or a tokenizer not the server's is a
    UsageError naming the flag (``flags``: the backend's argument -> the flag); a server that cannot be
    reached is an LLMBackendError with --on-failure raise (exit 1), else left to the run's warning. The
    pair is named by the served model."""
    try:
        llm.check_server()
    except ServerMismatchError as err:
        raise UsageError(f"{flags.get(err.argument, err.argument)}: {err}") from None
    except LLMBackendError:  # not reachable: --on-failure fallback goes on (the summary warns), raise stops
        if llm.on_failure == "raise":
            raise
        return
    plan.note = plan.note.replace(f" + {plan.llm_name}", f" + {llm.model!r} served at {llm.url} "
                                  f"(tokenizer {plan.llm_name})", 1)


def _llm_backend(args: argparse.Namespace, served_model: str | None) -> tuple[Any, Any]:
    """``(backend, llm tokenizer)`` for --llm: a URL (a served model) or a zoo name / folder."""
    if is_url(args.llm):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(zoo.resolve(args.llm_tokenizer, install=True))
        backend = OpenAICompatibleLLM(args.llm, served_model, top_k=args.top_k, tokenizer=tokenizer,
                                      on_failure=args.on_failure)
        check_served_llm(backend, args.plan, {"model": "--served-model", "top_k": "--top-k",
                                              "tokenizer": "--llm-tokenizer"})
        return backend, tokenizer
    model, tokenizer, _ = zoo.load(args.llm, dtype=args.dtype, device=args.device)
    return HFLLM(model, tokenizer), tokenizer


def run(args: argparse.Namespace) -> int:
    """The run, after :func:`validate`; a model that cannot be installed, or an LLM that fails with
    --on-failure raise, is one line on stderr and exit status 1."""
    try:
        return _run(args, args.plan)
    except (zoo.ZooError, LLMBackendError) as err:
        print(f"logitfuse generate: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the first token: nothing to keep
        print("logitfuse generate: interrupted (Ctrl-C) before any text was generated", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, plan: Plan) -> int:
    if not isinstance(args.rule_object, Mix):
        return _run_rule(args, plan, args.rule_object)
    slm_only, served = plan.head_dir is None and plan.alpha == 1.0, None
    if slm_only:
        print("logitfuse generate: --alpha 1 is the SLM alone: the cloud LLM is neither loaded nor contacted",
              file=sys.stderr, flush=True)
    else:
        served = args.served_model or (served_model_name(args.llm) if is_url(args.llm) else None)
        print(f"logitfuse generate: the cloud LLM ({args.llm}) will see: {plan.public!r}, then the text generated "
              "so far; the context and the rest of the instruction stay here", file=sys.stderr, flush=True)
    # a served LLM is checked against its server before the SLM loads
    backend = _llm_backend(args, served) if is_url(args.llm) and not slm_only else None
    apply_threads(args)
    slm, slm_tok, private_ids = load_slm(args.slm, private_messages(args.instruction, plan.context),
                                         engine=args.slm_engine, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                                         device=args.device, adapter=args.adapter,
                                         torch_llm=not (slm_only or is_url(args.llm)))
    sampling = sampling_config(slm, slm_tok, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                               seed=args.seed)
    if slm_only:
        alone, seconds, stopped = run_interruptible(slm, slm_tok, private_ids, None, None, FusionConfig(alpha=1.0),
                                                    sampling)
        ids, _, text = response(slm, slm_tok, alone)
        print(text, flush=True)
        print(f"[{len(ids)} tokens, SLM alone (--alpha 1), no LLM calls, {seconds:.1f} s; the LLM saw nothing"
              f"{INTERRUPTED if stopped else ''}]", file=sys.stderr)
        return 130 if stopped else 0
    llm, llm_tok = backend or _llm_backend(args, served)
    vmap = vocab_map_for(slm, slm_tok, llm.vocab_size, llm_tok)
    head, alpha, weight = load_weight(plan, vmap)
    drafts, why = speculation(llm, vmap, args.schedule, args.speculate, head)
    if why:
        print(f"logitfuse generate: {why}", file=sys.stderr)
    fusion = fusion_config(head=head, alpha=alpha, vocab_map=vmap, mode=None if head else (args.mode or "linear"),
                           tail=None if head else (args.tail or "slm"), schedule=args.schedule, speculate=drafts)
    fused, seconds, stopped = run_interruptible(slm, slm_tok, private_ids, llm,
                                                render_prompt(llm_tok, public_messages(plan.public)), fusion, sampling)
    ids, alphas, _ = response(slm, slm_tok, fused)
    print(colour_by_alpha(slm_tok, ids, alphas, use_color(args.color)), flush=True)
    silence = llm_silence(fused.stats, args.llm)
    stats = fused.stats
    how = (f"speculate {drafts}, {stats.draft_tokens_sent} draft tokens sent ({stats.draft_tokens_discarded} "
           "discarded: seen by the LLM, not in the output)" if drafts else "per step, overlap")
    print(f"[{stats.steps} steps, {stats.llm_calls} LLM calls, {stats.fallbacks} fallbacks, {seconds:.1f} s; {weight}; "
          f"fused by logitfuse.generate ({how}); the LLM saw: {plan.public!r}{silence}"
          f"{INTERRUPTED if stopped else ''}]", file=sys.stderr)
    return 130 if stopped else 0


def _run_rule(args: argparse.Namespace, plan: Plan, rule: Rule) -> int:
    """A run under a fusion rule other than the two-model mix: each input the rule reads is loaded (the
    LLM, the SLM over the public prompt: the same weights on this device, each --input), each gets
    the public task in its own chat template, and the SLM alone reads the private context."""
    reads_llm = "llm" in rule.inputs
    served = (args.served_model or served_model_name(args.llm)) if reads_llm and is_url(args.llm) else None
    if reads_llm:
        print(f"logitfuse generate: the cloud LLM ({args.llm}) will see: {plan.public!r}, then the text generated so "
              "far; the context and the rest of the instruction stay here", file=sys.stderr, flush=True)
    else:
        print(f"logitfuse generate: --rule {rule.spec} does not read the LLM: --llm is neither loaded nor contacted",
              file=sys.stderr, flush=True)
    backend = _llm_backend(args, served) if reads_llm and is_url(args.llm) else None
    apply_threads(args)
    slm, slm_tok, private_ids = load_slm(args.slm, private_messages(args.instruction, plan.context),
                                         engine=args.slm_engine, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                                         device=args.device, adapter=args.adapter)
    sampling = sampling_config(slm, slm_tok, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                               seed=args.seed)
    messages = public_messages(plan.public)
    inputs, publics = {}, {}
    if reads_llm:
        llm, llm_tok = backend or _llm_backend(args, served)
        inputs["llm"] = Input(llm, vocab_map=vocab_map_for(slm, slm_tok, llm.vocab_size, llm_tok))
        publics["llm"] = render_prompt(llm_tok, messages)
    if "slm_public" in rule.inputs:  # the SLM's own weights, a second KV cache, the public prompt only
        inputs["slm_public"] = Input(HFLLM(slm, slm_tok), on_device=True)
        publics["slm_public"] = render_prompt(slm_tok, messages)
    for name, model_name in args.inputs.items():
        model, tokenizer, _ = zoo.load(model_name, dtype=args.dtype, device=args.device)
        side = HFLLM(model, tokenizer)
        inputs[name] = Input(side, vocab_map=vocab_map_for(slm, slm_tok, side.vocab_size, tokenizer))
        publics[name] = render_prompt(tokenizer, messages)
    if isinstance(rule, Mixture) and rule.needs_head:
        from logitfuse.heads.mixture import load_mixture_head

        try:
            rule = rule.with_head(load_mixture_head(args.head))
        except ValueError as err:
            raise UsageError(f"--head {args.head!r}: {err}") from None
    fused, seconds, stopped = run_interruptible(slm, slm_tok, private_ids, inputs, publics, FusionConfig(rule=rule),
                                                sampling)
    print(response(slm, slm_tok, fused)[2], flush=True)
    stats = fused.stats
    print(f"[{stats.steps} steps, {stats.llm_calls} model calls over {len(inputs)} inputs "
          f"({', '.join(inputs)}), {stats.fallbacks} fallbacks, {seconds:.1f} s; rule {rule.spec}; fused by "
          f"logitfuse.generate; the inputs off this device saw: {plan.public!r}{INTERRUPTED if stopped else ''}]",
          file=sys.stderr)
    return 130 if stopped else 0
