"""The processor's overlap (``stopping_criteria=proc.stopping_criteria()``): the LLM's request for a
position runs while ``slm.generate`` computes the SLM's forward for it, with the same tokens, α,
statistics and LLM requests as without; where it cannot tell what comes next it does nothing."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import logitfuse
from logitfuse.serve.server import serve_in_thread
from logitfuse.testing import byte_level_tokenizer, sentencepiece_tokenizer, tiny_llama
from logitfuse.testing.generation import PRIVATE, PUBLIC, chat_ids, generate, left_pad, private_prompt_ids

PUBLICS = [PUBLIC, "Dear friends,", "Thank you for your help with the garden"]
PRIVATES = [PRIVATE, "I am Ana; I love roses.", "Secret: 1234"]
CANARY = "ZQX-7781-canary"
N_NEW = 6


def private_batch(tok, batch=3):
    return left_pad([private_prompt_ids(tok, p, q) for p, q in zip(PRIVATES[:batch], PUBLICS[:batch])])


def run(slm, llm, inputs, publics, *, overlap, seed=None, new_tokens=N_NEW, **options):
    """One ``slm.generate`` with a fresh processor, with or without the overlap criterion: what the
    caller compares (tokens, α, statistics, the backend's audit log) and the processor."""
    generate_options = {key: options.pop(key) for key in ("do_sample", "num_beams", "eos_token_id") if key in options}
    proc = logitfuse.CoGenesisLogitsProcessor(llm, publics, **options)
    if overlap:
        generate_options["stopping_criteria"] = proc.stopping_criteria()
    if seed is not None:
        torch.manual_seed(seed)
    tokens = generate(slm, inputs, new_tokens, proc, **generate_options).tolist()
    alpha = [a.tolist() for a in proc.alpha_history]
    return (tokens, alpha, dict(proc.stats), llm.audit_log), proc


@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "seed": 7}], ids=["greedy", "sampled"])
def test_same_tokens_alpha_stats_and_requests(tok, slm, llm_model, sampling):
    """A left-padded batch of 3: every step after the first overlaps, and nothing differs."""
    inputs = private_batch(tok)
    plain, _ = run(slm, logitfuse.HFLLM(llm_model, tok), inputs, PUBLICS, overlap=False, alpha=0.4, **sampling)
    overlapped, proc = run(slm, logitfuse.HFLLM(llm_model, tok), inputs, PUBLICS, overlap=True, alpha=0.4, **sampling)
    assert overlapped == plain
    assert plain[2]["llm_calls"] == N_NEW
    # the first call has the SLM's prefill logits already; after the last token the loop stops
    assert proc.overlapped_steps == N_NEW - 1


def test_a_stop_on_eos_sends_no_extra_request(tok, slm, llm_model):
    """generate() stops every row on its end-of-sequence id, which the processor was not told: the
    criterion reads the loop's own decision and prefetches nothing after the last step."""
    inputs = private_batch(tok, 1)
    first, _ = run(slm, logitfuse.HFLLM(llm_model, tok), inputs, PUBLICS[:1], overlap=False, alpha=0.4)
    eos = first[0][0][2]
    plain, _ = run(slm, logitfuse.HFLLM(llm_model, tok), inputs, PUBLICS[:1], overlap=False, alpha=0.4, eos_token_id=eos)
    overlapped, proc = run(slm, logitfuse.HFLLM(llm_model, tok), inputs, PUBLICS[:1], overlap=True, alpha=0.4,
                           eos_token_id=eos)
    stop = plain[0][0].index(eos) + 1
    assert overlapped == plain and plain[2]["llm_calls"] == stop < N_NEW
    assert proc.overlapped_steps == stop - 1


def test_cross_tokenizer_pair_sends_the_same_streams():
    sp, bl = sentencepiece_tokenizer(), byte_level_tokenizer()
    slm, llm_model = tiny_llama(len(sp), seed=2), tiny_llama(len(bl), seed=3)
    publics = [chat_ids(bl, p) for p in PUBLICS[:2]]
    inputs = left_pad([private_prompt_ids(sp, PRIVATE, p) for p in PUBLICS[:2]])
    options = dict(alpha=0.5, vocab_map=logitfuse.VocabMap.from_tokenizers(sp, bl), slm_tokenizer=sp, eos_token_id=[])
    plain, _ = run(slm, logitfuse.HFLLM(llm_model, bl), inputs, publics, overlap=False, new_tokens=10, **options)
    overlapped, proc = run(slm, logitfuse.HFLLM(llm_model, bl), inputs, publics, overlap=True, new_tokens=10, **options)
    assert overlapped == plain
    assert proc.overlapped_steps == 9 and plain[2]["llm_tokens"] > 0


def test_served_llm_gets_the_same_bodies_and_nothing_private(tok, slm, llm_model):
    """Against an HTTP server: the same request bodies with and without the overlap; none carries
    the private context."""
    server, url = serve_in_thread(llm_model, tok, model_name="tiny", log_requests=True)
    try:
        inputs = left_pad([private_prompt_ids(tok, f"{CANARY} is my door code.", p) for p in PUBLICS[:2]])
        runs, received = [], []
        for overlap in (False, True):
            server.received.clear()
            remote = logitfuse.OpenAICompatibleLLM(url, "tiny", tokenizer=tok)
            runs.append(run(slm, remote, inputs, PUBLICS[:2], overlap=overlap, alpha=0.3)[0])
            received.append(list(server.received))
    finally:
        server.shutdown()
        server.server_close()
    # the client's audit log (in runs) is in request order; the server's, in arrival order (rows in parallel)
    assert runs[0] == runs[1] and sorted(received[0]) == sorted(received[1])
    assert len(received[1]) == runs[1][2]["llm_row_calls"] == 2 * N_NEW and runs[1][2]["fallbacks"] == 0
    assert all(CANARY.encode() not in body for body in received[1])
    assert all(CANARY not in tok.decode(json.loads(body)["prompt"]) for body in received[1])


def test_the_llm_request_runs_while_the_slm_computes(tok, llm_model):
    """Each LLM request after the first and the SLM forward for the same position meet at a barrier:
    both must run at once (one after the other, the first to arrive would wait alone until the
    barrier's timeout broke it)."""
    slm = tiny_llama(len(tok), seed=0)
    barrier = threading.Barrier(2, timeout=20)
    meetings, forwards, advances = [], [], []

    class MeetingLLM(logitfuse.HFLLM):
        def advance(self, new_tokens, need=None):
            advances.append(1)
            if len(advances) > 1:  # the first request follows the prefill, inside the processor
                meetings.append(barrier.wait())
            return super().advance(new_tokens, need)

    def meet(module, args, kwargs):
        forwards.append(1)
        if len(forwards) > 1:  # the prefill has no request to meet
            barrier.wait()

    inputs = private_batch(tok, 2)
    hook = slm.register_forward_pre_hook(meet, with_kwargs=True)
    try:
        overlapped, proc = run(slm, MeetingLLM(llm_model, tok), inputs, PUBLICS[:2], overlap=True, alpha=0.3)
    finally:
        hook.remove()
    assert len(meetings) == proc.overlapped_steps == N_NEW - 1
    plain, _ = run(slm, logitfuse.HFLLM(llm_model, tok), inputs, PUBLICS[:2], overlap=False, alpha=0.3)
    assert overlapped[:3] == plain[:3]


class NeverStop(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@pytest.mark.parametrize("case", ["beam search", "entropy_gate", "criterion not last", "another processor"])
def test_where_the_criterion_cannot_tell_it_steps_synchronously(tok, slm, llm_model, case):
    """The criterion prefetches nothing (its request would not be the processor's next one, or the
    schedule needs the SLM's logits to decide): the processor steps as without it."""
    inputs = private_batch(tok, 2)
    options = {"alpha": 0.4}
    if case == "beam search":
        options["num_beams"] = 2
    if case == "entropy_gate":
        options["schedule"] = "entropy_gate(5.95)"
    plain, _ = run(slm, logitfuse.HFLLM(llm_model, tok), inputs, PUBLICS[:2], overlap=False, **dict(options))
    llm = logitfuse.HFLLM(llm_model, tok)
    proc = logitfuse.CoGenesisLogitsProcessor(llm, PUBLICS[:2], **{k: v for k, v in options.items() if k != "num_beams"})
    criteria = proc.stopping_criteria()
    if case == "criterion not last":
        criteria = StoppingCriteriaList([*criteria, NeverStop()])
    bystander = None
    if case == "another processor":  # the criterion of a processor this generate() call does not use
        bystander = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), PUBLICS[:2], alpha=0.4)
        bystander_llm, criteria = bystander.llm, bystander.stopping_criteria()
    tokens = generate(slm, inputs, N_NEW, proc, stopping_criteria=criteria,
                      num_beams=options.get("num_beams", 1)).tolist()
    assert (tokens, [a.tolist() for a in proc.alpha_history], dict(proc.stats), llm.audit_log) == plain
    assert proc.overlapped_steps == 0
    if bystander is not None:
        assert bystander.overlapped_steps == 0 and bystander_llm.audit_log == []
    if case == "beam search":
        assert plain[2]["reorders"] > 0


def test_a_reused_processor_after_reset_overlaps_again(tok, slm, llm_model):
    inputs = private_batch(tok, 2)
    proc = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), PUBLICS[:2], alpha=0.4)
    first = generate(slm, inputs, N_NEW, proc, stopping_criteria=proc.stopping_criteria()).tolist()
    stats = dict(proc.stats)
    proc.reset()
    assert proc.overlapped_steps == 0
    again = generate(slm, inputs, N_NEW, proc, stopping_criteria=proc.stopping_criteria()).tolist()
    assert again == first and dict(proc.stats) == stats and proc.overlapped_steps == N_NEW - 1


def test_the_demo_processor_engine_overlaps_with_a_head(tok, slm, llm_model):
    """``--fused-engine processor`` (demo_generation.generate_fused) passes the criterion; a fusion
    head's α is the same as without it."""
    from logitfuse.cli.generation import generate_fused

    head = logitfuse.FusionHead(len(tok), len(tok), init_alpha=0.5)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        head.mlp[-1].weight.data.normal_(0, 0.5)
    private = private_prompt_ids(tok, PRIVATE, PUBLIC)
    proc = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), PUBLIC, head=head)
    fused = generate_fused(slm, tok, private, proc, N_NEW, do_sample=False)
    assert proc.overlapped_steps == N_NEW - 1
    plain, _ = run(slm, logitfuse.HFLLM(llm_model, tok), left_pad([private]), PUBLIC, overlap=False, head=head)
    assert fused.token_ids == plain[0][0] and fused.alpha == [step[0] for step in plain[1]]
    assert fused.stats == plain[2]
