"""Checks of a :class:`logitfuse.FusionConfig` against the LLM backend it will be used with, and the one
normalisation of public prompts (:func:`public_rows`) every decoding entry point shares.

The config checked its own plain values when it was made (:mod:`logitfuse.config`); what is left is what
depends on the backend and the head: their vocabulary sizes, the head's setting, the tokenizers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from logitfuse.backends import LLMBackend
from logitfuse.config import FusionConfig
from logitfuse.heads.protocol import check_head
from logitfuse.vocab import VocabMap

__all__ = ["as_id_set", "check_fusion", "public_rows"]


def check_fusion(llm: Any, fusion: FusionConfig, slm_tokenizer: Any = None) -> tuple[str, str, bool]:
    """``(mode, tail, cross_tokenizer)`` for ``fusion`` used with the backend ``llm`` (and the SLM's
    tokenizer ``slm_tokenizer``, needed across tokenizers), after checking what the config alone cannot:
    ``TypeError``/``ValueError`` naming the argument and the fix otherwise.
    ``llm`` may be ``None`` only for the SLM alone (``alpha=1``: the LLM is never asked).

    >>> import logitfuse
    >>> from logitfuse.decoding.checks import check_fusion
    >>> check_fusion(None, logitfuse.FusionConfig(alpha=1.0))
    ('linear', 'slm', False)
    """
    if not isinstance(fusion, FusionConfig):
        raise TypeError(f"fusion must be a logitfuse.FusionConfig, got {type(fusion).__name__}")
    if llm is None and not fusion.slm_only:
        raise TypeError("llm=None works only with alpha=1 (the SLM alone); pass an LLM backend (HFLLM, "
                        "OpenAICompatibleLLM) to fuse")
    if llm is not None and not isinstance(llm, LLMBackend):
        raise TypeError(f"llm must be a logitfuse LLM backend (HFLLM, OpenAICompatibleLLM), got {type(llm).__name__}")
    head, vocab_map = fusion.head, fusion.vocab_map
    if head is not None:
        check_head(head)
    # with a head, its own setting is the default; without one, linear mode and the SLM-shaped tail
    mode = fusion.mode if fusion.mode is not None else (head.mode if head is not None else "linear")
    tail = fusion.tail if fusion.tail is not None else (head.tail if head is not None else "slm")
    if vocab_map is not None and not isinstance(vocab_map, VocabMap):
        raise TypeError(f"vocab_map must be a logitfuse.VocabMap or None, got {type(vocab_map).__name__}")
    if llm is None:
        return mode, tail, False
    if vocab_map is not None and vocab_map.v_llm != llm.vocab_size:
        raise ValueError(
            f"vocab_map was built for v_llm={vocab_map.v_llm} but the LLM has vocab_size={llm.vocab_size}; "
            "build the map for this LLM (VocabMap.identity or VocabMap.from_tokenizers)"
        )
    if head is not None:
        head.check_compatible(vocab_map=vocab_map, v_llm=llm.vocab_size, mode=mode, tail=tail)
    if fusion.llm_temperature != 1.0 and llm.output_kind != "dense":
        raise ValueError(f"llm_temperature={fusion.llm_temperature!r} needs dense LLM logits; {type(llm).__name__} "
                         "returns top-k log-probabilities (ask the server for that temperature instead)")
    if vocab_map is None and slm_tokenizer is not None and llm.tokenizer is not None \
            and slm_tokenizer is not llm.tokenizer and slm_tokenizer.get_vocab() != llm.tokenizer.get_vocab():
        raise ValueError("slm_tokenizer and the LLM's tokenizer differ but vocab_map is None (the identity); pass "
                         "vocab_map=logitfuse.VocabMap.from_tokenizers(slm_tokenizer, llm_tokenizer)")
    cross_tokenizer = vocab_map is not None and not vocab_map.is_identity
    if cross_tokenizer:
        if slm_tokenizer is None:
            raise ValueError("vocab_map is not the identity (two tokenizers): pass slm_tokenizer= so the "
                             "generated text can be re-tokenized for the LLM")
        if llm.tokenizer is None:
            raise ValueError("vocab_map is not the identity (two tokenizers): the LLM backend needs tokenizer=")
    if fusion.apply_chat_template and llm.tokenizer is None:
        raise ValueError("apply_chat_template=True needs the LLM backend's tokenizer (pass tokenizer= to the backend)")
    return mode, tail, cross_tokenizer


def public_rows(public_prompt: Any, batch: int) -> list[Any]:
    """One public prompt per row: ``public_prompt`` is one prompt for every row (a text, a list of LLM token
    ids, a 1-D tensor of them) or a list of ``batch`` prompts (a ``(batch, length)`` tensor: one row each).
    ``ValueError`` naming ``public_prompt`` otherwise.

    >>> from logitfuse.decoding.checks import public_rows
    >>> public_rows("Write an invitation:", 2)
    ['Write an invitation:', 'Write an invitation:']
    >>> public_rows([[5, 6], [7]], 2)
    [[5, 6], [7]]
    """
    if isinstance(public_prompt, torch.Tensor):
        public_prompt = public_prompt.tolist()
    if isinstance(public_prompt, str) or (isinstance(public_prompt, Sequence) and public_prompt and all(
            isinstance(i, int) and not isinstance(i, bool) for i in public_prompt)):
        return [public_prompt] * batch
    if isinstance(public_prompt, Sequence) and not isinstance(public_prompt, str) and len(public_prompt) == batch \
            and all(isinstance(p, str) or (isinstance(p, Sequence) and all(isinstance(i, int) for i in p))
                    for p in public_prompt):
        return list(public_prompt)
    raise ValueError(f"public_prompt must be one prompt (text or LLM token ids) for every row, or a list of "
                     f"{batch} (one per row of private_input_ids)")


def as_id_set(value: Any, name: str) -> frozenset[int]:
    """``value`` (an id, a list of ids or ``None``) as a frozen set; ``TypeError`` naming ``name`` otherwise."""
    if value is None:
        return frozenset()
    if isinstance(value, int) and not isinstance(value, bool):
        return frozenset([value])
    if isinstance(value, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return frozenset(value)
    raise TypeError(f"{name} must be an int, a list of ints or None, got {value!r}")
