"""The SLM in llama.cpp (logitfuse.LlamaCppSLM) against the same weights in transformers.

Two sets of weights:
- a tiny random Llama (logitfuse.testing.tiny_llama over the byte-level test tokenizer) written as a
  float32 GGUF file in-process (`write_tiny_gguf`): llama.cpp and transformers compute the same
  logits up to ~1e-4, so the fused greedy outputs of the two engine adapters must agree token for
  token; no real model needed;
- the zoo's SmolLM2-135M-Instruct Q4_1 GGUF against the zoo's dequantized transformers copy of it
  (`logitfuse models install smollm2-135m`): llama.cpp's Q4_1 kernels quantize the activations to 8
  bits too, so the two differ by about 0.1 nats (tests/backends/test_engine.py); the fused greedy outputs agree
  until a near-tie.

Skips, saying why, without llama-cpp-python (`pip install "llama-cpp-python[server]==0.3.36"`) or,
for the second set, the real model.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from transformers import LogitsProcessor

import logitfuse
from logitfuse import zoo
from logitfuse.decoding.llama_cpp import LlamaCppSLM, generate_fused_llama_cpp, llama_cpp_python_missing
from logitfuse.testing import byte_level_tokenizer, sentencepiece_tokenizer, tiny_llama
from logitfuse.testing.gguf import write_tiny_gguf


def fused_llama(slm, llm, private_ids, public_ids, **options):
    """logitfuse.generate over the llama.cpp SLM, one row."""
    return logitfuse.generate(slm, llm, [private_ids], public_ids, **options)


def alone(slm, ids, **options):
    """The llama.cpp SLM alone through logitfuse.generate (α = 1, no LLM)."""
    return logitfuse.generate(slm, None, [ids], alpha=1.0, **options)


pytestmark = pytest.mark.engine

CANARY = "Zq7VtX3kLp9R"
PRIVATE = f"My name is Martin and my door code is {CANARY}. Write an invitation:"
PUBLIC = "Write an invitation:"
TINY_EOS = [0, 2]  # what llama.cpp marks as ending generation in the tiny GGUF (<|endoftext|>, <|im_end|>)


@pytest.fixture(scope="module", autouse=True)
def _needs_llama_cpp():
    missing = llama_cpp_python_missing()
    if missing:
        pytest.skip(missing)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(LlamaCppSLM over the tiny GGUF, the same model in transformers, tokenizer, GGUF path)``."""
    tok = byte_level_tokenizer()
    model = tiny_llama(len(tok), seed=0)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, tok, model)
    slm = LlamaCppSLM(path, n_ctx=256, n_threads=1, tokenizer=tok)
    yield slm, model, tok, path
    slm.close()


class RecordScores(LogitsProcessor):
    """Keeps the scores it is given (put it after the fusion processor: the fused log-probabilities)."""

    def __init__(self):
        self.rows: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.rows.append(scores[0].clone())
        return scores


def transformers_fused(model, tok, llm, private_ids, public_ids, n_new, eos, alpha=0.5, **options):
    """Greedy fused ids (up to the first ``eos`` id) and the fused log-probabilities of each step,
    from the transformers adapter."""
    proc = logitfuse.CoGenesisLogitsProcessor(llm, public_ids, alpha=alpha, slm_tokenizer=tok, **options)
    record = RecordScores()
    inputs = torch.tensor([private_ids])
    with torch.no_grad():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), logits_processor=[proc, record],
                             max_new_tokens=n_new, do_sample=False, pad_token_id=eos[0], eos_token_id=eos)
    ids = out[0, inputs.shape[1]:].tolist()
    end = next((i for i, t in enumerate(ids) if t in eos), len(ids))
    return ids[:end], record.rows, proc


def agreement(reference: list[int], ours: list[int], reference_logprobs: list[torch.Tensor]) -> tuple[int, float]:
    """``(tokens identical from the start, how far our token at the first difference is below the
    reference's in the reference's fused distribution (0 when there is none))``."""
    same = 0
    while same < min(len(reference), len(ours)) and reference[same] == ours[same]:
        same += 1
    if same == len(reference) == len(ours):
        return same, 0.0
    if same == min(len(reference), len(ours)):  # one of them ended (EOS): compare EOS with the other's token
        return same, float("inf")
    row = reference_logprobs[same]
    return same, float(row[reference[same]] - row[ours[same]])


# ---------------------------------------------------------------------------------- tiny-model tests
def test_tiny_gguf_logits_match_transformers_and_the_kv_cache_is_kept(tiny):
    slm, model, tok, _ = tiny
    ids = tok.encode("Dear friends, please join us for dinner.")
    assert slm.tokenize("Dear friends, please join us for dinner.") == ids
    assert slm.detokenize(ids) == "Dear friends, please join us for dinner."
    assert slm.vocab_size == len(tok) and slm.eos_token_ids == frozenset(TINY_EOS)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0]
    slm.reset()
    every = slm.eval(ids, all_logits=True)
    assert every.shape == (len(ids), len(tok)) and every.dtype == torch.float32
    assert float((every - reference).abs().max()) < 1e-3
    # continuing from the cache one token at a time gives the same logits as evaluating all at once
    slm.truncate(3)
    for position in range(3, len(ids)):
        last = slm.eval([ids[position]])
        assert last.shape == (1, len(tok))
        assert float((last[0] - reference[position]).abs().max()) < 1e-3
    assert slm.n_past == len(ids)


def test_tiny_fused_greedy_is_the_transformers_processor_output(tiny):
    slm, model, tok, _ = tiny
    private_ids, public_ids = tok.encode(PRIVATE), tok.encode(PUBLIC)
    for alpha, schedule in ((0.5, "always"), (0.2, "periodic(3, 2, 1)")):
        llm_model = tiny_llama(len(tok), seed=1)
        ref_ids, ref_rows, proc = transformers_fused(model, tok, logitfuse.HFLLM(llm_model, tok), private_ids,
                                                     public_ids, 16, TINY_EOS, alpha=alpha, schedule=schedule)
        out = fused_llama(slm, logitfuse.HFLLM(llm_model, tok), private_ids, public_ids, alpha=alpha,
                          schedule=schedule, max_new_tokens=16)
        same, gap = agreement(ref_ids, out.token_ids, ref_rows)
        # the same weights in float32 on both sides: identical, or a difference only at an exact near-tie
        assert same == len(ref_ids) == len(out.token_ids) or gap < 1e-3, (alpha, schedule, ref_ids, out.token_ids)
        assert out.text == tok.decode(out.token_ids)
        if same == len(ref_ids):
            for key in ("steps", "llm_calls", "saved_calls", "llm_tokens"):
                assert out.stats[key] == proc.stats[key], key
            assert out.alpha[0][: len(out.token_ids)] == [float(a[0]) for a in proc.alpha_history][: len(out.token_ids)]
        expected_alpha = {alpha} if schedule == "always" else {alpha, 1.0}  # 1: steps the schedule skipped
        assert {round(a, 6) for a in out.alpha[0]} == expected_alpha
    slm_alone = alone(slm, private_ids, max_new_tokens=16)
    assert slm_alone.token_ids != out.token_ids  # the LLM changed the output: fusion is not a no-op here


def test_tiny_private_prompt_never_reaches_the_llm(tiny):
    slm, _, tok, _ = tiny
    private_ids, public_ids = tok.encode(PRIVATE), tok.encode(PUBLIC)
    llm = logitfuse.HFLLM(tiny_llama(len(tok), seed=1), tok)
    out = fused_llama(slm, llm, private_ids, public_ids, alpha=0.5, max_new_tokens=12)
    starts = [entry for entry in llm.audit_log if entry["op"] == "start"]
    assert starts == [{"op": "start", "token_ids": [public_ids]}]
    sent = [t for entry in llm.audit_log if entry["op"] == "advance" for row in entry["token_ids"] for t in row]
    # only generated tokens, in order: each step sends the token kept at the step before
    assert len(sent) >= len(out.token_ids) - 1 and sent == out.token_ids[: len(sent)]
    assert CANARY not in out.text and CANARY not in tok.decode(public_ids) + tok.decode(sent)


def test_tiny_alpha_1_is_the_slm_alone_and_never_contacts_the_llm(tiny):
    slm, _, tok, _ = tiny
    private_ids = tok.encode(PRIVATE)
    llm = logitfuse.HFLLM(tiny_llama(len(tok), seed=1), tok)
    fused = fused_llama(slm, llm, private_ids, tok.encode(PUBLIC), alpha=1.0, max_new_tokens=10)
    slm_alone = alone(slm, private_ids, max_new_tokens=10)
    assert fused.token_ids == slm_alone.token_ids and llm.audit_log == []
    assert fused.stats["llm_calls"] == 0 and slm_alone.stats.llm_calls == 0 and set(slm_alone.alpha[0]) == {1.0}
    with pytest.warns(DeprecationWarning, match="logitfuse.generate"):  # the old entry point: a thin wrapper
        assert slm.generate(private_ids, max_new_tokens=10).token_ids == slm_alone.token_ids


def test_tiny_repetition_penalty_follows_transformers(tiny):
    slm, model, tok, _ = tiny
    ids = tok.encode("The quick brown fox jumps over the lazy dog. The quick brown")
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=16, do_sample=False, repetition_penalty=1.5, pad_token_id=0,
                             eos_token_id=TINY_EOS)
    reference = out[0, len(ids):].tolist()
    reference = reference[: next((i for i, t in enumerate(reference) if t in TINY_EOS), len(reference))]
    ours = alone(slm, ids, max_new_tokens=16, repetition_penalty=1.5).token_ids
    plain = alone(slm, ids, max_new_tokens=16).token_ids
    assert ours == reference and plain != reference


def test_tiny_sampling_is_seeded_and_top_k_1_is_greedy(tiny):
    slm, _, tok, _ = tiny
    ids = tok.encode(PRIVATE)
    first = alone(slm, ids, max_new_tokens=12, temperature=1.0, seed=3).token_ids
    assert alone(slm, ids, max_new_tokens=12, temperature=1.0, generator=torch.Generator().manual_seed(3)).token_ids == first
    others = {tuple(alone(slm, ids, max_new_tokens=12, temperature=1.0, seed=s).token_ids) for s in (4, 5, 6)}
    assert others != {tuple(first)}  # the seed matters
    greedy = alone(slm, ids, max_new_tokens=12).token_ids
    assert alone(slm, ids, max_new_tokens=12, temperature=1.0, top_k=1, seed=9).token_ids == greedy
    assert alone(slm, ids, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=9).token_ids == greedy
    stop = greedy[3]
    stopped = alone(slm, ids, max_new_tokens=12, eos_token_id=TINY_EOS + [stop])
    assert stopped.token_ids == greedy[: greedy.index(stop)] and stopped.stopped == ["eos"]


@pytest.mark.parametrize("call, message", [
    (lambda s, i: alone(s, i, max_new_tokens=0), "max_new_tokens=0"),
    (lambda s, i: alone(s, i, max_new_tokens=300), "n_ctx=256"),
    (lambda s, i: alone(s, [], max_new_tokens=4), "private_input_ids is empty"),
    (lambda s, i: alone(s, [1, 10_000], max_new_tokens=4), "private_input_ids holds ids outside [0, 400)"),
    (lambda s, i: logitfuse.generate(s, None, "text", alpha=1.0), "private_input_ids must be a list of token ids"),
    (lambda s, i: alone(s, i, temperature=-1.0), "temperature=-1.0"),
    (lambda s, i: alone(s, i, top_p=0.0), "top_p=0.0"),
    (lambda s, i: alone(s, i, top_k=-2), "top_k=-2"),
    (lambda s, i: alone(s, i, repetition_penalty=0), "repetition_penalty=0"),
    (lambda s, i: logitfuse.generate(s, None, [i], alpha=0.5), "llm=None works only with alpha=1"),
    (lambda s, i: s.generate(i, public_prompt="Write:"), "pass session= and public_prompt= together"),
    (lambda s, i: s.generate(i, session="llm", public_prompt="Write:"), "session must be a logitfuse.FusionSession"),
    (lambda s, i: s.truncate(10_000), "n_past=10000"),
])
def test_tiny_bad_arguments_name_the_argument(tiny, call, message):
    slm, _, tok, _ = tiny
    with pytest.raises((ValueError, TypeError)) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        call(slm, tok.encode(PRIVATE))
    assert message in str(err.value)


def test_tiny_errors_come_before_the_llm_is_contacted(tiny, tmp_path):
    slm, _, tok, path = tiny
    llm = logitfuse.HFLLM(tiny_llama(len(tok), seed=1), tok)
    with pytest.raises(ValueError, match="exceed n_ctx"):
        fused_llama(slm, llm, tok.encode(PRIVATE), tok.encode(PUBLIC), alpha=0.5, max_new_tokens=500)
    assert llm.audit_log == []
    with pytest.raises(FileNotFoundError, match="model_path="):
        LlamaCppSLM(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="could not load"):
        LlamaCppSLM(tmp_path / "junk.gguf")
    with pytest.raises(ValueError, match="tokenizer does not tokenize like"):
        LlamaCppSLM(path, n_ctx=64, n_threads=1, tokenizer=sentencepiece_tokenizer())
    with pytest.raises(ValueError, match="no tokenizer to render them"):
        LlamaCppSLM(path, n_ctx=64, n_threads=1).tokenize([{"role": "user", "content": "hi"}])


def test_tiny_chat_messages_are_rendered_with_the_tokenizer(tiny):
    slm, _, tok, _ = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write an invitation."}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert slm.tokenize(messages) == tok.encode(text, add_special_tokens=False)
    assert tok.convert_tokens_to_ids("<|im_start|>") in slm.tokenize(messages)  # special tokens parsed


# ---------------------------------------------------------------------------------- logitfuse.generate on llama.cpp
def _without_eos(ids: list[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in TINY_EOS else ids


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_tiny_generate_on_llama_cpp_is_the_same_whatever_the_path(tiny, penalty):
    """logitfuse.generate over the llama.cpp SLM: per-step with overlap on and off and speculating (K = 2, 4:
    the rejected drafts leave llama.cpp's cache) give the same tokens; the per-step paths the same α and
    counters; the deprecated wrapper is the same call."""
    slm, _, tok, _ = tiny
    private_ids, public_ids = tok.encode(PRIVATE), tok.encode(PUBLIC)
    llm_model = tiny_llama(len(tok), seed=1)
    for alpha in (0.5, 0.95):
        ref = fused_llama(slm, logitfuse.HFLLM(llm_model, tok), private_ids, public_ids, alpha=alpha,
                          max_new_tokens=16, repetition_penalty=penalty, overlap=False)
        for options in (dict(overlap=True), dict(speculate=2), dict(speculate=4)):
            out = fused_llama(slm, logitfuse.HFLLM(llm_model, tok), private_ids, public_ids, alpha=alpha,
                              max_new_tokens=16, repetition_penalty=penalty, **options)
            assert out.sequences == ref.sequences and out.stopped == ref.stopped, (alpha, options)
            if not options.get("speculate"):
                assert out.alpha == ref.alpha and out.stats.llm_calls == ref.stats.llm_calls
            elif alpha == 0.95:
                assert out.stats.draft_tokens_kept > 0 and out.stats.llm_calls < ref.stats.llm_calls
        with pytest.warns(DeprecationWarning):
            old = generate_fused_llama_cpp(slm, logitfuse.HFLLM(llm_model, tok), private_ids, public_ids, alpha=alpha,
                                           max_new_tokens=16, repetition_penalty=penalty)
        assert old.sequences == ref.sequences and old.alpha == ref.alpha


def test_tiny_generate_across_tokenizers_overlaps_exactly(tiny):
    """The demo's shape: the llama.cpp SLM and an LLM with another tokenizer (per-step fusion)."""
    slm, _, tok, _ = tiny
    sp = sentencepiece_tokenizer()
    llm_model = tiny_llama(len(sp), seed=1)
    vocab_map = logitfuse.VocabMap.from_tokenizers(tok, sp, v_slm=slm.vocab_size, v_llm=len(sp))
    private_ids, public_ids = tok.encode(PRIVATE), sp.encode(PUBLIC)
    runs = [logitfuse.generate(slm, logitfuse.HFLLM(llm_model, sp), private_ids, public_ids, alpha=0.4,
                               vocab_map=vocab_map, max_new_tokens=12, repetition_penalty=1.1, overlap=overlap)
            for overlap in (False, True)]
    assert runs[0].sequences == runs[1].sequences and runs[0].stats.llm_calls == runs[1].stats.llm_calls > 0
    assert runs[0].text == tok.decode(runs[0].token_ids, skip_special_tokens=True)  # slm.tokenizer decodes


def test_tiny_cli_engine_takes_logitfuse_generate_with_the_own_loops_tokens(tiny):
    """`logitfuse demo/generate --slm-engine llama.cpp` run logitfuse.generate (logitfuse.cli.common):
    fused, the text, ids and α of LlamaCppSLM's own fused loop; alone (α = 1), those of its own
    generate; greedy with a penalty and sampled from a seed."""
    from logitfuse.cli.common import fusion_config, response, run_engine, sampling_config, slm_alone

    slm, _, tok, _ = tiny
    private_ids, public_ids = tok.encode(PRIVATE), tok.encode(PUBLIC)
    llm_model = tiny_llama(len(tok), seed=1)
    for sampling in ({"repetition_penalty": 1.1}, {"temperature": 0.9, "top_p": 0.9, "seed": 3}):
        config = sampling_config(slm, tok, 12, **sampling)
        out, _ = run_engine(slm, tok, private_ids, logitfuse.HFLLM(llm_model, tok), public_ids,
                            fusion_config(alpha=0.5), config)
        ids, alpha, text = response(slm, tok, out)
        own = fused_llama(slm, logitfuse.HFLLM(llm_model, tok), private_ids, public_ids, alpha=0.5,
                          max_new_tokens=12, **sampling)
        assert (ids, text, alpha) == (own.token_ids, own.text, own.alpha[0][:len(own.token_ids)]), sampling
        assert out.stats.llm_calls == own.stats["llm_calls"]
        by_cli, _ = slm_alone(slm, tok, private_ids, sampling_config(slm, tok, 12, **sampling))
        own = alone(slm, private_ids, max_new_tokens=12, **sampling)
        assert response(slm, tok, by_cli)[::2] == (own.token_ids, own.text) and by_cli.stats.llm_calls == 0, sampling


def test_tiny_generate_loop_refuses_what_llama_cpp_cannot_do(tiny):
    slm, _, tok, _ = tiny
    private_ids = tok.encode(PRIVATE)
    llm = logitfuse.HFLLM(tiny_llama(len(tok), seed=1), tok)
    cases = [
        (dict(private_input_ids=[private_ids, private_ids]), "batch size 1"),
        (dict(private_input_ids=torch.tensor([private_ids]), attention_mask=torch.tensor([[0] + [1] * (len(private_ids) - 1)])),
         "attention_mask"),
        (dict(private_input_ids=private_ids, max_new_tokens=500), "n_ctx"),
        (dict(private_input_ids=[], max_new_tokens=4), "private_input_ids"),
    ]
    for kwargs, match in cases:
        options = dict(max_new_tokens=4) | kwargs
        with pytest.raises(ValueError, match=match):
            logitfuse.generate(slm, llm, public_prompt=PUBLIC, alpha=0.5, **options)
    assert llm.audit_log == []


def test_import_logitfuse_does_not_import_llama_cpp():
    code = "import sys, logitfuse; logitfuse.LlamaCppSLM; print('llama_cpp' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------------------------- the real model
MODEL = "smollm2-135m"
N_NEW = 12
# measured on this machine (SmolLM2-135M-Instruct Q4_1 in llama.cpp vs the zoo's dequantized copy in
# transformers, both fused with the transformers copy as the LLM at α = 0.5, 32 new tokens, 6
# prompts): identical for all 32 tokens on 2 prompts; the others first differed after 1, 9, 14 and 21
# tokens, each time at a near-tie of transformers' fused distribution (0.004 to 0.11 nats apart)
NEAR_TIE = 0.3
PAIRS = [
    (f"My name is Martin; I sell houses on Maple Drive. My customer number is {CANARY}.",
     "Write an invitation to our open house."),
    ("I am allergic to peanuts and live in Lyon.", "Suggest a dinner recipe."),
    ("Our dog Biscuit turns five on Sunday.", "Write a birthday message."),
]


@pytest.fixture(scope="module")
def real():
    try:
        gguf_file, folder = zoo.gguf_path(MODEL), zoo.path(MODEL)
    except zoo.ZooError:
        pytest.skip(f"needs the real models: run `logitfuse models install {MODEL}`")
    model, tok, _ = zoo.load(folder, dtype="float32", install=False, progress=False)
    slm = LlamaCppSLM(gguf_file, n_ctx=1024, n_threads=1, tokenizer=tok)
    # one torch thread: on 2 shared cores, torch's idle OpenMP threads spinning beside llama.cpp's
    # thread slow both engines down several times
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield slm, model, tok
    torch.set_num_threads(threads)
    slm.close()


@pytest.mark.real_models
def test_real_gguf_tokenizer_and_chat_template_agree_with_transformers(real):
    slm, _, tok = real
    assert slm.vocab_size == len(tok) == 49152 and tok.eos_token_id in slm.eos_token_ids
    for private, public in PAIRS:
        messages = [{"role": "system", "content": private}, {"role": "user", "content": public}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert slm.tokenize(messages) == slm.tokenize(text) == tok.encode(text, add_special_tokens=False)


@pytest.mark.real_models
@pytest.mark.slow
def test_real_fused_greedy_agrees_with_transformers_until_a_near_tie_and_keeps_the_private_prompt(real):
    slm, model, tok = real
    results = []
    for private, public in PAIRS:
        private_ids = slm.tokenize([{"role": "system", "content": private}, {"role": "user", "content": public}])
        public_ids = slm.tokenize([{"role": "user", "content": public}])
        eos = sorted(slm.eos_token_ids)
        ref_ids, ref_rows, _ = transformers_fused(model, tok, logitfuse.HFLLM(model, tok), private_ids, public_ids,
                                                  N_NEW, eos)
        llm = logitfuse.HFLLM(model, tok)
        out = fused_llama(slm, llm, private_ids, public_ids, alpha=0.5, max_new_tokens=N_NEW)
        same, gap = agreement(ref_ids, out.token_ids, ref_rows)
        results.append((same, gap))
        assert out.stats["fallbacks"] == 0 and out.stats["llm_calls"] == out.stats["steps"]
        assert same == len(ref_ids) or gap <= NEAR_TIE, (private, same, gap, ref_ids, out.token_ids)
        # privacy: the LLM got the public prompt and the generated tokens only
        assert llm.audit_log[0] == {"op": "start", "token_ids": [public_ids]}
        sent = [t for e in llm.audit_log[1:] for row in e["token_ids"] for t in row]
        assert sent == out.token_ids[: len(sent)]
        # (generated text does go to the LLM: an SLM that copied the canary into its answer would send it)
        assert CANARY not in out.text and CANARY not in tok.decode(public_ids) + tok.decode(sent)
    print(f"\nllama.cpp vs transformers fused greedy, {N_NEW} tokens: (identical tokens, gap at the first "
          f"difference) = {results}")
    assert sum(same == N_NEW for same, _ in results) >= 1
