"""LLM backends: the cloud side of fused decoding.

- :mod:`logitfuse.backends.base`: the interface (:class:`LLMBackend`, an abstract class whose
  ``output_kind`` says whether :meth:`~LLMBackend.advance` returns dense logits or the top-k),
  :class:`LLMOutput`, :class:`LLMBackendError`;
- :mod:`logitfuse.backends.hf`: :class:`HFLLM`, a local transformers model with its own KV cache;
- :mod:`logitfuse.backends.openai`: :class:`OpenAICompatibleLLM`, the LLM behind an
  OpenAI-compatible ``/v1/completions`` endpoint: its requests and replies are
  :mod:`logitfuse.backends.completions`, over :mod:`logitfuse.backends.transport` (whole-request
  deadlines, no redirects); its teacher-forced scoring is :mod:`logitfuse.backends.served_scoring`,
  reading replies with :mod:`logitfuse.backends.prompt_scores`;
- :mod:`logitfuse.backends.server_checks`: the served model, ``top_k`` and tokenizer checked
  against the server before generating (:meth:`OpenAICompatibleLLM.check_server`);
- :mod:`logitfuse.backends.strings`: token strings in a server's ``top_logprobs`` back to ids.

>>> from logitfuse.backends import HFLLM, OpenAICompatibleLLM
>>> HFLLM.output_kind, OpenAICompatibleLLM.output_kind
('dense', 'topk')
"""

from logitfuse.backends.base import LLMBackend, LLMBackendError, LLMOutput
from logitfuse.backends.hf import HFLLM
from logitfuse.backends.openai import OpenAICompatibleLLM
from logitfuse.backends.server_checks import ServerCheck, ServerMismatchError
from logitfuse.backends.strings import TokenStringMap, parse_top_logprobs, render_token_bytes

__all__ = ["HFLLM", "LLMBackend", "LLMBackendError", "LLMOutput", "OpenAICompatibleLLM", "ServerCheck",
           "ServerMismatchError", "TokenStringMap", "parse_top_logprobs", "render_token_bytes"]
