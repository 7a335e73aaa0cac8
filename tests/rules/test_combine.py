"""The N-input combine op (logitfuse.rules.combine): the reference against a direct float64 formula,
the argument checks, the dispatcher, and the Triton kernel (logitfuse.kernels.combine) against the
reference. Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1, so the kernel runs in Triton's CPU
interpreter on CPU tensors (small vocabularies: the interpreter is slow); the full-size comparison is
marked gpu.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logitfuse.rules.combine import MAX_KERNEL_INPUTS, RULES, combine, combine_reference, implementation_for

NEG = -math.inf
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter evaluates both sides of tl.where in numpy: inf - inf in an unselected lane warns
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ------------------------------------------------------------------------------------ inputs and oracle
def make_inputs(n_inputs, batch, vocab, *, rule, seed=0, masked=0.1, device="cpu"):
    """Random ``(logprobs, coef)``: normalized log-probabilities with ~``masked`` of the tokens -inf
    in each input (never input 0's argmax, so every row keeps a possible token under any cut), and
    coefficients valid for ``rule`` (mixture: positive, rows summing to 1; sum: any sign)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_inputs, batch, vocab, generator=g) * 3
    mask = torch.rand(n_inputs, batch, vocab, generator=g) < masked
    mask.scatter_(2, logits[0].argmax(-1)[None, :, None].expand(n_inputs, batch, 1), False)
    logprobs = logits.masked_fill(mask, NEG).log_softmax(-1)
    if rule == "mixture":
        coef = torch.rand(batch, n_inputs, generator=g) + 0.05
        coef = coef / coef.sum(1, keepdim=True)
    else:
        coef = torch.randn(batch, n_inputs, generator=g)
    return logprobs.to(device), coef.to(device)


def direct(logprobs, coef, rule, plausibility=None):
    """The contract, written token by token in float64 and in probability space where it can be."""
    lp, c = logprobs.double().cpu(), coef.double().cpu()
    n_inputs, batch, vocab = lp.shape
    out = torch.empty(batch, vocab, dtype=torch.float64)
    for b in range(batch):
        if rule == "mixture":
            value = sum(c[b, i] * lp[i, b].exp() for i in range(n_inputs)).log()  # log 0 = -inf
        else:
            value = torch.zeros(vocab, dtype=torch.float64)
            for i in range(n_inputs):
                if c[b, i] != 0:  # a zero coefficient ignores the input, -inf or not
                    x = lp[i, b]
                    value = torch.where(torch.isneginf(x) | torch.isneginf(value), NEG, value + c[b, i] * x)
        if plausibility is not None:
            p0 = lp[0, b].exp()
            value[p0 < plausibility * p0.max()] = NEG
        top = value.max()
        out[b] = value - top - (value - top).exp().sum().log()
    return out


def assert_close(got, want, atol=2e-4, rtol=1e-5):
    assert got.dtype == torch.float32 and got.shape == want.shape
    got, want = got.cpu(), want.cpu()
    finite = torch.isfinite(want)
    assert not torch.isnan(got).any() and not torch.isposinf(got).any()
    assert torch.equal(finite, torch.isfinite(got)), "the two disagree on which tokens are -inf"
    torch.testing.assert_close(got[finite].double(), want[finite].double(), atol=atol, rtol=rtol)


def normalized(out):
    return torch.allclose(out.double().logsumexp(-1), torch.zeros(out.shape[0], dtype=torch.float64), atol=1e-5)


# ------------------------------------------------------------------------------------ reference
@pytest.mark.parametrize("vocab", [1, 7, 1000, 5003])
@pytest.mark.parametrize("rule", RULES)
def test_reference_matches_the_direct_formula(vocab, rule):
    for n_inputs in (1, 2, 3, 4):
        for batch in (1, 3):
            for plausibility in (None, 0.1):
                logprobs, coef = make_inputs(n_inputs, batch, vocab, rule=rule, seed=vocab + 10 * n_inputs + batch)
                out = combine_reference(logprobs, coef, rule=rule, plausibility=plausibility)
                assert_close(out, direct(logprobs, coef, rule, plausibility))
                assert normalized(out)


def test_reference_on_masked_inputs_negative_and_zero_coefficients():
    # input 1 rules out tokens 0..9, input 2 is -inf on tokens 10..19 but has coefficient 0 in row 0
    logprobs, _ = make_inputs(3, 2, 40, rule="sum", seed=1, masked=0.0)
    logprobs[1, :, :10] = NEG
    logprobs[2, :, 10:20] = NEG
    logprobs = logprobs.log_softmax(-1)
    coef = torch.tensor([[1.0, -0.7, 0.0], [1.0, -0.7, 0.4]])
    out = combine_reference(logprobs, coef, rule="sum")
    assert_close(out, direct(logprobs, coef, "sum"))
    assert torch.isneginf(out[:, :10]).all(), "a -inf input with a negative coefficient must give -inf, not +inf"
    assert torch.isfinite(out[0, 10:]).all(), "an input with coefficient 0 is ignored, -inf or not"
    assert torch.isneginf(out[1, 10:20]).all() and torch.isfinite(out[1, 20:]).all()
    # coefficient 0 ignores the input in a mixture too: the result is the other input
    mixture = combine_reference(logprobs[1:], torch.tensor([[1.0, 0.0], [0.0, 1.0]]), rule="mixture")
    assert_close(mixture, torch.stack([logprobs[1, 0], logprobs[2, 1]]), atol=1e-6)


def test_a_mixture_is_the_mean_of_the_probabilities_and_a_sum_the_normalized_product():
    logprobs, _ = make_inputs(3, 2, 50, rule="sum", seed=2)
    mixture = combine_reference(logprobs, torch.full((2, 3), 1 / 3), rule="mixture")
    torch.testing.assert_close(mixture.exp(), logprobs.exp().mean(0), atol=1e-6, rtol=1e-5)
    product = combine_reference(logprobs, torch.ones(2, 3), rule="sum")
    torch.testing.assert_close(product, logprobs.sum(0).log_softmax(-1), atol=1e-5, rtol=1e-5)


def test_plausibility_cut_and_tau_one_keeps_only_the_argmax_tokens():
    expert = torch.tensor([[0.4, 0.4, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]).log()
    amateur = torch.tensor([[0.1, 0.7, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]).log()
    logprobs = torch.stack([expert, amateur])
    for rule, coef in (("sum", torch.tensor([[1.0, -0.5]] * 2)), ("mixture", torch.tensor([[0.5, 0.5]] * 2))):
        tight = combine_reference(logprobs, coef, rule=rule, plausibility=1.0)
        assert torch.equal(torch.isfinite(tight), torch.tensor([[True, True, False, False], [False, False, False, True]]))
        assert normalized(tight)
        assert_close(tight, direct(logprobs, coef, rule, 1.0))
        # τ = 0.3: expert tokens with p < 0.3 · max p go (row 0: 0.05 < 0.12; row 1: 0.1 < 0.12)
        cut = combine_reference(logprobs, coef, rule=rule, plausibility=0.3)
        assert torch.equal(torch.isfinite(cut), torch.tensor([[True, True, True, False], [False, True, True, True]]))
        assert_close(cut, direct(logprobs, coef, rule, 0.3))
    # contrastive decoding at τ = 1 in row 0: the two tied argmax tokens, weighted by p_e / p_a^0.5
    cd = combine_reference(logprobs, torch.tensor([[1.0, -0.5]] * 2), rule="sum", plausibility=1.0)
    odds = (0.4 / 0.1**0.5) / (0.4 / 0.7**0.5)
    assert math.isclose(float(cd[0, 0] - cd[0, 1]), math.log(odds), rel_tol=1e-5)


@pytest.mark.parametrize("rule", RULES)
def test_a_row_with_no_possible_token_raises(rule):
    # input 0 allows tokens 0-1 only, input 1 tokens 2-3 only. Row 1 of the sum weighs both: every token
    # is ruled out. Row 1 of the mixture weighs input 1 alone, and the cut on input 0 keeps tokens 0-1 only.
    logprobs = torch.full((2, 2, 4), NEG)
    logprobs[0, :, :2] = math.log(0.5)
    logprobs[1, :, 2:] = math.log(0.5)
    coef = torch.tensor([[0.5, 0.5], [0.0, 1.0]]) if rule == "mixture" else torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    plausibility = 0.5 if rule == "mixture" else None
    with pytest.raises(ValueError, match=f"row 1 has no possible token under rule '{rule}'"):
        combine_reference(logprobs, coef, rule=rule, plausibility=plausibility)
    with pytest.raises(ValueError, match="row 1 has no possible token"):
        combine(logprobs, coef, rule=rule, plausibility=plausibility)


# ------------------------------------------------------------------------------------ argument checks
def _good():
    return make_inputs(2, 3, 7, rule="mixture", seed=3)


BAD_ARGUMENTS = [
    # (what, function of (logprobs, coef) -> kwargs, error type, message pattern)
    ("rule", lambda lp, c: dict(rule="max"), ValueError, r"rule must be one of \('mixture', 'sum'\), got 'max'"),
    ("not a tensor", lambda lp, c: dict(logprobs=lp.tolist()), TypeError, "logprobs must be a torch.Tensor"),
    ("2-d logprobs", lambda lp, c: dict(logprobs=lp[0]), ValueError,
     r"logprobs must have shape \(n_inputs, batch_size, vocab_size\), got \(3, 7\); stack the inputs"),
    ("float64 logprobs", lambda lp, c: dict(logprobs=lp.double()), ValueError,
     r"logprobs must be float32, got torch.float64; pass logprobs.float\(\)"),
    ("bf16 coef", lambda lp, c: dict(coef=c.bfloat16()), ValueError, r"coef must be float32, got torch.bfloat16"),
    ("no inputs", lambda lp, c: dict(logprobs=lp[:0], coef=c[:, :0]), ValueError, "logprobs has no inputs"),
    ("empty vocabulary", lambda lp, c: dict(logprobs=lp[:, :, :0]), ValueError, "empty vocabulary dimension"),
    ("coef shape", lambda lp, c: dict(coef=c.t().contiguous()), ValueError,
     r"coef must have shape \(batch_size, n_inputs\) = \(3, 2\) for logprobs of shape \(2, 3, 7\), got \(2, 3\)"),
    ("coef 1-d", lambda lp, c: dict(coef=c[0]), ValueError, r"coef must have shape \(batch_size, n_inputs\), got \(2,\)"),
    ("coef device", lambda lp, c: dict(coef=torch.empty(3, 2, device="meta")), ValueError,
     "coef is on meta but logprobs is on cpu"),
    ("coef NaN", lambda lp, c: dict(coef=c.index_fill(1, torch.tensor([0]), math.nan)), ValueError, "coef must be finite"),
    ("coef inf", lambda lp, c: dict(rule="sum", coef=c.index_fill(1, torch.tensor([1]), -math.inf)), ValueError,
     "coef must be finite"),
    ("mixture negative", lambda lp, c: dict(coef=torch.tensor([[1.5, -0.5]] * 3)), ValueError,
     "coef of rule 'mixture' must be >= 0.*use rule='sum'"),
    ("mixture sum", lambda lp, c: dict(coef=c * 1.01), ValueError,
     r"must sum to 1 in each row \(within 0.0001\); row 0 sums to 1.01: divide by coef.sum\(1, keepdim=True\)"),
    ("tau 0", lambda lp, c: dict(plausibility=0.0), ValueError, r"plausibility must lie in \(0, 1\].*got 0.0"),
    ("tau above 1", lambda lp, c: dict(plausibility=1.5), ValueError, r"plausibility must lie in \(0, 1\]"),
    ("tau NaN", lambda lp, c: dict(plausibility=math.nan), ValueError, r"plausibility must lie in \(0, 1\]"),
    ("tau str", lambda lp, c: dict(plausibility="0.1"), TypeError, "plausibility must be a float in"),
    ("tau bool", lambda lp, c: dict(plausibility=True), TypeError, "plausibility must be a float in"),
    ("NaN logprobs", lambda lp, c: dict(logprobs=lp.index_fill(2, torch.tensor([3]), math.nan)), ValueError,
     "logprobs contains NaN or \\+inf"),
    ("+inf logprobs", lambda lp, c: dict(logprobs=lp.index_fill(2, torch.tensor([3]), math.inf)), ValueError,
     "logprobs contains NaN or \\+inf"),
]


@pytest.mark.parametrize("what,change,error,pattern", BAD_ARGUMENTS, ids=[case[0] for case in BAD_ARGUMENTS])
def test_bad_arguments_raise_errors_naming_the_argument_and_the_fix(what, change, error, pattern):
    logprobs, coef = _good()
    kwargs = dict(logprobs=logprobs, coef=coef, rule="mixture", plausibility=None) | change(logprobs, coef)
    with pytest.raises(error, match=pattern):
        combine(**kwargs)


def test_mixture_coefficients_within_the_tolerance_pass():
    logprobs, coef = _good()
    nudged = coef.clone()
    nudged[:, 0] += 5e-5
    assert normalized(combine(logprobs, nudged, rule="mixture"))


# ------------------------------------------------------------------------------------ dispatcher
def test_the_dispatcher_sends_cpu_tensors_and_more_than_four_inputs_to_the_reference():
    assert implementation_for(torch.device("cpu"), 2) is combine_reference
    assert implementation_for(torch.device("cpu"), 9) is combine_reference
    assert implementation_for(torch.device("cuda"), MAX_KERNEL_INPUTS + 1) is combine_reference
    logprobs, coef = make_inputs(6, 2, 30, rule="sum", seed=4)
    assert torch.equal(combine(logprobs, coef, rule="sum", plausibility=0.2),
                       combine_reference(logprobs, coef, rule="sum", plausibility=0.2))


def test_the_dispatcher_sends_cuda_tensors_with_up_to_four_inputs_to_the_kernel():
    pytest.importorskip("triton", reason="needs Triton: pip install triton (Linux)")
    from logitfuse.kernels import combine as kernel

    for n_inputs in range(1, MAX_KERNEL_INPUTS + 1):
        assert implementation_for(torch.device("cuda"), n_inputs) is kernel.combine


def test_combine_returns_no_autograd_history():
    logprobs, coef = make_inputs(2, 2, 9, rule="sum", seed=5)
    out = combine(logprobs.requires_grad_(True), coef, rule="sum")
    assert out.grad_fn is None and not out.requires_grad


@settings(max_examples=25, deadline=None)
@given(n_inputs=st.integers(1, 6), batch=st.integers(1, 3), vocab=st.integers(1, 60), rule=st.sampled_from(RULES),
       seed=st.integers(0, 2**16), shift=st.floats(-20, 20))
def test_property_permuting_the_inputs_changes_nothing_and_sum_ignores_shifts(n_inputs, batch, vocab, rule, seed, shift):
    logprobs, coef = make_inputs(n_inputs, batch, vocab, rule=rule, seed=seed)
    out = combine(logprobs, coef, rule=rule)
    perm = torch.randperm(n_inputs, generator=torch.Generator().manual_seed(seed))
    assert_close(combine(logprobs[perm], coef[:, perm], rule=rule), out, atol=5e-5)
    assert normalized(out)
    if rule == "sum":  # a per-row constant added to an input's log-probabilities cancels in the log-softmax
        assert_close(combine_reference(logprobs + shift, coef, rule=rule), out, atol=5e-4)


# ------------------------------------------------------------------------------------ Triton kernel
def kernel_module():
    pytest.importorskip("triton", reason="needs Triton: pip install triton (Linux)")
    from logitfuse.kernels import combine as kernel

    return kernel


def test_kernel_signature_matches_the_reference():
    kernel = kernel_module()
    got = [(p.name, p.kind, p.default) for p in inspect.signature(kernel.combine).parameters.values()]
    want = [(p.name, p.kind, p.default) for p in inspect.signature(combine_reference).parameters.values()]
    assert got == want


# every axis value appears, not every combination (the interpreter is slow)
SIZES = [(1, 1), (3, 7), (2, 1000), (3, 333), (1, 5003)]
KERNEL_CASES = [(n, rule, tau, *SIZES[k % len(SIZES)])
                for k, (n, rule, tau) in enumerate((n, rule, tau) for n in (1, 2, 3, 4) for rule in RULES
                                                   for tau in (None, 0.2, 1.0))]


@pytest.mark.parametrize("n_inputs,rule,plausibility,batch,vocab", KERNEL_CASES)
def test_kernel_matches_the_reference(n_inputs, rule, plausibility, batch, vocab):
    kernel = kernel_module()
    logprobs, coef = make_inputs(n_inputs, batch, vocab, rule=rule, seed=n_inputs * 100 + vocab, device=DEVICE)
    if rule == "sum" and n_inputs > 1:
        coef[0, 1] = 0.0  # an ignored input, with its -inf entries
    want = combine_reference(logprobs, coef, rule=rule, plausibility=plausibility)
    assert_close(kernel.combine(logprobs, coef, rule=rule, plausibility=plausibility), want)


@pytest.mark.parametrize("rule", RULES)
def test_kernel_reads_non_contiguous_inputs(rule):
    kernel = kernel_module()
    # (B, N, V) storage seen as (N, B, V): inputs V apart, rows N·V apart
    logprobs, coef = make_inputs(3, 4, 129, rule=rule, seed=6, device=DEVICE)
    rows_first = logprobs.transpose(0, 1).contiguous().transpose(0, 1)
    every_other = torch.stack([logprobs, logprobs.flip(0)], dim=1).flatten(0, 1)[::2]  # stride 2·B·V between inputs
    wide = torch.stack([logprobs, logprobs], dim=-1).flatten(-2)[..., ::2]  # tokens 2 apart: copied
    want = combine_reference(logprobs, coef, rule=rule, plausibility=0.05)
    for view in (rows_first, every_other, wide):
        assert not view.is_contiguous() and torch.equal(view, logprobs)
        assert_close(kernel.combine(view, coef, rule=rule, plausibility=0.05), want)
    assert_close(kernel.combine(logprobs, coef.t().contiguous().t(), rule=rule, plausibility=0.05), want)


def test_kernel_rules_out_tokens_of_negatively_weighted_inputs_and_raises_on_empty_rows():
    kernel = kernel_module()
    logprobs, _ = make_inputs(2, 2, 40, rule="sum", seed=7, masked=0.0)
    logprobs[1, :, :10] = NEG
    logprobs = logprobs.log_softmax(-1)
    coef = torch.tensor([[1.0, -0.7], [1.0, 0.0]], device=DEVICE)
    out = kernel.combine(logprobs, coef, rule="sum")
    assert torch.isneginf(out[0, :10]).all() and torch.isfinite(out[1]).all()
    assert_close(out, combine_reference(logprobs, coef, rule="sum"))
    dead = torch.full((2, 2, 4), NEG, device=DEVICE)
    dead[0, :, :2] = dead[1, :, 2:] = math.log(0.5)
    with pytest.raises(ValueError, match="row 0 has no possible token under rule 'sum'"):
        kernel.combine(dead, torch.ones(2, 2, device=DEVICE), rule="sum")
    with pytest.raises(ValueError, match=r"row 1 has no possible token.*plausibility cut \(tau=1\)"):
        kernel.combine(dead, torch.tensor([[0.5, 0.5], [0.0, 1.0]], device=DEVICE), rule="mixture", plausibility=1.0)


def test_kernel_refuses_more_than_four_inputs_and_cpu_tensors_without_the_interpreter(monkeypatch):
    kernel = kernel_module()
    logprobs, coef = make_inputs(5, 1, 8, rule="sum", device=DEVICE)
    with pytest.raises(ValueError, match="takes 1 to 4 inputs.*runs more on the reference"):
        kernel.combine(logprobs, coef, rule="sum")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="CUDA tensors, got logprobs on cpu"):
            kernel.combine(logprobs[:2], coef[:, :2], rule="sum")


COMPILE_SCRIPT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from logitfuse.kernels.combine import combine_kernel

signature = {name: "*fp32" if name.endswith("_ptr") else "i32" for name in combine_kernel.arg_names}
signature.update(log_tau="fp32", stride_n="i64")
for constexprs in (dict(N=1, RULE=0, HAS_CUT=False), dict(N=3, RULE=1, HAS_CUT=True), dict(N=4, RULE=0, HAS_CUT=True)):
    constexprs["BLOCK"] = 4096
    types = dict(signature, **{name: "constexpr" for name in constexprs})
    triton.compile(ASTSource(fn=combine_kernel, signature=types, constexprs=constexprs),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
print("compiled")
"""


def test_kernel_compiles_for_a_real_gpu_target(tmp_path):
    """The interpreter accepts code the GPU compiler rejects: compile three variants for sm_90 (H100/H200)
    down to a cubin. Needs no GPU, only Triton's bundled ptxas; skipped where Triton has no CUDA backend."""
    pytest.importorskip("triton.backends.nvidia", reason="needs Triton's CUDA backend: pip install triton (Linux)")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("needs Triton's bundled ptxas: pip install triton (Linux x86-64)")
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.parametrize("rule", RULES)
def test_kernel_at_full_size_on_a_gpu(rule):
    """V = 151,936 (the pivot vocabulary), N = 4, B = 16, through the public function; and a row offset
    past 2**31 elements (B·V > 2**31 at N = 1), where an int32 offset would wrap."""
    kernel = kernel_module()
    logprobs, coef = make_inputs(4, 16, 151936, rule=rule, seed=8, device="cuda")
    for plausibility in (None, 0.1):
        want = combine_reference(logprobs, coef, rule=rule, plausibility=plausibility)
        assert_close(combine(logprobs, coef, rule=rule, plausibility=plausibility), want, atol=5e-4)
    row = torch.randn(151936, device="cuda").log_softmax(-1)
    big = torch.empty(1, 14200, 151936, device="cuda")  # 2.16e9 elements (8.6 GB): rows past 2**31
    big.copy_(row.expand_as(big))
    out = kernel.combine(big, torch.ones(14200, 1, device="cuda"), rule=rule)
    torch.testing.assert_close(out[-1], row, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ benchmark rows
def test_the_kernel_benchmark_writes_combine_rows(tmp_path):
    """`logitfuse bench kernels --op combine` at a tiny size: one row per rule variant, N and B, with the
    traffic of N inputs read and one output written (structure only: no timing is asserted)."""
    import json

    from logitfuse.bench.kernels import COMBINE_RULES, make_combine_inputs
    from logitfuse.cli import main

    for rule in RULES:  # the benchmark's inputs are valid arguments of the op
        logprobs, coef = make_combine_inputs(3, 2, 50, rule, torch.device("cpu"))
        assert normalized(combine(logprobs, coef, rule=rule))
    assert main(["bench", "kernels", "--op", "combine", "--quick", "--batch", "1", "2", "--vocab", "50", "--inputs",
                 "2", "5", "--no-compile", "--copy-mib", "1", "--device", "cpu", "--out", str(tmp_path),
                 "--no-plot"]) == 0
    rows = json.loads((tmp_path / "kernels_cpu_quick_combine.json").read_text())["rows"]
    assert {(r["rule"], r["tau"], r["N"], r["B"]) for r in rows} == {
        (rule, tau, n, b) for rule, tau in COMBINE_RULES for n in (2, 5) for b in (1, 2)}
    for row in rows:
        assert row["op"] == "combine" and row["bytes"] == (row["N"] + 1) * row["B"] * 50 * 4 and row["eager_ms"] > 0
