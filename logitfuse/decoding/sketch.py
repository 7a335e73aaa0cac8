"""The sketch-based variant of CoGenesis: the LLM outlines, the SLM writes.

The LLM sees only the public instruction and writes a short outline (a sketch); the SLM, on the
device, writes the final text from its private context, the instruction and that outline. The
private context never leaves :func:`sketch_generate`'s SLM call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

import torch

from logitfuse.backends import LLMBackend
from logitfuse.config import check_int
from logitfuse.prompts import has_chat_template, render_prompt

__all__ = ["FINAL_PROMPT", "OUTLINE_PROMPT", "SketchResult", "SketchSettings", "sketch_generate"]

OUTLINE_PROMPT = (
    "Write a brief outline (a few short bullet points) for the following writing task. "
    "Do not write the text itself.\n\nTask: {instruction}"
)
FINAL_PROMPT = (
    "Use the personal context below to write the text for the task, in the author's own style, "
    "following the outline.\n\n## Context\n{context}\n\n## Task\n{instruction}\n\n## Outline\n{outline}"
)


@dataclass
class SketchResult:
    """What :func:`sketch_generate` returns.

    Attributes:
        outline: the LLM's outline (text; public).
        text: the SLM's final text.
        outline_ids: the outline in LLM token ids.
        output_ids: the SLM's generated token ids (without the prompt).
    """

    outline: str
    text: str
    outline_ids: list[int]
    output_ids: list[int]


@dataclass(frozen=True)
class SketchSettings:
    """The outline step's settings (:func:`sketch_generate`).

    Attributes:
        outline_max_new_tokens: outline length in LLM tokens (greedy decoding).
        outline_prompt: template of the LLM's prompt, with ``{instruction}``.
        final_prompt: template of the SLM's prompt, with ``{context}``, ``{instruction}``, ``{outline}``.
        apply_chat_template: wrap both prompts in the tokenizers' chat templates (where they have one).
    """

    outline_max_new_tokens: int = 64
    outline_prompt: str = OUTLINE_PROMPT
    final_prompt: str = FINAL_PROMPT
    apply_chat_template: bool = True

    def __post_init__(self) -> None:
        check_int("outline_max_new_tokens", self.outline_max_new_tokens, 1, fix="outline length in LLM tokens")
        for name in ("outline_prompt", "final_prompt"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str template")


SKETCH_FIELDS = frozenset(f.name for f in fields(SketchSettings))


def _chat_ids(tokenizer: Any, text: str) -> list[int]:
    return render_prompt(tokenizer, [{"role": "user", "content": text}])


def sketch_generate(llm: LLMBackend, slm: Any, public_instruction: str, private_context: str, *,
                    slm_tokenizer: Any, settings: SketchSettings | None = None, **generate_kwargs: Any) -> SketchResult:
    """Sketch-based CoGenesis: an outline from the LLM (public), the text from the SLM (private).

    Args:
        llm (`LLMBackend`): the cloud side (:class:`logitfuse.HFLLM` or
            :class:`logitfuse.OpenAICompatibleLLM`, with a tokenizer to decode the outline).
        slm: the on-device transformers causal LM.
        public_instruction (`str`): the task; the only thing the LLM sees (formatted by the outline prompt).
        private_context (`str`): the user's private context; only the SLM sees it.
        slm_tokenizer: the SLM's tokenizer.
        settings (`SketchSettings`, *optional*): the outline step (length, templates, chat template);
            its fields may also be given as keywords.
        **generate_kwargs: passed to ``slm.generate`` for the final text (default greedy,
            ``max_new_tokens=128``).

    Example:

    >>> from logitfuse.testing import byte_level_tokenizer, tiny_llama
    >>> import logitfuse
    >>> tok = byte_level_tokenizer()
    >>> llm = logitfuse.HFLLM(tiny_llama(len(tok), seed=1), tok)
    >>> result = logitfuse.sketch_generate(llm, tiny_llama(len(tok), seed=0), "Write an invitation.",
    ...     "My name is Martin.", slm_tokenizer=tok, outline_max_new_tokens=4, max_new_tokens=4)
    >>> len(result.outline_ids), len(result.output_ids)
    (4, 4)
    """
    sugar = {k: generate_kwargs.pop(k) for k in list(generate_kwargs) if k in SKETCH_FIELDS}
    if settings is not None and not isinstance(settings, SketchSettings):
        raise TypeError(f"settings must be a SketchSettings, got {type(settings).__name__}")
    settings = dataclasses.replace(settings or SketchSettings(), **sugar)
    max_new_tokens = check_int("max_new_tokens", generate_kwargs.pop("max_new_tokens", 128), 1,
                               fix="final text length in SLM tokens")
    if not isinstance(llm, LLMBackend):
        raise TypeError(f"llm must be a logitfuse LLM backend (HFLLM, OpenAICompatibleLLM), got {type(llm).__name__}")
    if llm.tokenizer is None:
        raise ValueError("the LLM backend needs tokenizer= to encode the instruction and decode the outline")
    for name, value in (("public_instruction", public_instruction), ("private_context", private_context)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")

    # 1. the LLM: public instruction only
    llm_tok = llm.tokenizer
    outline_text = settings.outline_prompt.format(instruction=public_instruction)
    if settings.apply_chat_template and has_chat_template(llm_tok):
        llm_prompt: Any = _chat_ids(llm_tok, outline_text)
    else:
        llm_prompt = outline_text
    stop = [i for i in (getattr(llm_tok, "eos_token_id", None),) if i is not None]
    outline_ids = llm.greedy(llm_prompt, settings.outline_max_new_tokens, stop_ids=stop)
    outline = llm_tok.decode(outline_ids, skip_special_tokens=True).strip()

    # 2. the SLM: private context + instruction + outline, on the device
    final_text = settings.final_prompt.format(context=private_context, instruction=public_instruction, outline=outline)
    if settings.apply_chat_template and has_chat_template(slm_tokenizer):
        prompt_ids = _chat_ids(slm_tokenizer, final_text)
    else:
        prompt_ids = list(slm_tokenizer.encode(final_text))
    device = next(slm.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens}
    pad = getattr(slm_tokenizer, "pad_token_id", None)
    if pad is not None:
        kwargs["pad_token_id"] = pad
    kwargs.update(generate_kwargs)
    with torch.no_grad():
        out = slm.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    output_ids = out[0, input_ids.shape[1]:].tolist()
    text = slm_tokenizer.decode(output_ids, skip_special_tokens=True)
    return SketchResult(outline=outline, text=text, outline_ids=outline_ids, output_ids=output_ids)
