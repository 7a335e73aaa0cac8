"""One alignment per step: ``logitfuse.align`` against an independent float64 computation, the head
and the mix reading the same view, and the session's step without needless host reads."""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

import logitfuse
from logitfuse import FusionHead, PaperFusionHead, TopK, VocabMap, reference
from logitfuse.testing import byte_level_tokenizer, random_cross_map, tiny_llama
from logitfuse.types import TAIL_FLOOR

B, V_SLM, V_LLM, K = 3, 37, 53, 5


def cross_map() -> VocabMap:
    """Two tokenizers: some SLM tokens have an exact LLM twin, every other LLM token hands its mass
    to some SLM token (several to one), a few LLM tokens to none."""
    return random_cross_map(V_SLM, V_LLM, seed=3, unmapped=4)


def partial_map() -> VocabMap:
    """One tokenizer family: a one-to-one map with a third of the SLM tokens unmapped."""
    g = torch.Generator().manual_seed(4)
    slm_to_llm = torch.randperm(V_LLM, generator=g)[:V_SLM]
    slm_to_llm[torch.rand(V_SLM, generator=g) < 0.33] = -1
    return VocabMap(slm_to_llm, V_LLM)


def inputs(llm_kind: str, seed: int = 0, v_llm: int = V_LLM):
    g = torch.Generator().manual_seed(seed)
    slm = torch.randn(B, V_SLM, generator=g) * 3
    dense = torch.randn(B, v_llm, generator=g) * 3
    if llm_kind == "dense":
        return slm, dense
    top = dense.log_softmax(-1).topk(K, dim=-1)
    logprobs = top.values.clone()
    logprobs[0, -1] = -math.inf  # a padded entry: reports nothing
    return slm, TopK(top.indices, logprobs)


def expected_float64(slm, llm, vmap: VocabMap, tail: str, t_slm: float, t_llm: float):
    """``(lp_slm, slm_lse, lp_llm, llm_lse)`` row by row in float64, straight from the formulas in
    DESIGN.md: every LLM token hands its probability to the SLM token it maps to; the leftover
    ``r = max(1 - known mass, TAIL_FLOOR)`` goes to the SLM tokens nothing was reported for."""
    rows = []
    for b in range(slm.shape[0]):
        s = slm[b].double() / t_slm
        slm_lse = torch.logsumexp(s, 0)
        lp_s = s - slm_lse
        if isinstance(llm, TopK):
            llm_lse = torch.tensor(0.0, dtype=torch.float64)
            reported = {int(i): float(lp) for i, lp in zip(llm.ids[b], llm.logprobs[b].double()) if lp > -math.inf}
        else:
            l_scaled = llm[b].double() / t_llm
            llm_lse = torch.logsumexp(l_scaled, 0)
            reported = {j: float(l_scaled[j] - llm_lse) for j in range(len(l_scaled))}
        if vmap.llm_to_slm is None:
            owners = {int(vmap.slm_to_llm[i]): i for i in range(V_SLM) if vmap.slm_to_llm[i] >= 0}
        else:
            owners = {j: int(vmap.llm_to_slm[j]) for j in range(vmap.v_llm) if vmap.llm_to_slm[j] >= 0}
        mass = [0.0] * V_SLM
        known = [False] * V_SLM
        for j, lp in reported.items():
            if j in owners:
                mass[owners[j]] += math.exp(lp)
                known[owners[j]] = True
        r = max(1.0 - sum(m for m, k in zip(mass, known) if k), TAIL_FLOOR)
        unknown = [i for i in range(V_SLM) if not known[i]]
        p_unknown = sum(math.exp(lp_s[i]) for i in unknown)
        lp_l = torch.empty(V_SLM, dtype=torch.float64)
        for i in range(V_SLM):
            if known[i]:
                lp_l[i] = math.log(mass[i]) if mass[i] > 0 else -math.inf
            elif tail == "slm":
                lp_l[i] = math.log(r) + lp_s[i] - math.log(p_unknown)
            elif tail == "uniform":
                lp_l[i] = math.log(r) - math.log(len(unknown))
            else:  # "zero": raw logit 0 on the LLM's scale
                lp_l[i] = -llm_lse
        rows.append((lp_s, slm_lse, lp_l, llm_lse))
    return [torch.stack(parts) for parts in zip(*rows)]


@pytest.mark.parametrize("tail", ["slm", "uniform", "zero"])
@pytest.mark.parametrize("llm_kind", ["dense", "topk"])
@pytest.mark.parametrize("map_kind", ["identity", "partial", "cross"])
def test_align_matches_an_independent_float64_computation(map_kind, llm_kind, tail):
    slm, llm = inputs(llm_kind, v_llm=V_SLM if map_kind == "identity" else V_LLM)
    vmap = {"identity": lambda: VocabMap.identity(V_SLM, V_SLM), "partial": partial_map, "cross": cross_map}[map_kind]()
    t_llm = 0.8 if llm_kind == "dense" else 1.0
    view = logitfuse.align(slm, llm, vocab_map=vmap, tail=tail, slm_temperature=1.3, llm_temperature=t_llm)
    assert isinstance(view, logitfuse.Aligned) and view.tail == tail and view.slm_logits is slm
    lp_s, slm_lse, lp_l, llm_lse = expected_float64(slm, llm, vmap, tail, 1.3, t_llm)
    for got, want in ((view.slm_logprobs, lp_s), (view.slm_lse, slm_lse), (view.llm_logprobs, lp_l),
                      (view.llm_lse, llm_lse)):
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["linear", "geometric", "logit"])
@pytest.mark.parametrize("llm_kind", ["dense", "topk"])
def test_the_mix_of_the_aligned_view_is_fuse_bit_for_bit(mode, llm_kind):
    slm, llm = inputs(llm_kind, seed=1)
    vmap = cross_map()
    alpha = torch.tensor([0.0, 0.4, 1.0])
    view = logitfuse.align(slm, llm, vocab_map=vmap, tail="uniform", slm_temperature=0.7)
    fused = logitfuse.fuse(slm, llm, alpha=alpha, vocab_map=vmap, mode=mode, tail="uniform", slm_temperature=0.7)
    assert torch.equal(reference.mix(view, alpha, mode=mode), fused)


@pytest.mark.parametrize("head_class", [FusionHead, PaperFusionHead])
def test_the_head_and_the_mix_read_one_alignment(head_class, monkeypatch):
    """fuse_with_head aligns once (reference path): the head's α and the mix read that very view."""
    slm, llm = inputs("topk", seed=2)
    vmap = cross_map()
    head = head_class(V_SLM, V_LLM, mode="linear", tail="slm", hidden=8)
    made, read = [], []
    align, mix, alpha_from_aligned = reference.align, reference.mix, head.alpha_from_aligned
    monkeypatch.setattr(reference, "align", lambda *a, **k: made.append(align(*a, **k)) or made[-1])
    monkeypatch.setattr(reference, "mix", lambda view, *a, **k: read.append(("mix", view)) or mix(view, *a, **k))
    monkeypatch.setattr(head, "alpha_from_aligned", lambda view: read.append(("head", view)) or alpha_from_aligned(view))
    with torch.no_grad():
        alpha, fused = logitfuse.fuse_with_head(slm, llm, head, vocab_map=vmap, mode="linear", tail="slm")
    assert len(made) == 1
    assert [who for who, _ in read] == ["head", "mix"] and all(view is made[0] for _, view in read)
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(alpha, head(slm, llm, vmap))
        assert torch.equal(fused, logitfuse.fuse(slm, llm, alpha=alpha, vocab_map=vmap, mode="linear", tail="slm"))


@pytest.mark.parametrize("llm_kind", ["dense", "topk"])
def test_on_the_statistics_path_the_head_reads_what_fuse_with_head_computed(llm_kind, monkeypatch):
    """The kernel path of fuse_with_head (here with the reference implementations behind another namespace,
    as on CUDA): the per-row statistics are computed once there and handed to the head, which calls nothing
    back into logitfuse.functional; α and the mix are those of the aligned-view path."""
    from types import SimpleNamespace

    from logitfuse import functional, heads

    slm, llm = inputs(llm_kind, seed=5)
    vmap = partial_map()
    head = FusionHead(V_SLM, V_LLM, tail="uniform", top_k=3)
    with torch.no_grad():
        head.mlp[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        expected = logitfuse.fuse_with_head(slm, llm, head, vocab_map=vmap, tail="slm", validate=False)
    as_kernels = SimpleNamespace(**vars(functional.REFERENCE_OPS))
    monkeypatch.setattr(functional, "ops_for", lambda args, **k: as_kernels)

    def called_back(*a, **k):
        raise AssertionError("the head called back into logitfuse.functional")

    monkeypatch.setattr(heads, "fusion_feature_stats", called_back)
    monkeypatch.setattr(heads, "align", called_back)
    with torch.no_grad():
        alpha, fused = logitfuse.fuse_with_head(slm, llm, head, vocab_map=vmap, tail="slm", validate=False)
    torch.testing.assert_close(alpha, expected[0])
    torch.testing.assert_close(fused, expected[1])


def test_a_head_reads_its_own_view_from_align():
    slm, llm = inputs("dense", seed=3)
    vmap = partial_map()
    head = FusionHead(V_SLM, V_LLM, tail="uniform", top_k=3)
    view = logitfuse.align(slm, llm, vocab_map=vmap, tail="uniform")
    with torch.no_grad():
        assert torch.equal(head.alpha_from_aligned(view), head(slm, llm, vmap))
        assert torch.equal(head.features_from_aligned(view), head.features(slm, llm, vmap))


def test_align_checks_its_arguments():
    with pytest.raises(ValueError, match="tail='wide' is not one of"):
        logitfuse.align(torch.randn(2, 5), torch.randn(2, 5), tail="wide")
    with pytest.raises(ValueError, match="no vocab_map was given"):
        logitfuse.align(torch.randn(2, 5), torch.randn(2, 7))
    with pytest.raises(ValueError, match="slm_logits contains NaN"):
        logitfuse.align(torch.full((2, 5), float("nan")), torch.randn(2, 5))


# ------------------------------------------------------------------------------ the session's step
READS = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy", "cpu"}


class HostReads(TorchFunctionMode):
    """Records every read of a tensor's values into Python (a GPU -> CPU sync on a device)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS and not self.paused:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _session(reads: HostReads, **kwargs) -> logitfuse.FusionSession:
    class LLM(logitfuse.HFLLM):  # what the backend reads to run its own model is not the step's
        def advance(self, *a, **k):
            reads.paused = True
            try:
                return super().advance(*a, **k)
            finally:
                reads.paused = False

    tok = byte_level_tokenizer()
    session = logitfuse.FusionSession(LLM(tiny_llama(len(tok), seed=1), tok), **kwargs)
    session.start(["Write an invitation:", "Hello"], v_slm=len(tok))
    session.step([[], []], torch.randn(2, len(tok)))
    return session


@pytest.mark.parametrize("kind", ["alpha", "head", "head, deferred check"])
def test_a_session_step_reads_only_what_it_needs(kind):
    """Per step: nothing (the backend gives its ok flags as host data, ``ok_rows``), and with a head its
    α-is-finite check, unless the decode loop folds that into the ids it reads (``defer_alpha_checks``,
    as logitfuse.generate does). The step used to read 8 (fixed α) / 11 (head), then 1 / 2."""
    reads = HostReads()
    v = len(byte_level_tokenizer())
    session = _session(reads, **(dict(alpha=0.5) if kind == "alpha" else dict(head=FusionHead(v, v))))
    if kind == "head, deferred check":
        session.defer_alpha_checks()
    with reads:
        session.step([[5], [6]], torch.randn(2, v))
    assert reads.seen == (["__bool__"] if kind == "head" else [])
    assert session.stats.steps == 2 and session.stats["llm_calls"] == 2 and session.stats.fallbacks == 0
    assert [a.device.type for a in session.alpha_history] == ["cpu", "cpu"]


def test_banned_tokens_stay_banned_and_other_rows_are_untouched():
    tok = byte_level_tokenizer()
    v = len(tok)
    llm = logitfuse.HFLLM(tiny_llama(v, seed=1), tok)
    session = logitfuse.FusionSession(llm, alpha=0.3)
    session.start(["Write an invitation:", "Hello"], v_slm=v)
    slm = torch.randn(2, v, generator=torch.Generator().manual_seed(5))
    slm[1, [7, 40, 41]] = -math.inf  # row 1: the engine banned three tokens
    fused = session.step([[], []], slm)
    expected = logitfuse.fuse(slm, llm.advance([[], []]).next, alpha=0.3)
    assert torch.equal(fused[0], expected[0])  # nothing banned: exactly the fusion's row
    assert torch.isneginf(fused[1, [7, 40, 41]]).all()
    torch.testing.assert_close(fused[1].logsumexp(-1), torch.tensor(0.0), atol=1e-6, rtol=0)
    kept = torch.isfinite(fused[1])
    torch.testing.assert_close(fused[1][kept], torch.log_softmax(expected[1][kept], -1))
