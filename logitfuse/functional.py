"""Public fusion functions: check the arguments once, then dispatch.

The choice "kernel or reference" is made here and only here (:func:`ops_for`): CPU tensors go to
the torch reference (:mod:`logitfuse.reference`); CUDA tensors go to the Triton kernels in
:mod:`logitfuse.kernels` when Triton is importable, except for maps that aggregate LLM tokens and
for an ``alpha`` that needs a gradient through :func:`fuse` (the kernel does not differentiate).
Nothing here touches a device at import time.

One fused step with a head (:func:`fuse_with_head`) aligns once: :func:`align` gives both
distributions on the SLM vocabulary (:class:`~logitfuse.types.Aligned`), the head reads its α from
that view and :func:`logitfuse.reference.mix` mixes the same view. On the kernel path no ``(B, V)``
pulled-back LLM tensor is made: a :class:`~logitfuse.FusionHead` gets its per-row features from the
``fusion_feature_stats`` kernel and the fuse kernel gathers the LLM side itself (see
:func:`fuse_with_head`).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from logitfuse import reference
from logitfuse.arguments import (
    check_head_argument,
    check_logits,
    check_sampling_temperature,
    check_top_k,
    per_row,
    prepare_arguments,
)
from logitfuse.types import Aligned, FeatureStats, RowStats, TopK
from logitfuse.vocab import VocabMap

Tensor = torch.Tensor
#: the torch implementations, with the same signatures as ``logitfuse.kernels.OPS``
REFERENCE_OPS = SimpleNamespace(
    fuse=reference.fuse_reference,
    fuse_sample=reference.fuse_sample_reference,
    fused_cross_entropy=reference.fused_cross_entropy_reference,
    row_stats=reference.row_stats_reference,
    fusion_feature_stats=reference.fusion_feature_stats_reference,
)


def ops_for(args: dict, *, alpha_grad: bool = False) -> SimpleNamespace:
    """The implementation for ``args`` (as :func:`logitfuse.arguments.prepare_arguments` returns them):
    ``logitfuse.kernels.OPS`` for CUDA tensors when Triton is importable, :data:`REFERENCE_OPS`
    elsewhere, for maps that aggregate LLM tokens (``llm_to_slm``, which the kernels do not do yet),
    and when ``alpha_grad`` (the caller needs autograd through the result in α)."""
    if args["slm_logits"].device.type == "cuda" and "llm_to_slm" not in args and not alpha_grad:
        from logitfuse import kernels

        if kernels.available():
            return kernels.OPS
    return REFERENCE_OPS


# ---------------------------------------------------------------------------------- public API
def fuse(
    slm_logits: Tensor,
    llm: Tensor | TopK,
    *,
    alpha: float | Tensor,
    vocab_map: VocabMap | None = None,
    mode: str = "linear",
    tail: str = "slm",
    slm_temperature: float | Tensor = 1.0,
    llm_temperature: float | Tensor = 1.0,
    validate: bool = True,
) -> Tensor:
    """Fuse the SLM's and the LLM's next-token distributions into log-probabilities over the SLM vocabulary.

    Parameters
    ----------
    slm_logits : torch.Tensor
        ``(batch_size, v_slm)`` logits of the on-device model (float32, bfloat16 or float16).
    llm : torch.Tensor or logitfuse.TopK
        ``(batch_size, v_llm)`` dense logits of the LLM, or its top-k ``TopK(ids, logprobs)``,
        each ``(batch_size, k)``, as a cloud API returns them.
    alpha : float or torch.Tensor
        Weight of the SLM in ``[0, 1]``, one for all rows or ``(batch_size,)``; 1 means SLM only.
    vocab_map : logitfuse.VocabMap, optional
        SLM id -> LLM id. Default: the identity, for two models with one tokenizer and the same
        vocabulary size. When the sizes differ there is no default (``ValueError``): pass
        ``VocabMap.identity(v_slm, v_llm)`` if only the padding differs, else
        ``VocabMap.from_tokenizers``.
    mode : {"linear", "geometric", "logit"}
        Mixture of probabilities (default), product of experts, or the paper's raw-logit mix.
    tail : {"slm", "uniform", "zero"}
        Where the LLM's unreported mass goes (see :mod:`logitfuse.reference`).
    slm_temperature, llm_temperature : float or torch.Tensor
        Per-model temperatures, applied to the logits before mixing (``> 0``).
    validate : bool
        Check values (NaN, ranges, duplicate ids), which syncs with the device; shapes, dtypes and
        devices are always checked. Inputs with no meaningful fused distribution raise
        ``ValueError`` here, whatever ``alpha`` (it often comes from a head, so whether a side
        "matters" changes from step to step): a row of ``slm_logits`` or of dense ``llm`` that is all
        ``-inf`` (no token possible), float64 logits beyond float32's range, and a temperature so
        small (or infinite) that ``logits / temperature`` overflows float32. With
        ``validate=False`` such inputs give NaN rows.

    Returns
    -------
    torch.Tensor
        ``(batch_size, v_slm)`` float32 fused log-probabilities (each row's logsumexp is 0). At
        ``alpha = 1`` they equal the SLM's log-probabilities exactly, at ``alpha = 0`` the LLM's
        (pulled back and renormalized): linear mode mixes in log space, so a token far below the
        other side's (``-120`` nats) keeps its value instead of underflowing to ``-inf``. On CUDA
        the Triton kernel computes it, except when ``alpha`` requires grad: then the reference
        does, so the result stays differentiable in α (to train a head, prefer
        :func:`fused_cross_entropy`, whose kernel gives the α-gradient without an ``(N, V)`` tensor).

    Example
    -------
    >>> import torch, logitfuse
    >>> slm, llm = torch.randn(2, 10), torch.randn(2, 10)
    >>> fused = logitfuse.fuse(slm, llm, alpha=0.25)
    >>> torch.allclose(fused.logsumexp(-1), torch.zeros(2), atol=1e-5)
    True
    """
    args = prepare_arguments(slm_logits, llm, vocab_map, alpha, mode, tail, slm_temperature, llm_temperature, validate)
    fused = ops_for(args, alpha_grad=torch.is_grad_enabled() and args["alpha"].requires_grad).fuse(**args)
    if validate:
        check_fused_rows(args, torch.isnan(fused.detach()).any(dim=1), "fuse")
    return fused


def align(
    slm_logits: Tensor,
    llm: Tensor | TopK,
    *,
    vocab_map: VocabMap | None = None,
    tail: str = "slm",
    slm_temperature: float | Tensor = 1.0,
    llm_temperature: float | Tensor = 1.0,
    validate: bool = True,
) -> Aligned:
    """One step's two next-token distributions on the SLM vocabulary, computed once.

    Arguments and checks as in :func:`fuse` (``alpha`` and ``mode`` do not enter: they act in the
    mix). Returns an :class:`~logitfuse.types.Aligned`: the SLM's float32 log-probabilities at
    ``slm_temperature`` and its log-sum-exp, the LLM's log-probabilities pulled back onto the SLM
    vocabulary through ``vocab_map`` (the ``tail`` rule for tokens a top-k did not report) and its
    log-sum-exp. A fusion head reads its α from it (``head.alpha_from_aligned``) and
    :func:`logitfuse.reference.mix` mixes it; :func:`fuse_with_head` does both from one view.

    Always computed in torch (on the tensors' device): the view is ``(batch_size, v_slm)`` by
    definition. The CUDA kernels never build it; they gather the LLM side block by block.

    Example
    -------
    >>> import torch, logitfuse
    >>> slm, llm = torch.randn(2, 10), torch.randn(2, 10)
    >>> view = logitfuse.align(slm, llm)
    >>> torch.equal(logitfuse.reference.mix(view, torch.full((2,), 0.25), mode="linear"),
    ...             logitfuse.fuse(slm, llm, alpha=0.25))
    True
    """
    args = prepare_arguments(slm_logits, llm, vocab_map, 1.0, "linear", tail, slm_temperature, llm_temperature, validate)
    return _align(args)


def _align(args: dict) -> Aligned:
    """:func:`logitfuse.reference.align` of prepared arguments."""
    return reference.align(args["slm_logits"], args["llm"], args["slm_to_llm"], v_llm=args["v_llm"], tail=args["tail"],
                           slm_temperature=args["slm_temperature"], llm_temperature=args["llm_temperature"],
                           llm_to_slm=args.get("llm_to_slm"))


def fusion_feature_stats(slm_logits: Tensor, llm: Tensor | TopK, *, vocab_map: VocabMap | None = None,
                         tail: str = "slm", k: int = 4, validate: bool = True) -> FeatureStats:
    """Per-row statistics of both distributions on the SLM vocabulary at temperature 1, what a
    :class:`~logitfuse.FusionHead`'s features are made of (:class:`~logitfuse.types.FeatureStats`).

    On CUDA the ``fusion_feature_stats`` kernel streams the pulled-back LLM side block by block, so
    no ``(batch_size, v_slm)`` LLM tensor is made; elsewhere the reference computes them from
    :func:`align`.
    """
    args = prepare_arguments(slm_logits, llm, vocab_map, 1.0, "linear", tail, 1.0, 1.0, validate)
    for unused in ("alpha", "mode", "slm_temperature", "llm_temperature"):
        del args[unused]
    return ops_for(args).fusion_feature_stats(**args, k=k)


def fuse_with_head(
    slm_logits: Tensor,
    llm: Tensor | TopK,
    head,
    *,
    vocab_map: VocabMap | None = None,
    mode: str = "linear",
    tail: str = "slm",
    slm_temperature: float | Tensor = 1.0,
    llm_temperature: float | Tensor = 1.0,
    validate: bool = True,
    slm_hidden: Tensor | None = None,
    last_tokens: Any = None,
    positions: Any = None,
    check_finite: bool = True,
) -> tuple[Tensor, Tensor]:
    """``(alpha, fused)``: the fusion head's α for these logits, and :func:`fuse` with that α.
    ``slm_hidden``, ``last_tokens``, ``positions``: the SLM-side inputs of a head that reads them
    (``head.reads_slm_side``; as for :meth:`logitfuse.FusionHead.forward`). ``check_finite=False``: the
    head does not check (by a device read) that α is finite; the caller does.

    Bit for bit the same as ``alpha = head(slm_logits, llm, vocab_map)`` then
    ``fuse(..., alpha=alpha)``, with the step aligned once:

    - on the torch reference (CPU tensors, or a map across tokenizers), :func:`align` builds the
      view, ``head.alpha_from_aligned`` reads α from it and :func:`logitfuse.reference.mix` mixes
      the same view. A head reads the distributions at temperature 1 with its own tail rule: where
      ``tail`` or a temperature differs, the head gets its own view (two alignments, as asked);
    - on the CUDA kernels, no ``(batch_size, v_slm)`` pulled-back LLM tensor is made for a
      :class:`~logitfuse.FusionHead`: its per-row features come from the ``fusion_feature_stats``
      kernel, then the fuse kernel mixes. A head whose input is the whole pulled-back vector
      (:class:`~logitfuse.PaperFusionHead`) gets one :func:`align`, which the reference mix then
      reuses instead of having the kernel gather the LLM side again.

    Example
    -------
    >>> import torch, logitfuse
    >>> slm, llm, head = torch.randn(2, 10), torch.randn(2, 10), logitfuse.FusionHead(10, 10)
    >>> alpha, fused = logitfuse.fuse_with_head(slm, llm, head)
    >>> torch.equal(fused, logitfuse.fuse(slm, llm, alpha=head(slm, llm)))
    True
    """
    check_head_argument(head)
    args = prepare_arguments(slm_logits, llm, vocab_map, 1.0, mode, tail, slm_temperature, llm_temperature, validate)
    head.check_vocab_sizes(args["slm_logits"].shape[1], args["v_llm"])
    side = dict(slm_hidden=slm_hidden, last_tokens=last_tokens, positions=positions) \
        if head.reads_slm_side else {}
    if not check_finite:  # passed only when asked: a head of one's own need not take it otherwise
        side["check_finite"] = False
    ops = ops_for(args)
    if ops is not REFERENCE_OPS and not head.needs_aligned_view:
        # per-row statistics from a kernel (no (B, V) LLM tensor), at temperature 1 with the head's tail,
        # computed here once and handed to the head: it calls nothing back
        stats_args = {key: value for key, value in args.items()
                      if key not in ("alpha", "mode", "slm_temperature", "llm_temperature")} | {"tail": head.tail}
        alpha = head.alpha_from_stats(ops.fusion_feature_stats(**stats_args, k=head.stats_top_k), **side)
        batch, device = args["slm_logits"].shape[0], args["slm_logits"].device
        args["alpha"] = per_row("alpha", alpha, batch, device, low=0.0, high=1.0, validate=validate)
        fused = ops_for(args, alpha_grad=torch.is_grad_enabled() and args["alpha"].requires_grad).fuse(**args)
    else:
        aligned = _align(args)
        same_view = head.tail == tail and _is_one(slm_temperature) and _is_one(llm_temperature)
        alpha = head.alpha_from_aligned(aligned if same_view else head.aligned(slm_logits, llm, vocab_map), **side)
        fused = reference.mix(aligned, alpha, mode=mode)
    if validate:
        check_fused_rows(dict(args, alpha=alpha.detach().float().expand(fused.shape[0])),
                         torch.isnan(fused.detach()).any(dim=1), "fuse_with_head")
    return alpha, fused


def check_fused_rows(args: dict, empty: Tensor, where: str) -> None:
    """``ValueError`` when ``empty`` (a ``(batch_size,)`` bool tensor: rows whose fused result is NaN)
    has a row: the two distributions of that row leave no token with a fused probability (``args`` as
    :func:`logitfuse.arguments.prepare_arguments` returns them, for the explanation). One device read;
    the public functions call it only with ``validate=True``, never on the decoding hot path."""
    if not bool(empty.any()):
        return
    rows = empty.nonzero().flatten().tolist()
    view = _align({key: value[rows] if isinstance(value, Tensor) and key in _PER_ROW else value
                   for key, value in args.items()} | {"llm": _rows_of(args["llm"], rows)})
    llm_nothing = ~torch.isfinite(view.llm_logprobs).any(dim=1)
    alpha = args["alpha"][rows].tolist()
    shown = ", ".join(f"{row} (alpha={a:.3g})" for row, a in zip(rows[:8], alpha)) + (" ..." if len(rows) > 8 else "")
    if bool(llm_nothing.all()):
        why = ("the LLM gives no probability to any SLM token: all of its mass is on LLM ids that vocab_map maps to "
               "no SLM token (or that its top-k tail cannot reach)")
        fix = ("give the SLM weight (alpha > 0 with mode='linear'), or build a vocab_map that covers those LLM tokens "
               "(VocabMap.from_tokenizers)")
    else:
        why = (f"no token has probability under both the SLM and the LLM (pulled back through vocab_map), so "
               f"mode={args['mode']!r}, a product of the two, gives every token probability 0 at 0 < alpha < 1"
               if args["mode"] != "linear" else "the two distributions share no token")
        fix = ("use mode='linear' (a mixture keeps either side's tokens), alpha=1 (the SLM alone) or alpha=0 (the LLM "
               "alone) for those rows, or leave unmasked a token that both sides allow")
    raise ValueError(f"{where}: no fused distribution in row(s) {shown}, mode={args['mode']!r}: {why}. To fix: {fix}")


#: prepared arguments with one entry per row
_PER_ROW = ("slm_logits", "alpha", "slm_temperature", "llm_temperature")


def _rows_of(llm: Tensor | TopK, rows: list[int]) -> Tensor | TopK:
    return TopK(llm.ids[rows], llm.logprobs[rows]) if isinstance(llm, TopK) else llm[rows]


def _is_one(temperature: float | Tensor) -> bool:
    """Whether a temperature argument is 1 in every row (a float needs no device read)."""
    if isinstance(temperature, Tensor):
        return bool((temperature == 1).all())
    return temperature == 1


def fuse_sample(
    slm_logits: Tensor,
    llm: Tensor | TopK,
    *,
    alpha: float | Tensor,
    vocab_map: VocabMap | None = None,
    mode: str = "linear",
    tail: str = "slm",
    temperature: float | Tensor = 1.0,
    top_k: int | Tensor = 0,
    top_p: float | Tensor = 1.0,
    generator: torch.Generator | None = None,
    slm_temperature: float | Tensor = 1.0,
    llm_temperature: float | Tensor = 1.0,
    return_logprobs: bool = False,
    validate: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Draw one token per row from the fused distribution (same arguments as :func:`fuse`).

    ``temperature`` (0 = greedy), ``top_k`` (0 = off) and ``top_p`` (1 = off) act on the fused
    distribution in that order; each is a number or a ``(batch_size,)`` tensor. A positive
    ``temperature`` so small that the fused log-probabilities divided by it overflow float32
    (below about ``2·log(v_slm) / 3.4e38``) or an infinite one is a ``ValueError``; use 0 for greedy. The same
    ``generator`` state gives the same tokens.

    Returns ``(batch_size,)`` int64 token ids in the SLM vocabulary, and with
    ``return_logprobs=True`` also their fused log-probabilities (before temperature and filtering).

    Example
    -------
    >>> import torch, logitfuse
    >>> g = torch.Generator().manual_seed(0)
    >>> ids = logitfuse.fuse_sample(torch.randn(3, 50), torch.randn(3, 50), alpha=0.5, top_p=0.9, generator=g)
    >>> ids.shape
    torch.Size([3])
    """
    args = prepare_arguments(slm_logits, llm, vocab_map, alpha, mode, tail, slm_temperature, llm_temperature, validate)
    logits = args["slm_logits"]
    batch, device = logits.shape[0], logits.device
    args["temperature"] = per_row("temperature", temperature, batch, device, low=0.0, high=float("inf"), validate=validate)
    if validate:
        check_sampling_temperature(args["temperature"], logits.shape[1])
    args["top_p"] = per_row("top_p", top_p, batch, device, low=0.0, high=1.0, low_open=True, validate=validate)
    args["top_k"] = check_top_k(top_k, batch, device, validate)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    draw_on = generator.device if generator is not None else device
    args["uniform"] = torch.rand(batch, generator=generator, device=draw_on).to(device)
    ids, logprobs = ops_for(args).fuse_sample(**args)
    if validate:
        check_fused_rows(args, torch.isnan(logprobs), "fuse_sample")
    return (ids, logprobs) if return_logprobs else ids


def fused_cross_entropy(
    slm_logits: Tensor,
    llm: Tensor | TopK,
    targets: Tensor,
    *,
    alpha: float | Tensor,
    vocab_map: VocabMap | None = None,
    mode: str = "linear",
    tail: str = "slm",
    slm_temperature: float | Tensor = 1.0,
    llm_temperature: float | Tensor = 1.0,
    ignore_index: int = -100,
    validate: bool = True,
) -> Tensor:
    """Per-token negative log-likelihood of ``targets`` under the fused distribution, ``(N,)`` float32.

    Differentiable in ``alpha`` (a float or an ``(N,)`` tensor, e.g. a fusion head's output), so a
    head trains through it. Rows whose target equals ``ignore_index`` get loss 0.

    Example
    -------
    >>> import torch, logitfuse
    >>> alpha = torch.full((4,), 0.5, requires_grad=True)
    >>> loss = logitfuse.fused_cross_entropy(torch.randn(4, 9), torch.randn(4, 9), torch.tensor([1, 2, 3, -100]), alpha=alpha)
    >>> loss.sum().backward(); alpha.grad.shape
    torch.Size([4])
    """
    args = prepare_arguments(slm_logits, llm, vocab_map, alpha, mode, tail, slm_temperature, llm_temperature, validate)
    logits = args["slm_logits"]
    if not isinstance(targets, Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError("targets must be an integer tensor of shape (N,)")
    if targets.shape != (logits.shape[0],):
        raise ValueError(f"targets must have shape ({logits.shape[0]},) to match slm_logits, got {tuple(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"targets is on {targets.device} but slm_logits is on {logits.device}")
    targets = targets.long()
    if validate:
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= logits.shape[1]))
        if bool(bad.any()):
            raise ValueError(
                f"targets holds ids outside [0, {logits.shape[1]}) that are not ignore_index={ignore_index}: "
                f"{targets[bad][:5].tolist()}"
            )
    loss = ops_for(args).fused_cross_entropy(**args, targets=targets, ignore_index=ignore_index)
    if validate:
        check_fused_rows(args, torch.isnan(loss.detach()) & (targets != ignore_index), "fused_cross_entropy")
    return loss


def row_stats(logits: Tensor, k: int = 4) -> RowStats:
    """Per-row log-sum-exp, max log-probability, entropy and top-``k`` log-probabilities and ids.

    Example
    -------
    >>> import torch, logitfuse
    >>> stats = logitfuse.row_stats(torch.zeros(1, 4), k=2)
    >>> round(stats.entropy.item(), 4)   # uniform over 4 tokens: log 4
    1.3863
    """
    logits = check_logits("logits", logits, validate=True)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return ops_for({"slm_logits": logits}).row_stats(logits, k)


def keep_banned(fused: Tensor, slm_logits: Tensor) -> Tensor:
    """``fused`` log-probabilities (owned: changed in place) with every token the engine banned in ``slm_logits``
    (``-inf``: bad words, min_new_tokens' EOS...) at ``-inf`` too, even where the LLM gave it mass,
    and the rows that had such a token renormalized; other rows are left exactly as they were. No
    device read: the renormalizer is subtracted (0 in rows with nothing banned) instead of asked for."""
    banned = slm_logits == float("-inf")
    fused.masked_fill_(banned, float("-inf"))
    return fused.sub_(torch.where(banned.any(dim=-1, keepdim=True), fused.logsumexp(dim=-1, keepdim=True), 0.0))
