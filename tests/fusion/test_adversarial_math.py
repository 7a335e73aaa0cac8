"""Fusion math at the edges (issue 12, section 4): exact ends in linear mode, inputs with no
meaningful distribution, many-to-one vocabulary maps, and a missing vocab_map across sizes.

Where an edge case has a finite answer, the Triton kernels (Triton's interpreter on CPU, see
conftest.py) are compared with the torch reference on it.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models

import logitfuse
from logitfuse import FusionHead, TopK, VocabMap, reference
from logitfuse.vocab import MAP_FORMAT, content_hash

# the interpreter evaluates both sides of tl.where in numpy: inf - inf in an unselected lane warns
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
MODES = ("linear", "geometric", "logit")
# the example: each side puts its second token 120 nats below its first, in opposite order
S = torch.tensor([[0.0, -120.0]])
L = torch.tensor([[-120.0, 0.0]])
LLM_KINDS = {"dense": L, "topk": TopK(torch.tensor([[1, 0]]), torch.tensor([[0.0, -120.0]]))}


@pytest.fixture(scope="module")
def ops():
    pytest.importorskip("triton")
    import logitfuse.kernels as kernels

    return kernels.OPS


def op_args(slm, llm, alpha, v_llm=None, slm_to_llm=None):
    """Arguments for the reference / kernel ops, as logitfuse.functional prepares them."""
    batch, v_slm = slm.shape
    v_llm = v_llm or (llm.shape[1] if isinstance(llm, torch.Tensor) else v_slm)
    slm_to_llm = VocabMap.identity(v_slm, v_llm).slm_to_llm if slm_to_llm is None else slm_to_llm
    ones = torch.ones(batch)
    return dict(slm_logits=slm, llm=llm, slm_to_llm=slm_to_llm, alpha=torch.full((batch,), float(alpha)),
                v_llm=v_llm, slm_temperature=ones, llm_temperature=ones)


# ------------------------------------------------------------------------ exact ends (linear mode)
@pytest.mark.parametrize("llm_kind", ["dense", "topk"])
@pytest.mark.parametrize("mode", MODES)
def test_alpha_one_is_the_slm_and_alpha_zero_the_llm_exactly(llm_kind, mode):
    llm = LLM_KINDS[llm_kind]
    at_one = logitfuse.fuse(S, llm, alpha=1.0, mode=mode)
    at_zero = logitfuse.fuse(S, llm, alpha=0.0, mode=mode)
    torch.testing.assert_close(at_one, torch.tensor([[0.0, -120.0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(at_zero, torch.tensor([[-120.0, 0.0]]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("llm_kind", ["dense", "topk"])
@pytest.mark.parametrize("mode", MODES)
def test_kernels_are_exact_at_the_ends_too(ops, llm_kind, mode):
    for alpha, want in ((1.0, [[0.0, -120.0]]), (0.0, [[-120.0, 0.0]])):
        args = op_args(S, LLM_KINDS[llm_kind], alpha)
        got = ops.fuse(**args, mode=mode, tail="slm")
        torch.testing.assert_close(got, reference.fuse_reference(**args, mode=mode, tail="slm"), atol=1e-5, rtol=0)
        torch.testing.assert_close(got, torch.tensor(want), atol=1e-5, rtol=0)


def test_cross_entropy_at_alpha_one_is_120_not_inf(ops):
    for fn in (reference.fused_cross_entropy_reference, ops.fused_cross_entropy):
        args = op_args(S, L, 1.0)
        alpha = args.pop("alpha").requires_grad_(True)
        loss = fn(**args, alpha=alpha, targets=torch.tensor([1]), mode="linear", tail="slm", ignore_index=-100)
        torch.testing.assert_close(loss.detach(), torch.tensor([120.0]), atol=1e-4, rtol=0)
        loss.sum().backward()
        # the true derivative is e^120 - 1, beyond float32: +inf, never NaN
        assert not torch.isnan(alpha.grad).any() and alpha.grad.item() > 0
    public = logitfuse.fused_cross_entropy(S, L, torch.tensor([1]), alpha=1.0)
    assert public.item() == pytest.approx(120.0, abs=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("target", [0, 1])
def test_alpha_gradient_at_the_ends_is_finite_where_the_derivative_is(ops, alpha, target):
    # 50 nats apart: every one-sided derivative at α = 0 and 1 fits in float32 (the largest is ~e^50)
    s, l = torch.tensor([[0.0, -50.0]]), torch.tensor([[-50.0, 0.0]])  # noqa: E741 (the formulas' names)
    p_s = torch.tensor([0.0, -50.0], dtype=torch.float64).softmax(-1)[target]
    p_l = torch.tensor([-50.0, 0.0], dtype=torch.float64).softmax(-1)[target]
    # loss = -log(α p_S + (1-α) p_L) + log Z, Z = α + (1-α) = 1: d loss / dα = -(p_S - p_L) / mixture
    want = -(p_s - p_l) / (alpha * p_s + (1 - alpha) * p_l)
    for fn in (reference.fused_cross_entropy_reference, ops.fused_cross_entropy):
        args = op_args(s, l, alpha)
        a = args.pop("alpha").requires_grad_(True)
        fn(**args, alpha=a, targets=torch.tensor([target]), mode="linear", tail="slm", ignore_index=-100).sum().backward()
        assert torch.isfinite(a.grad).all()
        assert a.grad.item() == pytest.approx(want.item(), rel=1e-3)


@pytest.mark.parametrize("tail", ["slm", "uniform", "zero"])
def test_linear_normalizer_does_not_underflow_when_the_llm_mass_is_elsewhere(ops, tail):
    # the LLM puts all its mass on id 2, which the SLM lacks; α = 0: the LLM renormalized over the
    # SLM's two tokens (e^-200 each underflows in probability space, not in log space)
    slm, llm = torch.tensor([[0.0, 1.0]]), torch.tensor([[-200.0, -200.0, 0.0]])
    args = op_args(slm, llm, 0.0)
    want = reference.fuse_reference(**args, mode="linear", tail=tail)
    torch.testing.assert_close(want, torch.full((1, 2), -math.log(2)), atol=1e-5, rtol=0)
    torch.testing.assert_close(ops.fuse(**args, mode="linear", tail=tail), want, atol=1e-5, rtol=0)


def test_zero_tail_far_above_the_llm_logits_does_not_overflow(ops):
    # LLM logits near -100: the "zero" tail's raw logit 0 is e^100 times likelier (overflows as a probability)
    slm, llm = torch.tensor([[0.0, 0.5, 1.0]]), torch.tensor([[-100.0, -101.0]])
    for alpha in (0.0, 0.5, 1.0):
        args = op_args(slm, llm, alpha, slm_to_llm=torch.tensor([0, 1, -1]))
        want = reference.fuse_reference(**args, mode="linear", tail="zero")
        assert torch.isfinite(want).all()
        torch.testing.assert_close(ops.fuse(**args, mode="linear", tail="zero"), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_topk_that_reports_only_minus_inf_gives_the_tail_everything(ops, mode):
    slm = torch.tensor([[0.0, 1.0, 2.0, -math.inf]])
    llm = TopK(torch.tensor([[1, 2]]), torch.full((1, 2), -math.inf))
    for alpha in (0.0, 0.5, 1.0):
        fused = logitfuse.fuse(slm, llm, alpha=alpha, mode=mode)
        assert not torch.isnan(fused).any()
        torch.testing.assert_close(fused.logsumexp(-1), torch.zeros(1), atol=1e-5, rtol=0)
        args = op_args(slm, llm, alpha)
        torch.testing.assert_close(ops.fuse(**args, mode=mode, tail="slm"), fused, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ inputs with no answer
def _public_calls(slm, llm, **kwargs):
    """Every public fusion function on the same inputs."""
    targets = torch.zeros(slm.shape[0], dtype=torch.long)
    head = FusionHead(slm.shape[1], llm.shape[1] if isinstance(llm, torch.Tensor) else slm.shape[1])
    return {
        "fuse": lambda: logitfuse.fuse(slm, llm, alpha=0.5, **kwargs),
        "fuse_sample": lambda: logitfuse.fuse_sample(slm, llm, alpha=0.5, **kwargs),
        "fused_cross_entropy": lambda: logitfuse.fused_cross_entropy(slm, llm, targets, alpha=0.5, **kwargs),
        "fuse_with_head": lambda: logitfuse.fuse_with_head(slm, llm, head, **kwargs),
    }


@pytest.mark.parametrize("name", ["fuse", "fuse_sample", "fused_cross_entropy", "fuse_with_head"])
def test_an_all_minus_inf_row_is_refused_on_either_side(name):
    slm, llm = torch.randn(4, 6), torch.randn(4, 6)
    slm[3] = -math.inf
    with pytest.raises(ValueError, match="slm_logits row 3 is all -inf: no token is possible"):
        _public_calls(slm, llm)[name]()
    slm[3] = 0.0
    llm[1] = -math.inf
    with pytest.raises(ValueError, match="llm row 1 is all -inf"):
        _public_calls(slm, llm)[name]()


@pytest.mark.parametrize("value", [1e39, -1e39])
def test_float64_logits_beyond_float32_are_refused(value):
    slm, llm = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    bad = slm.clone()
    bad[1, 2] = value
    with pytest.raises(ValueError, match="slm_logits holds values beyond float32's range"):
        logitfuse.fuse(bad, llm, alpha=1.0)
    bad = llm.clone()
    bad[0, 0] = value
    with pytest.raises(ValueError, match="llm holds values beyond float32's range"):
        logitfuse.fuse(slm, bad, alpha=1.0)
    slm[0, 0] = 1e30  # large but representable: fine
    assert torch.isfinite(logitfuse.fuse(slm, llm, alpha=0.5)).any(dim=-1).all()


@pytest.mark.parametrize("which", ["slm_temperature", "llm_temperature"])
def test_a_temperature_that_overflows_the_logits_is_refused(which):
    slm, llm = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match=f"{which}=1.4e-45 is too small: .* overflows float32"):
        logitfuse.fuse(slm, llm, alpha=0.5, **{which: 1e-45})
    with pytest.raises(ValueError, match=f"{which} must be finite"):
        logitfuse.fuse(slm, llm, alpha=0.5, **{which: math.inf})
    # the same tiny temperature on all-zero logits does not overflow: a uniform row, no error
    zeros = torch.zeros(2, 5)
    fused = logitfuse.fuse(zeros, zeros, alpha=0.5, **{which: 1e-45})
    torch.testing.assert_close(fused, torch.full((2, 5), -math.log(5)))
    # small but representable: the near-greedy limit, never NaN
    sharp = logitfuse.fuse(slm, llm, alpha=1.0, slm_temperature=1e-30)
    assert not torch.isnan(sharp).any() and torch.equal(sharp.argmax(-1), slm.argmax(-1))


def test_a_sampling_temperature_that_overflows_is_refused():
    slm, llm = torch.randn(3, 7), torch.randn(3, 7)
    with pytest.raises(ValueError, match="temperature=1.4e-45 is too small: .* use temperature 0 for greedy"):
        logitfuse.fuse_sample(slm, llm, alpha=0.5, temperature=1e-45)
    with pytest.raises(ValueError, match="temperature must be finite"):
        logitfuse.fuse_sample(slm, llm, alpha=0.5, temperature=math.inf)
    greedy = logitfuse.fuse_sample(slm, llm, alpha=0.5, temperature=0.0)
    assert torch.equal(logitfuse.fuse_sample(slm, llm, alpha=0.5, temperature=1e-30), greedy)


# ------------------------------------------------------------------------ vocabulary maps
def test_a_many_to_one_map_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"SLM ids 0 and 1 both to LLM id 0.*llm_to_slm"):
        VocabMap(torch.tensor([0, 0, 1]), 3)
    with pytest.raises(ValueError, match=r"SLM ids 1 and 4 both to LLM id 2"):
        VocabMap(torch.tensor([-1, 2, -1, 0, 2]), 3)
    # unmapped (-1) entries may repeat; identity maps of any padding pass
    VocabMap(torch.tensor([-1, -1, 1]), 3)
    for v_slm, v_llm in ((5, 5), (7, 4), (4, 7)):
        VocabMap.identity(v_slm, v_llm)


def test_a_many_to_one_map_is_refused_at_load(tmp_path):
    # a file written by another tool, with a correct content hash: the constructor's check still runs
    path = tmp_path / "map.safetensors"
    slm_to_llm = torch.tensor([0, 0, 1])
    save_file({"slm_to_llm": slm_to_llm}, str(path),
              metadata={"format": MAP_FORMAT, "v_llm": "3", "hash": content_hash(slm_to_llm, 3)})
    with pytest.raises(ValueError, match=r"map.safetensors holds an invalid VocabMap: .*both to LLM id 0"):
        VocabMap.load(path)


def test_the_hand_off_carries_many_to_one_without_counting_twice():
    # LLM ids 0 and 2 both belong to SLM token 0: exact pair 0 -> 0, and LLM 2 hands its mass to SLM 0
    vmap = VocabMap(torch.tensor([0, -1, 1]), 3, llm_to_slm=torch.tensor([0, 2, 0]))
    llm = torch.tensor([[3.0, 0.0, 3.0]])
    fused = logitfuse.fuse(torch.zeros(1, 3), llm, alpha=0.0, vocab_map=vmap, tail="uniform")
    p_llm = llm.softmax(-1)[0]
    assert fused.exp()[0, 0].item() == pytest.approx((p_llm[0] + p_llm[2]).item(), rel=1e-5)
    assert fused.exp().sum().item() == pytest.approx(1.0, rel=1e-5)


def _word_tokenizer(tokens: list[str]) -> Tokenizer:
    return Tokenizer(models.WordLevel({tok: i for i, tok in enumerate(tokens)}, unk_token=tokens[0]))


def test_from_tokenizers_keeps_one_slm_token_per_normalized_text():
    # SLM: "▁a" and " a" are both the text " a" (lowest id wins); "<0x41>" and "A" are both "A" (the
    # ordinary token wins over the byte token, even at a higher id)
    slm = _word_tokenizer(["<unk>", "▁a", " a", "<0x41>", "A", "b"])
    llm = _word_tokenizer(["<unk>", "A", " a", " a ", "b", "▁a"])
    vmap = VocabMap.from_tokenizers(slm, llm)
    assert vmap.slm_to_llm.tolist() == [0, 2, -1, -1, 1, 4]
    # the LLM's own duplicate ("▁a" = " a", id 5) hands its mass to the SLM token that kept the text
    assert vmap.llm_to_slm[5].item() == 1 and vmap.llm_to_slm[2].item() == 1
    mapped = vmap.slm_to_llm[vmap.slm_to_llm >= 0]
    assert mapped.unique().numel() == mapped.numel()


# ------------------------------------------------------------------------ missing vocab_map
@pytest.mark.parametrize("name", ["fuse", "fuse_sample", "fused_cross_entropy", "fuse_with_head"])
def test_different_vocabulary_sizes_need_an_explicit_map(name):
    slm, llm = torch.randn(2, 10), torch.randn(2, 12)
    with pytest.raises(ValueError, match=r"pass vocab_map=VocabMap.identity\(10, 12\)"):
        _public_calls(slm, llm)[name]()
    _public_calls(slm, llm, vocab_map=VocabMap.identity(10, 12))[name]()  # explicit: fine
    _public_calls(slm, torch.randn(2, 10))[name]()  # same sizes: the identity by default
