"""Argument checks of :class:`logitfuse.FusionSession`, in their own module to keep the session short."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from logitfuse.backends import LLMBackend
from logitfuse.types import MODES, TAILS
from logitfuse.vocab import VocabMap

__all__ = ["as_id_set", "check_session_arguments"]


def check_session_arguments(llm: Any, *, head: Any, alpha: Any, vocab_map: Any, mode: Any, tail: Any, slm_tokenizer: Any,
                            apply_chat_template: Any, lookbehind: Any, slm_temperature: Any,
                            llm_temperature: Any) -> tuple[str, str, bool]:
    """``(mode, tail, cross_tokenizer)`` after checking :class:`~logitfuse.FusionSession`'s arguments
    (see there); ``TypeError``/``ValueError`` naming the argument and the fix otherwise."""
    if not isinstance(llm, LLMBackend):
        raise TypeError(f"llm must be a logitfuse LLM backend (HFLLM, OpenAICompatibleLLM), got {type(llm).__name__}")
    if (head is None) == (alpha is None):
        raise ValueError("pass exactly one of head= (a FusionHead predicting α per row) or alpha= (a fixed float in [0, 1])")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha={alpha!r} must be a float in [0, 1] (1 = SLM only, 0 = LLM only)")
    # with a head, its own setting is the default; without one, linear mode and the SLM-shaped tail
    mode = mode if mode is not None else (getattr(head, "mode", None) or "linear")
    tail = tail if tail is not None else (getattr(head, "tail", None) or "slm")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if tail not in TAILS:
        raise ValueError(f"tail={tail!r} is not one of {TAILS}")
    if vocab_map is not None and not isinstance(vocab_map, VocabMap):
        raise TypeError(f"vocab_map must be a logitfuse.VocabMap or None, got {type(vocab_map).__name__}")
    if vocab_map is not None and vocab_map.v_llm != llm.vocab_size:
        raise ValueError(
            f"vocab_map was built for v_llm={vocab_map.v_llm} but the LLM has vocab_size={llm.vocab_size}; "
            "build the map for this LLM (VocabMap.identity or VocabMap.from_tokenizers)"
        )
    if head is not None:
        if not callable(head) or not hasattr(head, "check_compatible"):
            raise TypeError(f"head must be a logitfuse.FusionHead or PaperFusionHead, got {type(head).__name__}")
        head.check_compatible(vocab_map=vocab_map, v_llm=llm.vocab_size, mode=mode, tail=tail)
    for name, value in (("slm_temperature", slm_temperature), ("llm_temperature", llm_temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name}={value!r} must be a positive number")
    if not isinstance(lookbehind, int) or isinstance(lookbehind, bool) or lookbehind < 0:
        raise ValueError(f"lookbehind={lookbehind!r} must be an int >= 0 (LLM tokens re-encoded each step)")
    if llm_temperature != 1.0 and llm.output_kind != "dense":
        raise ValueError(f"llm_temperature={llm_temperature!r} needs dense LLM logits; {type(llm).__name__} "
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
    if apply_chat_template and llm.tokenizer is None:
        raise ValueError("apply_chat_template=True needs the LLM backend's tokenizer (pass tokenizer= to the backend)")
    return mode, tail, cross_tokenizer


def as_id_set(value: Any, name: str) -> frozenset[int]:
    """``value`` (an id, a list of ids or ``None``) as a frozen set; ``TypeError`` naming ``name`` otherwise."""
    if value is None:
        return frozenset()
    if isinstance(value, int) and not isinstance(value, bool):
        return frozenset([value])
    if isinstance(value, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return frozenset(value)
    raise TypeError(f"{name} must be an int, a list of ints or None, got {value!r}")
