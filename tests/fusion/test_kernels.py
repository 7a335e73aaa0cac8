"""Triton kernels (logitfuse.kernels) against the torch reference (logitfuse.reference).

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1, so every kernel runs in Triton's CPU
interpreter on CPU tensors; sizes stay small because the interpreter is slow. The same comparisons at
full size (V = 152064, B = 64) and the int32-overflow checks are in tests/fusion/test_kernels_gpu.py.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import logitfuse
from logitfuse import functional, reference
from logitfuse.types import TopK

pytest.importorskip("triton", reason="needs Triton: pip install triton (Linux)")
import logitfuse.kernels as kernels  # noqa: E402

OPS = kernels.OPS
# the interpreter evaluates both sides of tl.where in numpy: inf - inf in an unselected lane warns
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: (atol, rtol) on log-probabilities. Kernel and reference read the same low-precision inputs and
#: both compute in float32, so the tolerances differ only by accumulation order, not input rounding.
TOL = {"fp32": (2e-4, 1e-4), "bf16": (5e-4, 2e-4), "fp16": (5e-4, 2e-4)}


# ------------------------------------------------------------------------------------ inputs
def make_case(batch, v_slm, v_llm, *, llm_kind="dense", map_kind="identity", dtype="fp32", k=5,
              seed=0, scale=2.0, temperatures=True):
    """Random fusion inputs on DEVICE, as ``logitfuse.functional`` would pass them to the ops."""
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    slm = (torch.randn(batch, v_slm, generator=g) * scale).to(dt)
    if map_kind == "identity":
        vmap = logitfuse.VocabMap.identity(v_slm, v_llm).slm_to_llm
    else:  # a random partial one-to-one map: ~30% unmapped (and ids the LLM lacks)
        vmap = torch.randperm(max(v_slm, v_llm), generator=g)[:v_slm]
        vmap[(torch.rand(v_slm, generator=g) < 0.3) | (vmap >= v_llm)] = -1
    llm_logits = torch.randn(batch, v_llm, generator=g) * scale
    if llm_kind == "dense":
        llm = llm_logits.to(dt)
        t_llm = torch.rand(batch, generator=g) + 0.5 if temperatures else torch.ones(batch)
    else:
        top = llm_logits.log_softmax(-1).topk(min(k, v_llm), dim=-1)
        llm = TopK(top.indices, top.values.to(dt))
        t_llm = torch.ones(batch)
    alpha = torch.rand(batch, generator=g)
    if batch >= 3:
        alpha[0], alpha[1] = 0.0, 1.0  # the ends: one side does not take part
    t_slm = torch.rand(batch, generator=g) + 0.5 if temperatures else torch.ones(batch)

    def on(x):
        return x.to(DEVICE)

    llm = TopK(on(llm.ids), on(llm.logprobs)) if isinstance(llm, TopK) else on(llm)
    return dict(slm_logits=on(slm), llm=llm, slm_to_llm=on(vmap), alpha=on(alpha), v_llm=v_llm,
                slm_temperature=on(t_slm), llm_temperature=on(t_llm))


def assert_logprobs_close(got, want, dtype="fp32"):
    atol, rtol = TOL[dtype]
    assert got.dtype == torch.float32 and got.shape == want.shape
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)), "kernel and reference disagree on which entries are -inf"
    torch.testing.assert_close(got[finite], want[finite], atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------ dispatch
def test_signatures_match_the_reference():
    pairs = [
        (OPS.fuse, reference.fuse_reference),
        (OPS.fuse_sample, reference.fuse_sample_reference),
        (OPS.fused_cross_entropy, reference.fused_cross_entropy_reference),
        (OPS.row_stats, reference.row_stats_reference),
        (OPS.fusion_feature_stats, reference.fusion_feature_stats_reference),
    ]
    for op, ref in pairs:
        got = [(p.name, p.kind) for p in inspect.signature(op).parameters.values()]
        want = [(p.name, p.kind) for p in inspect.signature(ref).parameters.values()]
        assert got == want, op.__name__


def test_import_needs_no_triton_and_queries_no_device():
    code = textwrap.dedent("""
        import sys
        import logitfuse, logitfuse.kernels as k
        assert "triton" not in sys.modules, "importing logitfuse.kernels imported triton"
        assert k.available() in (True, False)
        assert "triton" not in sys.modules, "available() imported triton"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_cpu_tensors_dispatch_to_the_reference():
    assert functional.ops_for({"slm_logits": torch.zeros(2, 3)}) is functional.REFERENCE_OPS
    assert kernels.available()


def test_ops_on_cpu_under_the_interpreter_match_the_public_functions():
    if DEVICE != "cpu":
        pytest.skip("compares the interpreter on CPU tensors")
    case = make_case(3, 40, 50, map_kind="partial", temperatures=False)
    slm, llm, alpha = case["slm_logits"], case["llm"], case["alpha"]
    vmap = logitfuse.VocabMap(case["slm_to_llm"], 50)
    for mode in logitfuse.MODES:
        want = logitfuse.fuse(slm, llm, alpha=alpha, vocab_map=vmap, mode=mode, tail="uniform")
        got = OPS.fuse(**case, mode=mode, tail="uniform")
        assert_logprobs_close(got, want)
    targets = torch.tensor([0, 5, 39])
    want = logitfuse.fused_cross_entropy(slm, llm, targets, alpha=alpha, vocab_map=vmap)
    got = OPS.fused_cross_entropy(**case, targets=targets, mode="linear", tail="slm", ignore_index=-100)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    stats_want, stats_got = logitfuse.row_stats(slm, k=3), OPS.row_stats(slm, 3)
    for got_field, want_field in zip(stats_got, stats_want):
        torch.testing.assert_close(got_field, want_field, atol=2e-4, rtol=1e-4)


def test_kernels_refuse_cpu_tensors_without_the_interpreter(monkeypatch):
    if DEVICE != "cpu":
        pytest.skip("CPU tensors only")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = make_case(1, 8, 8)
    with pytest.raises(ValueError, match="CUDA"):
        OPS.fuse(**case, mode="linear", tail="slm")


def test_kernels_refuse_inputs_on_two_devices():
    if DEVICE != "cpu":
        pytest.skip("needs a meta tensor beside a CPU one")
    case = make_case(1, 8, 8)
    case["alpha"] = torch.zeros(1, device="meta")
    with pytest.raises(ValueError, match="alpha is on meta"):
        OPS.fuse(**case, mode="linear", tail="slm")


# ------------------------------------------------------------------------------------ fuse
# every axis value appears; not every combination (the interpreter is slow)
FUSE_CASES = [
    # batch, v_slm, v_llm, llm_kind, map_kind, mode, tail, dtype
    (1, 1, 1, "dense", "identity", "linear", "slm", "fp32"),
    (3, 7, 7, "dense", "identity", "geometric", "uniform", "fp32"),
    (3, 7, 9, "topk", "partial", "logit", "zero", "fp32"),
    (17, 1000, 1000, "dense", "partial", "linear", "uniform", "bf16"),
    (3, 1000, 1100, "topk", "identity", "geometric", "slm", "fp16"),
    (3, 4099, 4099, "dense", "identity", "logit", "slm", "fp32"),
    (3, 4099, 3001, "dense", "partial", "geometric", "zero", "fp16"),
    (17, 4099, 4099, "topk", "partial", "linear", "zero", "bf16"),
    (3, 1000, 900, "dense", "identity", "linear", "zero", "fp32"),  # padded SLM vocab: unknown ids
    (3, 1000, 1000, "topk", "partial", "geometric", "uniform", "fp32"),
    (17, 7, 7, "topk", "identity", "linear", "slm", "fp16"),
    (1, 1000, 1000, "topk", "partial", "logit", "uniform", "bf16"),
]


@pytest.mark.parametrize("batch,v_slm,v_llm,llm_kind,map_kind,mode,tail,dtype", FUSE_CASES)
def test_fuse_matches_reference(batch, v_slm, v_llm, llm_kind, map_kind, mode, tail, dtype):
    case = make_case(batch, v_slm, v_llm, llm_kind=llm_kind, map_kind=map_kind, dtype=dtype,
                     temperatures=llm_kind == "dense")
    want = reference.fuse_reference(**case, mode=mode, tail=tail)
    got = OPS.fuse(**case, mode=mode, tail=tail)
    assert_logprobs_close(got, want, dtype)
    assert torch.allclose(got.logsumexp(-1), torch.zeros(batch, device=got.device), atol=1e-4)


@pytest.mark.parametrize("mode", ["linear", "geometric", "logit"])
@pytest.mark.parametrize("tail", ["slm", "uniform", "zero"])
def test_fuse_every_mode_and_tail_with_masked_logits(mode, tail):
    # -inf logits on both sides (masked tokens), K = 1, and the ends α = 0 and α = 1
    case = make_case(4, 37, 41, llm_kind="topk", map_kind="partial", k=1, seed=3)
    case["slm_logits"][:, :5] = -math.inf
    want = reference.fuse_reference(**case, mode=mode, tail=tail)
    assert_logprobs_close(OPS.fuse(**case, mode=mode, tail=tail), want)
    dense = make_case(4, 37, 41, map_kind="partial", seed=4)
    dense["slm_logits"][:, 3:9] = -math.inf
    dense["llm"][:, :10] = -math.inf
    want = reference.fuse_reference(**dense, mode=mode, tail=tail)
    assert_logprobs_close(OPS.fuse(**dense, mode=mode, tail=tail), want)


@pytest.mark.parametrize("llm_kind", ["dense", "topk"])
@pytest.mark.parametrize("tail", ["slm", "uniform", "zero"])
def test_linear_mode_is_exact_at_the_ends_with_sides_hundreds_of_nats_apart(llm_kind, tail):
    # scale 80: tokens lie hundreds of nats apart, far beyond float32's e^-104; at α = 1 (rows 1, 3)
    # the fused row is the SLM's log-softmax exactly, at α = 0 (rows 0, 2) the LLM side's. (Dense
    # input takes the identity map: with unknown SLM tokens, the tail mass r = 1 - Σ known p_L cancels
    # catastrophically at this scale, in both implementations alike, in different summation orders.)
    map_kind = "identity" if llm_kind == "dense" else "partial"
    case = make_case(4, 60, 64, llm_kind=llm_kind, map_kind=map_kind, seed=11, scale=80.0, k=8)
    case["alpha"] = torch.tensor([0.0, 1.0, 0.0, 1.0], device=DEVICE)
    want = reference.fuse_reference(**case, mode="linear", tail=tail)
    lp_slm = reference.slm_logprobs(case["slm_logits"], case["slm_temperature"])
    torch.testing.assert_close(want[1::2], lp_slm[1::2], atol=1e-4, rtol=1e-5)
    assert_logprobs_close(OPS.fuse(**case, mode="linear", tail=tail), want)
    targets = torch.arange(4, device=DEVICE) * 7
    (loss_want, loss_got), (grad_want, grad_got) = _ce_both(case, targets, "linear", tail)
    assert torch.isfinite(loss_want).all() and not torch.isnan(grad_want).any()
    torch.testing.assert_close(loss_got, loss_want, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(grad_got, grad_want, atol=1e-3, rtol=1e-3)


def test_fuse_topk_with_k_equal_to_v_equals_dense():
    case = make_case(3, 50, 50, temperatures=False)
    logprobs = case["llm"].log_softmax(-1)
    ids = torch.arange(50, device=DEVICE).expand(3, 50).contiguous()
    topk = dict(case, llm=TopK(ids, logprobs))
    for mode in ("linear", "geometric"):
        assert_logprobs_close(OPS.fuse(**topk, mode=mode, tail="uniform"), OPS.fuse(**case, mode=mode, tail="uniform"))


def test_only_the_dispatcher_chooses_the_reference_for_an_alpha_needing_a_gradient():
    """The kernel op never falls back (its result has no graph); ``ops_for`` routes α-gradients to the reference."""
    case = make_case(3, 30, 30)
    alpha = case["alpha"].clone().requires_grad_(True)
    out = OPS.fuse(**dict(case, alpha=alpha), mode="geometric", tail="slm")
    assert out.grad_fn is None
    assert functional.ops_for(case, alpha_grad=True) is functional.REFERENCE_OPS
    fused = functional.ops_for(case, alpha_grad=True).fuse(**dict(case, alpha=alpha), mode="geometric", tail="slm")
    fused[:, 0].sum().backward()
    assert alpha.grad is not None and torch.isfinite(alpha.grad).all()
    assert_logprobs_close(out, fused.detach())


def test_fuse_accepts_non_contiguous_inputs():
    case = make_case(3, 64, 64)
    wide = torch.randn(3, 128, device=DEVICE)
    case["slm_logits"] = wide[:, ::2]
    case["alpha"] = torch.tensor(0.3, device=DEVICE).expand(3)
    want = reference.fuse_reference(**case, mode="linear", tail="slm")
    assert_logprobs_close(OPS.fuse(**case, mode="linear", tail="slm"), want)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 4),
    v_slm=st.integers(1, 300),
    v_llm=st.integers(1, 300),
    alpha=st.floats(0.0, 1.0),
    llm_kind=st.sampled_from(["dense", "topk"]),
    map_kind=st.sampled_from(["identity", "partial"]),
    mode=st.sampled_from(["linear", "geometric", "logit"]),
    tail=st.sampled_from(["slm", "uniform", "zero"]),
    seed=st.integers(0, 2**16),
)
def test_fuse_property_shapes_and_alpha(batch, v_slm, v_llm, alpha, llm_kind, map_kind, mode, tail, seed):
    case = make_case(batch, v_slm, v_llm, llm_kind=llm_kind, map_kind=map_kind, seed=seed,
                     temperatures=llm_kind == "dense")
    case["alpha"] = torch.full((batch,), alpha, device=DEVICE)
    want = reference.fuse_reference(**case, mode=mode, tail=tail)
    got = OPS.fuse(**case, mode=mode, tail=tail)
    assert_logprobs_close(got, want)


# ------------------------------------------------------------------------------------ row stats
@pytest.mark.parametrize("batch,vocab,k,dtype", [(1, 1, 1, "fp32"), (3, 7, 20, "bf16"), (17, 1000, 4, "fp16"),
                                                 (3, 4099, 8, "fp32")])
def test_row_stats_matches_reference(batch, vocab, k, dtype):
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(batch, vocab, generator=g) * 4).to(DTYPES[dtype]).to(DEVICE)
    if vocab > 3:
        logits[0, : vocab // 3] = -math.inf
    want, got = reference.row_stats_reference(logits, k), OPS.row_stats(logits, k)
    atol, rtol = TOL[dtype]
    for name, got_field, want_field in zip(want._fields, got, want):
        if name == "topk_ids":  # ids equal where the value is unique in its row (ties may come in any order)
            values = logits.float().gather(1, want_field)
            unique = (logits.float()[:, None, :] == values[:, :, None]).sum(-1) == 1
            assert unique.any() and torch.equal(got_field[unique], want_field[unique])
            picked = logits.float().gather(1, got_field) - want.lse[:, None]
            torch.testing.assert_close(picked, want.topk_logprobs, atol=atol, rtol=rtol)
        else:
            torch.testing.assert_close(got_field, want_field, atol=atol, rtol=rtol, msg=name)


def test_row_stats_ties_put_the_first_index_first_across_blocks():
    """Kernel and reference agree on the argmax among ties (a head's argmax features depend on it)."""
    logits = torch.zeros(2, 5000, device=DEVICE)
    logits[0, [4100, 17, 2500]] = 3.0  # three blocks of 2048 on a GPU (one block in the interpreter)
    for stats in (reference.row_stats_reference(logits, 3), OPS.row_stats(logits, 3)):
        assert stats.topk_ids[:, 0].tolist() == [17, 0]


# ------------------------------------------------------------------------------------ head features
@pytest.mark.parametrize("llm_kind,map_kind,tail,k", [
    ("dense", "identity", "slm", 4), ("dense", "partial", "uniform", 3), ("dense", "partial", "zero", 1),
    ("topk", "identity", "zero", 4), ("topk", "partial", "slm", 2), ("topk", "partial", "uniform", 8),
])
def test_fusion_feature_stats_match_the_reference(llm_kind, map_kind, tail, k):
    """The head's statistics without the (B, V) pulled-back LLM tensor give the reference's features."""
    case = make_case(3, 37, 45, llm_kind=llm_kind, map_kind=map_kind, temperatures=False, seed=k)
    args = {name: case[name] for name in ("slm_logits", "llm", "slm_to_llm", "v_llm")}
    want = reference.fusion_feature_stats_reference(**args, tail=tail, k=k)
    got = OPS.fusion_feature_stats(**args, tail=tail, k=k)
    torch.testing.assert_close(reference.features_from_stats(got, k), reference.features_from_stats(want, k),
                               atol=2e-4, rtol=1e-4)
    assert torch.equal(got.slm.topk_ids[:, 0], want.slm.topk_ids[:, 0])
    assert torch.equal(got.llm.topk_ids[:, 0], want.llm.topk_ids[:, 0])


# ------------------------------------------------------------------------------------ sampling
def sample_args(batch, *, temperature, top_k, top_p, seed=0):
    g = torch.Generator().manual_seed(seed)

    def row(values, dtype=torch.float32):
        values = list(values) * (batch // len(values) + 1)
        return torch.tensor(values[:batch], dtype=dtype, device=DEVICE)

    return dict(uniform=torch.rand(batch, generator=g).to(DEVICE), temperature=row(temperature),
                top_k=row(top_k, torch.int64), top_p=row(top_p))


SAMPLE_CASES = [
    # batch, v_slm, v_llm, llm_kind, map_kind, mode, tail, dtype
    (6, 300, 320, "dense", "identity", "linear", "slm", "fp32"),
    (6, 300, 280, "topk", "partial", "geometric", "uniform", "bf16"),
    (6, 1000, 1000, "dense", "partial", "logit", "zero", "fp16"),
    (3, 7, 7, "topk", "identity", "linear", "zero", "fp32"),
    (1, 1, 1, "dense", "identity", "geometric", "slm", "fp32"),
    (17, 4099, 4099, "dense", "identity", "linear", "uniform", "fp32"),
]


@pytest.mark.parametrize("batch,v_slm,v_llm,llm_kind,map_kind,mode,tail,dtype", SAMPLE_CASES)
def test_fuse_sample_matches_reference(batch, v_slm, v_llm, llm_kind, map_kind, mode, tail, dtype):
    # well-separated random logits: no near-ties at a top-k/top-p boundary or at the drawn CDF point
    case = make_case(batch, v_slm, v_llm, llm_kind=llm_kind, map_kind=map_kind, dtype=dtype,
                     temperatures=llm_kind == "dense", seed=batch + v_slm)
    draw = sample_args(batch, temperature=[1.0, 0.0, 0.7, 1.3, 1.0, 0.5], top_k=[0, 0, 5, 0, 50, 1],
                       top_p=[1.0, 1.0, 0.9, 0.5, 0.8, 1.0], seed=v_slm)
    ids_want, lp_want = reference.fuse_sample_reference(**case, **draw, mode=mode, tail=tail)
    ids_got, lp_got = OPS.fuse_sample(**case, **draw, mode=mode, tail=tail)
    assert ids_got.dtype == torch.int64 and lp_got.dtype == torch.float32
    assert torch.equal(ids_got, ids_want)
    torch.testing.assert_close(lp_got, lp_want, atol=2e-4, rtol=1e-4)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3),
    vocab=st.integers(1, 64),
    temperature=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    top_k=st.integers(0, 70),
    top_p=st.floats(0.05, 1.0),
    llm_kind=st.sampled_from(["dense", "topk"]),
    mode=st.sampled_from(["linear", "geometric", "logit"]),
    tail=st.sampled_from(["slm", "uniform", "zero"]),
    seed=st.integers(0, 2**16),
)
def test_fuse_sample_property(batch, vocab, temperature, top_k, top_p, llm_kind, mode, tail, seed):
    case = make_case(batch, vocab, vocab + 5, llm_kind=llm_kind, map_kind="partial", seed=seed,
                     temperatures=llm_kind == "dense")
    draw = sample_args(batch, temperature=[temperature], top_k=[top_k], top_p=[top_p], seed=seed)
    ids_want, lp_want = reference.fuse_sample_reference(**case, **draw, mode=mode, tail=tail)
    ids_got, lp_got = OPS.fuse_sample(**case, **draw, mode=mode, tail=tail)
    assert torch.equal(ids_got, ids_want)
    torch.testing.assert_close(lp_got, lp_want, atol=2e-4, rtol=1e-4)


def test_fuse_sample_same_uniform_same_ids_and_generator_reproducible():
    case = make_case(5, 200, 200, map_kind="partial", seed=11)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        uniform = torch.rand(5, generator=g).to(DEVICE)
        args = sample_args(5, temperature=[1.0], top_k=[0], top_p=[0.95])
        return OPS.fuse_sample(**case, **dict(args, uniform=uniform), mode="linear", tail="slm")[0]

    assert torch.equal(draw(123), draw(123))
    assert not all(torch.equal(draw(123), draw(s)) for s in (1, 2, 3))


def test_fuse_sample_ties_at_the_top_p_threshold_are_all_kept():
    # four equal logits; top_p = 0.5 reaches its mass after two of them, ties keep all four
    slm = torch.tensor([[0.0, 0.0, 0.0, 0.0, -30.0, -30.0]], device=DEVICE)
    case = dict(slm_logits=slm, llm=slm.clone(), slm_to_llm=torch.arange(6, device=DEVICE),
                alpha=torch.ones(1, device=DEVICE), v_llm=6, slm_temperature=torch.ones(1, device=DEVICE),
                llm_temperature=torch.ones(1, device=DEVICE))
    for u in (0.01, 0.3, 0.6, 0.99):
        draw = dict(uniform=torch.tensor([u], device=DEVICE), temperature=torch.ones(1, device=DEVICE),
                    top_k=torch.tensor([2], device=DEVICE), top_p=torch.tensor([0.5], device=DEVICE))
        want = reference.fuse_sample_reference(**case, **draw, mode="linear", tail="slm")[0]
        got = OPS.fuse_sample(**case, **draw, mode="linear", tail="slm")[0]
        assert int(got) == int(want) == min(int(u * 4), 3)


def test_fuse_sample_frequencies_follow_the_filtered_distribution():
    # One distribution on many rows, drawn with stratified uniforms u_i = (i + u_0) / N: inverse-CDF
    # sampling then puts within 1 of N·p_j draws on each token j (a sharp frequency test that needs
    # only N rows, which the interpreter can afford); tokens removed by top-k / top-p have
    # probability 0 and are never drawn.
    rows, vocab = 40, 12
    base = make_case(1, vocab, vocab, map_kind="partial", seed=5, scale=1.5)
    case = {k: (v.expand(rows, *v.shape[1:]).contiguous() if isinstance(v, torch.Tensor) and k != "slm_to_llm" else v)
            for k, v in base.items()}
    case["alpha"] = torch.full((rows,), 0.4, device=DEVICE)
    u0 = torch.rand(1, generator=torch.Generator().manual_seed(7))
    draw = dict(uniform=((torch.arange(rows) + u0) / rows).to(DEVICE),
                temperature=torch.full((rows,), 0.8, device=DEVICE),
                top_k=torch.full((rows,), 6, dtype=torch.int64, device=DEVICE),
                top_p=torch.full((rows,), 0.85, device=DEVICE))
    ids, _ = OPS.fuse_sample(**case, **draw, mode="geometric", tail="slm")
    first = {k: (v[:1] if isinstance(v, torch.Tensor) and k != "slm_to_llm" else v) for k, v in case.items()}
    probs = torch.softmax(reference.fuse_reference(**first, mode="geometric", tail="slm") / 0.8, dim=-1)
    keep = reference.sampling_mask(probs, draw["top_k"][:1], draw["top_p"][:1])[0].cpu()
    expected = torch.where(keep, probs[0].cpu(), 0.0)
    expected = expected / expected.sum()
    counts = torch.bincount(ids.cpu(), minlength=vocab).float()
    assert 2 < int(keep.sum()) < 6, "the filters should remove some tokens and keep several"
    assert counts[~keep].sum() == 0, f"a token of probability 0 was drawn: {counts}"
    assert ((counts - rows * expected).abs() <= 1.0 + 1e-4).all(), (counts, rows * expected)


# ------------------------------------------------------------------------------------ cross-entropy
CE_CASES = [
    # batch, v_slm, v_llm, llm_kind, map_kind, mode, tail, dtype
    (3, 7, 7, "dense", "identity", "linear", "slm", "fp32"),
    (17, 1000, 1000, "dense", "partial", "geometric", "uniform", "bf16"),
    (3, 1000, 1100, "topk", "partial", "logit", "zero", "fp16"),
    (3, 4099, 4099, "topk", "identity", "linear", "uniform", "fp32"),
    (1, 1, 1, "dense", "identity", "logit", "slm", "fp32"),
    (17, 300, 280, "topk", "partial", "geometric", "slm", "fp32"),
    (3, 300, 300, "dense", "partial", "logit", "uniform", "fp32"),
    (3, 300, 300, "topk", "partial", "geometric", "zero", "fp32"),
]


def _ce_both(case, targets, mode, tail):
    losses, grads = [], []
    for fn in (reference.fused_cross_entropy_reference, OPS.fused_cross_entropy):
        alpha = case["alpha"].clone().requires_grad_(True)
        loss = fn(**dict(case, alpha=alpha), targets=targets, mode=mode, tail=tail, ignore_index=-100)
        weights = torch.linspace(0.5, 1.5, loss.shape[0], device=loss.device)  # a non-trivial grad_output
        (loss * weights).sum().backward()
        losses.append(loss.detach())
        grads.append(alpha.grad)
    return losses, grads


@pytest.mark.parametrize("batch,v_slm,v_llm,llm_kind,map_kind,mode,tail,dtype", CE_CASES)
def test_fused_cross_entropy_loss_and_alpha_grad_match_autograd(batch, v_slm, v_llm, llm_kind, map_kind,
                                                                mode, tail, dtype):
    case = make_case(batch, v_slm, v_llm, llm_kind=llm_kind, map_kind=map_kind, dtype=dtype,
                     temperatures=llm_kind == "dense", seed=v_slm)
    g = torch.Generator().manual_seed(batch)
    targets = torch.randint(0, v_slm, (batch,), generator=g)
    if batch > 2:
        targets[2] = -100
    (loss_want, loss_got), (grad_want, grad_got) = _ce_both(case, targets.to(DEVICE), mode, tail)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(loss_got, loss_want, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_got, grad_want, atol=10 * atol, rtol=10 * rtol)
    if batch > 2:
        assert loss_got[2] == 0 and grad_got[2] == 0


@pytest.mark.parametrize("mode", ["linear", "geometric", "logit"])
def test_fused_cross_entropy_with_masked_logits_at_the_ends(mode):
    # -inf logits on either side with α = 0 and α = 1 exactly: the reference's NaN-free gradients
    case = make_case(4, 40, 40, map_kind="partial", seed=9)
    case["slm_logits"][:, :6] = -math.inf
    case["llm"][:, 30:] = -math.inf
    case["alpha"] = torch.tensor([0.0, 1.0, 0.5, 0.0], device=DEVICE)
    targets = torch.tensor([1, 10, 12, 20], device=DEVICE)
    for tail in ("slm", "uniform"):
        (loss_want, loss_got), (grad_want, grad_got) = _ce_both(case, targets, mode, tail)
        assert torch.isfinite(grad_want).all()
        torch.testing.assert_close(loss_got, loss_want, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(grad_got, grad_want, atol=1e-3, rtol=1e-3)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    alpha=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
    vocab=st.integers(2, 200),
    llm_kind=st.sampled_from(["dense", "topk"]),
    mode=st.sampled_from(["linear", "geometric", "logit"]),
    tail=st.sampled_from(["slm", "uniform", "zero"]),
    seed=st.integers(0, 2**16),
)
def test_fused_cross_entropy_property_alpha(alpha, vocab, llm_kind, mode, tail, seed):
    batch = len(alpha)
    case = make_case(batch, vocab, vocab + 3, llm_kind=llm_kind, map_kind="partial", seed=seed,
                     temperatures=llm_kind == "dense")
    case["alpha"] = torch.tensor(alpha, device=DEVICE)
    targets = torch.randint(0, vocab, (batch,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    (loss_want, loss_got), (grad_want, grad_got) = _ce_both(case, targets, mode, tail)
    torch.testing.assert_close(loss_got, loss_want, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(grad_got, grad_want, atol=2e-3, rtol=1e-3)


def test_fused_cross_entropy_stores_no_vocab_sized_tensor():
    # the autograd graph keeps one float per row (∂loss/∂α), nothing of size N·V
    case = make_case(5, 500, 500, seed=2)
    alpha = case["alpha"].clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = OPS.fused_cross_entropy(**dict(case, alpha=alpha), targets=torch.zeros(5, dtype=torch.int64, device=DEVICE),
                                       mode="linear", tail="slm", ignore_index=-100)
    loss.sum().backward()
    assert alpha.grad is not None and saved and max(saved) <= 5


# ------------------------------------------------------------------------------------ GPU compile
COMPILE_SCRIPT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from logitfuse.kernels import cross_entropy, mix, row_stats, sample

def types(fn, dtype):
    out = {}
    for name in fn.arg_names:
        out[name] = "*fp32" if name.endswith("_ptr") else "i32"
    out.update(slm_ptr=f"*{dtype}", llm_ptr=f"*{dtype}", lps_ptr=f"*{dtype}", x_ptr=f"*{dtype}", map_ptr="*i64",
               ids_ptr="*i64", ids_out_ptr="*i64", top_k_ptr="*i64", targets_ptr="*i64", cand_id_ptr="*i64",
               top_p_tol="fp32", slm_stride="i64", llm_stride="i64")
    return {k: v for k, v in out.items() if k in fn.arg_names}

def build(fn, dtype, **constexprs):
    signature = types(fn, dtype)
    signature.update({name: "constexpr" for name in constexprs})
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})

build(mix.fuse_kernel, "bf16", BLOCK_S=2048, BLOCK_L=4096, HAS_TOPK=False, MODE=1, TAIL=0)
build(sample.fuse_sample_kernel, "fp16", BLOCK_S=2048, BLOCK_L=4096, HAS_TOPK=True, MODE=0, TAIL=1)
build(cross_entropy.fused_ce_kernel, "fp32", BLOCK_S=2048, BLOCK_L=4096, HAS_TOPK=False, MODE=2, TAIL=2)
build(row_stats.row_stats_kernel, "bf16", BLOCK=4096)
print("compiled")
"""


def test_kernels_compile_for_a_real_gpu_target(tmp_path):
    """The interpreter accepts code the GPU compiler rejects (globals, loop-carried types): compile
    each kernel ahead of time for sm_90 (H100/H200) down to a cubin. Needs no GPU, only Triton's
    bundled ptxas; skipped where Triton has no CUDA backend."""
    pytest.importorskip("triton.backends.nvidia", reason="needs Triton's CUDA backend: pip install triton (Linux)")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("needs Triton's bundled ptxas: pip install triton (Linux x86-64)")
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-4000:]


def test_kernels_refuse_aggregating_maps_and_fuse_routes_them_to_the_reference():
    from logitfuse import VocabMap

    vmap = VocabMap(torch.tensor([0, 1, 2]), 4, llm_to_slm=torch.tensor([0, 1, 2, 2]))
    args = functional.prepare_arguments(torch.randn(2, 3), torch.randn(2, 4), vmap, 0.5, "linear", "slm", 1.0, 1.0, True)
    assert functional.ops_for(args) is functional.REFERENCE_OPS
    with pytest.raises(ValueError, match="one-to-one vocabulary maps"):
        kernels.OPS.fuse(**args)
