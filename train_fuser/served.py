"""The LLM side of ``logitfuse train/eval --llm http://HOST:PORT/v1``: a served LLM scores the reference
responses through its prompt log-probabilities (teacher-forced, top-k per position), so a fusion
head can be trained for an LLM that only a serving engine runs.

::

    logitfuse train --slm qwen2.5-coder-0.5b --llm http://127.0.0.1:8080/v1 --llm-model llm \\
        --llm-tokenizer qwen2.5-coder-1.5b --out runs/served

The server gets what a served LLM gets while decoding: the public prompt (rendered with the LLM's
chat template) and the response tokens, never the private prompt (``eval``'s LLM-with-context upper
bound is skipped). It must score prompt tokens: llama.cpp's server started with ``--logits_all true``,
vLLM (``prompt_logprobs``) or ``logitfuse serve`` (:meth:`logitfuse.OpenAICompatibleLLM.score`).
A server gives only its top-k, so only the top-k LLM inputs are trained (no dense head, no paper
head). The score cache records the server's URL and model name (no text of the data).

>>> is_url("http://127.0.0.1:8080/v1"), is_url("qwen2.5-coder-1.5b")
(True, False)
"""

from __future__ import annotations

from typing import Any

import torch

from logitfuse.backends import LLMBackendError, OpenAICompatibleLLM
from logitfuse.types import TopK

__all__ = ["ServedScorer", "check_served", "is_url"]


def is_url(value: Any) -> bool:
    """Whether ``--llm`` names a server (``http://`` or ``https://``) rather than a model."""
    return isinstance(value, str) and value.startswith(("http://", "https://"))


class ServedScorer:
    """A served LLM that scores token sequences (teacher-forced) through its prompt log-probabilities.

    Args:
        url (`str`): the server's root (``/v1`` optional).
        model (`str`): the served model's name.
        tokenizer: the served LLM's tokenizer (token ids, and text for llama.cpp's server).
        top_k (`int`, defaults to 20): log-probabilities per position.
        timeout (`float`, defaults to 300): seconds for one scoring request (a whole response).
    """

    def __init__(self, url: str, model: str, tokenizer: Any, top_k: int = 20, *, timeout: float = 300.0):
        self.backend = OpenAICompatibleLLM(url, model, top_k=top_k, tokenizer=tokenizer, timeout=timeout,
                                           on_failure="raise", add_special_tokens=False)
        self.tokenizer, self.top_k, self.vocab_size = tokenizer, top_k, self.backend.vocab_size
        #: what the score cache records for this LLM (server and model, nothing of the data)
        self.name = f"{model}@{self.backend.url}"

    def problem(self) -> str | None:
        """Why this server cannot score prompt tokens (``None``: it can). Probes it once."""
        if self.backend.supports_score:
            return None
        if self.backend.stats["score_method"] is None:
            return f"no usable answer from {self.backend.url} (is the server running, and is --llm-model its model's name?)"
        return (f"{self.backend.url} returns no prompt log-probabilities (neither echo + logprobs nor vLLM's "
                "prompt_logprobs); start llama.cpp's server with --logits_all true, or use vLLM or `logitfuse serve`")

    def score_topk(self, prompt_ids: list[int], continuation_ids: list[int]) -> TopK:
        """``(len(continuation_ids), k)`` top-k: row ``t`` is the distribution that predicts
        ``continuation_ids[t]`` (after the prompt and the continuation's first ``t`` tokens)."""
        if not continuation_ids:
            return TopK(torch.zeros(0, self.top_k, dtype=torch.long), torch.zeros(0, self.top_k))
        self.backend.start([list(prompt_ids)])
        out = self.backend.score([list(continuation_ids[:-1])])
        self.backend.reset()
        if not bool(out.ok[0]):
            raise LLMBackendError(f"{self.backend.url}: the server did not score the sequence")
        return TopK(out.next.ids[0], out.next.logprobs[0])


def check_served(args: Any) -> ServedScorer | None:
    """``--llm``, ``--llm-model`` and ``--llm-tokenizer`` of `train`/`eval` checked (``UsageError``):
    for ``--llm URL``, the served scorer, after one probe of the server (before any model loads);
    otherwise ``None``."""
    from logitfuse.errors import UsageError
    from logitfuse.zoo import check_model
    from logitfuse.zoo import resolve

    if not is_url(args.llm):
        if args.llm_model is not None or args.llm_tokenizer is not None:
            raise UsageError("--llm-model and --llm-tokenizer go with --llm http://HOST:PORT/v1 (a served LLM); "
                             f"--llm {args.llm!r} is a model to run here: leave them out")
        return None
    if not args.llm_model:
        raise UsageError(f"--llm {args.llm} is a server: pass --llm-model NAME, the served model's name "
                         "(GET /v1/models lists it)")
    tokenizer_source = args.llm_tokenizer or args.slm
    check_model("--llm-tokenizer" if args.llm_tokenizer else "--slm (the served LLM's tokenizer by default)",
                tokenizer_source)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve(tokenizer_source))
    try:
        scorer = ServedScorer(args.llm, args.llm_model, tokenizer, top_k=args.llm_top_k)
    except ValueError as err:
        raise UsageError(f"--llm {args.llm}: {err}") from None
    problem = scorer.problem()
    if problem:
        raise UsageError(f"--llm {args.llm}: {problem}")
    return scorer
