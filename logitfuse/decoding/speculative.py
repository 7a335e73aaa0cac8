"""Exact speculative fusion for :func:`logitfuse.generate` (``speculate=K``).

The SLM drafts K tokens alone, the LLM scores all K + 1 positions in one call
(``LLMBackend.score``), the session fuses each position, and the drafts are accepted by the
speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023) with the SLM's distribution q as
the draft and the fused distribution p as the target (both after the same temperature, top-k and
top-p): accept x with probability min(1, p(x) / q(x)); at the first rejection draw from
norm(max(0, p - q)) and stop; if all K are accepted draw one more from the last p. Greedy: accept
while the fused argmax equals the draft (the SLM's argmax). The tokens are distributed exactly as
per-step fusion's (greedy: identical). Rejected drafts are rolled back in both caches.

Privacy: drafts that end up rejected are SLM text the LLM sees although the output does not hold
it. Speculation is therefore opt-in (``speculate=0`` by default) and counted in the statistics
(``draft_tokens_sent``, ``draft_tokens_kept``, ``draft_tokens_discarded``) and the backend's audit log.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from logitfuse.decoding.session import FusionSession
from logitfuse.heads.protocol import check_slm_side_inputs
from logitfuse.reference import sample_from_logprobs

if TYPE_CHECKING:  # the loop's parts (logitfuse.decoding.engine imports this module)
    from logitfuse.decoding.runners import SLMRunner
    from logitfuse.decoding.sampling import GeneratedRows, RepetitionPenalty, TokenChooser

Tensor = torch.Tensor

__all__ = ["accept_or_correct", "check_speculation", "speculative_accept", "speculative_fusion"]


def check_speculation(session: FusionSession, v_slm: int) -> bool:
    """Refuse, before anything is sent, what speculative fusion cannot do exactly. Returns whether
    this generation speculates: not across tokenizers (a draft's SLM positions are not the LLM's
    token positions, so one call cannot score it exactly), nor with a backend that cannot score
    drafts (``supports_score``; a server is probed once, with a fixed text). Then it fuses per step
    instead, with a warning shown once and ``stats.speculation_fallbacks`` counted."""
    llm = session.llm
    check_slm_side_inputs(session.head, hidden=False, side=False, where="speculate > 0",
                          fix="one LLM call scores a whole draft; use speculate=0 (per-step fusion) with this head")
    if session.schedule.spec != "always":
        raise ValueError(f"speculate > 0 needs schedule='always' (got {session.schedule.spec!r}); a schedule that "
                         "skips the LLM already saves calls: use speculate=0 with it")
    if session.cross_tokenizer:
        why = ("the SLM and the LLM use different tokenizers, so the SLM's draft positions are not the LLM's and one "
               "call cannot score a draft exactly")
    elif v_slm > llm.vocab_size:
        raise ValueError(f"speculate > 0 needs every SLM id in the LLM's vocabulary; the SLM has {v_slm} ids, the "
                         f"LLM {llm.vocab_size}: use speculate=0")
    elif not llm.supports_score:
        why = ("the LLM backend cannot score a draft in one call (LLMBackend.score; a server needs prompt "
               "log-probabilities: llama.cpp's server with logits_all, or vLLM)")
    else:
        return True
    warnings.warn(f"speculate > 0: {why}; this generation fuses per step (counted in stats.speculation_fallbacks; "
                  "this warning is shown once)", RuntimeWarning, stacklevel=3)
    return False


def speculative_fusion(slm: SLMRunner, session: FusionSession, rows: GeneratedRows, chooser: TokenChooser,
                       logits: Tensor, k: int, penalty: RepetitionPenalty) -> None:
    """Speculative fusion from the SLM's prefill ``logits``. With a repetition ``penalty`` the draft and
    the target read the same penalized SLM logits: at each drafted position the seen tokens include the
    drafts before it, as per-step fusion's would had those been kept (so the rule stays exact).
    Host reads per LLM call: the drafts (once, to send them) and the accepted counts with the token
    after them; α is read once at the end."""
    batch, device, pad_id = slm.batch_size, slm.device, slm.pad_token_id
    logits = penalty(logits)
    appended: list[list[int]] = [[] for _ in range(batch)]
    while True:
        left = max(rows.max_new_tokens - len(t) for r, t in enumerate(rows.tokens) if rows.running(r))
        n = min(k, left - 1)
        # the SLM drafts n tokens alone (finished rows are fed padding), on the device
        running = torch.tensor([rows.running(r) for r in range(batch)], device=device)
        slm_logits, drafts = [logits], torch.full((batch, n), pad_id, dtype=torch.long, device=device)
        seen = penalty.fork()
        for i in range(n):
            q = torch.log_softmax(slm_logits[-1].float() / session.slm_temperature, dim=-1)
            drafts[:, i] = torch.where(running, chooser.choose(q).to(device), pad_id)
            penalty.mark_column(drafts[:, i], seen)
            slm_logits.append(penalty(slm.append(drafts[:, i]), seen))
        stacked = torch.stack(slm_logits, dim=1)
        drafted = drafts.tolist()  # read once: the drafts are sent to the LLM
        draft_lists = [drafted[r] if rows.running(r) else [] for r in range(batch)]
        fused, alpha = session.step_many(appended, draft_lists, stacked)
        # accept or reject each row's drafts (all rows at once)
        accepted, after = accept_or_correct(chooser, drafts, stacked, fused, session.slm_temperature)
        if session.alpha_finite is not None:  # a head's α checked with the ids, not by a read of its own
            after = torch.where(session.alpha_finite.all(dim=1).to(after.device), after, -1)
        decided = torch.stack([accepted.to(after.device), after]).tolist()  # read once per LLM call
        bad = [r for r in range(batch) if rows.running(r) and decided[1][r] < 0]
        if bad:
            raise session.non_finite_alpha(bad)
        kept, taken, chosen = [0] * batch, [0] * batch, [pad_id] * batch
        for r in range(batch):
            if rows.running(r):
                a, token = decided[0][r], decided[1][r]
                taken[r] = rows.add(r, draft_lists[r][:a] + [token])
                kept[r] = min(a, taken[r])
                if rows.running(r):
                    chosen[r] = token
        rows.record_alpha(alpha, taken)
        penalty.mark([(draft_lists[r][:kept[r]] + [chosen[r]]) if rows.running(r) else [] for r in range(batch)])
        session.accept_drafts(kept, taken)
        slm.drop([n - kept[r] for r in range(batch)])
        for r in range(batch):
            if not rows.running(r):
                session.finish(r)
        if rows.done():
            return
        appended = [[chosen[r]] if rows.running(r) else [] for r in range(batch)]
        logits = penalty(slm.append(torch.tensor(chosen, device=device)))


def accept_or_correct(chooser: TokenChooser, drafts: Tensor, slm_logits: Tensor, fused: Tensor,
                      slm_temperature: float) -> tuple[Tensor, Tensor]:
    """``(accepted, token)`` ``(B,)`` each, on the device: how many of its ``drafts`` ``(B, n)`` each row
    accepts, and the token after them (the correction at the first rejection, or one more from the last
    fused distribution). ``slm_logits`` and ``fused`` are ``(B, n + 1, V)``: the SLM's logits and the
    fused log-probabilities at each position."""
    batch, positions, vocab = fused.shape
    device = fused.device
    drafts = drafts.to(device)
    if chooser.greedy:
        best = fused.argmax(dim=-1)
        accepted = (best[:, :-1] == drafts).long().cumprod(dim=1).sum(dim=1)
        return accepted, best.gather(1, accepted[:, None])[:, 0]
    p = chooser.probs(fused.flatten(0, 1)).view(batch, positions, vocab)
    q = chooser.probs(torch.log_softmax(slm_logits.flatten(0, 1).float() / slm_temperature, dim=-1))
    q = q.view(batch, positions, vocab)
    return speculative_accept(p, q, drafts, chooser.uniform(batch * (positions - 1), device).view(batch, positions - 1),
                              chooser.uniform(batch, device))


def speculative_accept(p: Tensor, q: Tensor, drafts: Tensor, accept_uniform: Tensor,
                       draw_uniform: Tensor) -> tuple[Tensor, Tensor]:
    """The speculative-sampling rule, per row: ``(accepted (B,), token (B,))``.

    ``p`` ``(B, n + 1, V)``: the target (fused) distributions; ``q`` ``(B, n + 1, V)``: the draft's
    (its last position is not read); ``drafts`` ``(B, n)``: the drafted ids (each drawn from its
    ``q``). Draft ``i`` is accepted when ``accept_uniform[:, i] * q_i(x_i) < p_i(x_i)`` (probability
    ``min(1, p/q)``), up to the first rejection; there the token is drawn with ``draw_uniform``
    ``(B,)`` from ``norm(max(0, p_i - q_i))``; if all are accepted, from ``p_n``.

    >>> import torch
    >>> p = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]]); q = torch.tensor([[[1.0, 0.0, 0.0], [1/3] * 3]])
    >>> speculative_accept(p, q, torch.tensor([[0]]), torch.tensor([[0.4]]), torch.tensor([0.9]))  # kept
    (tensor([1]), tensor([2]))
    >>> speculative_accept(p, q, torch.tensor([[0]]), torch.tensor([[0.6]]), torch.tensor([0.9]))  # rejected
    (tensor([0]), tensor([1]))
    """
    n = drafts.shape[1]
    index = drafts[:, :, None]
    ok = accept_uniform * q[:, :n].gather(2, index)[:, :, 0] < p[:, :n].gather(2, index)[:, :, 0]
    accepted = ok.long().cumprod(dim=1).sum(dim=1)
    at = accepted[:, None, None].expand(-1, 1, p.shape[2])
    p_at, q_at = p.gather(1, at)[:, 0], q.gather(1, at)[:, 0]
    residual = torch.where((accepted < n)[:, None], (p_at - q_at).clamp(min=0), p_at)
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_at)  # p == q: rounding only
    return accepted, _draw(residual, draw_uniform)


def _draw(weights: Tensor, uniform: Tensor) -> Tensor:
    """One id per row drawn by inverse CDF from unnormalized ``weights`` ``(B, V)`` (as sampling draws)."""
    rows, device = weights.shape[0], weights.device
    return sample_from_logprobs(weights.log(), uniform.to(device), temperature=torch.ones(rows, device=device),
                                top_k=torch.zeros(rows, dtype=torch.long, device=device),
                                top_p=torch.ones(rows, device=device), filters=(False, False))
