"""Properties of the fusion math (the CPU path of logitfuse.fuse / fuse_sample / fused_cross_entropy).

The reference is checked against the DESIGN.md formulas written out independently in float64 here,
and against the properties any fusion must have (normalization, α = 0 / 1, permutation symmetry).
"""

import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import logitfuse
from logitfuse import TopK, VocabMap

MODES = logitfuse.MODES
TAILS = logitfuse.TAILS


def random_partial_map(v_slm, v_llm, gen, unmapped=0.3, aggregate=False):
    """A one-to-one map with about `unmapped` of the SLM tokens left out; with `aggregate`, the
    other LLM tokens also hand their mass to random SLM tokens (as prefixes do across tokenizers)."""
    targets = torch.randperm(v_llm, generator=gen)[:v_slm] if v_slm <= v_llm else torch.randperm(v_llm, generator=gen)
    slm_to_llm = torch.full((v_slm,), -1)
    chosen = torch.randperm(v_slm, generator=gen)[: min(v_slm, len(targets))]
    slm_to_llm[chosen] = targets[: len(chosen)]
    slm_to_llm = torch.where(torch.rand(v_slm, generator=gen) < unmapped, -1, slm_to_llm)
    if not aggregate:
        return VocabMap(slm_to_llm, v_llm)
    llm_to_slm = torch.randint(-1, v_slm, (v_llm,), generator=gen)
    mapped = slm_to_llm >= 0
    llm_to_slm[slm_to_llm[mapped]] = torch.arange(v_slm)[mapped]
    return VocabMap(slm_to_llm, v_llm, llm_to_slm)


def random_topk(llm_logits, k):
    logprobs = torch.log_softmax(llm_logits.double(), -1)
    top = logprobs.topk(k, dim=-1)
    return TopK(top.indices, top.values.float())


def assert_normalized(fused):
    torch.testing.assert_close(fused.logsumexp(-1), torch.zeros(fused.shape[0]), atol=2e-5, rtol=0)


# ------------------------------------------------------------------ independent float64 formulas
def naive_fuse(slm, llm_logprobs_full, known_cols, vmap, alpha, mode, tail, llm_shift):
    """DESIGN.md, literally, one row at a time in float64 numpy.

    llm_logprobs_full: (V_L,) LLM log-probs where reported (dense: all; top-k: the k ids);
    known_cols: set of LLM ids the LLM reported.
    """
    s = slm.double().numpy()
    lp_s = s - np.log(np.exp(s - s.max()).sum()) - s.max()
    m = vmap.slm_to_llm.numpy()
    known = np.array([j >= 0 and j in known_cols for j in m])
    lp_l = np.zeros_like(lp_s)
    lp_l[known] = llm_logprobs_full[m[known]]
    r = max(1 - np.exp(lp_l[known]).sum(), 1e-6)
    unknown = ~known
    if unknown.any():
        if tail == "slm":
            lp_l[unknown] = np.log(r) + lp_s[unknown] - np.log(np.exp(lp_s[unknown]).sum())
        elif tail == "uniform":
            lp_l[unknown] = np.log(r) - np.log(unknown.sum())
        else:
            lp_l[unknown] = -llm_shift
    if mode == "linear":
        z = np.log(alpha * np.exp(lp_s) + (1 - alpha) * np.exp(lp_l))
    elif mode == "geometric":
        z = alpha * lp_s + (1 - alpha) * lp_l
    else:
        z = alpha * s + (1 - alpha) * (lp_l + llm_shift)
    return z - np.log(np.exp(z - z.max()).sum()) - z.max()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("llm_kind", ["dense", "topk"])
def test_reference_matches_the_written_out_formulas(mode, tail, llm_kind):
    # a seed per case that is the same in every process (hash() of a str is randomized per process)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{mode}/{tail}/{llm_kind}".encode()))
    v_slm, v_llm, batch = 37, 41, 3
    slm = torch.randn(batch, v_slm, generator=gen) * 2
    llm = torch.randn(batch, v_llm, generator=gen) * 2
    vmap = random_partial_map(v_slm, v_llm, gen)
    alpha = torch.rand(batch, generator=gen)
    if llm_kind == "dense":
        inputs = llm
    else:
        inputs = random_topk(llm, 5)
    fused = logitfuse.fuse(slm, inputs, alpha=alpha, vocab_map=vmap, mode=mode, tail=tail)
    for b in range(batch):
        if llm_kind == "dense":
            shift = torch.logsumexp(llm[b].double(), -1).item()
            full = (llm[b].double() - shift).numpy()
            known_cols = set(range(v_llm))
        else:
            shift = 0.0
            full = np.full(v_llm, -np.inf)
            full[inputs.ids[b].numpy()] = inputs.logprobs[b].double().numpy()
            known_cols = set(inputs.ids[b].tolist())
        expected = naive_fuse(slm[b], full, known_cols, vmap, alpha[b].item(), mode, tail, shift)
        np.testing.assert_allclose(fused[b].numpy(), expected, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------ properties
shapes = st.tuples(st.integers(1, 4), st.integers(1, 60), st.integers(1, 60))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, mode=st.sampled_from(MODES), tail=st.sampled_from(TAILS),
       alpha=st.floats(0, 1), topk=st.booleans(), aggregate=st.booleans(), seed=st.integers(0, 2**16))
def test_outputs_normalize(shape, mode, tail, alpha, topk, aggregate, seed):
    batch, v_slm, v_llm = shape
    gen = torch.Generator().manual_seed(seed)
    vmap = random_partial_map(v_slm, v_llm, gen, aggregate=aggregate)
    llm = torch.randn(batch, v_llm, generator=gen) * 3
    inputs = random_topk(llm, min(v_llm, 3)) if topk else llm
    fused = logitfuse.fuse(torch.randn(batch, v_slm, generator=gen) * 3, inputs, alpha=alpha,
                           vocab_map=vmap, mode=mode, tail=tail)
    assert fused.dtype == torch.float32 and fused.shape == (batch, v_slm)
    assert not torch.isnan(fused).any()
    assert_normalized(fused)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, mode=st.sampled_from(MODES), tail=st.sampled_from(TAILS), topk=st.booleans(),
       seed=st.integers(0, 2**16))
def test_alpha_one_is_the_slm_alone(shape, mode, tail, topk, seed):
    batch, v_slm, v_llm = shape
    gen = torch.Generator().manual_seed(seed)
    slm = torch.randn(batch, v_slm, generator=gen) * 3
    llm = torch.randn(batch, v_llm, generator=gen) * 3
    inputs = random_topk(llm, min(v_llm, 4)) if topk else llm
    fused = logitfuse.fuse(slm, inputs, alpha=1.0, vocab_map=random_partial_map(v_slm, v_llm, gen), mode=mode, tail=tail)
    torch.testing.assert_close(fused, torch.log_softmax(slm, -1), atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 4), vocab=st.integers(1, 80), mode=st.sampled_from(["linear", "geometric"]),
       tail=st.sampled_from(TAILS), seed=st.integers(0, 2**16))
def test_alpha_zero_with_identity_map_is_the_llm_alone(batch, vocab, mode, tail, seed):
    gen = torch.Generator().manual_seed(seed)
    llm = torch.randn(batch, vocab, generator=gen) * 3
    fused = logitfuse.fuse(torch.randn(batch, vocab, generator=gen), llm, alpha=0.0, mode=mode, tail=tail)
    torch.testing.assert_close(fused, torch.log_softmax(llm, -1), atol=1e-5, rtol=1e-5)


def test_alpha_is_per_row():
    gen = torch.Generator().manual_seed(0)
    slm, llm = torch.randn(3, 20, generator=gen), torch.randn(3, 20, generator=gen)
    alpha = torch.tensor([0.0, 0.5, 1.0])
    fused = logitfuse.fuse(slm, llm, alpha=alpha, mode="geometric")
    torch.testing.assert_close(fused[0], torch.log_softmax(llm[0], -1))
    torch.testing.assert_close(fused[2], torch.log_softmax(slm[2], -1))
    torch.testing.assert_close(fused[1:2], logitfuse.fuse(slm[1:2], llm[1:2], alpha=0.5, mode="geometric"))


@settings(max_examples=25, deadline=None)
@given(shape=shapes, mode=st.sampled_from(MODES), tail=st.sampled_from(TAILS), topk=st.booleans(),
       alpha=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_permuting_both_vocabularies_permutes_the_output(shape, mode, tail, topk, alpha, seed):
    batch, v_slm, v_llm = shape
    gen = torch.Generator().manual_seed(seed)
    slm = torch.randn(batch, v_slm, generator=gen)
    llm = torch.randn(batch, v_llm, generator=gen)
    vmap = random_partial_map(v_slm, v_llm, gen)
    perm_s, perm_l = torch.randperm(v_slm, generator=gen), torch.randperm(v_llm, generator=gen)
    inv_l = torch.argsort(perm_l)
    # new SLM id a stands for old id perm_s[a]; new LLM id c for old perm_l[c]
    old_targets = vmap.slm_to_llm[perm_s]
    new_map = VocabMap(torch.where(old_targets >= 0, inv_l[old_targets.clamp(min=0)], -1), v_llm)
    if topk:
        k = min(v_llm, 4)
        inputs, permuted_inputs = random_topk(llm, k), None
        permuted_inputs = TopK(inv_l[inputs.ids], inputs.logprobs)
    else:
        inputs, permuted_inputs = llm, llm[:, perm_l]
    fused = logitfuse.fuse(slm, inputs, alpha=alpha, vocab_map=vmap, mode=mode, tail=tail)
    fused_permuted = logitfuse.fuse(slm[:, perm_s], permuted_inputs, alpha=alpha, vocab_map=new_map, mode=mode, tail=tail)
    torch.testing.assert_close(fused_permuted, fused[:, perm_s], atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), vocab=st.integers(1, 50), mode=st.sampled_from(MODES),
       tail=st.sampled_from(TAILS), alpha=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_topk_with_k_equal_to_the_vocabulary_is_dense(batch, vocab, mode, tail, alpha, seed):
    gen = torch.Generator().manual_seed(seed)
    slm, llm = torch.randn(batch, vocab, generator=gen) * 2, torch.randn(batch, vocab, generator=gen) * 2
    dense = logitfuse.fuse(slm, llm, alpha=alpha, mode=mode, tail=tail)
    full = logitfuse.fuse(slm, random_topk(llm, vocab), alpha=alpha, mode=mode, tail=tail)
    torch.testing.assert_close(full, dense, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tail", ["slm", "uniform"])
def test_partial_map_topk_with_every_id_is_dense(tail):
    """With a partial map, reporting every LLM id is the same as dense logits (tails that are distributions)."""
    gen = torch.Generator().manual_seed(1)
    slm, llm = torch.randn(2, 30, generator=gen), torch.randn(2, 25, generator=gen)
    vmap = random_partial_map(30, 25, gen)
    for mode in MODES:
        dense = logitfuse.fuse(slm, llm, alpha=0.3, vocab_map=vmap, mode=mode, tail=tail)
        full = logitfuse.fuse(slm, random_topk(llm, 25), alpha=0.3, vocab_map=vmap, mode=mode, tail=tail)
        torch.testing.assert_close(full, dense, atol=1e-4, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), vocab=st.integers(2, 60), k=st.integers(1, 20),
       tail=st.sampled_from(["slm", "uniform"]), seed=st.integers(0, 2**16))
def test_tail_mass_is_what_the_topk_left(batch, vocab, k, tail, seed):
    k = min(k, vocab - 1)
    gen = torch.Generator().manual_seed(seed)
    topk = random_topk(torch.randn(batch, vocab, generator=gen) * 2, k)
    # α = 0, linear, identity map: the fused distribution is the LLM's pulled-back distribution
    fused = logitfuse.fuse(torch.randn(batch, vocab, generator=gen), topk, alpha=0.0, tail=tail).double().exp()
    reported = torch.zeros(batch, vocab, dtype=torch.bool).scatter_(1, topk.ids, True)
    tail_mass = torch.where(reported, 0.0, fused).sum(-1)
    expected = 1 - topk.logprobs.double().exp().sum(-1)
    torch.testing.assert_close(tail_mass, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused.gather(1, topk.ids), topk.logprobs.double().exp(), atol=1e-5, rtol=1e-4)


def test_slm_tail_follows_the_slm_and_uniform_tail_is_flat():
    slm = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    topk = TopK(torch.tensor([[0]]), torch.tensor([[math.log(0.6)]]))
    slm_tail = logitfuse.fuse(slm, topk, alpha=0.0, tail="slm").exp()[0, 1:]
    expected = 0.4 * torch.softmax(slm[0, 1:], -1)
    torch.testing.assert_close(slm_tail, expected)
    flat = logitfuse.fuse(slm, topk, alpha=0.0, tail="uniform").exp()[0, 1:]
    torch.testing.assert_close(flat, torch.full((4,), 0.1))


def test_temperatures_scale_each_side():
    gen = torch.Generator().manual_seed(3)
    slm, llm = torch.randn(2, 9, generator=gen), torch.randn(2, 9, generator=gen)
    hot = logitfuse.fuse(slm, llm, alpha=0.4, slm_temperature=2.0, llm_temperature=0.5)
    torch.testing.assert_close(hot, logitfuse.fuse(slm / 2.0, llm / 0.5, alpha=0.4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_float32(dtype):
    gen = torch.Generator().manual_seed(4)
    slm, llm = torch.randn(2, 33, generator=gen), torch.randn(2, 33, generator=gen)
    low = logitfuse.fuse(slm.to(dtype), llm.to(dtype), alpha=0.3)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, logitfuse.fuse(slm.to(dtype).float(), llm.to(dtype).float(), alpha=0.3))


def test_masked_slm_tokens_stay_masked_in_geometric_mode():
    slm = torch.tensor([[0.0, -math.inf, 1.0]])
    llm = torch.tensor([[0.0, 5.0, 1.0]])
    fused = logitfuse.fuse(slm, llm, alpha=0.5, mode="geometric")
    assert fused[0, 1] == -math.inf and not torch.isnan(fused).any()
    assert_normalized(fused)


# ------------------------------------------------------------------ sampling
def expected_sampling_probs(logprobs, temperature, top_k, top_p):
    """Top-k then top-p on a float64 copy, written independently of the library."""
    p = np.exp(logprobs.double().numpy() / temperature)
    p /= p.sum()
    if top_k:
        kth = np.sort(p)[::-1][top_k - 1]
        p = np.where(p >= kth, p, 0)
        p /= p.sum()
    if top_p < 1:
        order = np.sort(p)[::-1]
        tau = order[np.searchsorted(np.cumsum(order), top_p)]
        p = np.where(p >= tau, p, 0)
        p /= p.sum()
    return p


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 8, 0.6)])
def test_sampling_frequencies_match_the_fused_distribution(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(11)
    vocab, draws = 12, 20000
    slm, llm = torch.randn(1, vocab, generator=gen), torch.randn(1, vocab, generator=gen)
    fused = logitfuse.fuse(slm, llm, alpha=0.4)
    expected = expected_sampling_probs(fused[0], temperature, top_k, top_p)
    ids = logitfuse.fuse_sample(slm.expand(draws, -1), llm.expand(draws, -1), alpha=0.4, temperature=temperature,
                                top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(5))
    counts = np.bincount(ids.numpy(), minlength=vocab)
    assert counts[expected == 0].sum() == 0, "a token outside top-k/top-p was drawn"
    support = expected > 0
    chi2 = (((counts - draws * expected) ** 2)[support] / (draws * expected[support])).sum()
    dof = support.sum() - 1
    # p < 1e-4 critical value is below dof + 6·sqrt(2·dof) + 10 for these small dof
    assert chi2 < dof + 6 * math.sqrt(2 * max(dof, 1)) + 10, (chi2, dof, counts, expected * draws)


def test_same_seed_same_tokens_and_greedy_is_argmax():
    gen = torch.Generator().manual_seed(2)
    slm, llm = torch.randn(6, 40, generator=gen), torch.randn(6, 40, generator=gen)
    first = logitfuse.fuse_sample(slm, llm, alpha=0.5, top_p=0.9, generator=torch.Generator().manual_seed(7))
    again = logitfuse.fuse_sample(slm, llm, alpha=0.5, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    ids, lps = logitfuse.fuse_sample(slm, llm, alpha=0.5, temperature=0.0, return_logprobs=True)
    fused = logitfuse.fuse(slm, llm, alpha=0.5)
    assert torch.equal(ids, fused.argmax(-1))
    torch.testing.assert_close(lps, fused.max(-1).values)


def test_top_p_keeps_ties_at_the_threshold():
    logits = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]]))
    seen = set()
    for seed in range(60):
        seen.add(int(logitfuse.fuse_sample(logits, logits, alpha=1.0, top_p=0.5,
                                           generator=torch.Generator().manual_seed(seed))))
    assert seen == {0, 1, 2, 3}  # 0.4 does not reach 0.5; the tied 0.2s are all kept
    exact = torch.log(torch.tensor([[0.25, 0.5, 0.25]]))
    for seed in range(20):  # 0.5 alone reaches top_p = 0.5: the smallest such set is {1}
        assert int(logitfuse.fuse_sample(exact, exact, alpha=1.0, top_p=0.5,
                                         generator=torch.Generator().manual_seed(seed))) == 1


def test_top_k_one_is_greedy():
    gen = torch.Generator().manual_seed(9)
    slm, llm = torch.randn(5, 30, generator=gen), torch.randn(5, 30, generator=gen)
    ids = logitfuse.fuse_sample(slm, llm, alpha=0.3, top_k=1, generator=gen)
    assert torch.equal(ids, logitfuse.fuse(slm, llm, alpha=0.3).argmax(-1))


# ------------------------------------------------------------------ cross-entropy
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("llm_kind", ["dense", "topk"])
def test_cross_entropy_gradient_matches_finite_differences(mode, llm_kind):
    gen = torch.Generator().manual_seed(5)
    n, v_slm, v_llm = 6, 23, 19
    slm, llm = torch.randn(n, v_slm, generator=gen).double(), torch.randn(n, v_llm, generator=gen).double()
    vmap = random_partial_map(v_slm, v_llm, gen)
    inputs = llm if llm_kind == "dense" else random_topk(llm, 4)
    targets = torch.randint(0, v_slm, (n,), generator=gen)
    targets[0] = -100
    alpha = (torch.rand(n, generator=gen) * 0.8 + 0.1).requires_grad_()
    loss = logitfuse.fused_cross_entropy(slm, inputs, targets, alpha=alpha, vocab_map=vmap, mode=mode)
    loss.sum().backward()
    assert loss[0] == 0 and alpha.grad[0] == 0
    h = 1e-3
    for i in range(1, n):
        bumped = [alpha.detach().clone() for _ in range(2)]
        bumped[0][i] += h
        bumped[1][i] -= h
        up, down = (logitfuse.fused_cross_entropy(slm, inputs, targets, alpha=a, vocab_map=vmap, mode=mode)[i] for a in bumped)
        torch.testing.assert_close(alpha.grad[i], (up - down) / (2 * h), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("mode", ["linear", "geometric"])
def test_cross_entropy_gradient_matches_the_design_formulas(mode):
    """DESIGN.md's closed forms for ∂(-log p_f(t))/∂α, computed from p_S and p_L (identity map, dense)."""
    gen = torch.Generator().manual_seed(8)
    slm, llm = torch.randn(5, 17, generator=gen), torch.randn(5, 17, generator=gen)
    targets = torch.randint(0, 17, (5,), generator=gen)
    alpha = torch.rand(5, generator=gen).requires_grad_()
    logitfuse.fused_cross_entropy(slm, llm, targets, alpha=alpha, mode=mode).sum().backward()
    lp_s, lp_l = torch.log_softmax(slm, -1), torch.log_softmax(llm, -1)
    a = alpha.detach()[:, None]
    rows = torch.arange(5)
    if mode == "linear":
        p_f = a * lp_s.exp() + (1 - a) * lp_l.exp()  # already normalized: identity map, no tail
        expected = -(lp_s.exp() - lp_l.exp())[rows, targets] / p_f[rows, targets]
    else:
        diff = lp_s - lp_l
        p_f = torch.softmax(a * lp_s + (1 - a) * lp_l, -1)
        expected = -diff[rows, targets] + (p_f * diff).sum(-1)
    torch.testing.assert_close(alpha.grad, expected, atol=1e-5, rtol=1e-4)


def test_cross_entropy_is_minus_the_fused_logprob():
    gen = torch.Generator().manual_seed(6)
    slm, llm = torch.randn(4, 11, generator=gen), torch.randn(4, 11, generator=gen)
    targets = torch.tensor([0, 3, 10, 5])
    loss = logitfuse.fused_cross_entropy(slm, llm, targets, alpha=0.3)
    fused = logitfuse.fuse(slm, llm, alpha=0.3)
    torch.testing.assert_close(loss, -fused[torch.arange(4), targets])


# ------------------------------------------------------------------ row statistics
def test_row_stats():
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(3, 50, generator=gen)
    stats = logitfuse.row_stats(logits, k=5)
    lp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(stats.lse, logits.logsumexp(-1))
    torch.testing.assert_close(stats.entropy, -(lp.exp() * lp).sum(-1))
    torch.testing.assert_close(stats.max_logprob, lp.max(-1).values)
    torch.testing.assert_close(stats.topk_logprobs, lp.topk(5).values)
    assert torch.equal(stats.topk_ids, lp.topk(5).indices)
    tiny = logitfuse.row_stats(torch.zeros(2, 1), k=4)  # k is capped at the vocabulary
    assert tiny.topk_ids.shape == (2, 1) and torch.all(tiny.entropy == 0)


def test_row_stats_put_the_first_of_tied_maxima_first_and_keep_the_ids_distinct():
    """A head's argmax features read ``topk_ids[:, 0]``: among ties it is the first index, on every device."""
    logits = torch.zeros(3, 300)
    logits[0, [250, 17, 130]] = 2.0
    logits[1, [299, 3]] = 1.0
    stats = logitfuse.row_stats(logits, k=4)
    assert stats.topk_ids[:, 0].tolist() == [17, 3, 0]
    assert all(len(set(row.tolist())) == 4 for row in stats.topk_ids)
    assert set(stats.topk_ids[0, :3].tolist()) == {17, 130, 250} and set(stats.topk_ids[1, :2].tolist()) == {3, 299}


@pytest.mark.parametrize("mode", MODES)
def test_alpha_gradient_is_finite_at_the_ends_and_with_masked_tokens(mode):
    """A head's sigmoid can saturate to exactly 0 or 1, and logits can be -inf: no NaN gradient."""
    gen = torch.Generator().manual_seed(13)
    slm, llm = torch.randn(4, 9, generator=gen), torch.randn(4, 9, generator=gen)
    slm[:, 2] = -math.inf
    llm[:, 5] = -math.inf
    alpha = torch.tensor([0.0, 1.0, 0.5, 1e-30], requires_grad=True)
    targets = torch.tensor([0, 1, 3, 4])
    loss = logitfuse.fused_cross_entropy(slm, llm, targets, alpha=alpha, mode=mode, tail="uniform")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(alpha.grad).all(), (loss, alpha.grad)


def test_linear_gradient_at_alpha_one_counts_tokens_the_slm_masked():
    """At α = 1 a token with p_S = 0 has mixture 0, but it still takes mass as α decreases."""
    slm = torch.tensor([[0.0, 1.0, -math.inf, 0.5]], dtype=torch.float64)
    llm = torch.tensor([[0.2, -0.3, 2.0, 0.1]], dtype=torch.float64)
    target = torch.tensor([0])
    alpha = torch.ones(1, dtype=torch.float64, requires_grad=True)
    logitfuse.fused_cross_entropy(slm, llm, target, alpha=alpha).backward()
    h = 1e-3  # the math runs in float32
    below = logitfuse.fused_cross_entropy(slm, llm, target, alpha=1 - h)
    at = logitfuse.fused_cross_entropy(slm, llm, target, alpha=1.0)
    torch.testing.assert_close(alpha.grad.float(), (at - below) / h, atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------ maps between two tokenizers
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("topk", [False, True])
def test_aggregating_through_the_exact_inverse_is_the_gather(mode, tail, topk):
    gen = torch.Generator().manual_seed(21)
    vmap = random_partial_map(30, 26, gen)
    inverse = torch.full((26,), -1)
    mapped = vmap.slm_to_llm >= 0
    inverse[vmap.slm_to_llm[mapped]] = torch.arange(30)[mapped]
    aggregating = VocabMap(vmap.slm_to_llm, 26, inverse)
    slm, llm = torch.randn(3, 30, generator=gen), torch.randn(3, 26, generator=gen)
    inputs = random_topk(llm, 6) if topk else llm
    torch.testing.assert_close(
        logitfuse.fuse(slm, inputs, alpha=0.3, vocab_map=aggregating, mode=mode, tail=tail),
        logitfuse.fuse(slm, inputs, alpha=0.3, vocab_map=vmap, mode=mode, tail=tail))


@pytest.mark.parametrize("topk", [False, True])
def test_llm_tokens_without_a_counterpart_give_their_mass_to_their_first_slm_piece(topk):
    """SLM: ["a", "b", "],"]; LLM: ["a", "b", "],", "],\n\n"] — the LLM's "],\n\n" starts with "],"."""
    vmap = VocabMap(torch.tensor([0, 1, 2]), 4, llm_to_slm=torch.tensor([0, 1, 2, 2]))
    llm_probs = torch.tensor([[0.05, 0.05, 0.1, 0.8]])
    llm = TopK(torch.tensor([[3, 2]]), llm_probs[:, [3, 2]].log()) if topk else llm_probs.log()
    fused = logitfuse.fuse(torch.zeros(1, 3), llm, alpha=0.0, vocab_map=vmap).exp()
    assert fused[0, 2] == pytest.approx(0.9, abs=1e-5)
    exact_only = logitfuse.fuse(torch.zeros(1, 3), llm, alpha=0.0, vocab_map=VocabMap(torch.tensor([0, 1, 2]), 4)).exp()
    assert exact_only[0, 2] < 0.6  # without the hand-off the 0.8 is lost (dense) or spread over the tail (top-k)
