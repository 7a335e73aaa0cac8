"""Host reads in the decode loop: a fused step reads back one value from the device (the chosen ids);
speculation at most K + 1 per LLM call. CPU tensors stand in for a device here: every read a logitfuse
frame makes (``Tensor.item``, ``.tolist``, ``.cpu``, ``.numpy``, ``bool(t)``, ``int(t)``, ``float(t)``)
is counted during whole :func:`logitfuse.generate` calls, and the steady state is the difference
between a long and a short generation (the prefill and the end are the same in both)."""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

import logitfuse
from logitfuse.testing import byte_level_tokenizer, tiny_llama

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
PACKAGE = os.path.dirname(logitfuse.__file__) + os.sep


@contextlib.contextmanager
def counted_reads():
    """Counts, per ``file:line``, the host reads made directly by logitfuse code (not by torch or
    transformers internals, e.g. inside a model's forward)."""
    seen: dict[str, int] = {}
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(method):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PACKAGE):
                key = f"{os.path.relpath(caller.f_code.co_filename, PACKAGE)}:{caller.f_lineno}"
                seen[key] = seen.get(key, 0) + 1
            return method(self, *args, **kwargs)
        return read

    try:
        for name, method in originals.items():
            setattr(torch.Tensor, name, counting(method))
        yield seen
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


@pytest.fixture(scope="module")
def models():
    tok = byte_level_tokenizer()
    return tok, tiny_llama(len(tok), seed=0), tiny_llama(len(tok), seed=1)


def reads_of(models, new_tokens, **options):
    tok, slm, llm_model = models
    llm = logitfuse.HFLLM(llm_model, tok)
    private = [tok.encode("Martin sells houses. Write an invitation:"), tok.encode("Ana loves roses. Write:")]
    with counted_reads() as seen:
        out = logitfuse.generate(slm, llm, private, "Write an invitation:", max_new_tokens=new_tokens,
                                 eos_token_id=[], **options)
    assert [len(s) for s in out.sequences] == [new_tokens] * 2
    return seen, out.stats


def steady(models, **options):
    """Reads per step (or per LLM call) between a 4- and a 12-token generation, and where they are."""
    short, short_stats = reads_of(models, 4, **options)
    long, long_stats = reads_of(models, 12, **options)
    extra = {key: long.get(key, 0) - short.get(key, 0) for key in long}
    per = long_stats.llm_calls - short_stats.llm_calls if options.get("speculate") else 8
    return sum(extra.values()) / per, {key: n for key, n in extra.items() if n}


@pytest.mark.parametrize("options", [
    dict(alpha=0.5), dict(alpha=0.5, overlap=False), dict(alpha=0.5, temperature=0.8, top_p=0.9, seed=1),
    dict(alpha=0.5, repetition_penalty=1.2), dict(alpha=1.0),
])
def test_a_fused_step_reads_the_device_once(models, options):
    per_step, where = steady(models, **options)
    assert per_step <= 1, where


def test_a_head_step_reads_the_device_once(models):
    tok = models[0]
    per_step, where = steady(models, head=logitfuse.FusionHead(len(tok), len(tok)))
    assert per_step <= 1, where


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_speculation_reads_at_most_k_plus_1_per_llm_call(models, k, temperature):
    per_call, where = steady(models, alpha=0.9, speculate=k, temperature=temperature, seed=0)
    assert per_call <= k + 1, where


def test_the_counter_sees_a_read():
    """The shim can fail: a read a logitfuse frame makes is counted, one made elsewhere is not."""
    with counted_reads() as seen:
        torch.ones(2).sum().item()  # this test file's read
    assert sum(seen.values()) == 0
    with counted_reads() as seen:
        logitfuse.decoding.checks.public_rows(torch.tensor([1, 2]), 1)  # a tensor prompt is read (tolist)
    assert list(seen.values()) == [1]


def test_a_non_finite_alpha_is_still_refused_without_a_read_of_its_own(models):
    """The head's finiteness check rides on the chosen ids: a NaN α still raises, naming the rows."""
    tok, slm, llm_model = models
    head = logitfuse.FusionHead(len(tok), len(tok))
    with torch.no_grad():
        head.mlp[-1].bias.fill_(float("nan"))
    for speculate in (0, 2):
        with pytest.raises(ValueError, match=r"α is NaN: this FusionHead gave a non-finite α for rows \[0\]"):
            logitfuse.generate(slm, logitfuse.HFLLM(llm_model, tok), [[5, 6, 7]], "Write:", head=head,
                               max_new_tokens=4, speculate=speculate)
