"""Issue 23, items 1 and 2: rows with no fused distribution, and API edges that used to fail with an
unclear exception.

Two distributions that share no token have no product (geometric or logit mode at 0 < α < 1), and an
LLM whose mass is all on tokens the vocabulary map leaves without an SLM counterpart has nothing to
give at α = 0: both used to come back as all-NaN rows. The dispatcher now raises a ``ValueError``
naming the rows, the reason and the fix, on the reference and on the Triton kernels (Triton's
interpreter on CPU, see conftest.py), when ``validate=True`` (the decode loop passes False and makes
no extra device read).
"""

from __future__ import annotations

import pytest
import torch

import logitfuse
from logitfuse import FusionHead, TopK, VocabMap, functional

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
NINF = float("-inf")
# row 0: the SLM allows tokens 0 and 1, the LLM only 2 and 3 (disjoint); row 1: both allow everything
SLM = torch.tensor([[0.0, 1.0, NINF, NINF], [0.0, 0.5, 1.0, 1.5]])
DISJOINT = torch.tensor([[NINF, NINF, 0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
# row 0: the LLM's mass is all on ids 4 and 5, which the map sends to no SLM token
UNMAPPED = torch.tensor([[NINF, NINF, NINF, NINF, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
MAP = VocabMap.identity(4, 6)


@pytest.fixture(params=["reference", "kernel"])
def path(request, monkeypatch):
    """Run the public functions on the reference, or on the Triton kernels through the dispatcher."""
    if request.param == "kernel":
        pytest.importorskip("triton")
        import logitfuse.kernels as kernels

        monkeypatch.setattr(functional, "ops_for", lambda args, alpha_grad=False: kernels.OPS)
    return request.param


@pytest.mark.parametrize("mode", ["geometric", "logit"])
def test_disjoint_supports_raise_naming_the_row_and_the_fix(path, mode):
    with pytest.raises(ValueError, match=r"fuse: no fused distribution in row\(s\) 0 \(alpha=0.5\).*mode='linear'"):
        logitfuse.fuse(SLM, DISJOINT, alpha=0.5, mode=mode, vocab_map=MAP)
    with pytest.raises(ValueError, match=r"fuse_sample: no fused distribution in row\(s\) 0 "):
        logitfuse.fuse_sample(SLM, DISJOINT, alpha=0.5, mode=mode, vocab_map=MAP)
    with pytest.raises(ValueError, match=r"fused_cross_entropy: no fused distribution in row\(s\) 0 "):
        logitfuse.fused_cross_entropy(SLM, DISJOINT, torch.tensor([0, 1]), alpha=0.5, mode=mode, vocab_map=MAP)
    # the row is ignored: no loss asked of it, no error
    loss = logitfuse.fused_cross_entropy(SLM, DISJOINT, torch.tensor([-100, 1]), alpha=0.5, mode=mode, vocab_map=MAP)
    assert loss[0] == 0 and torch.isfinite(loss[1])


@pytest.mark.parametrize("mode", ["linear", "geometric", "logit"])
def test_llm_mass_only_on_unmapped_tokens_at_alpha_0_raises(path, mode):
    with pytest.raises(ValueError, match=r"row\(s\) 0 \(alpha=0\).*no probability to any SLM token.*alpha > 0"):
        logitfuse.fuse(SLM, UNMAPPED, alpha=0.0, vocab_map=MAP, mode=mode)


def test_the_fusable_cases_still_fuse(path):
    """Linear mode at 0 < α keeps either side's tokens; α = 1 is the SLM alone; α = 0 with mapped mass is the LLM."""
    assert torch.isfinite(logitfuse.fuse(SLM, DISJOINT, alpha=0.5, vocab_map=MAP).logsumexp(-1)).all()
    assert torch.isfinite(logitfuse.fuse(SLM, DISJOINT, alpha=1.0, mode="geometric", vocab_map=MAP).logsumexp(-1)).all()
    assert torch.isfinite(logitfuse.fuse(SLM, DISJOINT, alpha=0.0, mode="geometric", vocab_map=MAP).logsumexp(-1)).all()
    assert torch.isfinite(logitfuse.fuse(SLM, UNMAPPED, alpha=0.5, vocab_map=MAP).logsumexp(-1)).all()


def test_validate_false_does_not_check():
    """The decode loop's path (validate=False) reads nothing back: the NaN row is the caller's to handle."""
    fused = logitfuse.fuse(SLM, DISJOINT, alpha=0.5, mode="geometric", vocab_map=MAP, validate=False)
    assert torch.isnan(fused[0]).all() and not torch.isnan(fused[1]).any()


def test_fuse_with_head_checks_the_rows_too():
    head = FusionHead(4, 6, mode="geometric", init_alpha=0.5)
    with pytest.raises(ValueError, match=r"fuse_with_head: no fused distribution in row\(s\) 0 "):
        logitfuse.fuse_with_head(SLM, DISJOINT, head, vocab_map=MAP, mode="geometric")


# ---------------------------------------------------------------------------- item 2: API edges
@pytest.mark.parametrize("llm", [TopK([[1], [2]], [[-0.1], [-0.1]]), TopK(torch.tensor([[1], [2]]), [[-0.1], [-0.1]])])
def test_a_topk_of_lists_is_a_type_error_naming_llm(llm):
    with pytest.raises(TypeError, match=r"llm=TopK\(ids, logprobs\) needs two tensors.*torch.tensor"):
        logitfuse.fuse(torch.zeros(2, 4), llm, alpha=0.5)


@pytest.mark.parametrize("llm", [[torch.tensor([[1], [2]]), torch.tensor([[-0.1], [-0.1]])],
                                 (torch.tensor([[1], [2]]), torch.tensor([[-0.1], [-0.1]]))])
def test_a_plain_pair_where_a_topk_is_expected_names_topk(llm):
    with pytest.raises(TypeError, match=r"llm must be .*logitfuse.TopK\(ids, logprobs\) with two"):
        logitfuse.fuse(torch.zeros(2, 4), llm, alpha=0.5)


@pytest.mark.parametrize("top_k", [torch.tensor([[1], [2]]), torch.tensor([[1, 2]]), torch.tensor([1.0, 2.0]),
                                   torch.tensor([True, False]), torch.tensor([1, 2, 3])])
def test_fuse_sample_top_k_of_the_wrong_shape_or_dtype_is_a_value_error(top_k):
    with pytest.raises(ValueError, match=r"top_k must be an int or an integer tensor of shape \(2,\)"):
        logitfuse.fuse_sample(torch.zeros(2, 4), torch.zeros(2, 4), alpha=0.5, top_k=top_k)


def test_fuse_sample_top_k_scalar_and_per_row_tensors_work():
    for top_k in (torch.tensor(1), torch.tensor([1]), torch.tensor([1, 1]), 1):
        ids = logitfuse.fuse_sample(torch.tensor([[0.0, 5.0, 1.0]] * 2), torch.zeros(2, 3), alpha=0.5, top_k=top_k)
        assert ids.tolist() == [1, 1]


@pytest.mark.parametrize("head", [None, lambda slm, llm, vocab_map=None: torch.full((2,), 0.5), FusionHead, 0.5])
def test_fuse_with_head_refuses_what_is_not_a_head(head):
    with pytest.raises(TypeError, match=r"head must be a fusion head instance.*logitfuse.fuse\(\.\.\., alpha=\.\.\.\)"):
        logitfuse.fuse_with_head(torch.zeros(2, 4), torch.zeros(2, 4), head)
