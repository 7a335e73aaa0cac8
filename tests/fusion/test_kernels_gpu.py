"""The Triton kernels at full size on a CUDA GPU (skipped without one; see tests/conftest.py).

Same comparisons as tests/fusion/test_kernels.py at V = 152064 (Qwen2.5's vocabulary) and B = 64, and
inputs whose B·V exceeds 2**31, so a row offset computed in int32 would wrap.
"""

from __future__ import annotations

import pytest
import torch

import logitfuse
from logitfuse import functional, reference
from logitfuse.types import TopK

pytest.importorskip("triton", reason="needs Triton: pip install triton (Linux)")
import logitfuse.kernels as kernels  # noqa: E402

pytestmark = pytest.mark.gpu

V = 152064
B = 64


def make_case(batch, v_slm, v_llm, *, llm_kind, map_kind, dtype=torch.bfloat16, k=20, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    slm = (torch.randn(batch, v_slm, generator=g, device="cuda") * 3).to(dtype)
    if map_kind == "identity":
        vmap = logitfuse.VocabMap.identity(v_slm, v_llm).slm_to_llm.cuda()
    else:
        # a random partial one-to-one map (VocabMap refuses an LLM id used twice): ~30% unmapped
        vmap = torch.randperm(max(v_slm, v_llm), generator=g, device="cuda")[:v_slm]
        vmap[(torch.rand(v_slm, generator=g, device="cuda") < 0.3) | (vmap >= v_llm)] = -1
    llm_logits = torch.randn(batch, v_llm, generator=g, device="cuda") * 3
    if llm_kind == "dense":
        llm = llm_logits.to(dtype)
        t_llm = torch.rand(batch, generator=g, device="cuda") + 0.5
    else:
        top = llm_logits.log_softmax(-1).topk(k, dim=-1)
        llm = TopK(top.indices, top.values.to(dtype))
        t_llm = torch.ones(batch, device="cuda")
    alpha = torch.rand(batch, generator=g, device="cuda")
    alpha[0], alpha[1] = 0.0, 1.0
    return dict(slm_logits=slm, llm=llm, slm_to_llm=vmap, alpha=alpha, v_llm=v_llm,
                slm_temperature=torch.rand(batch, generator=g, device="cuda") + 0.5, llm_temperature=t_llm)


def assert_logprobs_close(got, want, atol=1e-3, rtol=1e-4):
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    torch.testing.assert_close(got[finite], want[finite], atol=atol, rtol=rtol)


def test_cuda_tensors_dispatch_to_the_kernels():
    assert functional.ops_for({"slm_logits": torch.zeros(1, device="cuda")}) is kernels.OPS


@pytest.mark.parametrize("llm_kind,map_kind,mode,tail", [
    ("dense", "identity", "linear", "slm"), ("dense", "partial", "geometric", "uniform"),
    ("topk", "partial", "logit", "zero"), ("topk", "identity", "linear", "uniform"),
    ("topk", "partial", "geometric", "slm"), ("dense", "partial", "logit", "slm"),
])
def test_fuse_full_size(llm_kind, map_kind, mode, tail):
    case = make_case(B, V, V, llm_kind=llm_kind, map_kind=map_kind)
    want = reference.fuse_reference(**case, mode=mode, tail=tail)
    assert_logprobs_close(kernels.OPS.fuse(**case, mode=mode, tail=tail), want)


def test_public_fuse_on_cuda_matches_the_reference():
    case = make_case(B, V, V, llm_kind="dense", map_kind="identity", dtype=torch.float16)
    got = logitfuse.fuse(case["slm_logits"], case["llm"], alpha=case["alpha"], mode="geometric")
    want = reference.fuse_reference(**dict(case, slm_temperature=torch.ones(B, device="cuda"),
                                           llm_temperature=torch.ones(B, device="cuda")),
                                    mode="geometric", tail="slm")
    assert_logprobs_close(got, want)


@pytest.mark.parametrize("llm_kind,map_kind,mode,tail", [
    ("dense", "identity", "linear", "slm"), ("topk", "partial", "geometric", "uniform"),
    ("dense", "partial", "logit", "zero"),
])
def test_fuse_sample_full_size(llm_kind, map_kind, mode, tail):
    case = make_case(B, V, V, llm_kind=llm_kind, map_kind=map_kind, seed=1)
    g = torch.Generator(device="cuda").manual_seed(2)
    row = torch.arange(B, device="cuda")
    draw = dict(uniform=torch.rand(B, generator=g, device="cuda"),
                temperature=torch.tensor([1.0, 0.0, 0.7, 1.3], device="cuda")[row % 4],
                top_k=torch.tensor([0, 0, 20, 1000, 50], device="cuda")[row % 5],
                top_p=torch.tensor([1.0, 0.9, 0.5, 0.95, 0.99, 1.0], device="cuda")[row % 6])
    ids_want, _ = reference.fuse_sample_reference(**case, **draw, mode=mode, tail=tail)
    ids_got, lp_got = kernels.OPS.fuse_sample(**case, **draw, mode=mode, tail=tail)
    # rounding differs from the reference, so a draw may land on the other side of a boundary on a
    # genuine near-tie: ask for most rows to agree exactly, and every kernel id to be consistent with
    # the reference's filtered inverse CDF up to float32 rounding
    assert (ids_got == ids_want).float().mean() >= 0.9
    fused = reference.fuse_reference(**case, mode=mode, tail=tail)
    torch.testing.assert_close(lp_got, fused.gather(1, ids_got[:, None]).squeeze(1), atol=1e-3, rtol=1e-4)
    greedy = draw["temperature"] == 0
    assert torch.equal(ids_got[greedy], fused.argmax(-1)[greedy])
    temp = torch.where(greedy, 1.0, draw["temperature"])
    probs = torch.softmax(fused / temp[:, None], dim=-1)
    keep = reference.sampling_mask(probs, draw["top_k"], draw["top_p"])
    weights = torch.where(keep, probs, 0.0)
    cdf = weights.double().cumsum(-1)
    target = draw["uniform"].double() * cdf[:, -1]
    at = cdf.gather(1, ids_got[:, None]).squeeze(1)
    before = at - weights.double().gather(1, ids_got[:, None]).squeeze(1)
    slack = 1e-4 * cdf[:, -1]
    sampled = ~greedy
    assert (before[sampled] <= target[sampled] + slack[sampled]).all()
    assert (at[sampled] >= target[sampled] - slack[sampled]).all()


@pytest.mark.parametrize("llm_kind,map_kind,mode,tail", [
    ("dense", "identity", "linear", "slm"), ("topk", "partial", "geometric", "uniform"),
    ("dense", "partial", "logit", "zero"),
])
def test_fused_cross_entropy_full_size(llm_kind, map_kind, mode, tail):
    case = make_case(B, V, V, llm_kind=llm_kind, map_kind=map_kind, seed=3)
    targets = torch.randint(0, V, (B,), device="cuda")
    targets[5] = -100
    results = []
    for fn in (reference.fused_cross_entropy_reference, kernels.OPS.fused_cross_entropy):
        alpha = case["alpha"].clone().requires_grad_(True)
        loss = fn(**dict(case, alpha=alpha), targets=targets, mode=mode, tail=tail, ignore_index=-100)
        loss.sum().backward()
        results.append((loss.detach(), alpha.grad))
    (loss_want, grad_want), (loss_got, grad_got) = results
    torch.testing.assert_close(loss_got, loss_want, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(grad_got, grad_want, atol=1e-2, rtol=1e-3)


def test_row_stats_full_size():
    logits = torch.randn(B, V, device="cuda") * 4
    want, got = reference.row_stats_reference(logits, 20), kernels.OPS.row_stats(logits, 20)
    for name in ("lse", "max_logprob", "entropy", "topk_logprobs"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-3, rtol=1e-4, msg=name)
    assert (got.topk_ids == want.topk_ids).float().mean() > 0.99  # ties in random floats are rare


@pytest.mark.parametrize("llm_kind,map_kind,tail", [("dense", "identity", "slm"), ("topk", "partial", "uniform"),
                                                   ("dense", "partial", "zero")])
def test_fusion_feature_stats_full_size(llm_kind, map_kind, tail):
    case = make_case(B, V, V, llm_kind=llm_kind, map_kind=map_kind, dtype=torch.float32)
    args = {name: case[name] for name in ("slm_logits", "llm", "slm_to_llm", "v_llm")}
    want = reference.fusion_feature_stats_reference(**args, tail=tail, k=4)
    got = kernels.OPS.fusion_feature_stats(**args, tail=tail, k=4)
    torch.testing.assert_close(reference.features_from_stats(got, 4), reference.features_from_stats(want, 4),
                               atol=1e-3, rtol=1e-4)


def test_fuse_with_head_on_cuda_equals_head_then_fuse():
    """The kernel path: a FusionHead's features from the feature kernel, the mix from the fuse kernel."""
    case = make_case(8, V, V, llm_kind="topk", map_kind="partial", dtype=torch.float32)
    vmap = logitfuse.VocabMap(case["slm_to_llm"].cpu(), V)
    head = logitfuse.FusionHead(V, V, tail="slm").cuda()
    with torch.no_grad():
        alpha, fused = logitfuse.fuse_with_head(case["slm_logits"], case["llm"], head, vocab_map=vmap)
        want_alpha = head(case["slm_logits"], case["llm"], vmap)
        want = logitfuse.fuse(case["slm_logits"], case["llm"], alpha=want_alpha, vocab_map=vmap)
        ref_alpha = head.alpha_from_aligned(logitfuse.align(case["slm_logits"], case["llm"], vocab_map=vmap))
    assert torch.equal(alpha, want_alpha) and torch.equal(fused, want)
    torch.testing.assert_close(alpha, ref_alpha, atol=1e-4, rtol=1e-4)


class _FixedLLM(logitfuse.LLMBackend):
    """A backend that answers every step with the same CUDA logits (its ok flags on the device too)."""

    output_kind = "dense"

    def __init__(self, logits):
        super().__init__()
        self.logits, self.vocab_size = logits, logits.shape[1]

    def start(self, public_prompts):
        self.rows = len(public_prompts)

    def advance(self, new_tokens, need=None):
        return logitfuse.LLMOutput(self.logits, torch.ones(self.rows, dtype=torch.bool, device="cuda"))

    def rollback(self, n):
        pass

    def reset(self):
        pass

    @property
    def batch_size(self):
        return self.rows


def test_a_session_step_with_a_fixed_alpha_does_not_sync():
    logits = torch.randn(4, V, device="cuda")
    session = logitfuse.FusionSession(_FixedLLM(logits), alpha=0.5)
    session.start([[1], [2], [3], [4]], v_slm=V)
    slm = torch.randn(4, V, device="cuda")
    slm[0, 5] = float("-inf")
    session.step([[], [], [], []], slm)  # warm-up: the map's first copy to the GPU, the kernel's compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused = session.step([[7], [7], [7], [7]], slm)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isneginf(fused[0, 5]) and session.stats.fallbacks == 0 and session.stats.llm_calls == 2
    assert torch.equal(session.alpha_history[1], torch.full((4,), 0.5))


def test_no_int32_overflow_when_batch_times_vocab_exceeds_2_31():
    # 14200 x 152064 = 2.16e9 elements per input: row offsets of the last rows pass 2**31
    rows = 14200
    assert rows * V > 2**31
    case = make_case(rows, V, V, llm_kind="dense", map_kind="identity", seed=4)
    tail_rows = slice(rows - 3, rows)
    small = {k: (v[tail_rows] if isinstance(v, torch.Tensor) and k != "slm_to_llm" else v) for k, v in case.items()}

    fused = kernels.OPS.fuse(**case, mode="linear", tail="slm")
    assert_logprobs_close(fused[tail_rows], reference.fuse_reference(**small, mode="linear", tail="slm"))
    del fused

    targets = torch.randint(0, V, (rows,), device="cuda")
    loss = kernels.OPS.fused_cross_entropy(**case, targets=targets, mode="geometric", tail="slm", ignore_index=-100)
    want = reference.fused_cross_entropy_reference(**small, targets=targets[tail_rows], mode="geometric", tail="slm",
                                                   ignore_index=-100)
    torch.testing.assert_close(loss[tail_rows], want, atol=1e-3, rtol=1e-4)

    stats = kernels.OPS.row_stats(case["slm_logits"], 4)
    stats_want = reference.row_stats_reference(case["slm_logits"][tail_rows], 4)
    torch.testing.assert_close(stats.lse[tail_rows], stats_want.lse, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(stats.entropy[tail_rows], stats_want.entropy, atol=1e-3, rtol=1e-4)

    ones = torch.ones(rows, device="cuda")
    draw = dict(uniform=torch.rand(rows, device="cuda"), temperature=torch.zeros(rows, device="cuda"),
                top_k=torch.zeros(rows, dtype=torch.int64, device="cuda"), top_p=ones)
    ids, _ = kernels.OPS.fuse_sample(**case, **draw, mode="linear", tail="slm")
    want_ids, _ = reference.fuse_sample_reference(**small, **{k: v[tail_rows] for k, v in draw.items()},
                                                  mode="linear", tail="slm")
    assert torch.equal(ids[tail_rows], want_ids)
