"""`logitfuse demo` and `logitfuse generate`: fused generation with real models, from the command line.

    logitfuse demo                       # SmolLM2-135M (on-device, private) + Qwen2.5-Coder-0.5B (cloud, public)
    logitfuse generate --slm smollm2-135m --llm qwen2.5-coder-0.5b \\
        --context profile.txt --instruction "Write a toast for my sister's wedding: mention our trip to Rome"
    logitfuse generate ... --llm http://127.0.0.1:8000 --llm-tokenizer qwen2.5-coder-0.5b   # a served LLM
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from logitfuse import zoo
from logitfuse.backends import HFLLM, OpenAICompatibleLLM
from logitfuse.heads import load_head
from logitfuse.processor import CoGenesisLogitsProcessor
from logitfuse.train_fuser.data import PRIVATE_SYSTEM, PUBLIC_SYSTEM, bundled_split, load_examples, public_instruction, render_prompt
from logitfuse.vocab import VocabMap

DEFAULT_SLM = "smollm2-135m"
DEFAULT_LLM = "qwen2.5-coder-0.5b"


def bundled_head_dir(slm_name: str, llm_name: str, variant: str = "dense") -> Path | None:
    """The head shipped for a model pair, trained with `logitfuse train` (``None`` when there is none)."""
    from logitfuse import train_fuser

    folder = Path(train_fuser.__file__).parent / "heads" / f"{slm_name}__{llm_name}" / variant
    return folder if (folder / "config.json").is_file() else None


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    seconds: float
    alpha: list[float] = field(default_factory=list)  # per generated token (fused runs only)
    stats: dict[str, int] = field(default_factory=dict)


def _generate(model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int, processor=None,
              **sampling: Any) -> tuple[list[int], float]:
    inputs = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                             logits_processor=[processor] if processor is not None else None, pad_token_id=pad,
                             **sampling)
    return out[0, inputs.shape[1]:].tolist(), time.perf_counter() - started


def _strip_eos(ids: list[int], tokenizer: Any) -> list[int]:
    special = set(tokenizer.all_special_ids)
    while ids and ids[-1] in special:
        ids = ids[:-1]
    return ids


def generate_alone(model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int, **sampling: Any) -> Generation:
    ids, seconds = _generate(model, tokenizer, prompt_ids, max_new_tokens, **sampling)
    ids = _strip_eos(ids, tokenizer)
    return Generation(tokenizer.decode(ids, skip_special_tokens=True), ids, seconds)


def generate_fused(slm: Any, slm_tokenizer: Any, private_ids: list[int], processor: CoGenesisLogitsProcessor,
                   max_new_tokens: int, **sampling: Any) -> Generation:
    """Run ``slm.generate`` on the private prompt with ``processor`` fusing in the LLM."""
    processor.reset()
    ids, seconds = _generate(slm, slm_tokenizer, private_ids, max_new_tokens, processor, **sampling)
    alpha = [float(a[0]) for a in processor.alpha_history]
    ids = _strip_eos(ids, slm_tokenizer)
    return Generation(slm_tokenizer.decode(ids, skip_special_tokens=True), ids, seconds, alpha[: len(ids)],
                      dict(processor.stats))


def vocab_map_for(slm: Any, slm_tokenizer: Any, llm_vocab_size: int, llm_tokenizer: Any) -> VocabMap:
    """Identity for one tokenizer on both sides, else the exact-text map between the two."""
    v_slm = slm.get_output_embeddings().weight.shape[0]
    if slm_tokenizer.get_vocab() == llm_tokenizer.get_vocab():
        return VocabMap.identity(v_slm, llm_vocab_size, n_shared=min(len(slm_tokenizer), v_slm, llm_vocab_size))
    return VocabMap.from_tokenizers(slm_tokenizer, llm_tokenizer, v_slm=v_slm, v_llm=llm_vocab_size)


# ------------------------------------------------------------------------------------ output
_SCALE = [27, 33, 39, 75, 111, 148, 184, 178, 172, 166, 160]  # 256-colour: blue (LLM) ... red-orange (SLM)


def use_color(choice: str, stream: Any = sys.stdout) -> bool:
    if choice == "always":
        return True
    if choice == "never" or os.environ.get("NO_COLOR"):
        return False
    return bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TERM", "") != "dumb"


def colour_by_alpha(tokenizer: Any, ids: list[int], alpha: list[float], color: bool) -> str:
    """The text with each token coloured by who drove it (α = 1: SLM alone; 0: LLM alone)."""
    if not color or not alpha:
        return tokenizer.decode(ids, skip_special_tokens=True)
    pieces, previous = [], ""
    for n in range(1, len(ids) + 1):  # decode prefixes so multi-byte characters come out whole
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        piece, previous = text[len(previous):], text
        a = alpha[n - 1] if n - 1 < len(alpha) else 1.0
        pieces.append(f"\033[38;5;{_SCALE[round(a * (len(_SCALE) - 1))]}m{piece}")
    return "".join(pieces) + "\033[0m"


def legend(color: bool) -> str:
    if not color:
        return ""
    swatch = "".join(f"\033[38;5;{c}m█" for c in _SCALE)
    return f"  colour = α per token: LLM-driven {swatch}\033[0m SLM-driven\n"


def _section(title: str, body: str) -> str:
    return f"\n\033[1m{title}\033[0m\n{body.strip()}\n" if sys.stdout.isatty() else f"\n== {title} ==\n{body.strip()}\n"


# ------------------------------------------------------------------------------------ demo
def run_demo(args: argparse.Namespace) -> int:
    color = use_color(args.color)
    print(f"logitfuse demo: on-device SLM {args.slm} (sees the private context), cloud LLM {args.llm} "
          f"(sees only the public task title)", flush=True)
    slm, slm_tok, slm_name = zoo.load(args.slm, dtype=args.dtype, device=args.device)
    llm_model, llm_tok, llm_name = zoo.load(args.llm, dtype=args.dtype, device=args.device)
    llm = HFLLM(llm_model, llm_tok)
    vmap = vocab_map_for(slm, slm_tok, llm.vocab_size, llm_tok)

    examples = load_examples(bundled_split("test"))
    example = next((e for e in examples if e.tid == args.example), None) if args.example else examples[0]
    if example is None:
        raise SystemExit(f"--example {args.example!r} is not a tid of the bundled test split")
    private_ids = render_prompt(slm_tok, example.private_messages(args.max_history))
    public_ids = render_prompt(llm_tok, example.public_messages())

    head, weight = None, f"fixed alpha={args.alpha}"
    head_dir = Path(args.head) if args.head and args.head != "none" else (
        bundled_head_dir(slm_name, llm_name) if args.head is None else None)
    if head_dir is not None:
        try:
            head = load_head(head_dir, vocab_map=vmap)
            weight = f"trained head {head_dir.parent.name}/{head_dir.name}"
        except ValueError as err:
            if args.head is not None:  # the user's own head must fit
                raise
            print(f"(the shipped head does not fit these models, using a fixed alpha: {err})")
    proc = CoGenesisLogitsProcessor(llm, public_ids, head=head, alpha=None if head is not None else args.alpha,
                                    vocab_map=vmap, slm_tokenizer=slm_tok, schedule=args.schedule)
    sampling = dict(do_sample=False, repetition_penalty=args.repetition_penalty)

    print(_section("What the cloud LLM saw (all of it)", llm_tok.decode(public_ids)))
    print(_section("Kept on the device (not shown in full)",
                   f"profile of {len(example.additional_profile)} characters, {len(example.profile)} writing samples, "
                   f"the full instruction: {example.instruction!r}"))
    slm_alone = generate_alone(slm, slm_tok, private_ids, args.max_new_tokens, **sampling)
    print(_section(f"SLM alone, with the private context ({slm_alone.seconds:.1f} s)", slm_alone.text), flush=True)
    llm_alone = generate_alone(llm_model, llm_tok, public_ids, args.max_new_tokens, **sampling)
    print(_section(f"LLM alone, without it ({llm_alone.seconds:.1f} s)", llm_alone.text), flush=True)
    fused = generate_fused(slm, slm_tok, private_ids, proc, args.max_new_tokens, **sampling)
    print(_section(f"Fused, {weight} ({fused.seconds:.1f} s)", colour_by_alpha(slm_tok, fused.token_ids, fused.alpha, color)))
    print(legend(color), end="")
    mean_alpha = sum(fused.alpha) / max(len(fused.alpha), 1)
    print(f"\n{fused.stats['steps']} steps, {fused.stats['llm_calls']} LLM calls, {fused.stats['saved_calls']} saved by the "
          f"schedule, {fused.stats['fallbacks']} fallbacks; mean α {mean_alpha:.2f}; "
          f"vocabulary map coverage {vmap.coverage:.1%}")
    print(f"reference response (from the dataset): {example.response[:300]}{'...' if len(example.response) > 300 else ''}")
    return 0


# ------------------------------------------------------------------------------------ generate
def _llm_backend(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(backend, llm tokenizer)`` for --llm: a URL (a served model) or a zoo name / folder."""
    if args.llm.startswith(("http://", "https://")):
        if not args.llm_tokenizer:
            raise SystemExit("--llm is a URL: pass --llm-tokenizer NAME|PATH (the served model's tokenizer)")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(zoo.resolve(args.llm_tokenizer, install=True))
        backend = OpenAICompatibleLLM(args.llm, args.served_model or served_model_name(args.llm), top_k=args.top_k,
                                      tokenizer=tokenizer, on_failure=args.on_failure)
        return backend, tokenizer
    model, tokenizer, _ = zoo.load(args.llm, dtype=args.dtype, device=args.device)
    return HFLLM(model, tokenizer), tokenizer


def served_model_name(base_url: str, timeout: float = 10.0) -> str:
    """The first model an OpenAI-compatible server lists at ``/v1/models``."""
    import json
    import urllib.request

    url = base_url.rstrip("/") + "/v1/models"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return json.load(reply)["data"][0]["id"]
    except (OSError, ValueError, KeyError, IndexError) as err:
        raise SystemExit(f"could not read the served model's name from {url} ({err}); pass --served-model NAME") from err


def run_generate(args: argparse.Namespace) -> int:
    context = Path(args.context).read_text(encoding="utf-8") if args.context else ""
    public = args.public if args.public is not None else public_instruction(args.instruction)
    slm, slm_tok, slm_name = zoo.load(args.slm, dtype=args.dtype, device=args.device)
    llm, llm_tok = _llm_backend(args)
    vmap = vocab_map_for(slm, slm_tok, llm.vocab_size, llm_tok)
    private_messages = [{"role": "system", "content": PRIVATE_SYSTEM},
                        {"role": "user", "content": f"## Context\n{context}\n\n## Task\n{args.instruction}"}]
    public_messages = [{"role": "system", "content": PUBLIC_SYSTEM}, {"role": "user", "content": public}]
    head = load_head(args.head, vocab_map=vmap) if args.head else None
    proc = CoGenesisLogitsProcessor(
        llm, render_prompt(llm_tok, public_messages), head=head, alpha=None if head else args.alpha, vocab_map=vmap,
        mode=None if head else args.mode, tail=None if head else args.tail, schedule=args.schedule,
        slm_tokenizer=slm_tok,
    )
    sampling: dict[str, Any] = {"do_sample": args.temperature > 0}
    if args.temperature > 0:
        torch.manual_seed(args.seed)
        sampling.update(temperature=args.temperature, top_p=args.top_p)
    fused = generate_fused(slm, slm_tok, render_prompt(slm_tok, private_messages), proc, args.max_new_tokens, **sampling)
    print(colour_by_alpha(slm_tok, fused.token_ids, fused.alpha, use_color(args.color)))
    print(f"[{fused.stats['steps']} steps, {fused.stats['llm_calls']} LLM calls, {fused.stats['fallbacks']} fallbacks, "
          f"{fused.seconds:.1f} s; the LLM saw: {public!r}]", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------ CLI
def _shared(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--schedule", default="always", help='"always", "periodic(P, K, T)" or "entropy_gate(h)"')
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--color", default="auto", choices=["auto", "always", "never"], help="colour the fused text by α")


def add_subcommands(subparsers: Any) -> None:
    """Register `demo` and `generate` on an argparse subparsers object."""
    demo = subparsers.add_parser("demo", help="fused generation on one user of the CoGenesis test split, side by side",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--slm", default=DEFAULT_SLM, help=f"on-device model: zoo name or folder (default {DEFAULT_SLM})")
    demo.add_argument("--llm", default=DEFAULT_LLM, help=f"cloud model: zoo name or folder (default {DEFAULT_LLM})")
    demo.add_argument("--head", default=None, help="head folder; default: the one shipped for the pair; 'none': --alpha")
    demo.add_argument("--alpha", type=float, default=0.25, help="fixed α when there is no head (default 0.25)")
    demo.add_argument("--example", default=None, help="tid of a test-split example (default: the first)")
    demo.add_argument("--max-history", type=int, default=2, help="writing-history items in the private prompt")
    demo.add_argument("--repetition-penalty", type=float, default=1.1)
    _shared(demo)
    demo.set_defaults(func=run_demo)

    gen = subparsers.add_parser("generate", help="fused generation for your own models and context",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("--slm", required=True, help="on-device model: zoo name or folder")
    gen.add_argument("--llm", required=True, help="cloud model: zoo name, folder, or URL of an OpenAI-compatible server")
    gen.add_argument("--llm-tokenizer", default=None, help="with a URL: the served model's tokenizer (zoo name or folder)")
    gen.add_argument("--served-model", default=None, help="with a URL: the model name the server expects (default: the first of /v1/models)")
    gen.add_argument("--top-k", type=int, default=20, help="with a URL: logprobs to request")
    gen.add_argument("--on-failure", default="fallback", choices=["fallback", "raise"])
    gen.add_argument("--context", default=None, help="file with the private context (stays on this machine)")
    gen.add_argument("--instruction", required=True, help="the full instruction (the SLM sees it whole)")
    gen.add_argument("--public", default=None, help="what the LLM may see (default: the instruction before its first ': ')")
    gen.add_argument("--head", default=None, help="a trained head folder")
    gen.add_argument("--alpha", type=float, default=0.25, help="fixed α without a head (1 = SLM only)")
    gen.add_argument("--mode", default="linear", choices=["linear", "geometric", "logit"])
    gen.add_argument("--tail", default="slm", choices=["slm", "uniform", "zero"])
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    _shared(gen)
    gen.set_defaults(func=run_generate)
