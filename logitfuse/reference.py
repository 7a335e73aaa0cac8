"""Reference math for logit fusion, in plain torch: the CPU path and the test oracle.

Every function here takes already-validated arguments (see :mod:`logitfuse.functional` for the
checked public entry points) and computes in float32 whatever the input dtype. The Triton kernels in
:mod:`logitfuse.kernels` have the same signatures and are compared against these in the tests.

Notation (DESIGN.md): SLM logits ``s`` over ``V_S`` tokens; LLM information over ``V_L`` tokens,
either dense logits ``l`` or a top-k ``(ids, logprobs)``; a vocabulary map ``m: [0, V_S) -> [0, V_L)
∪ {-1}`` given as the int64 tensor ``slm_to_llm``; a weight ``α ∈ [0, 1]`` per row (``α = 1`` means
the SLM alone).

The LLM side is first pulled back onto the SLM vocabulary:

- an SLM token ``i`` is *known* when ``m(i) != -1`` and the LLM reported ``m(i)`` (always, for dense
  logits; when ``m(i)`` is among the top-k ids otherwise); then ``lp_L(i) = log p_L(m(i))``;
- the LLM mass that no known SLM token received, ``r = max(1 - Σ_known p_L, TAIL_FLOOR)``, is spread
  over the other SLM tokens by the tail rule: ``"slm"`` in proportion to the SLM's probabilities,
  ``"uniform"`` evenly, or ``"zero"`` (the paper's code) as a score of 0 on the LLM's logit scale,
  which is not a distribution.

Then the modes mix ``lp_S = log_softmax(s / T_S)`` with ``lp_L``:

- ``"linear"``: ``log(α·p_S + (1-α)·p_L)``, renormalized over the SLM vocabulary, computed in log
  space as ``logaddexp(log α + lp_S, log(1-α) + lp_L)`` (``log 0 = -inf``), so ``α = 1`` gives
  exactly ``lp_S`` and ``α = 0`` exactly ``lp_L`` (renormalized), however far apart the two sides are;
- ``"geometric"``: ``log_softmax(α·lp_S + (1-α)·lp_L)``;
- ``"logit"``: ``log_softmax(α·s/T_S + (1-α)·l̃)`` with ``l̃ = lp_L + lse(l / T_L)`` the LLM's raw
  logits (top-k logprobs count as logits) and the ``"zero"`` tail's fill 0 on that raw scale. Its
  values equal geometric's (the two differ by a per-row constant, which the log-softmax removes);
  it is kept to compare with the paper's code, and its α-gradient has the raw scale.
"""

from __future__ import annotations

import math

import torch

from logitfuse.types import TAIL_FLOOR, TOP_P_TOLERANCE, Aligned, FeatureStats, RowStats, TopK

Tensor = torch.Tensor


class LogMixture(torch.autograd.Function):
    """``log(a·exp(lp_a) + (1-a)·exp(lp_b))`` in log space, with the gradient written out.

    Forward: ``logaddexp(log a + lp_a, log(1-a) + lp_b)`` with ``log 0 = -inf``, so ``a = 0`` and
    ``a = 1`` are exact (at ``a = 1`` a token 120 nats below the other side's keeps its ``-120``).
    Backward, with ``mix`` the result: ``∂/∂a = (p_a - p_b) / mix``, ``∂/∂lp_a = a·p_a / mix``,
    ``∂/∂lp_b = (1-a)·p_b / mix``, each computed as ``exp`` of a log-space difference. Autograd
    through the forward would form ``(1/a)·0`` at ``a = 0`` (NaN); this gives the one-sided derivative
    there, which is finite whenever ``mix > 0`` (it is ``±inf`` only where the true value exceeds
    float32, e.g. ``e^120``). Tokens with ``mix = 0`` (``-inf``) and entries whose incoming gradient
    is 0 contribute nothing (no ``0·inf``).
    """

    @staticmethod
    def forward(ctx, a: Tensor, lp_a: Tensor, lp_b: Tensor) -> Tensor:
        mixed = torch.logaddexp(a.log() + lp_a, torch.log1p(-a) + lp_b)  # log(0) = -inf: exact ends
        ctx.save_for_backward(a, lp_a, lp_b, mixed)
        return mixed

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, lp_a, lp_b, mixed = ctx.saved_tensors
        alive = (mixed > -math.inf) & (grad != 0)
        base = torch.where(alive, mixed, 0.0)
        grad = torch.where(alive, grad, 0.0)

        def share(log_weight: Tensor, lp: Tensor) -> Tensor:  # weight·p / mix, 0 off the living set
            return torch.where(alive, (log_weight + lp - base).exp(), 0.0)

        zero = torch.zeros((), dtype=a.dtype, device=a.device)
        grad_a = grad_lp_a = grad_lp_b = None
        if ctx.needs_input_grad[0]:
            grad_a = (grad * (share(zero, lp_a) - share(zero, lp_b))).sum_to_size(a.shape)
        if ctx.needs_input_grad[1]:
            grad_lp_a = (grad * share(a.log(), lp_a)).sum_to_size(lp_a.shape)
        if ctx.needs_input_grad[2]:
            grad_lp_b = (grad * share(torch.log1p(-a), lp_b)).sum_to_size(lp_b.shape)
        return grad_a, grad_lp_a, grad_lp_b


def log_mixture(a: Tensor, lp_a: Tensor, lp_b: Tensor) -> Tensor:
    """``log(a·exp(lp_a) + (1-a)·exp(lp_b))``, exact at ``a = 0`` and ``a = 1`` and with finite
    gradients in ``a`` (one-sided at the ends) wherever the mixture is positive; see :class:`LogMixture`.
    Float32 tensors that broadcast together (e.g. ``a`` ``(B, 1)``, ``lp_*`` ``(B, V)``); the
    trainer's cached linear-mode loss uses it on per-token numbers."""
    return LogMixture.apply(a.float(), lp_a.float(), lp_b.float())


def _log_product(a: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """``a·x + (1-a)·y`` where a side with weight 0 does not take part (``0·-inf = 0``) and a
    ``-inf`` on a side with positive weight gives ``-inf`` without a NaN gradient in ``a``."""
    x_masked, y_masked = x == -math.inf, y == -math.inf
    dead = (x_masked & (a > 0)) | (y_masked & (a < 1))
    mixed = a * torch.where(x_masked, 0.0, x) + (1 - a) * torch.where(y_masked, 0.0, y)
    return torch.where(dead, -math.inf, mixed)


def slm_logprobs(slm_logits: Tensor, slm_temperature: Tensor) -> Tensor:
    """``log_softmax(s / T_S)`` in float32, ``(B, V_S)``."""
    return torch.log_softmax(slm_logits.float() / slm_temperature[:, None], dim=-1)


def slm_logprobs_and_lse(slm_logits: Tensor, slm_temperature: Tensor) -> tuple[Tensor, Tensor]:
    """``(log_softmax(s / T_S), logsumexp(s / T_S))`` with one log-sum-exp: the normalizer is read
    back from the log-softmax at each row's maximum (``lse = max(s/T_S) - max(lp_S)``, exact up to
    float32 rounding), which costs two max-reductions instead of a second log-sum-exp."""
    scaled = slm_logits.float() / slm_temperature[:, None]
    lp_slm = torch.log_softmax(scaled, dim=-1)
    return lp_slm, scaled.amax(dim=-1) - lp_slm.amax(dim=-1)


def llm_logprobs_on_slm_vocab(
    lp_slm: Tensor,
    llm: Tensor | TopK,
    slm_to_llm: Tensor,
    *,
    v_llm: int,
    tail: str,
    llm_temperature: Tensor,
    llm_to_slm: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Pull the LLM's distribution back onto the SLM vocabulary.

    Returns ``(lp_llm, llm_shift)``: ``lp_llm`` is ``(B, V_S)`` float32, ``log p_L`` of each SLM
    token's counterpart (tail rule for unknown tokens), and ``llm_shift`` is ``(B,)``, the LLM's
    log-sum-exp (0 for top-k input), so ``lp_llm + llm_shift`` is on the LLM's raw logit scale.

    With ``llm_to_slm`` ``(V_L,)`` (maps between two tokenizers), every LLM token hands its
    probability to the SLM token it starts with, and an SLM token is known when some LLM token
    handing to it was reported: ``p_L(i) = Σ_{j: llm_to_slm[j] = i} p_L(j)``. With the exact
    inverse of a one-to-one ``slm_to_llm`` this is the same as the gather above.
    """
    if llm_to_slm is not None:
        lp_known, known, llm_shift = _aggregate_llm(lp_slm, llm, llm_to_slm, llm_temperature)
        return _with_tail(lp_slm, lp_known, known, llm_shift, tail), llm_shift
    batch = lp_slm.shape[0]
    mapped = slm_to_llm >= 0
    columns = slm_to_llm.clamp(min=0)
    if isinstance(llm, TopK):
        # scatter the K reported logprobs into a dense row; only the reference builds this copy
        lp_full = torch.full((batch, v_llm), -math.inf, device=lp_slm.device)
        lp_full.scatter_(1, llm.ids, llm.logprobs.float())
        reported = torch.zeros((batch, v_llm), dtype=torch.bool, device=lp_slm.device)
        reported.scatter_(1, llm.ids, llm.logprobs > -math.inf)  # a -inf entry is padding: not reported
        llm_shift = torch.zeros(batch, device=lp_slm.device)
        known = reported[:, columns] & mapped
    else:
        logits = llm.float() / llm_temperature[:, None]
        llm_shift = torch.logsumexp(logits, dim=-1)
        lp_full = logits - llm_shift[:, None]
        known = mapped.expand(batch, -1)
    lp_known = torch.where(known, lp_full[:, columns], -math.inf)
    return _with_tail(lp_slm, lp_known, known, llm_shift, tail), llm_shift


def _aggregate_llm(lp_slm: Tensor, llm: Tensor | TopK, llm_to_slm: Tensor,
                   llm_temperature: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(log Σ_{j → i} p_L(j), known, llm_shift)``: ``known[b, i]`` when a reported LLM token maps to ``i``."""
    batch, v_slm = lp_slm.shape
    if isinstance(llm, TopK):
        targets = llm_to_slm[llm.ids]
        reported = (targets >= 0) & (llm.logprobs > -math.inf)  # a -inf entry is padding: not reported
        probs = torch.where(reported, llm.logprobs.float().exp(), 0.0)
        columns = targets.clamp(min=0)
        mass = torch.zeros(batch, v_slm, device=lp_slm.device).scatter_add_(1, columns, probs)
        hits = torch.zeros(batch, v_slm, device=lp_slm.device).scatter_add_(1, columns, reported.float())
        llm_shift = torch.zeros(batch, device=lp_slm.device)
    else:
        logits = llm.float() / llm_temperature[:, None]
        llm_shift = torch.logsumexp(logits, dim=-1)
        # unmapped LLM tokens add 0 to column 0 (a where, not a boolean-mask copy: this runs every step)
        valid = llm_to_slm >= 0
        columns = llm_to_slm.clamp(min=0)
        probs = torch.where(valid, (logits - llm_shift[:, None]).exp(), 0.0)
        mass = torch.zeros(batch, v_slm, device=lp_slm.device).index_add_(1, columns, probs)
        hits = torch.zeros(v_slm, device=lp_slm.device).index_add_(0, columns, valid.float())
        hits = hits.expand(batch, -1)
    known = hits > 0
    return torch.where(known, mass.log(), -math.inf), known, llm_shift


def _with_tail(lp_slm: Tensor, lp_known: Tensor, known: Tensor, llm_shift: Tensor, tail: str) -> Tensor:
    """Fill the SLM tokens the LLM said nothing about (not ``known``) by the tail rule."""
    unknown = ~known
    # LLM mass that no known SLM token received; it goes to the unknown ones
    tail_mass = (1.0 - lp_known.exp().sum(dim=-1)).clamp(min=TAIL_FLOOR)
    if tail == "slm":
        # r · p_S(i) / Σ_{unknown} p_S
        lse_unknown = torch.logsumexp(torch.where(unknown, lp_slm, -math.inf), dim=-1)
        lse_unknown = torch.where(torch.isfinite(lse_unknown), lse_unknown, 0.0)
        lp_tail = tail_mass.log()[:, None] + lp_slm - lse_unknown[:, None]
    elif tail == "uniform":
        n_unknown = unknown.sum(dim=-1).clamp(min=1).float()
        lp_tail = (tail_mass.log() - n_unknown.log())[:, None].expand_as(lp_slm)
    else:  # "zero": raw logit 0
        lp_tail = (-llm_shift)[:, None].expand_as(lp_slm)
    return torch.where(known, lp_known, lp_tail)


def align(
    slm_logits: Tensor,
    llm: Tensor | TopK,
    slm_to_llm: Tensor,
    *,
    v_llm: int,
    tail: str,
    slm_temperature: Tensor,
    llm_temperature: Tensor,
    llm_to_slm: Tensor | None = None,
) -> Aligned:
    """Both sides of one step on the SLM vocabulary (:class:`logitfuse.types.Aligned`), computed
    once. Arguments as validated by ``logitfuse.align``; ``llm_to_slm`` as in
    :func:`llm_logprobs_on_slm_vocab`."""
    lp_slm, slm_lse = slm_logprobs_and_lse(slm_logits, slm_temperature)
    lp_llm, llm_lse = llm_logprobs_on_slm_vocab(
        lp_slm, llm, slm_to_llm, v_llm=v_llm, tail=tail, llm_temperature=llm_temperature, llm_to_slm=llm_to_slm
    )
    return Aligned(slm_logits, lp_slm, slm_lse, lp_llm, llm_lse, tail)


def mix(aligned: Aligned, alpha: Tensor, *, mode: str) -> Tensor:
    """Mix the two sides of ``aligned`` into fused log-probabilities ``(B, V_S)`` with the SLM
    weight ``alpha`` ``(B,)``. ``mode="logit"`` moves each side to its raw logit scale with
    ``aligned.slm_lse`` / ``aligned.llm_lse`` (a per-row constant cancels in the other modes)."""
    lp_slm, lp_llm = aligned.slm_logprobs, aligned.llm_logprobs
    a = alpha.float()[:, None]
    if mode == "linear":
        # all in log space (exact at α = 0 and 1); normalize in closed form,
        # log Z = logaddexp(log α + log Σp_S, log(1-α) + log Σp_L), so dZ/dα also counts tokens whose
        # mixture is 0 at α = 0 or 1 (a log-softmax would drop them from the gradient)
        log_z = log_mixture(a, lp_slm.logsumexp(dim=-1, keepdim=True), lp_llm.logsumexp(dim=-1, keepdim=True))
        return log_mixture(a, lp_slm, lp_llm) - log_z
    if mode == "geometric":
        mixed = _log_product(a, lp_slm, lp_llm)
    else:  # "logit"
        mixed = _log_product(a, lp_slm + aligned.slm_lse[:, None], lp_llm + aligned.llm_lse[:, None])
    return torch.log_softmax(mixed, dim=-1)


def fuse_reference(
    slm_logits: Tensor,
    llm: Tensor | TopK,
    slm_to_llm: Tensor,
    alpha: Tensor,
    *,
    v_llm: int,
    mode: str,
    tail: str,
    slm_temperature: Tensor,
    llm_temperature: Tensor,
    llm_to_slm: Tensor | None = None,
) -> Tensor:
    """Fused log-probabilities ``(B, V_S)`` float32: :func:`mix` of :func:`align`. Arguments as
    validated by ``logitfuse.fuse``: ``alpha``, ``slm_temperature`` and ``llm_temperature`` are
    float32 ``(B,)`` tensors; ``llm_to_slm`` as in :func:`llm_logprobs_on_slm_vocab`."""
    aligned = align(slm_logits, llm, slm_to_llm, v_llm=v_llm, tail=tail, slm_temperature=slm_temperature,
                    llm_temperature=llm_temperature, llm_to_slm=llm_to_slm)
    return mix(aligned, alpha, mode=mode)


def sampling_mask(probs: Tensor, top_k: Tensor, top_p: Tensor, filters: tuple[bool, bool] | None = None) -> Tensor:
    """Which tokens survive top-k then top-p, ``(B, V)`` bool. ``filters``: whether top-k and top-p are on
    in any row, where the caller knows it on the host (else it is read from ``top_k`` and ``top_p``).

    - ``top_k[b] > 0`` keeps tokens whose probability is at least the k-th largest (ties kept);
    - then, over the renormalized survivors, ``top_p[b] < 1`` keeps the smallest set whose mass
      reaches ``top_p``: with survivors sorted by probability, the threshold ``τ`` is the probability
      of the first one at which the running mass reaches ``top_p``, and every token with
      probability ``>= τ`` is kept (ties at ``τ`` are all kept).
    """
    vocab = probs.shape[-1]
    keep = probs > 0
    k = top_k.clamp(min=0, max=vocab)
    any_top_k, any_top_p = filters if filters is not None else (bool((k > 0).any()), bool((top_p < 1).any()))
    if any_top_k:
        kth = probs.sort(dim=-1, descending=True).values.gather(1, (k.clamp(min=1) - 1)[:, None])
        keep = keep & ((k[:, None] == 0) | (probs >= kth))
    if any_top_p:
        kept = torch.where(keep, probs, 0.0)
        kept = kept / kept.sum(dim=-1, keepdim=True)
        sorted_probs = kept.sort(dim=-1, descending=True).values
        reached = sorted_probs.cumsum(dim=-1) >= top_p[:, None] - TOP_P_TOLERANCE
        # first sorted position where the running mass reaches p (the last one if rounding never does)
        first = torch.where(reached.any(dim=-1), reached.float().argmax(dim=-1), vocab - 1)
        tau = sorted_probs.gather(1, first[:, None])
        keep = keep & ((top_p[:, None] >= 1) | (kept >= tau))
    return keep


def sampling_weights(logprobs: Tensor, *, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                     filters: tuple[bool, bool] | None = None) -> Tensor:
    """The distribution :func:`sample_from_logprobs` draws from, ``(B, V)``, unnormalized: the
    probabilities at ``temperature`` (1 in greedy rows) with the tokens top-k and top-p remove at 0
    (``filters`` as in :func:`sampling_mask`)."""
    scaled = logprobs / torch.where(temperature == 0, 1.0, temperature)[:, None]
    probs = torch.softmax(scaled, dim=-1)
    return torch.where(sampling_mask(probs, top_k, top_p, filters), probs, 0.0)


def sample_from_logprobs(
    logprobs: Tensor, uniform: Tensor, *, temperature: Tensor, top_k: Tensor, top_p: Tensor,
    filters: tuple[bool, bool] | None = None,
) -> Tensor:
    """Draw one token per row from ``logprobs`` ``(B, V)`` with temperature, top-k and top-p.

    ``uniform`` ``(B,)`` holds one U[0, 1) draw per row; the token is found by inverse CDF in
    vocabulary order over the surviving tokens (no sort of the distribution is needed for the draw
    itself). ``temperature[b] == 0`` means greedy (argmax) for that row. ``filters``: as in
    :func:`sampling_mask` (no device read when given).
    """
    greedy = temperature == 0
    weights = sampling_weights(logprobs, temperature=temperature, top_k=top_k, top_p=top_p, filters=filters)
    cdf = weights.cumsum(dim=-1)
    target = uniform.float()[:, None] * cdf[:, -1:]
    # first index whose cdf exceeds the target; rounding at u -> 1 falls back to the last survivor
    last_kept = (weights > 0).cumsum(dim=-1).argmax(dim=-1)
    drawn = torch.minimum((cdf <= target).sum(dim=-1), last_kept)
    return torch.where(greedy, logprobs.argmax(dim=-1), drawn)


def fuse_sample_reference(
    slm_logits: Tensor,
    llm: Tensor | TopK,
    slm_to_llm: Tensor,
    alpha: Tensor,
    uniform: Tensor,
    *,
    v_llm: int,
    mode: str,
    tail: str,
    slm_temperature: Tensor,
    llm_temperature: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    llm_to_slm: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample from the fused distribution: ``(ids (B,) int64, fused logprob of each id (B,))``."""
    fused = fuse_reference(
        slm_logits, llm, slm_to_llm, alpha, v_llm=v_llm, mode=mode, tail=tail,
        slm_temperature=slm_temperature, llm_temperature=llm_temperature, llm_to_slm=llm_to_slm,
    )
    ids = sample_from_logprobs(fused, uniform, temperature=temperature, top_k=top_k, top_p=top_p)
    return ids, fused.gather(1, ids[:, None]).squeeze(1)


def fused_cross_entropy_reference(
    slm_logits: Tensor,
    llm: Tensor | TopK,
    slm_to_llm: Tensor,
    alpha: Tensor,
    targets: Tensor,
    *,
    v_llm: int,
    mode: str,
    tail: str,
    slm_temperature: Tensor,
    llm_temperature: Tensor,
    ignore_index: int,
    llm_to_slm: Tensor | None = None,
) -> Tensor:
    """Per-token ``-log p_fused(target)`` ``(N,)``, differentiable in ``alpha`` through autograd.
    Rows whose target is ``ignore_index`` get loss 0."""
    fused = fuse_reference(
        slm_logits, llm, slm_to_llm, alpha, v_llm=v_llm, mode=mode, tail=tail,
        slm_temperature=slm_temperature, llm_temperature=llm_temperature, llm_to_slm=llm_to_slm,
    )
    ignored = targets == ignore_index
    picked = fused.gather(1, torch.where(ignored, 0, targets)[:, None]).squeeze(1)
    return torch.where(ignored, 0.0, -picked)


def row_stats_reference(logits: Tensor, k: int) -> RowStats:
    """Log-sum-exp, max log-probability, entropy (nats) and the top ``k`` log-probabilities and
    ids of each row of ``logits`` ``(B, V)``; ``k`` is capped at ``V``. The first id is the argmax's
    first index among ties (as the kernel's), so that a head's argmax features do not depend on
    how ``torch.topk`` orders ties."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    logprobs = logits - lse[:, None]
    probs = logprobs.exp()
    entropy = -torch.where(probs > 0, probs * logprobs, 0.0).sum(dim=-1)
    top = logprobs.topk(min(k, logits.shape[-1]), dim=-1)
    # put the first maximal index in front: swap it with whatever topk put there (values are equal)
    first = logprobs.argmax(dim=-1, keepdim=True)
    ids = torch.where(top.indices == first, top.indices[:, :1], top.indices)
    ids[:, :1] = first
    return RowStats(lse, top.values[:, 0], entropy, top.values, ids)


def feature_stats(lp_slm: Tensor, lp_llm: Tensor, k: int) -> FeatureStats:
    """:class:`~logitfuse.types.FeatureStats` of two distributions over the SLM vocabulary ``(B, V_S)``."""
    slm, llm = row_stats_reference(lp_slm, k), row_stats_reference(lp_llm, k)
    return FeatureStats(slm, llm, lp_llm.gather(1, slm.topk_ids[:, :1]).squeeze(1),
                        lp_slm.gather(1, llm.topk_ids[:, :1]).squeeze(1))


def fusion_feature_stats_reference(
    slm_logits: Tensor,
    llm: Tensor | TopK,
    slm_to_llm: Tensor,
    *,
    v_llm: int,
    tail: str,
    k: int,
    llm_to_slm: Tensor | None = None,
) -> FeatureStats:
    """:func:`feature_stats` of the step's two distributions at temperature 1 (what a fusion head
    reads); arguments as for :func:`align`."""
    ones = torch.ones(slm_logits.shape[0], device=slm_logits.device)
    aligned = align(slm_logits, llm, slm_to_llm, v_llm=v_llm, tail=tail, slm_temperature=ones,
                    llm_temperature=ones, llm_to_slm=llm_to_slm)
    return feature_stats(aligned.slm_logprobs, aligned.llm_logprobs, k)


def features_from_stats(stats: FeatureStats, k: int) -> Tensor:
    """The head's feature matrix ``(B, 2·(2+k) + 3)`` float32 from :class:`~logitfuse.types.FeatureStats`.

    Per model: entropy, max log-probability, top-k log-probabilities. Then: whether the argmaxes
    agree, ``log p_L(argmax_S)`` and ``log p_S(argmax_L)`` (cross-probabilities, in log space).
    Log-probabilities are floored at -50 so that a masked token gives a finite feature.
    """
    floor = -50.0
    parts = []
    for side in (stats.slm, stats.llm):
        top = side.topk_logprobs.clamp(min=floor)
        if top.shape[-1] < k:  # a vocabulary smaller than k: pad with the floor
            top = torch.nn.functional.pad(top, (0, k - top.shape[-1]), value=floor)
        parts += [side.entropy[:, None], side.max_logprob.clamp(min=floor)[:, None], top]
    parts += [
        (stats.slm.topk_ids[:, :1] == stats.llm.topk_ids[:, :1]).float(),
        stats.llm_at_slm_argmax.clamp(min=floor)[:, None],
        stats.slm_at_llm_argmax.clamp(min=floor)[:, None],
    ]
    return torch.cat(parts, dim=-1)


def fusion_features(lp_slm: Tensor, lp_llm: Tensor, k: int) -> Tensor:
    """Features of the two distributions over the SLM vocabulary, ``(B, 2·(2+k) + 3)`` float32
    (:func:`features_from_stats` of :func:`feature_stats`)."""
    return features_from_stats(feature_stats(lp_slm, lp_llm, k), k)


def num_fusion_features(k: int) -> int:
    """Width of :func:`fusion_features` for top-``k`` features."""
    return 2 * (2 + k) + 3
