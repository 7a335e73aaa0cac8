"""One input of a fusion rule: a backend, the prompt it reads, and whether it runs on this device.

Privacy is a property of each input: only an input marked ``on_device`` may read the private prompt, and
only an in-process model (:class:`logitfuse.HFLLM`) can be marked so. A served backend (anything over
HTTP, loopback included: :class:`logitfuse.OpenAICompatibleLLM`, or any backend class logitfuse cannot
see into) is never on-device: such an input is refused when it is made, before anything is sent.

>>> import logitfuse
>>> from logitfuse.rules import Input
>>> from logitfuse.testing import byte_level_tokenizer, tiny_llama
>>> tok = byte_level_tokenizer()
>>> slm = tiny_llama(len(tok), seed=0)
>>> Input(logitfuse.HFLLM(slm, tok), on_device=True).prompt      # the SLM over the public prompt
'public'
>>> Input(logitfuse.OpenAICompatibleLLM("http://127.0.0.1:9", "m", tokenizer=tok), prompt="private", on_device=True)
Traceback (most recent call last):
...
ValueError: Input(OpenAICompatibleLLM, on_device=True): only an in-process model (logitfuse.HFLLM) runs on this device; a served backend (over HTTP, loopback included) never may read the private prompt: give it prompt='public', on_device=False
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["PROMPTS", "Input"]

#: which prompt an input reads: the private one (context + instruction; on-device inputs only) or the public one
PROMPTS = ("public", "private")


@dataclass(frozen=True)
class Input:
    """An input of a fusion rule, beside the pivot ``"slm"`` (the SLM the loop generates with).

    Args:
        backend (`LLMBackend`): the model: :class:`logitfuse.HFLLM` (in process) or
            :class:`logitfuse.OpenAICompatibleLLM` (served). It gets the prompt below, then the tokens
            the loop kept (re-tokenized with its own tokenizer when ``vocab_map`` is not the identity).
        prompt: ``"public"`` (default: what the LLM may see) or ``"private"`` (the SLM's own prompt, as
            SLM token ids: the backend must share the SLM's tokenizer; on-device inputs only).
        on_device: the backend runs in this process on this machine (:class:`logitfuse.HFLLM` only).
        vocab_map (`VocabMap`, *optional*): SLM ids to this backend's ids (default: the identity);
            across tokenizers the input is pulled onto the SLM's vocabulary as the two-model mix pulls
            the LLM.
    """

    backend: Any
    prompt: str = "public"
    on_device: bool = False
    vocab_map: Any = None

    def __post_init__(self) -> None:
        from logitfuse.backends import HFLLM, LLMBackend
        from logitfuse.vocab import VocabMap

        name = type(self.backend).__name__
        if not isinstance(self.backend, LLMBackend):
            raise TypeError(f"Input backend must be a logitfuse LLM backend (HFLLM, OpenAICompatibleLLM), got {name}")
        if self.prompt not in PROMPTS:
            raise ValueError(f"Input prompt={self.prompt!r} is not one of {', '.join(map(repr, PROMPTS))}")
        if not isinstance(self.on_device, bool):
            raise TypeError(f"Input on_device must be True or False, got {self.on_device!r}")
        if self.on_device and not isinstance(self.backend, HFLLM):
            raise ValueError(f"Input({name}, on_device=True): only an in-process model (logitfuse.HFLLM) runs on "
                             "this device; a served backend (over HTTP, loopback included) never may read the private "
                             "prompt: give it prompt='public', on_device=False")
        if self.prompt == "private" and not self.on_device:
            raise ValueError(f"Input({name}, prompt='private'): only an input marked on_device=True may read the "
                             "private prompt; give it prompt='public', or mark an in-process HFLLM on_device=True")
        if self.vocab_map is not None and not isinstance(self.vocab_map, VocabMap):
            raise TypeError(f"Input vocab_map must be a logitfuse.VocabMap or None, got {type(self.vocab_map).__name__}")
        if self.prompt == "private" and self.vocab_map is not None and not self.vocab_map.is_identity:
            raise ValueError("Input(prompt='private') reads the SLM's own token ids, so it needs the SLM's tokenizer "
                             "(vocab_map None or the identity)")
