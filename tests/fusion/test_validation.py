"""Bad input gets a clear error that names the argument and says how to fix it."""

import math

import pytest
import torch

import logitfuse
from logitfuse import TopK, VocabMap

SLM = torch.randn(2, 10)
LLM = torch.randn(2, 12)
VMAP = VocabMap.identity(10, 12)


def topk(ids, logprobs=None):
    ids = torch.tensor(ids)
    if logprobs is None:
        logprobs = torch.full(ids.shape, math.log(0.1))
    return TopK(ids, torch.as_tensor(logprobs, dtype=torch.float32))


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(llm=torch.randn(3, 12)), ValueError, "llm has batch size 3 but slm_logits has 2"),
        (dict(slm_logits=torch.randn(2, 9)), ValueError, "slm_logits has vocabulary size 9 but vocab_map was built for v_slm=10"),
        (dict(llm=torch.randn(2, 13)), ValueError, "llm has vocabulary size 13 but vocab_map was built for v_llm=12"),
        (dict(slm_logits=torch.randn(10)), ValueError, r"slm_logits must have shape \(batch_size, vocab_size\)"),
        (dict(slm_logits=torch.ones(2, 10, dtype=torch.long)), TypeError, "slm_logits must be a float tensor"),
        (dict(slm_logits=SLM.tolist()), TypeError, "slm_logits must be a torch.Tensor"),
        (dict(slm_logits=torch.where(torch.eye(2, 10) > 0, math.nan, SLM)), ValueError, "slm_logits contains NaN or \\+inf"),
        (dict(llm=torch.full((2, 12), math.inf)), ValueError, "llm contains NaN or \\+inf"),
        (dict(alpha=1.5), ValueError, r"alpha must lie in \[0.0, 1.0\], got 1.5"),
        (dict(alpha=-0.1), ValueError, "alpha must lie in"),
        (dict(alpha=torch.tensor([0.5, math.nan])), ValueError, "alpha must lie in"),
        (dict(alpha=torch.tensor([0.5, 0.5, 0.5])), ValueError, r"alpha must be a float or a tensor of shape \(2,\)"),
        (dict(alpha="0.5"), TypeError, "alpha must be a float or a tensor"),
        (dict(mode="harmonic"), ValueError, "mode='harmonic' is not one of 'linear', 'geometric', 'logit'"),
        (dict(tail="none"), ValueError, "tail='none' is not one of"),
        (dict(slm_temperature=0.0), ValueError, r"slm_temperature must lie in \(0.0"),
        (dict(llm=topk([[1, 2], [3, 4]]), llm_temperature=2.0), ValueError, "llm_temperature applies to dense LLM logits only"),
        (dict(llm=topk([[], []])), ValueError, r"llm is an empty top-k \(k = 0\)"),
        (dict(llm=topk([[1, 2], [3, 12]])), ValueError, r"llm.ids holds ids outside \[0, 12\)"),
        (dict(llm=topk([[1, -1], [3, 4]])), ValueError, r"llm.ids holds ids outside"),
        (dict(llm=topk([[1, 1], [3, 4]])), ValueError, "llm.ids repeats an id within a row"),
        (dict(llm=topk([[1, 2], [3, 4]], [[0.5, -1.0], [-1.0, -1.0]])), ValueError, "llm.logprobs must be log-probabilities"),
        (dict(llm=topk([[1, 2], [3, 4]], [[-0.1, -0.1], [-1.0, -1.0]])), ValueError, "sum to more than probability 1"),
        (dict(llm=topk([[1, 2, 3]])), ValueError, "llm has batch size 1 but slm_logits has 2"),
        (dict(llm=TopK(torch.tensor([[1.0], [2.0]]), torch.zeros(2, 1) - 1)), TypeError, "llm.ids must be an integer tensor"),
        (dict(llm=[[0.0] * 12] * 2), TypeError, "llm must be dense logits"),
        (dict(vocab_map="identity"), TypeError, "vocab_map must be a logitfuse.VocabMap"),
    ],
)
def test_fuse_rejects_bad_input(kwargs, error, message):
    args = dict(slm_logits=SLM, llm=LLM, alpha=0.5, vocab_map=VMAP)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        logitfuse.fuse(args.pop("slm_logits"), args.pop("llm"), **args)


def test_minus_inf_logits_are_allowed():
    masked = SLM.clone()
    masked[:, 3] = -math.inf
    for mode in ("linear", "geometric", "logit"):
        fused = logitfuse.fuse(masked, LLM, alpha=0.5, vocab_map=VMAP, mode=mode)
        unmasked = torch.cat([fused[:, :3], fused[:, 4:]], dim=1)
        assert torch.isfinite(unmasked).all(), mode
        # the masked SLM token still gets the LLM's share in linear mode (a mixture), none otherwise
        if mode == "linear":
            p_llm = torch.softmax(LLM, -1)
            expected = torch.log(0.5 * p_llm[:, 3]) - torch.log(0.5 + 0.5 * p_llm[:, :10].sum(-1))
            assert torch.allclose(fused[:, 3], expected, atol=1e-5)
        else:
            assert torch.all(fused[:, 3] == -math.inf), mode
        assert torch.allclose(fused.logsumexp(-1), torch.zeros(2), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(top_k=-1), ValueError, "top_k must be >= 0"),
        (dict(top_k=2.5), TypeError, "top_k must be an int"),
        (dict(top_p=0.0), ValueError, r"top_p must lie in \(0.0, 1.0\]"),
        (dict(top_p=1.2), ValueError, "top_p must lie in"),
        (dict(temperature=-1.0), ValueError, r"temperature must lie in \[0.0"),
        (dict(generator=0), TypeError, "generator must be a torch.Generator"),
    ],
)
def test_fuse_sample_rejects_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        logitfuse.fuse_sample(SLM, LLM, alpha=0.5, vocab_map=VMAP, **kwargs)


@pytest.mark.parametrize(
    "targets,error,message",
    [
        (torch.tensor([1, 10]), ValueError, r"targets holds ids outside \[0, 10\)"),
        (torch.tensor([1]), ValueError, r"targets must have shape \(2,\)"),
        (torch.tensor([1.0, 2.0]), TypeError, "targets must be an integer tensor"),
    ],
)
def test_cross_entropy_rejects_bad_targets(targets, error, message):
    with pytest.raises(error, match=message):
        logitfuse.fused_cross_entropy(SLM, LLM, targets, alpha=0.5, vocab_map=VMAP)


def test_errors_name_the_argument_for_row_stats():
    with pytest.raises(ValueError, match="k must be a positive int"):
        logitfuse.row_stats(SLM, k=0)
    with pytest.raises(ValueError, match="logits contains NaN"):
        logitfuse.row_stats(torch.full((1, 3), math.nan))
