"""The loop's sampler (logitfuse.decoding.sampling.TokenChooser): the draws of an explicit generator, on
the logits' device, the same tokens as the reference sampler's for the same generator state."""

from __future__ import annotations

import pytest
import torch

import logitfuse
from logitfuse.config import SamplingConfig
from logitfuse.decoding.sampling import TokenChooser
from logitfuse.reference import sample_from_logprobs


def reference_tokens(logprobs, seed, steps, temperature, top_k, top_p):
    generator, rows, out = torch.Generator().manual_seed(seed), logprobs.shape[1], []
    for step in range(steps):
        uniform = torch.rand(rows, generator=generator)
        out.append(sample_from_logprobs(logprobs[step], uniform, temperature=torch.full((rows,), temperature),
                                        top_k=torch.full((rows,), top_k), top_p=torch.full((rows,), top_p)))
    return torch.stack(out)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.8), (7, 0.6)])
def test_the_chooser_draws_what_the_reference_draws_for_the_same_generator(top_k, top_p):
    logprobs = torch.log_softmax(torch.randn(6, 3, 50) * 3, dim=-1)
    chooser = TokenChooser(SamplingConfig(temperature=0.9, top_k=top_k, top_p=top_p, seed=11))
    ours = torch.stack([chooser.choose(step) for step in logprobs])
    assert torch.equal(ours, reference_tokens(logprobs, 11, 6, 0.9, top_k, top_p))


def test_greedy_is_the_argmax_and_draws_nothing():
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    logprobs = torch.randn(4, 30)
    chooser = TokenChooser(SamplingConfig(generator=generator))
    assert torch.equal(chooser.choose(logprobs), logprobs.argmax(-1))
    assert torch.equal(generator.get_state(), state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_generator_samples_cuda_logits_as_it_samples_cpu_ones():
    logprobs = torch.log_softmax(torch.randn(5, 4, 1000), dim=-1)
    on_cpu = TokenChooser(SamplingConfig(temperature=1.0, top_p=0.9, seed=3))
    on_gpu = TokenChooser(SamplingConfig(temperature=1.0, top_p=0.9, seed=3))
    cpu = torch.stack([on_cpu.choose(step) for step in logprobs])
    gpu = torch.stack([on_gpu.choose(step.cuda()) for step in logprobs])
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


def test_the_same_seed_gives_the_same_fused_tokens():
    from logitfuse.testing import byte_level_tokenizer, tiny_llama

    tok = byte_level_tokenizer()
    slm, llm = tiny_llama(len(tok), seed=0), logitfuse.HFLLM(tiny_llama(len(tok), seed=1), tok)
    runs = [logitfuse.generate(slm, llm, [[5, 6, 7, 8]], "Write:", alpha=0.5, max_new_tokens=6, temperature=1.0,
                               **options).sequences
            for options in (dict(seed=4), dict(generator=torch.Generator().manual_seed(4)), dict(seed=5))]
    assert runs[0] == runs[1] != runs[2]
