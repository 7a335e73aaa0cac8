"""Fused generation through CoGenesisLogitsProcessor with a local LLM (HFLLM), tiny random models."""

from __future__ import annotations

import codecs
import inspect

import pytest
import torch
from logitfuse.testing.generation import (
    PRIVATE,
    PUBLIC,
    chat_ids,
    generate,
    hf_streams,
    left_pad,
    private_prompt_ids,
)
from logitfuse.testing import byte_level_tokenizer, sentencepiece_tokenizer, tiny_llama

import logitfuse
import logitfuse.decoding.schedules
from logitfuse.vocab.retokenize import token_bytes
from logitfuse.decoding.schedules import parse

N_NEW = 12


PRIVATES = [PRIVATE, "I am Ana; I love roses.", "Secret: 1234"]


def private_rows(tok, publics):
    return [private_prompt_ids(tok, p, q) for p, q in zip(PRIVATES, publics)]


def private_batch(tok, publics):
    return left_pad(private_rows(tok, publics))


PUBLICS = [PUBLIC, "Dear friends,", "Thank you for your help with the garden"]


def test_alpha_one_equals_plain_slm_greedy(tok, slm, llm_model):
    inputs = private_batch(tok, PUBLICS)
    plain = generate(slm, inputs, N_NEW)
    proc = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), PUBLICS, alpha=1.0)
    fused = generate(slm, inputs, N_NEW, proc)
    assert torch.equal(fused, plain)
    # α = 1 gives the LLM weight 0: its calls are skipped altogether
    assert proc.stats["steps"] == N_NEW and proc.stats["llm_calls"] == 0
    assert proc.stats["fallbacks"] == 0


def test_tokens_banned_by_earlier_processors_stay_banned(tok, slm, llm_model):
    """Linear fusion must not give back mass to a token `bad_words_ids` removed from the SLM's scores."""
    inputs = private_batch(tok, PUBLICS[:1])
    proc = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), PUBLICS[:1], alpha=0.0)
    free = generate(slm, inputs, N_NEW, proc)[0].tolist()
    banned = sorted(set(free))[:3]
    proc.reset()
    constrained = generate(slm, inputs, N_NEW, proc, bad_words_ids=[[t] for t in banned])[0].tolist()
    assert not set(constrained) & set(banned), (banned, constrained)


def test_alpha_history_records_each_step(tok, slm, llm_model):
    inputs = private_batch(tok, PUBLICS[:2])
    proc = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), PUBLICS[:2], alpha=0.3,
                                              schedule="periodic(2, 1, 1)")
    generate(slm, inputs, 6, proc)
    history = torch.stack(proc.alpha_history)
    assert history.shape == (6, 2)
    skipped = history[:, 0] == 1.0
    assert int(skipped.sum()) == proc.stats["saved_calls"] // 2 and torch.all(history[~skipped] == 0.3)


@pytest.mark.parametrize("batch", [1, 2])
def test_alpha_zero_shared_model_equals_llm_greedy(tok, slm, batch):
    """Identity map, one model on both sides, α = 0: the tokens are the LLM's own greedy decoding
    of the public prompt, although the SLM's input held the private prompt."""
    publics = PUBLICS[:batch]
    public_ids = [chat_ids(tok, p) for p in publics]
    proc = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(slm, tok), public_ids, alpha=0.0)
    fused = generate(slm, private_batch(tok, publics), N_NEW, proc)
    for row, ids in enumerate(public_ids):
        own = generate(slm, left_pad([ids]), N_NEW)
        assert fused[row].tolist() == own[0].tolist()


def test_batched_left_padding_equals_per_row(tok, slm, llm_model):
    llm = logitfuse.HFLLM(llm_model, tok)
    inputs = private_batch(tok, PUBLICS)
    proc = logitfuse.CoGenesisLogitsProcessor(llm, PUBLICS, alpha=0.4)
    batched = generate(slm, inputs, N_NEW, proc)
    for row, (public, ids) in enumerate(zip(PUBLICS, private_rows(tok, PUBLICS))):
        proc_one = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), public, alpha=0.4)
        assert generate(slm, left_pad([ids]), N_NEW, proc_one)[0].tolist() == batched[row].tolist()


def test_llm_receives_exactly_the_generated_tokens(tok, slm, llm_model):
    llm = logitfuse.HFLLM(llm_model, tok)
    public_ids = [chat_ids(tok, p) for p in PUBLICS]
    proc = logitfuse.CoGenesisLogitsProcessor(llm, public_ids, alpha=0.5)
    out = generate(slm, private_batch(tok, PUBLICS), N_NEW, proc)
    # the LLM saw its public prompt, then every generated token but the last (never scored)
    assert hf_streams(llm.audit_log) == [p + out[r, :-1].tolist() for r, p in enumerate(public_ids)]


def test_sampling_and_head(tok, slm, llm_model):
    """Sampling with a head uses the head's α: a head whose α is a constant (zero last layer) samples
    exactly what the same constant as a fixed α samples, and not what the SLM alone samples."""
    head = logitfuse.FusionHead(len(tok), len(tok), init_alpha=0.2)
    constant = float(torch.sigmoid(head.mlp[-1].bias.detach()))  # the head's α whatever the features

    def sample(**weight):
        proc = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), PUBLICS, **weight)
        torch.manual_seed(0)
        return generate(slm, private_batch(tok, PUBLICS), N_NEW, proc, do_sample=True, top_k=0), proc

    out, proc = sample(head=head)
    assert out.shape == (3, N_NEW) and proc.stats["llm_row_calls"] == 3 * N_NEW
    assert all(torch.allclose(a, torch.full((3,), constant)) for a in proc.alpha_history)
    assert torch.equal(out, sample(alpha=constant)[0])
    assert not torch.equal(out, sample(alpha=1.0)[0])


def test_finished_rows_stop_advancing(tok, slm, llm_model):
    inputs = private_batch(tok, PUBLICS)
    plain = generate(slm, inputs, N_NEW)
    eos = int(plain[0, 2])  # row 0 "finishes" at its third token (other rows may too)
    plain_eos = generate(slm, inputs, N_NEW, eos_token_id=eos)
    llm = logitfuse.HFLLM(llm_model, tok)
    # α just below 1: the LLM is consulted (α = 1 skips it) but cannot change the greedy choice
    proc = logitfuse.CoGenesisLogitsProcessor(llm, PUBLICS, alpha=1.0 - 1e-6, eos_token_id=eos)
    fused = generate(slm, inputs, N_NEW, proc, eos_token_id=eos)
    assert torch.equal(fused, plain_eos)
    streams = hf_streams(llm.audit_log)
    assert streams[0][-2:] == plain[0, :2].tolist()  # eos and the padding after it were not fed
    # a row is consulted up to and including the step that produced its eos
    width = fused.shape[1]
    active = [row.index(eos) + 1 if eos in row else width for row in fused.tolist()]
    assert proc.stats["llm_row_calls"] == sum(active) and proc.stats["steps"] == width


def test_reset_and_reuse(tok, slm, llm_model):
    inputs = private_batch(tok, PUBLICS[:2])
    proc = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), PUBLICS[:2], alpha=0.3)
    first = generate(slm, inputs, 6, proc)
    with pytest.raises(ValueError, match="reset"):
        generate(slm, inputs, 6, proc)
    proc.reset()
    assert proc.stats["steps"] == 0
    assert torch.equal(generate(slm, inputs, 6, proc), first)


@pytest.mark.parametrize("prompts", ["one", "one-per-row", "two-rows"])
def test_beam_search_follows_the_beams(tok, slm, prompts):
    """α = 0 with one shared model: fused beam search must equal the LLM's own beam search over the
    public prompt, which only holds if the LLM's state follows every reordering of the beams."""
    publics = PUBLICS[:2] if prompts == "two-rows" else [PUBLIC]
    public_ids = [chat_ids(tok, p) for p in publics]
    llm = logitfuse.HFLLM(slm, tok)
    proc = logitfuse.CoGenesisLogitsProcessor(llm, public_ids[0] if prompts == "one" else public_ids, alpha=0.0)
    fused = generate(slm, private_batch(tok, publics), 8, proc, num_beams=3, num_return_sequences=2)
    own = generate(slm, left_pad(public_ids), 8, num_beams=3, num_return_sequences=2)
    assert proc.stats["reorders"] > 0
    assert fused.tolist() == own.tolist()


def test_beam_search_across_tokenizers_keeps_streams_exact():
    sp, bl = sentencepiece_tokenizer(), byte_level_tokenizer()
    slm, llm_model = tiny_llama(len(sp), seed=2), tiny_llama(len(bl), seed=3)
    llm = logitfuse.HFLLM(llm_model, bl)
    public_ids = chat_ids(bl, PUBLIC)
    proc = logitfuse.CoGenesisLogitsProcessor(llm, [public_ids], alpha=0.5, slm_tokenizer=sp, eos_token_id=[],
                                              vocab_map=logitfuse.VocabMap.from_tokenizers(sp, bl))
    generate(slm, left_pad([private_prompt_ids(sp, PRIVATE, PUBLIC)]), 8, proc, num_beams=3)
    assert proc.stats["reorders"] > 0
    for row, stream in enumerate(hf_streams(llm.audit_log)):
        assert stream[len(public_ids):] == proc.llm_token_ids(row)
        assert token_bytes(bl, proc.llm_token_ids(row)).decode() == proc.generated_text(row)


def test_a_new_generation_without_reset_raises(tok, slm, llm_model):
    proc = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), [PUBLIC] * 2, alpha=0.5)
    generate(slm, private_batch(tok, PUBLICS[:2]), 3, proc)
    with pytest.raises(ValueError, match="reset"):
        generate(slm, private_batch(tok, PUBLICS[1:3]), 5, proc)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one of head"),
    (dict(alpha=0.5, head=object()), "exactly one of head"),
    (dict(alpha=1.5), "alpha=1.5"),
    (dict(alpha=0.5, mode="max"), "mode='max'"),
    (dict(alpha=0.5, schedule="sometimes"), "schedule='sometimes'"),
    (dict(alpha=0.5, schedule="periodic(1, 2, 0)"), "T=0"),
    (dict(alpha=0.5, vocab_map=logitfuse.VocabMap.identity(400, 300)), "v_llm=300"),
])
def test_constructor_validation(tok, llm_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), PUBLIC, **kwargs)


def test_a_fusion_config_or_its_fields_as_keywords(tok, slm, llm_model):
    """One FusionConfig, the same fields as keywords, or keywords over another config: the same run."""
    inputs = private_batch(tok, PUBLICS)
    fields = dict(alpha=0.4, mode="geometric", schedule="periodic(2, 1, 1)")
    runs = []
    for args, kwargs in (((logitfuse.FusionConfig(**fields),), {}), ((), fields),
                         ((logitfuse.FusionConfig(alpha=0.9, tail="uniform"),), dict(fields, tail="slm"))):
        llm = logitfuse.HFLLM(llm_model, tok)
        proc = logitfuse.CoGenesisLogitsProcessor(llm, PUBLICS, *args, **kwargs)
        runs.append((generate(slm, inputs, 6, proc).tolist(), dict(proc.stats), llm.audit_log))
        assert (proc.fusion.alpha, proc.mode, proc.tail, proc.schedule.spec) == (0.4, "geometric", "slm",
                                                                                "periodic(2, 1, 1)")
    assert runs[0] == runs[1] == runs[2] and runs[0][1]["saved_calls"] > 0
    assert len(inspect.signature(logitfuse.CoGenesisLogitsProcessor).parameters) <= 7  # and self


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((), dict(alpha=0.5, max_new_tokens=4), TypeError, r"CoGenesisLogitsProcessor\(\) got unexpected .*max_new_tokens"),
    ((), dict(alpha=0.5, speculate=2), ValueError, r"speculate=2.*logitfuse.generate"),
    (("alpha=0.5",), {}, TypeError, "expected a FusionConfig, got str"),
    ((logitfuse.FusionConfig(alpha=0.5),), dict(mode="max"), ValueError, "mode='max'"),
])
def test_bad_settings_name_the_argument(tok, llm_model, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), PUBLIC, *args, **kwargs)


@pytest.mark.parametrize("public_prompt", [5, [], None, [["a"], "b"]])
def test_a_public_prompt_that_is_no_prompt_is_refused(tok, llm_model, public_prompt):
    with pytest.raises(ValueError, match="public_prompt must be one prompt"):
        logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), public_prompt, alpha=0.5)


def test_text_prompt_needs_a_backend_tokenizer(llm_model):
    with pytest.raises(ValueError, match="tokenizer"):
        logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model), PUBLIC, alpha=0.5)
    logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model), [[5, 6, 7]], alpha=0.5)  # ids are fine


def test_head_must_match_the_setting(tok, llm_model):
    head = logitfuse.FusionHead(len(tok), len(tok), mode="geometric")
    with pytest.raises(ValueError, match="mode"):
        logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), PUBLIC, head=head, mode="linear")


def test_a_head_brings_its_own_mode_and_tail(tok, llm_model):
    head = logitfuse.FusionHead(len(tok), len(tok), mode="geometric", tail="uniform")
    proc = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), PUBLIC, head=head)
    assert (proc.mode, proc.tail) == ("geometric", "uniform")
    fixed = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), PUBLIC, alpha=0.5)
    assert (fixed.mode, fixed.tail) == ("linear", "slm")


# ------------------------------------------------------------------------------------ schedules
def test_schedule_parsing():
    from logitfuse.decoding.schedules import Always, EntropyGate, Periodic

    assert isinstance(parse("always"), Always)
    assert parse(" periodic(5, 10, 3) ").spec == "periodic(5, 10, 3)"
    assert parse("entropy_gate(2.5)").threshold == 2.5
    schedule = Periodic(5, 10, 3)
    assert parse(schedule) is schedule
    # the paper's FusionStrategy: step < P, else (step - K - 1) % (K + T) < T
    paper = [step < 5 or (step - 11) % 13 < 3 for step in range(60)]
    assert [schedule.should_call(step, None) for step in range(60)] == paper
    gate = EntropyGate(1.0)
    assert gate.should_call(0, torch.tensor([0.5, 1.0, 2.0])).tolist() == [False, True, True]
    for bad in ["never", "periodic(1, 2)", "periodic(1.5, 2, 3)", "entropy_gate(-1)", "entropy_gate(x)"]:
        with pytest.raises(ValueError, match="schedule|threshold|must"):
            parse(bad)
    with pytest.raises(TypeError):
        parse(3)


@pytest.mark.parametrize("spec", ["periodic(2, 3, 1)", "periodic(0, 1, 2)", "periodic(20, 1, 1)"])
def test_periodic_call_counts_match_the_schedule(tok, slm, llm_model, spec):
    llm = logitfuse.HFLLM(llm_model, tok)
    public_ids = [chat_ids(tok, p) for p in PUBLICS[:2]]
    proc = logitfuse.CoGenesisLogitsProcessor(llm, public_ids, alpha=0.3, schedule=spec)
    out = generate(slm, private_batch(tok, PUBLICS[:2]), N_NEW, proc)
    expected = sum(bool(parse(spec).should_call(step, None)) for step in range(N_NEW))
    assert proc.stats["llm_calls"] == expected
    assert proc.stats["llm_row_calls"] == 2 * expected
    assert proc.stats["saved_calls"] == 2 * (N_NEW - expected)
    # lazy catch-up: what the LLM was fed is a prefix of the generated tokens, in order
    for row, stream in enumerate(hf_streams(llm.audit_log)):
        fed = stream[len(public_ids[row]):]
        assert fed == out[row, :len(fed)].tolist()


def test_skipped_steps_keep_the_llm_in_sync(tok, slm):
    """α = 0 on every LLM step with one shared model: whenever the LLM is consulted after skipped
    steps, its logits must be those of a full forward over public prompt + everything generated."""
    public_ids = chat_ids(tok, PUBLIC)
    seen = []

    class Recording(logitfuse.HFLLM):
        def advance(self, new_tokens, need=None):
            out = super().advance(new_tokens, need)
            seen.append(out.next[0].clone())
            return out

    llm = Recording(slm, tok)
    proc = logitfuse.CoGenesisLogitsProcessor(llm, [public_ids], alpha=0.0, schedule="periodic(1, 2, 1)")
    generate(slm, private_batch(tok, [PUBLIC]), N_NEW, proc)
    streams = hf_streams(llm.audit_log)[0]
    calls = [step for step in range(N_NEW) if parse("periodic(1, 2, 1)").should_call(step, None)]
    assert len(seen) == len(calls)
    fed = streams[len(public_ids):]
    for logits, step in zip(seen, calls):
        with torch.no_grad():
            full = slm(torch.tensor([public_ids + fed[:step]])).logits[0, -1].float()
        torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)


def test_entropy_gate_zero_equals_always(tok, slm, llm_model):
    inputs = private_batch(tok, PUBLICS)
    runs = {}
    for spec in ("always", "entropy_gate(0)"):
        proc = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), PUBLICS, alpha=0.3, schedule=spec)
        runs[spec] = (generate(slm, inputs, N_NEW, proc), dict(proc.stats))
    assert torch.equal(runs["always"][0], runs["entropy_gate(0)"][0])
    assert runs["always"][1] == runs["entropy_gate(0)"][1]


def test_entropy_gate_skips_confident_rows(tok, slm, llm_model):
    inputs = private_batch(tok, PUBLICS)
    proc = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), PUBLICS, alpha=0.3,
                                              schedule="entropy_gate(1e9)")
    out = generate(slm, inputs, N_NEW, proc)
    assert proc.stats["llm_calls"] == 0 and proc.stats["saved_calls"] == 3 * N_NEW
    assert torch.equal(out, generate(slm, inputs, N_NEW))  # SLM alone


def test_per_row_schedule_calls_only_those_rows(tok, slm, llm_model):
    """A schedule may answer per row (as the entropy gate does): other rows use the SLM alone."""

    class EveryOtherRow(logitfuse.decoding.schedules.Schedule):
        spec = "every-other-row"

        def should_call(self, step, slm_entropy):
            return torch.tensor([True, False, True])

    inputs = private_batch(tok, PUBLICS)
    llm = logitfuse.HFLLM(llm_model, tok)
    proc = logitfuse.CoGenesisLogitsProcessor(llm, PUBLICS, alpha=0.0, schedule=EveryOtherRow())
    out = generate(slm, inputs, 6, proc)
    assert proc.stats["llm_row_calls"] == 2 * 6 and proc.stats["saved_calls"] == 6
    assert out[1].tolist() == generate(slm, inputs, 6)[1].tolist()  # row 1: SLM alone


# ------------------------------------------------------------------------------- cross-tokenizer
@pytest.mark.parametrize("direction", ["sp->bytelevel", "bytelevel->sp"])
def test_cross_tokenizer_generation(direction):
    sp, bl = sentencepiece_tokenizer(), byte_level_tokenizer()
    slm_tok, llm_tok = (sp, bl) if direction == "sp->bytelevel" else (bl, sp)
    slm, llm_model = tiny_llama(len(slm_tok), seed=2), tiny_llama(len(llm_tok), seed=3)
    llm = logitfuse.HFLLM(llm_model, llm_tok)
    vocab_map = logitfuse.VocabMap.from_tokenizers(slm_tok, llm_tok)
    public_ids = [chat_ids(llm_tok, p) for p in PUBLICS[:2]]
    proc = logitfuse.CoGenesisLogitsProcessor(llm, public_ids, alpha=0.5, vocab_map=vocab_map,
                                              slm_tokenizer=slm_tok, eos_token_id=[])
    inputs = left_pad([private_prompt_ids(slm_tok, PRIVATE, p) for p in PUBLICS[:2]])
    out = generate(slm, inputs, 16, proc)
    streams = hf_streams(llm.audit_log)
    for row in range(2):
        generated = out[row, :-1].tolist()  # the last token is never shown to the processor
        text = codecs.getincrementaldecoder("utf-8")("replace").decode(token_bytes(slm_tok, generated))
        assert text and proc.generated_text(row) == text
        llm_ids = streams[row][len(public_ids[row]):]
        assert llm_ids == proc.llm_token_ids(row)
        assert token_bytes(llm_tok, llm_ids).decode("utf-8") == text
        # the LLM tokenizer's own decode agrees (a sentencepiece decoder strips one leading space)
        assert llm_tok.decode(llm_ids) == (text[1:] if llm_tok is sp and text.startswith(" ") else text)


def test_cross_tokenizer_needs_the_slm_tokenizer():
    sp, bl = sentencepiece_tokenizer(), byte_level_tokenizer()
    llm = logitfuse.HFLLM(tiny_llama(len(bl), seed=3), bl)
    with pytest.raises(ValueError, match="slm_tokenizer"):
        logitfuse.CoGenesisLogitsProcessor(llm, PUBLIC, alpha=0.5, vocab_map=logitfuse.VocabMap.from_tokenizers(sp, bl))
