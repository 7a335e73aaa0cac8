"""The on-device SLM of `logitfuse demo` and `logitfuse generate`, on either engine.

- ``transformers``: ``model.generate`` with a :class:`CoGenesisLogitsProcessor` fusing in the LLM, or
  :func:`logitfuse.generate` (our decode loop: the LLM's request overlapped with the SLM's forward, and
  exact speculative fusion where the pair shares a tokenizer); greedy, both give the same tokens;
- ``llama.cpp``: the zoo's GGUF file in a :class:`LlamaCppSLM`, fused by :func:`logitfuse.generate` (or
  its own decode loop, the reference: the same tokens per step).

Both give the text, the generated ids, the seconds and, fused, the α per token and the session's
counters, so the commands print either the same way (:func:`colour_by_alpha`: the text coloured by
who drove each token).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from logitfuse import zoo
from logitfuse.decoding.llama_cpp import LlamaCppSLM, generate_fused_llama_cpp
from logitfuse.decoding.processor import CoGenesisLogitsProcessor
from logitfuse.prompts import render_prompt
from logitfuse.vocab import VocabMap

__all__ = ["Generation", "colour_by_alpha", "fast_path", "fuse_on_engine", "generate_alone", "generate_fused",
           "generate_fused_loop", "legend", "load_slm", "slm_alone", "use_color", "vocab_map_for"]


@dataclass
class Generation:
    """One run of a model: its text, generated ids (no end-of-generation id) and wall time; fused runs add α
    per token and the counters."""

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
                             stopping_criteria=processor.stopping_criteria() if processor is not None else None,
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


def generate_fused_loop(slm: Any, slm_tokenizer: Any, private_ids: list[int], llm: Any, public_ids: list[int],
                        max_new_tokens: int, *, speculate: int = 0, repetition_penalty: float = 1.0,
                        temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                        **fusion: Any) -> Generation:
    """Fused generation by :func:`logitfuse.generate` (overlap on; ``speculate`` drafts per LLM call).

    A transformers SLM (greedy) stops where ``slm.generate`` would (the SLM's generation config's EOS
    ids): the same tokens as :func:`generate_fused` at the same ``repetition_penalty``. A
    :class:`LlamaCppSLM` stops at its end-of-generation ids and samples (``temperature`` > 0, ``top_p``)
    from a generator seeded with ``seed`` (default its own): per step, the tokens of its own loop
    (:func:`generate_fused_llama_cpp`) with the same settings.
    """
    from logitfuse.decoding.engine import generate

    generator = None
    if isinstance(slm, LlamaCppSLM):
        eos, pad = sorted(slm.eos_token_ids), 0
        generator = torch.Generator().manual_seed(slm.seed if seed is None else int(seed))
    else:
        eos = getattr(getattr(slm, "generation_config", None), "eos_token_id", None)
        eos = slm_tokenizer.eos_token_id if eos is None else eos
        pad = slm_tokenizer.pad_token_id if slm_tokenizer.pad_token_id is not None else slm_tokenizer.eos_token_id
    started = time.perf_counter()
    out = generate(slm, llm, [private_ids], public_ids, max_new_tokens=max_new_tokens, speculate=speculate,
                   overlap=True, slm_tokenizer=slm_tokenizer, eos_token_id=eos, pad_token_id=pad,
                   repetition_penalty=repetition_penalty, temperature=temperature, top_p=top_p, generator=generator,
                   **fusion)
    seconds = time.perf_counter() - started
    if isinstance(slm, LlamaCppSLM):
        ids = out.sequences[0][:-1] if out.stopped[0] == "eos" else out.sequences[0]
        text = slm.detokenize(ids)
    else:
        ids = _strip_eos(out.sequences[0], slm_tokenizer)
        text = slm_tokenizer.decode(ids, skip_special_tokens=True)
    return Generation(text, ids, seconds, out.alpha[0][: len(ids)], dict(out.stats))


def fast_path(slm: Any, llm: Any, vocab_map: VocabMap, schedule: str, sampling: dict[str, Any], speculate: int = 0,
              *, head: Any = None) -> tuple[str, int, str]:
    """``(engine, speculate, why)``: the fastest fused path that gives the processor's tokens.

    ``"generate"`` (:func:`generate_fused_loop`) for a :class:`LlamaCppSLM` (it gives its own loop's
    tokens, greedy or sampled) and for a transformers SLM decoding greedily (with or without a
    repetition penalty: :func:`logitfuse.generate` applies it where ``slm.generate`` does), else
    ``"processor"`` (``why`` says why: sampling draws differ between the two loops). With
    ``"generate"``, ``speculate`` drafts per LLM call where both sides share one tokenizer, the
    schedule is ``"always"``, ``head`` reads no SLM-side features and the backend scores drafts
    (``llm.supports_score``, asked only then: a server is probed once); else 0, per-step fusion,
    and ``why`` says why.
    """
    if not isinstance(slm, LlamaCppSLM) and sampling.get("do_sample"):
        return "processor", 0, "this run samples (logitfuse.generate draws its samples differently)"
    if not speculate:
        return "generate", 0, ""
    blocked = ("the two tokenizers differ" if not vocab_map.is_identity else
               f"--schedule {schedule} is not 'always'" if schedule != "always" else
               "the head reads SLM-side features" if getattr(head, "reads_slm_side", False) else
               f"{type(llm).__name__} cannot score a draft" if not getattr(llm, "supports_score", False) else "")
    if blocked:
        return "generate", 0, f"speculation off: {blocked}"
    return "generate", speculate, ""


def load_slm(name: str, messages: list[dict[str, str]], *, engine: str = "transformers", max_new_tokens: int,
             dtype: str = "float32", device: str = "cpu", adapter: str | None = None,
             torch_llm: bool = True) -> tuple[Any, Any, list[int]]:
    """``(slm, tokenizer, private prompt ids)`` for zoo model or folder ``name``.

    ``engine="transformers"``: the transformers model (``dtype``, ``device``, LoRA ``adapter``).
    ``engine="llama.cpp"``: a :class:`LlamaCppSLM` on the zoo's GGUF file, its context sized for the
    prompt and ``max_new_tokens`` (of the transformers folder only the tokenizer is loaded). With a
    torch LLM in the same process (``torch_llm``) llama.cpp takes half the cores and torch at most the rest.
    """
    if engine == "transformers":
        slm, tokenizer, _ = zoo.load(name, dtype=dtype, device=device, adapter=adapter)
        return slm, tokenizer, render_prompt(tokenizer, messages)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(zoo.resolve(name, install=True))
    ids = render_prompt(tokenizer, messages)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    threads = max(1, cores // 2)
    if torch_llm:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - threads)))
    slm = LlamaCppSLM(zoo.gguf_path(name), tokenizer=tokenizer, n_ctx=len(ids) + max_new_tokens + 8, n_threads=threads)
    return slm, tokenizer, ids


def slm_alone(slm: Any, tokenizer: Any, private_ids: list[int], max_new_tokens: int, **sampling: Any) -> Any:
    """The SLM alone on either engine (a :class:`Generation` or :class:`~logitfuse.SLMGeneration`)."""
    if isinstance(slm, LlamaCppSLM):
        return slm.generate(private_ids, max_new_tokens=max_new_tokens, **sampling)
    return generate_alone(slm, tokenizer, private_ids, max_new_tokens, **sampling)


def fuse_on_engine(slm: Any, tokenizer: Any, private_ids: list[int], llm: Any, public_ids: list[int],
                   max_new_tokens: int, sampling: dict[str, Any], *, loop: str = "auto", speculate: int = 0,
                   **fusion: Any) -> Any:
    """Fused generation on either engine; ``fusion``: head, alpha, vocab_map, mode, tail, schedule.

    ``loop="generate"`` runs :func:`generate_fused_loop` (``speculate`` drafts per LLM call; a
    transformers SLM: greedy ``sampling`` only, its ``repetition_penalty`` applied), ``"processor"``
    :func:`generate_fused` (a transformers SLM), ``"llama.cpp"`` :class:`LlamaCppSLM`'s own loop;
    ``"auto"``: ``"generate"`` for a :class:`LlamaCppSLM`, ``"processor"`` for a transformers SLM.
    """
    llama = isinstance(slm, LlamaCppSLM)
    loop = ("generate" if llama else "processor") if loop == "auto" else loop
    if loop == ("processor" if llama else "llama.cpp"):
        raise ValueError(f"loop={loop!r} does not run a {type(slm).__name__}; pass loop='generate' or 'auto'")
    if loop == "llama.cpp":
        return generate_fused_llama_cpp(slm, llm, private_ids, public_ids, max_new_tokens=max_new_tokens, **fusion,
                                        **sampling)
    if loop == "generate":
        loop_sampling = sampling if llama else {"repetition_penalty": sampling.get("repetition_penalty", 1.0)}
        return generate_fused_loop(slm, tokenizer, private_ids, llm, public_ids, max_new_tokens, speculate=speculate,
                                   **loop_sampling, **fusion)
    processor = CoGenesisLogitsProcessor(llm, public_ids, slm_tokenizer=tokenizer, slm=slm, **fusion)
    try:  # slm=: a head reading the SLM's hidden state gets it from a hook, removed after
        return generate_fused(slm, tokenizer, private_ids, processor, max_new_tokens, **sampling)
    finally:
        processor.close()


def vocab_map_for(slm: Any, slm_tokenizer: Any, llm_vocab_size: int, llm_tokenizer: Any) -> VocabMap:
    """Identity for one tokenizer on both sides, else the exact-text map between the two (``slm``: the
    transformers model or a :class:`LlamaCppSLM`)."""
    v_slm = slm.vocab_size if isinstance(slm, LlamaCppSLM) else slm.get_output_embeddings().weight.shape[0]
    if slm_tokenizer.get_vocab() == llm_tokenizer.get_vocab():
        return VocabMap.identity(v_slm, llm_vocab_size, n_shared=min(len(slm_tokenizer), v_slm, llm_vocab_size))
    return VocabMap.from_tokenizers(slm_tokenizer, llm_tokenizer, v_slm=v_slm, v_llm=llm_vocab_size)


# ------------------------------------------------------------------------------------ printing a run
_SCALE = [27, 33, 39, 75, 111, 148, 184, 178, 172, 166, 160]  # 256-colour: blue (LLM) ... red-orange (SLM)


def use_color(choice: str, stream: Any = None) -> bool:
    """Whether to colour (``choice``: ``"auto"``, ``"always"``, ``"never"``): auto colours a terminal
    (``stream``, default stdout) unless ``NO_COLOR`` is set or ``TERM`` is dumb."""
    stream = sys.stdout if stream is None else stream
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
    """The colour scale of :func:`colour_by_alpha` as one line (empty without colour)."""
    if not color:
        return ""
    swatch = "".join(f"\033[38;5;{c}m█" for c in _SCALE)
    return f"  colour = α per token: LLM-driven {swatch}\033[0m SLM-driven\n"
