"""LLM backends: the cloud side of fused decoding (being split into modules)."""

from logitfuse.backends.openai import (HFLLM, LLMBackend, LLMBackendError, LLMOutput, OpenAICompatibleLLM,
                                       TokenStringMap, parse_top_logprobs, render_token_bytes)

__all__ = ["HFLLM", "LLMBackend", "LLMBackendError", "LLMOutput", "OpenAICompatibleLLM", "TokenStringMap",
           "parse_top_logprobs", "render_token_bytes"]
