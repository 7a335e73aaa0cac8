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

import math
from types import SimpleNamespace

import torch

from logitfuse import reference
from logitfuse.types import MODES, TAILS, Aligned, FeatureStats, RowStats, TopK
from logitfuse.vocab import VocabMap, identity_map

Tensor = torch.Tensor
#: the largest float32: the fusion computes in float32, so larger inputs (or quotients) overflow to inf
FLOAT32_MAX = torch.finfo(torch.float32).max
#: the torch implementations, with the same signatures as ``logitfuse.kernels.OPS``
REFERENCE_OPS = SimpleNamespace(
    fuse=reference.fuse_reference,
    fuse_sample=reference.fuse_sample_reference,
    fused_cross_entropy=reference.fused_cross_entropy_reference,
    row_stats=reference.row_stats_reference,
    fusion_feature_stats=reference.fusion_feature_stats_reference,
)


def ops_for(args: dict, *, alpha_grad: bool = False) -> SimpleNamespace:
    """The implementation for ``args`` (as :func:`prepare_arguments` returns them):
    ``logitfuse.kernels.OPS`` for CUDA tensors when Triton is importable, :data:`REFERENCE_OPS`
    elsewhere, for maps that aggregate LLM tokens (``llm_to_slm``, which the kernels do not do yet),
    and when ``alpha_grad`` (the caller needs autograd through the result in α)."""
    if args["slm_logits"].device.type == "cuda" and "llm_to_slm" not in args and not alpha_grad:
        from logitfuse import kernels

        if kernels.available():
            return kernels.OPS
    return REFERENCE_OPS


# ---------------------------------------------------------------------------------- validation
def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(repr(c) for c in choices)}")


def _check_logits(name: str, logits: object, validate: bool) -> Tensor:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch_size, vocab_size), got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{name} must have shape (batch_size, vocab_size), got {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor (float32, bfloat16 or float16), got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension: shape {tuple(logits.shape)}")
    if validate:
        if bool((torch.isnan(logits) | torch.isposinf(logits)).any()):
            raise ValueError(f"{name} contains NaN or +inf; -inf is allowed for masked tokens, NaN and +inf are not")
        # only float64 can hold finite values that float32 cannot
        if logits.dtype == torch.float64 and bool(((logits.abs() > FLOAT32_MAX) & torch.isfinite(logits)).any()):
            raise ValueError(
                f"{name} holds values beyond float32's range (|x| > {FLOAT32_MAX:.4g}), which the float32 fusion "
                "would turn into ±inf; subtract each row's max (a log-softmax does not change) and pass float32"
            )
        dead = torch.isneginf(logits).all(dim=1)
        if bool(dead.any()):
            raise ValueError(
                f"{name} row {int(dead.nonzero()[0])} is all -inf: no token is possible; "
                "leave at least one token unmasked in every row"
            )
    return logits


def _check_scaled(name: str, logits: Tensor, temperature_name: str, temperature: Tensor) -> None:
    """``logits / temperature`` must not overflow float32 (a tiny temperature, or an infinite one,
    would give ``inf - inf`` or ``-inf / inf``: NaN). Validate path only: it reads the logits."""
    bad = ~torch.isfinite(temperature)
    if bool(bad.any()):
        raise ValueError(f"{temperature_name} must be finite, got {temperature[bad][0].item()!r}")
    largest = torch.where(torch.isfinite(logits), logits.abs(), 0).amax(dim=1).float()
    bad = torch.isinf(largest / temperature)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"{temperature_name}={temperature[row].item():.3g} is too small: {name} / {temperature_name} overflows "
            f"float32 (row {row}, largest |logit| {largest[row].item():.4g}); use at least "
            f"{temperature_name}={largest[row].item() / FLOAT32_MAX:.3g} (for greedy decoding, fuse_sample's temperature=0)"
        )


def _check_topk(topk: TopK, batch: int, v_llm: int, validate: bool) -> TopK:
    ids, logprobs = topk
    if not isinstance(ids, Tensor) or not isinstance(logprobs, Tensor):
        raise TypeError("llm=TopK(ids, logprobs) needs two tensors")
    if ids.dim() != 2 or ids.shape != logprobs.shape:
        raise ValueError(
            f"llm.ids and llm.logprobs must both have shape (batch_size, k), got {tuple(ids.shape)} and {tuple(logprobs.shape)}"
        )
    if ids.shape[0] != batch:
        raise ValueError(f"llm has batch size {ids.shape[0]} but slm_logits has {batch}; pass one row per sequence")
    if ids.shape[1] == 0:
        raise ValueError("llm is an empty top-k (k = 0); pass at least one (id, logprob) per row, or use alpha=1")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"llm.ids must be an integer tensor, got {ids.dtype}")
    if not logprobs.dtype.is_floating_point:
        raise TypeError(f"llm.logprobs must be a float tensor, got {logprobs.dtype}")
    ids = ids.long()
    if validate:
        if bool(((ids < 0) | (ids >= v_llm)).any()):
            raise ValueError(
                f"llm.ids holds ids outside [0, {v_llm}) (min {int(ids.min())}, max {int(ids.max())}); "
                "pass vocab_map= for the LLM's vocabulary"
            )
        if ids.shape[1] > 1 and bool((ids.sort(dim=-1).values.diff(dim=-1) == 0).any()):
            raise ValueError("llm.ids repeats an id within a row; each top-k id must appear once per row")
        if bool((torch.isnan(logprobs) | (logprobs > 1e-4)).any()):
            raise ValueError("llm.logprobs must be log-probabilities (<= 0, no NaN)")
        if bool((logprobs.float().exp().sum(dim=-1) > 1.001).any()):
            raise ValueError("llm.logprobs sum to more than probability 1 in some row; pass log-probabilities, not logits")
    return TopK(ids.contiguous(), logprobs.contiguous())


def _per_row(name: str, value: float | Tensor, batch: int, device: torch.device, *, low: float, high: float,
             low_open: bool = False, validate: bool = True) -> Tensor:
    """A float or a ``(batch_size,)`` / scalar tensor, as a float32 ``(batch_size,)`` tensor (graph kept)."""
    if isinstance(value, Tensor):
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
            raise ValueError(f"{name} must be a float or a tensor of shape ({batch},), got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the logits are on {device}; move it with .to({str(device)!r})")
        row = value.float().expand(batch)
        check = row.detach()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        check = row = torch.full((batch,), float(value), device=device)
    else:
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if validate:
        bad = torch.isnan(check) | (check > high) | ((check <= low) if low_open else (check < low))
        if bool(bad.any()):
            bracket = "(" if low_open else "["
            raise ValueError(f"{name} must lie in {bracket}{low}, {high}], got {check[bad][0].item()!r}")
    return row


def _check_sampling_temperature(temperature: Tensor, v_slm: int) -> None:
    """``fuse_sample``'s ``temperature`` divides fused log-probabilities, the largest of which is at
    least ``-log(v_slm)``: a positive temperature below ``2·max(log v_slm, 1) / FLOAT32_MAX`` could
    send every token to ``-inf`` (NaN probabilities), an infinite one gives ``-inf / inf``."""
    bad = ~torch.isfinite(temperature)
    if bool(bad.any()):
        raise ValueError(f"temperature must be finite, got {temperature[bad][0].item()!r}")
    floor = 2 * max(math.log(v_slm), 1.0) / FLOAT32_MAX
    bad = (temperature > 0) & (temperature < floor)
    if bool(bad.any()):
        raise ValueError(
            f"temperature={temperature[bad][0].item():.3g} is too small: the fused log-probabilities / temperature "
            f"overflow float32; use temperature 0 for greedy, or at least {floor:.3g}"
        )


def prepare_arguments(slm_logits, llm, vocab_map=None, alpha=1.0, mode="linear", tail="slm", slm_temperature=1.0,
                      llm_temperature=1.0, validate=True) -> dict:
    """Check what :func:`fuse` and its siblings share (same arguments and errors) and return the
    keyword arguments of the implementations in :data:`REFERENCE_OPS` / ``logitfuse.kernels.OPS``:
    ``slm_logits``, ``llm``, ``slm_to_llm`` (the map on the logits' device), ``alpha``, ``v_llm``,
    ``mode``, ``tail``, ``slm_temperature``, ``llm_temperature`` (float32 ``(batch_size,)``) and, for
    a map across tokenizers, ``llm_to_slm``. Benchmarks and tests call the implementations with it."""
    slm_logits = _check_logits("slm_logits", slm_logits, validate)
    batch, v_slm = slm_logits.shape
    device = slm_logits.device
    _check_choice("mode", mode, MODES)
    _check_choice("tail", tail, TAILS)
    if vocab_map is not None and not isinstance(vocab_map, VocabMap):
        raise TypeError(f"vocab_map must be a logitfuse.VocabMap or None, got {type(vocab_map).__name__}")
    if isinstance(llm, TopK):
        vocab_map = vocab_map or identity_map(v_slm, v_slm)
        if llm.ids.device != device or llm.logprobs.device != device:
            raise ValueError(f"llm top-k tensors are on {llm.ids.device}/{llm.logprobs.device}, slm_logits on {device}")
        llm = _check_topk(llm, batch, vocab_map.v_llm, validate)
        if llm_temperature != 1.0:
            raise ValueError("llm_temperature applies to dense LLM logits only; ask the server for top-k logprobs at that temperature instead")
    elif isinstance(llm, Tensor):
        llm = _check_logits("llm", llm, validate)
        if llm.shape[0] != batch:
            raise ValueError(f"llm has batch size {llm.shape[0]} but slm_logits has {batch}; pass one row per sequence")
        if llm.device != device:
            raise ValueError(f"llm is on {llm.device} but slm_logits is on {device}; put both on one device")
        if vocab_map is None and llm.shape[1] != v_slm:
            raise ValueError(
                f"slm_logits has vocabulary size {v_slm} but llm has {llm.shape[1]}, and no vocab_map was given: "
                f"token ids mean the same text only within one tokenizer. If both models share a tokenizer and "
                f"only the padding differs, pass vocab_map=VocabMap.identity({v_slm}, {llm.shape[1]}); otherwise "
                "build one with VocabMap.from_tokenizers(slm_tokenizer, llm_tokenizer)"
            )
        vocab_map = vocab_map or identity_map(v_slm, v_slm)
        if llm.shape[1] != vocab_map.v_llm:
            raise ValueError(
                f"llm has vocabulary size {llm.shape[1]} but vocab_map was built for v_llm={vocab_map.v_llm}; "
                "build the map for this LLM (VocabMap.identity or VocabMap.from_tokenizers)"
            )
    else:
        raise TypeError(f"llm must be dense logits (a tensor) or logitfuse.TopK(ids, logprobs), got {type(llm).__name__}")
    if vocab_map.v_slm != v_slm:
        raise ValueError(
            f"slm_logits has vocabulary size {v_slm} but vocab_map was built for v_slm={vocab_map.v_slm}; "
            "build the map for this SLM (VocabMap.identity or VocabMap.from_tokenizers)"
        )
    args = dict(
        slm_logits=slm_logits,
        llm=llm,
        slm_to_llm=vocab_map.on(device),
        alpha=_per_row("alpha", alpha, batch, device, low=0.0, high=1.0, validate=validate),
        v_llm=vocab_map.v_llm,
        mode=mode,
        tail=tail,
        slm_temperature=_per_row("slm_temperature", slm_temperature, batch, device, low=0.0, high=float("inf"), low_open=True, validate=validate),
        llm_temperature=_per_row("llm_temperature", llm_temperature, batch, device, low=0.0, high=float("inf"), low_open=True, validate=validate),
    )
    if validate:
        _check_scaled("slm_logits", slm_logits, "slm_temperature", args["slm_temperature"].detach())
        if isinstance(llm, Tensor):
            _check_scaled("llm", llm, "llm_temperature", args["llm_temperature"].detach())
    if vocab_map.llm_to_slm is not None:  # two tokenizers: LLM tokens hand their mass to SLM prefixes
        args["llm_to_slm"] = vocab_map.on(device, "llm_to_slm")
    return args


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
    return ops_for(args, alpha_grad=torch.is_grad_enabled() and args["alpha"].requires_grad).fuse(**args)


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
) -> tuple[Tensor, Tensor]:
    """``(alpha, fused)``: the fusion head's α for these logits, and :func:`fuse` with that α.

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
    args = prepare_arguments(slm_logits, llm, vocab_map, 1.0, mode, tail, slm_temperature, llm_temperature, validate)
    head.check_vocab_sizes(args["slm_logits"].shape[1], args["v_llm"])
    ops = ops_for(args)
    if ops is not REFERENCE_OPS and not head.needs_aligned_view:
        alpha = head(slm_logits, llm, vocab_map)  # per-row features from a kernel, no (B, V) LLM tensor
        batch, device = args["slm_logits"].shape[0], args["slm_logits"].device
        args["alpha"] = _per_row("alpha", alpha, batch, device, low=0.0, high=1.0, validate=validate)
        return alpha, ops_for(args, alpha_grad=torch.is_grad_enabled() and args["alpha"].requires_grad).fuse(**args)
    aligned = _align(args)
    same_view = head.tail == tail and _is_one(slm_temperature) and _is_one(llm_temperature)
    alpha = head.alpha_from_aligned(aligned if same_view else head.aligned(slm_logits, llm, vocab_map))
    return alpha, reference.mix(aligned, alpha, mode=mode)


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
    args["temperature"] = _per_row("temperature", temperature, batch, device, low=0.0, high=float("inf"), validate=validate)
    if validate:
        _check_sampling_temperature(args["temperature"], logits.shape[1])
    args["top_p"] = _per_row("top_p", top_p, batch, device, low=0.0, high=1.0, low_open=True, validate=validate)
    if isinstance(top_k, Tensor):
        if top_k.dtype.is_floating_point or top_k.numel() not in (1, batch):
            raise ValueError(f"top_k must be an int or an integer tensor of shape ({batch},)")
        args["top_k"] = top_k.to(device, torch.int64).expand(batch)
    elif isinstance(top_k, int) and not isinstance(top_k, bool):
        args["top_k"] = torch.full((batch,), top_k, dtype=torch.int64, device=device)
    else:
        raise TypeError(f"top_k must be an int or an integer tensor, got {type(top_k).__name__}")
    if validate and bool((args["top_k"] < 0).any()):
        raise ValueError("top_k must be >= 0 (0 turns top-k filtering off)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    draw_on = generator.device if generator is not None else device
    args["uniform"] = torch.rand(batch, generator=generator, device=draw_on).to(device)
    ids, logprobs = ops_for(args).fuse_sample(**args)
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
    return ops_for(args).fused_cross_entropy(**args, targets=targets, ignore_index=ignore_index)


def row_stats(logits: Tensor, k: int = 4) -> RowStats:
    """Per-row log-sum-exp, max log-probability, entropy and top-``k`` log-probabilities and ids.

    Example
    -------
    >>> import torch, logitfuse
    >>> stats = logitfuse.row_stats(torch.zeros(1, 4), k=2)
    >>> round(stats.entropy.item(), 4)   # uniform over 4 tokens: log 4
    1.3863
    """
    logits = _check_logits("logits", logits, validate=True)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return ops_for({"slm_logits": logits}).row_stats(logits, k)
