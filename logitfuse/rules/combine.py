"""The N-input combine op: one fused next-token distribution from N aligned ones.

Every fusion rule over N inputs (:mod:`logitfuse.rules`) ends in this op. Its inputs are the N
models' normalized next-token log-probabilities on one pivot vocabulary, stacked as ``(N, B, V)``
float32 (``-inf`` where an input gives a token no probability), and per-row coefficients
``coef`` ``(B, N)``. Two rules:

- ``"mixture"``: ``log Σ_i coef[b, i] · p_i`` (a linear mixture of distributions; ``coef ≥ 0``, rows
  summing to 1), computed in log space as ``logsumexp_i(log coef[b, i] + logprobs[i, b])`` with
  ``log 0 = -inf``, so an input of weight 0 takes no part;
- ``"sum"``: ``log_softmax(Σ_i coef[b, i] · logprobs[i, b])`` (a geometric mixture, product of
  experts): ``coef`` = weights; logit arithmetic ``base + Σ β (expert − anti)`` (proxy-tuning,
  DExperts, context steering) is ``coef = (1, β, −β)``; contrastive decoding ``expert − λ·amateur``
  is ``coef = (1, −λ)``. A token that an input with a nonzero coefficient rules out (``-inf``) is
  ruled out in the output, whatever the sign of the coefficient (never ``+inf``); an input with
  coefficient exactly 0 is ignored at every token.

``plausibility = τ`` is contrastive decoding's cut (Li et al. 2023, arXiv 2210.15097) on input 0,
the expert: a token ``v`` with ``p_0(v) < τ · max_v p_0`` is removed (``-inf``) before the output is
normalized, for both rules; ``τ = 1`` keeps only input 0's argmax tokens. Every output row is
renormalized (for ``"mixture"`` without a cut this changes nothing but rounding).

:func:`combine_reference` is the math in plain torch (the CPU path and the test oracle);
:func:`combine` checks the arguments and dispatches: CUDA tensors with ``N ≤ 4`` to the Triton
kernel (``logitfuse.kernels.combine``), everything else to the reference. The op is for decode time
and evaluation: :func:`combine` returns no autograd history.
"""

from __future__ import annotations

import math
import numbers

import torch

Tensor = torch.Tensor

__all__ = ["MAX_KERNEL_INPUTS", "MIXTURE_TOLERANCE", "RULES", "combine", "combine_reference", "implementation_for"]

#: the combine rules: a linear mixture of distributions, or a weighted sum of log-probabilities
RULES = ("mixture", "sum")
#: the most inputs the Triton kernel takes (one compiled variant per N); more run on the reference
MAX_KERNEL_INPUTS = 4
#: how far a ``"mixture"`` row of ``coef`` may sum from 1
MIXTURE_TOLERANCE = 1e-4


def combine_reference(logprobs: Tensor, coef: Tensor, *, rule: str, plausibility: float | None = None) -> Tensor:
    """The combine op in plain torch (arguments as :func:`combine`'s, already checked).

    Parameters
    ----------
    logprobs : torch.Tensor
        ``(n_inputs, batch_size, vocab_size)`` float32 normalized log-probabilities, ``-inf`` allowed.
    coef : torch.Tensor
        ``(batch_size, n_inputs)`` float32 coefficients.
    rule : {"mixture", "sum"}
        See the module docstring.
    plausibility : float, optional
        ``τ`` in ``(0, 1]``: the cut on input 0.

    Returns
    -------
    torch.Tensor
        ``(batch_size, vocab_size)`` float32 normalized log-probabilities. A row with no possible
        token (every entry ``-inf``) raises ``ValueError``.

    Example
    -------
    >>> import torch
    >>> expert = torch.tensor([[0.7, 0.2, 0.1]]).log()
    >>> amateur = torch.tensor([[0.8, 0.1, 0.1]]).log()
    >>> out = combine_reference(torch.stack([expert, amateur]), torch.tensor([[1.0, -1.0]]), rule="sum",
    ...                         plausibility=0.2)
    >>> out.exp()  # token 2 is below 0.2 · 0.7 under the expert: cut
    tensor([[0.3043, 0.6957, 0.0000]])
    """
    lp = logprobs.to(torch.float32)
    c = coef.to(torch.float32).t().unsqueeze(-1)  # (N, B, 1), beside lp's (N, B, V)
    if rule == "mixture":
        log_c = torch.where(c > 0, c.log(), -math.inf)  # log 0 = -inf: a weight-0 input takes no part
        combined = torch.logsumexp(log_c + lp, dim=0)
    else:
        used = c != 0
        ruled_out = (used & torch.isneginf(lp)).any(dim=0)  # c·(-inf) would be +inf for c < 0
        combined = torch.where(used & ~torch.isneginf(lp), c * lp, 0.0).sum(dim=0)
        combined = combined.masked_fill(ruled_out, -math.inf)
    if plausibility is not None:
        first = lp[0]
        keep = first >= first.amax(dim=-1, keepdim=True) + math.log(plausibility)
        combined = combined.masked_fill(~keep, -math.inf)
    log_z = torch.logsumexp(combined, dim=-1, keepdim=True)
    dead = torch.isneginf(log_z[:, 0])
    if bool(dead.any()):
        raise ValueError(_dead_row_message(int(dead.nonzero()[0]), rule, plausibility))
    return combined - log_z


def _dead_row_message(row: int, rule: str, plausibility: float | None) -> str:
    weight = "a positive coef" if rule == "mixture" else "a nonzero coef"
    cut = f" among the tokens that pass the plausibility cut (tau={plausibility:g})" if plausibility is not None else ""
    return (f"row {row} has no possible token under rule {rule!r}: every input with {weight} gives each token{cut} "
            "probability 0 (-inf); give every row at least one token that all of its weighted inputs allow")


def implementation_for(device: torch.device, n_inputs: int):
    """The function :func:`combine` runs for inputs on ``device`` with ``n_inputs`` inputs: the Triton
    kernel's ``combine`` for CUDA tensors with ``n_inputs ≤ 4`` when Triton is importable, else
    :func:`combine_reference` (both have the same signature and result).

    >>> implementation_for(torch.device("cpu"), 2) is combine_reference
    True
    """
    if device.type == "cuda" and n_inputs <= MAX_KERNEL_INPUTS:
        from logitfuse import kernels

        if kernels.available():
            from logitfuse.kernels.combine import combine as combine_kernel

            return combine_kernel
    return combine_reference


def combine(logprobs: Tensor, coef: Tensor, *, rule: str, plausibility: float | None = None) -> Tensor:
    """Combine N aligned next-token distributions into one (see the module docstring for the math).

    Parameters
    ----------
    logprobs : torch.Tensor
        ``(n_inputs, batch_size, vocab_size)`` float32 normalized next-token log-probabilities of
        ``n_inputs ≥ 1`` inputs on one vocabulary (stack them: ``torch.stack([lp_a, lp_b])``);
        ``-inf`` marks a token an input gives no probability; NaN and ``+inf`` are refused. Any
        strides (a view that is not contiguous in the inputs' dimension is read in place).
    coef : torch.Tensor
        ``(batch_size, n_inputs)`` float32 finite coefficients, on ``logprobs``' device. For
        ``"mixture"``: ``≥ 0`` and each row summing to 1 (within ``1e-4``).
    rule : {"mixture", "sum"}
        ``"mixture"``: ``log Σ coef·p``; ``"sum"``: ``log_softmax(Σ coef·logprobs)``.
    plausibility : float, optional
        ``τ`` in ``(0, 1]``: remove the tokens whose input-0 probability is below ``τ`` times
        input 0's largest (contrastive decoding's cut), before normalizing.

    Returns
    -------
    torch.Tensor
        ``(batch_size, vocab_size)`` float32 normalized log-probabilities, without autograd history.
        CUDA tensors with ``n_inputs ≤ 4`` run on the Triton kernel, everything else on
        :func:`combine_reference`. A row with no possible token raises ``ValueError``.

    Example
    -------
    Contrastive decoding (expert − 0.5·amateur, cut at τ = 0.1) and an even mixture of three:

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> lp = torch.randn(3, 2, 50).log_softmax(-1)
    >>> cd = combine(lp[:2], torch.tensor([[1.0, -0.5]] * 2), rule="sum", plausibility=0.1)
    >>> cd.shape, bool(torch.isneginf(cd).any())  # tokens the expert finds implausible are cut
    (torch.Size([2, 50]), True)
    >>> mix = combine(lp, torch.full((2, 3), 1 / 3), rule="mixture")
    >>> torch.allclose(mix.exp(), lp.exp().mean(0), atol=1e-6)
    True
    """
    check_arguments(logprobs, coef, rule, plausibility)
    with torch.no_grad():
        return implementation_for(logprobs.device, logprobs.shape[0])(logprobs, coef, rule=rule,
                                                                       plausibility=plausibility)


def check_arguments(logprobs: Tensor, coef: Tensor, rule: str, plausibility: float | None) -> None:
    """:func:`combine`'s checks: shapes, dtypes and devices first, then values (which read the tensors).
    Each error names the argument and the fix."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    for name, tensor, dims in (("logprobs", logprobs, "(n_inputs, batch_size, vocab_size)"),
                               ("coef", coef, "(batch_size, n_inputs)")):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {dims}, got {type(tensor).__name__}")
        if tensor.dim() != dims.count(",") + 1:
            raise ValueError(f"{name} must have shape {dims}, got {tuple(tensor.shape)}"
                             + ("; stack the inputs: torch.stack([lp_a, lp_b])" if name == "logprobs" else ""))
        if tensor.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {tensor.dtype}; pass {name}.float()")
    n_inputs, batch, vocab = logprobs.shape
    if n_inputs == 0:
        raise ValueError(f"logprobs has no inputs (shape {tuple(logprobs.shape)}); stack at least one")
    if vocab == 0:
        raise ValueError(f"logprobs has an empty vocabulary dimension (shape {tuple(logprobs.shape)})")
    if tuple(coef.shape) != (batch, n_inputs):
        raise ValueError(f"coef must have shape (batch_size, n_inputs) = {(batch, n_inputs)} for logprobs of shape "
                         f"{tuple(logprobs.shape)}, got {tuple(coef.shape)}")
    if coef.device != logprobs.device:
        raise ValueError(f"coef is on {coef.device} but logprobs is on {logprobs.device}; put both on one device")
    if plausibility is not None:
        if isinstance(plausibility, bool) or not isinstance(plausibility, numbers.Real):
            raise TypeError(f"plausibility must be a float in (0, 1] or None, got {type(plausibility).__name__}")
        if not 0 < plausibility <= 1:  # False for NaN too
            raise ValueError(f"plausibility must lie in (0, 1] (the expert-probability fraction a token needs), "
                             f"got {plausibility!r}; pass None for no cut")
    if not bool(torch.isfinite(coef).all()):
        raise ValueError("coef must be finite (no NaN or ±inf); for an input that should take no part use 0")
    if rule == "mixture":
        if bool((coef < 0).any()):
            raise ValueError("coef of rule 'mixture' must be >= 0 (mixture weights); for differences of "
                             "log-probabilities (negative coefficients) use rule='sum'")
        sums = coef.double().sum(dim=1)
        off = (sums - 1).abs() > MIXTURE_TOLERANCE
        if bool(off.any()):
            row = int(off.nonzero()[0])
            raise ValueError(f"coef of rule 'mixture' must sum to 1 in each row (within {MIXTURE_TOLERANCE:g}); "
                             f"row {row} sums to {float(sums[row]):.6g}: divide by coef.sum(1, keepdim=True)")
    if bool((torch.isnan(logprobs) | torch.isposinf(logprobs)).any()):
        raise ValueError("logprobs contains NaN or +inf; pass normalized log-probabilities (log_softmax), "
                         "-inf for a token an input gives no probability")
