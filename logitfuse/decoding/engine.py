"""The one fused decode loop: :func:`generate`, with exact speculative fusion (``speculate=K``).

A small loop in the manner of gpt-fast over the SLM's KV cache, through an SLM runner
(:mod:`logitfuse.decoding.runners`: transformers, or llama.cpp for a :class:`logitfuse.LlamaCppSLM`):
prefill the private prompt once, then one forward per token; a :class:`logitfuse.FusionSession` does
the LLM side (the backend's state, α, fusion). Per step the session returns the fused
log-probabilities and the token is chosen as :func:`logitfuse.fuse_sample` chooses it (greedy argmax,
or temperature, top-k then top-p from an explicit ``torch.Generator``), on the logits' device: the
chosen ids are the one value a step reads back to the host; α stays on the device until the end.

With ``speculate=K`` the SLM drafts K tokens alone and the LLM scores all K + 1 positions in one call;
the drafts are accepted by the speculative-sampling rule, so the tokens are distributed exactly as
per-step fusion's (greedy: identical). See :mod:`logitfuse.decoding.speculative`.

Overlap (per-step fusion, on by default): the LLM's request for a position is issued in a thread as
soon as the token before it is chosen, while the SLM computes its forward for that position, so a
step costs about max(SLM, LLM) plus fusion instead of the sum.

Privacy: the LLM sees the public prompts and the tokens the SLM generated and kept; with
``speculate``, also the drafts that end up rejected (opt-in, counted in the statistics). With
``alpha=1`` (the SLM alone) it sees nothing, and ``llm`` may be ``None``.

>>> import torch, logitfuse
>>> from logitfuse.testing import byte_level_tokenizer, tiny_llama
>>> tok = byte_level_tokenizer()
>>> slm, llm = tiny_llama(len(tok), seed=0), logitfuse.HFLLM(tiny_llama(len(tok), seed=1), tok)
>>> private = tok(["Martin sells houses. Write an invitation:"], return_tensors="pt")
>>> out = logitfuse.generate(slm, llm, private["input_ids"], "Write an invitation:", alpha=0.5,
...                          max_new_tokens=6, speculate=2)
>>> out.sequences == logitfuse.generate(slm, llm, private["input_ids"], "Write an invitation:",
...                                     logitfuse.FusionConfig(alpha=0.5),
...                                     logitfuse.SamplingConfig(max_new_tokens=6)).sequences
True
>>> len(logitfuse.generate(slm, None, private["input_ids"], alpha=1.0, max_new_tokens=4).sequences[0])
4
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping
from typing import Any

import torch

from logitfuse.backends.base import LLMBackendError
from logitfuse.config import FusionConfig, SamplingConfig, split_options
from logitfuse.decoding.checks import public_rows
from logitfuse.decoding.rule_session import RuleSession, rule_inputs
from logitfuse.decoding.runners import RunnerSource, SLMRunner, TransformersRunner
from logitfuse.decoding.sampling import FusedGeneration, GeneratedRows, RepetitionPenalty, TokenChooser
from logitfuse.decoding.session import FusionSession
from logitfuse.decoding.speculative import check_speculation, speculative_accept, speculative_fusion
from logitfuse.heads.protocol import check_slm_side_inputs

Tensor = torch.Tensor

__all__ = ["FusedGeneration", "generate", "open_runner", "speculative_accept"]


def open_runner(slm: Any, private_input_ids: Any, *, attention_mask: Any, max_new_tokens: int,
                pad_token_id: int | None, tokenizer: Any = None) -> SLMRunner:
    """The :class:`~logitfuse.decoding.runners.SLMRunner` over ``private_input_ids``: the SLM's own
    (``slm.open_runner``, e.g. a :class:`logitfuse.LlamaCppSLM`), an :class:`SLMRunner` given as it is,
    or a :class:`~logitfuse.decoding.runners.TransformersRunner` for a transformers model."""
    if isinstance(slm, SLMRunner):
        return slm
    if isinstance(slm, RunnerSource):
        runner = slm.open_runner(private_input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad_token_id)
    else:
        runner = TransformersRunner(slm, private_input_ids, attention_mask=attention_mask, pad_token_id=pad_token_id)
    if tokenizer is not None:
        runner.tokenizer = tokenizer
    return runner


def _per_step(slm: SLMRunner, session: FusionSession, rows: GeneratedRows, chooser: TokenChooser,
              start: Any, overlap: bool, penalty: RepetitionPenalty, hidden: bool) -> None:
    """Per-step fusion (``start`` starts the session's rows). With ``overlap`` the LLM's request for the
    next position runs in a thread while the SLM computes its forward for it (and the LLM's prefill
    while the SLM's runs). ``penalty`` acts on the SLM's logits before the session fuses them; with
    ``hidden`` the session gets the hidden state of the forward that made them. One host read per step:
    the chosen ids."""
    batch, device, pad_id = slm.batch_size, slm.device, slm.pad_token_id
    appended: list[list[int]] = [[] for _ in range(batch)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="logitfuse-llm") as pool:

        def first_request():
            start()
            return session.request(appended)

        if overlap:
            request = pool.submit(first_request)
            logits = slm.prefill()
            request = request.result()
        else:
            start()
            logits = slm.prefill()
        while True:
            logits = penalty(logits)
            state = slm.last_hidden if hidden else None
            if overlap:
                fused = session.complete(request, logits, slm_hidden=state)
            else:
                fused = session.step(appended, logits, slm_hidden=state)
            chosen = chooser.choose(fused)
            if session.alpha_finite is not None:  # a head's α checked with the ids, not by a read of its own
                chosen = torch.where(session.alpha_finite.to(chosen.device), chosen, -1)
            tokens = chosen.tolist()  # the step's one host read
            if min(tokens) < 0:
                raise session.non_finite_alpha([r for r, t in enumerate(tokens) if t < 0])
            appended = [[] for _ in range(batch)]
            taken = [0] * batch
            for r in range(batch):
                if rows.running(r):
                    taken[r] = rows.add(r, [tokens[r]])
                    appended[r] = [tokens[r]]
                else:
                    tokens[r] = pad_id
            rows.record_alpha(session.last_alpha[:, None], taken)
            if rows.done():
                return
            penalty.mark([[t] for t in tokens])  # finished rows see padding, as in slm.generate
            fed = torch.tensor(tokens, device=device)
            if overlap:
                request = pool.submit(session.request, appended)
                logits = slm.append(fed)
                request = request.result()
            else:
                logits = slm.append(fed)


# ------------------------------------------------------------------------- public entry point
def generate(slm: Any, llm: Any, private_input_ids: Any, public_prompt: Any = None, fusion: FusionConfig | None = None,
             sampling: SamplingConfig | None = None, *, attention_mask: Any = None, **options: Any) -> FusedGeneration:
    r"""Fused generation with our own decode loop over the SLM's KV cache (see the module docstring).

    Args:
        slm: the on-device model: a transformers causal LM in eval mode, a :class:`logitfuse.LlamaCppSLM`
            (one row; its end-of-generation ids and ``tokenizer`` are the defaults of ``eos_token_id`` and
            ``slm_tokenizer``), or any :class:`~logitfuse.decoding.runners.SLMRunner`. It alone reads
            ``private_input_ids``.
        llm (`LLMBackend`): the LLM side (:class:`logitfuse.HFLLM`, :class:`logitfuse.OpenAICompatibleLLM`);
            ``None`` with ``alpha=1`` (the SLM alone: the LLM is never asked). With a fusion ``rule``: one
            backend (the input ``"llm"``), or a dict of every input the rule reads besides ``"slm"``, by
            name (``{"llm": backend, "slm_public": logitfuse.rules.Input(HFLLM(slm, tok), on_device=True)}``;
            :mod:`logitfuse.rules`).
        private_input_ids: ``(batch, length)`` SLM token ids, left padded (with ``attention_mask``), or a
            list of id lists (left padded here).
        public_prompt: what the LLM may see: one prompt (text or LLM ids) for all rows, or one per row
            (:func:`logitfuse.decoding.checks.public_rows`); may be left out with ``alpha=1``. Under a rule,
            also a dict by input name, each public input's own (its ids, its chat template).
        fusion (`FusionConfig`): how to fuse: head or fixed α, vocabulary map, mode, tail, schedule,
            ``speculate``, ``overlap``, ``apply_chat_template``... (:class:`logitfuse.FusionConfig`).
        sampling (`SamplingConfig`, *optional*): ``max_new_tokens`` (default 128), ``temperature`` (0:
            greedy), ``top_k``, ``top_p``, ``repetition_penalty``, ``seed`` / ``generator``,
            ``eos_token_id``, ``pad_token_id`` (:class:`logitfuse.SamplingConfig`).
        attention_mask: with a tensor ``private_input_ids``: 1 for real tokens, 0 for left padding.
        **options: keyword sugar for the fields of both configs (``alpha=0.5, max_new_tokens=32,
            speculate=2, rule="steer(0.5)", ...``), applied over ``fusion`` and ``sampling``; ``slm_tokenizer=``,
            the SLM's tokenizer (an attribute of the SLM, not a setting: it re-tokenizes the generated text for
            an LLM with another tokenizer, and its ``eos_token_id`` is the default end of a row).

    Notes on the settings, as this loop applies them:

    - a head with SLM-side features gets them here: the hidden state of each step's own SLM forward
      (transformers only: a hook on the output layer, removed at the end), the last token and the position;
      not with ``speculate`` (``ValueError`` before anything is sent).
    - ``speculate=K`` needs ``schedule="always"``; it speculates where both sides share one tokenizer and
      the backend scores drafts (``supports_score``), otherwise it fuses per step, warns once and counts
      ``stats.speculation_fallbacks``. Rejected drafts are seen by the LLM: opt-in, counted.
    - ``overlap`` (default on) runs the LLM's request for a position while the SLM computes it; not with
      ``speculate`` nor with a schedule that reads the SLM's logits (``entropy_gate``, ``head_gate``).
    - ``repetition_penalty`` acts on the SLM's logits before fusion, as ``slm.generate`` applies it ahead
      of the fusion processor; exact with ``speculate`` too.
    - ``rule`` (a fusion rule other than ``"mix"``) steps a :class:`~logitfuse.decoding.rule_session.RuleSession`
      over the inputs (``llm``: one backend, the input ``"llm"``, or a dict of inputs); an on-device
      input with ``prompt="private"`` is started on the SLM's private ids. ``FusedGeneration.alpha`` holds
      the SLM's coefficient in the rule per token.

    Returns:
        :class:`FusedGeneration` (ids per row, α per token, the session's statistics, why each row stopped).
        A ``KeyboardInterrupt`` (Ctrl-C), and an :class:`~logitfuse.backends.base.LLMBackendError` of a backend
        with ``on_failure="raise"``, carries the tokens chosen until then as its ``partial``, a
        :class:`FusedGeneration` (``None`` when it came before the first step could start).
    """
    started = time.perf_counter()
    slm_tokenizer = options.pop("slm_tokenizer", None)
    fusion, sampling = split_options("generate", fusion, sampling, options)
    if fusion is None:
        raise ValueError("pass exactly one of head= (a trained fusion head, logitfuse.load_head) and alpha= "
                         "(a fixed weight in [0, 1]; 1 = the SLM alone), or fusion=FusionConfig(...)")
    if fusion.uses_rule:
        inputs = rule_inputs(fusion.rule, llm)  # checked before the SLM opens
    elif isinstance(llm, Mapping):
        raise ValueError("llm is a dict of inputs, which a fusion rule reads: pass rule= (e.g. 'steer(0.5)', "
                         "logitfuse.rules), or one LLM backend")
    sampling = SamplingConfig() if sampling is None else sampling
    runner = open_runner(slm, private_input_ids, attention_mask=attention_mask, max_new_tokens=sampling.max_new_tokens,
                         pad_token_id=sampling.pad_token_id, tokenizer=slm_tokenizer)
    rows = session = None
    try:
        eos = sampling.eos_token_id
        eos = sorted(runner.eos_token_ids) if eos is None and runner.eos_token_ids else eos
        eos = None if eos is None else list(eos)
        if fusion.uses_rule:
            session = RuleSession(fusion.rule, inputs, fusion, slm_tokenizer=runner.tokenizer, eos_token_id=eos)
        else:
            session = FusionSession(llm, fusion, slm_tokenizer=runner.tokenizer, eos_token_id=eos)
        session.defer_alpha_checks()  # folded into the ids each step reads
        head, batch = fusion.head, runner.batch_size
        if public_prompt is None and not session.slm_only:
            raise ValueError("public_prompt is missing: pass what the LLM may see (text or LLM token ids), or alpha=1 "
                             "for the SLM alone")
        speculating = bool(fusion.speculate) and not session.slm_only and check_speculation(session, runner.vocab_size)
        hidden = head is not None and head.needs_slm_hidden
        if hidden:
            check_slm_side_inputs(head, hidden=runner.supports_hidden, side=True, where=runner.name,
                                  fix="use a head without the 'hidden' group (logitfuse train --slm-features "
                                      "token,position) or the transformers SLM")
            runner.watch_hidden(head)
        if public_prompt is None:
            publics = [None] * batch
        elif fusion.uses_rule and isinstance(public_prompt, Mapping):  # one per input, by name
            publics = {name: public_rows(prompt, batch) for name, prompt in public_prompt.items()}
        else:
            publics = public_rows(public_prompt, batch)
        rows = GeneratedRows(batch, sampling.max_new_tokens, session.eos_token_ids)
        chooser = TokenChooser(sampling)
        penalize = RepetitionPenalty(sampling.repetition_penalty, runner.ids, runner.mask, runner.vocab_size)

        if fusion.uses_rule:
            privates = [row[keep == 1].tolist() for row, keep in zip(runner.ids, runner.mask)]  # on-device inputs only

            def start() -> None:
                session.start(publics, v_slm=runner.vocab_size, private_prompts=privates)
        else:
            def start() -> None:
                session.start(publics, v_slm=runner.vocab_size)  # the LLM prefills the public prompts only

        if speculating:
            start()
            speculative_fusion(runner, session, rows, chooser, runner.prefill(), fusion.speculate, penalize)
        else:
            # one model on both sides: its LLM forwards (in the thread) would pass the hidden-state hook too
            same_model = hidden and getattr(llm, "model", None) is slm
            overlap = fusion.overlap and not session.slm_only and not session.schedule.needs_entropy and not same_model
            _per_step(runner, session, rows, chooser, start, overlap, penalize, hidden)
            if fusion.speculate and not session.slm_only:  # asked for, but the backend cannot score drafts
                session.stats.speculation_fallbacks += 1
    except (KeyboardInterrupt, LLMBackendError) as stop:
        # Ctrl-C, or the LLM failing under on_failure="raise": what was generated so far goes with it
        # (a row still running: stopped None)
        stop.partial = None if rows is None or session is None else rows.result(session.stats, started, runner.decode)
        raise
    finally:
        runner.close()
    return rows.result(session.stats, started, runner.decode)
