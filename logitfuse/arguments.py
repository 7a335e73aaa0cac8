"""Argument checks shared by the public fusion functions (:mod:`logitfuse.functional`).

:func:`prepare_arguments` checks what ``fuse`` and its siblings share (shapes, dtypes, devices, the
vocabulary map; with ``validate=True`` also values, which reads them from the device) and returns
the keyword arguments of the implementations (:mod:`logitfuse.reference`, ``logitfuse.kernels``).
Every error names the argument and the fix.
"""

from __future__ import annotations

import math

import torch

from logitfuse.config import check_choice
from logitfuse.types import MODES, TAILS, TopK
from logitfuse.vocab import VocabMap, identity_map

Tensor = torch.Tensor
#: the largest float32: the fusion computes in float32, so larger inputs (or quotients) overflow to inf
FLOAT32_MAX = torch.finfo(torch.float32).max


def check_logits(name: str, logits: object, validate: bool) -> Tensor:
    """``logits`` if it is a float ``(batch_size, vocab_size)`` tensor; with ``validate`` also free of
    NaN and +inf, within float32's range, and with a possible token in every row."""
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
        raise TypeError(
            f"llm=TopK(ids, logprobs) needs two tensors of shape (batch_size, k), got {type(ids).__name__} and "
            f"{type(logprobs).__name__}; build it as TopK(torch.tensor(ids), torch.tensor(logprobs))"
        )
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


def per_row(name: str, value: float | Tensor, batch: int, device: torch.device, *, low: float, high: float,
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


def check_sampling_temperature(temperature: Tensor, v_slm: int) -> None:
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
    slm_logits = check_logits("slm_logits", slm_logits, validate)
    batch, v_slm = slm_logits.shape
    device = slm_logits.device
    check_choice("mode", mode, MODES)
    check_choice("tail", tail, TAILS)
    if vocab_map is not None and not isinstance(vocab_map, VocabMap):
        raise TypeError(f"vocab_map must be a logitfuse.VocabMap or None, got {type(vocab_map).__name__}")
    if isinstance(llm, TopK):
        vocab_map = vocab_map or identity_map(v_slm, v_slm)
        if isinstance(llm.ids, Tensor) and isinstance(llm.logprobs, Tensor) and \
                (llm.ids.device != device or llm.logprobs.device != device):
            raise ValueError(f"llm top-k tensors are on {llm.ids.device}/{llm.logprobs.device}, slm_logits on {device}")
        llm = _check_topk(llm, batch, vocab_map.v_llm, validate)
        if llm_temperature != 1.0:
            raise ValueError("llm_temperature applies to dense LLM logits only; ask the server for top-k logprobs at that temperature instead")
    elif isinstance(llm, Tensor):
        llm = check_logits("llm", llm, validate)
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
    elif isinstance(llm, (list, tuple)):
        raise TypeError(
            f"llm must be dense logits (a tensor) or logitfuse.TopK(ids, logprobs), got a {type(llm).__name__}; "
            "for a top-k pass logitfuse.TopK(ids, logprobs) with two (batch_size, k) tensors, not a plain sequence"
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
        alpha=per_row("alpha", alpha, batch, device, low=0.0, high=1.0, validate=validate),
        v_llm=vocab_map.v_llm,
        mode=mode,
        tail=tail,
        slm_temperature=per_row("slm_temperature", slm_temperature, batch, device, low=0.0, high=float("inf"), low_open=True, validate=validate),
        llm_temperature=per_row("llm_temperature", llm_temperature, batch, device, low=0.0, high=float("inf"), low_open=True, validate=validate),
    )
    if validate:
        _check_scaled("slm_logits", slm_logits, "slm_temperature", args["slm_temperature"].detach())
        if isinstance(llm, Tensor):
            _check_scaled("llm", llm, "llm_temperature", args["llm_temperature"].detach())
    if vocab_map.llm_to_slm is not None:  # two tokenizers: LLM tokens hand their mass to SLM prefixes
        args["llm_to_slm"] = vocab_map.on(device, "llm_to_slm")
    return args


def check_top_k(top_k: int | Tensor, batch: int, device: torch.device, validate: bool) -> Tensor:
    """``fuse_sample``'s ``top_k`` (an int, or a scalar or ``(batch_size,)`` integer tensor) as an int64
    ``(batch_size,)`` tensor on ``device``."""
    if isinstance(top_k, Tensor):
        if top_k.dtype.is_floating_point or top_k.dtype == torch.bool or top_k.dim() > 1 \
                or top_k.numel() not in (1, batch):
            raise ValueError(
                f"top_k must be an int or an integer tensor of shape ({batch},), got a {top_k.dtype} tensor of shape "
                f"{tuple(top_k.shape)}" + ("; flatten it with top_k.reshape(-1)" if top_k.numel() == batch else "")
            )
        top_k = top_k.to(device, torch.int64).reshape(-1).expand(batch)
    elif isinstance(top_k, int) and not isinstance(top_k, bool):
        top_k = torch.full((batch,), top_k, dtype=torch.int64, device=device)
    else:
        raise TypeError(f"top_k must be an int or an integer tensor, got {type(top_k).__name__}")
    if validate and bool((top_k < 0).any()):
        raise ValueError("top_k must be >= 0 (0 turns top-k filtering off)")
    return top_k


#: what fuse_with_head reads of a head (logitfuse.heads.protocol.FusionHeadProtocol lists all it declares)
HEAD_MEMBERS = ("check_vocab_sizes", "reads_slm_side", "needs_aligned_view", "tail", "alpha_from_aligned")


def check_head_argument(head: object) -> None:
    """``TypeError`` unless ``head`` is a fusion head instance (``fuse_with_head``'s ``head``), naming the fix."""
    missing = [name for name in HEAD_MEMBERS if not hasattr(head, name)]
    if head is None or isinstance(head, type) or missing:
        got = "None" if head is None else f"the class {head.__name__}" if isinstance(head, type) \
            else f"{type(head).__name__} lacking {', '.join(missing)}"
        raise TypeError(
            f"head must be a fusion head instance (logitfuse.FusionHead, PaperFusionHead or one following "
            f"logitfuse.heads.protocol.FusionHeadProtocol), got {got}; for a fixed weight call "
            "logitfuse.fuse(..., alpha=...) instead, and build a head with FusionHead(v_slm, v_llm) or "
            "FusionHead.from_pretrained(folder)"
        )
