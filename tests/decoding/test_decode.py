"""logitfuse.generate (our own decode loop) and exact speculative fusion, with tiny random models."""

from __future__ import annotations

import json
import math
import threading
import warnings

import pytest
import torch

import logitfuse
from logitfuse.testing.generation import PRIVATE, PUBLIC, chat_ids, generate, left_pad, private_prompt_ids
from logitfuse.decoding.engine import speculative_accept
from logitfuse.serve.server import serve_in_thread
from logitfuse.testing import byte_level_tokenizer, sentencepiece_tokenizer, tiny_llama

N_NEW = 10
PUBLICS = [PUBLIC, "Dear friends,", "Thank you for your help with the garden"]
PRIVATES = [PRIVATE, "I am Ana; I love roses.", "Secret: 1234"]


def private_batch(tok, batch):
    return left_pad([private_prompt_ids(tok, p, q) for p, q in zip(PRIVATES[:batch], PUBLICS[:batch])])


def random_head(tok, seed=0):
    """A head whose α depends on its input (a random last layer), around 0.5."""
    head = logitfuse.FusionHead(len(tok), len(tok), init_alpha=0.5)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head.mlp[-1].weight.data.normal_(0, 0.5)
    return head


def fused(slm, llm, inputs, publics, *configs, **kwargs):
    return logitfuse.generate(slm, llm, inputs["input_ids"], publics, *configs, attention_mask=inputs["attention_mask"],
                              **kwargs)


def without_padding(ids: torch.Tensor, eos: int | None) -> list[list[int]]:
    rows = ids.tolist()
    return [row[:row.index(eos) + 1] if eos in row else row for row in rows]


# ------------------------------------------------------------------ per-step: same as the processor
@pytest.mark.parametrize("schedule", ["always", "periodic(2, 3, 1)", "entropy_gate(5.95)"])
@pytest.mark.parametrize("weight", ["alpha", "head"])
def test_greedy_equals_the_processor(tok, slm, llm_model, schedule, weight):
    inputs = private_batch(tok, 3)
    options = {"alpha": 0.4} if weight == "alpha" else {"head": random_head(tok)}
    proc = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), PUBLICS, schedule=schedule, **options)
    expected = generate(slm, inputs, N_NEW, proc).tolist()
    out = fused(slm, logitfuse.HFLLM(llm_model, tok), inputs, PUBLICS, max_new_tokens=N_NEW, schedule=schedule,
                **options)
    assert out.sequences == expected
    assert dict(out.stats) == dict(proc.stats)
    assert out.alpha == [[float(step[r]) for step in proc.alpha_history]
                                                       for r in range(3)]
    assert out.stopped == ["length"] * 3


@pytest.mark.parametrize("penalty", [1.1, 3.0])
@pytest.mark.parametrize("weight", ["alpha", "head"])
def test_repetition_penalty_equals_the_processor(tok, slm, llm_model, penalty, weight):
    """slm.generate applies the penalty to the SLM's logits before the fusion processor; generate does
    the same, per step and speculating (K = 2: the drafts and the targets read the same penalized
    logits), with left-padded rows of different lengths. α = 0.9 keeps most drafts, so a draft's logits
    penalized without the drafts before it would show."""
    inputs, n_new = private_batch(tok, 3), 16
    publics = [chat_ids(tok, p) for p in PUBLICS]
    options = {"alpha": 0.9} if weight == "alpha" else {"head": random_head(tok, seed=1)}
    proc = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), publics, **options)
    expected = generate(slm, inputs, n_new, proc, repetition_penalty=penalty).tolist()
    for speculate in (0, 2):
        out = fused(slm, logitfuse.HFLLM(llm_model, tok), inputs, publics, max_new_tokens=n_new, speculate=speculate,
                    repetition_penalty=penalty, **options)
        assert out.sequences == expected, speculate
        assert out.first_token_seconds > 0  # what a decode rate leaves out (bench speculate)
    unpenalized = fused(slm, logitfuse.HFLLM(llm_model, tok), inputs, publics, max_new_tokens=n_new, **options)
    if penalty == 3.0:  # the test has the power to tell a penalty that is not applied
        assert unpenalized.sequences != expected


def test_rows_that_reach_eos_stop(tok, slm, llm_model):
    inputs = private_batch(tok, 3)
    eos = int(generate(slm, inputs, N_NEW)[0, 2])
    proc = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), PUBLICS, alpha=0.9, eos_token_id=eos)
    expected = without_padding(generate(slm, inputs, N_NEW, proc, eos_token_id=eos), eos)
    out = fused(slm, logitfuse.HFLLM(llm_model, tok), inputs, PUBLICS, alpha=0.9, max_new_tokens=N_NEW,
                eos_token_id=eos)
    assert out.sequences == expected and out.sequences[0][-1] == eos and out.stopped[0] == "eos"
    assert dict(out.stats) == dict(proc.stats)
    assert [len(a) for a in out.alpha] == [len(s) for s in out.sequences]


def test_sampling_is_reproducible_with_a_generator(tok, slm, llm_model):
    inputs = private_batch(tok, 2)

    def sample(seed, **kwargs):
        return fused(slm, logitfuse.HFLLM(llm_model, tok), inputs, PUBLICS[:2], alpha=0.5, max_new_tokens=N_NEW,
                     temperature=1.0, top_k=50, top_p=0.95, generator=torch.Generator().manual_seed(seed),
                     **kwargs).sequences

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    assert sample(3, speculate=2) == sample(3, speculate=2)


def test_a_list_of_rows_is_left_padded(tok, slm, llm_model):
    rows = [private_prompt_ids(tok, p, q) for p, q in zip(PRIVATES[:2], PUBLICS[:2])]
    llm = logitfuse.HFLLM(llm_model, tok)
    from_lists = logitfuse.generate(slm, llm, rows, PUBLICS[:2], alpha=0.4, max_new_tokens=4).sequences
    assert from_lists == fused(slm, llm, left_pad(rows), PUBLICS[:2], alpha=0.4, max_new_tokens=4).sequences


# ------------------------------------------------------------------ overlap
def test_overlap_sends_the_same_requests_to_a_served_llm(tok, slm, llm_model):
    """Against an HTTP server: with and without overlap, the same tokens, α, statistics and request bodies."""
    server, url = serve_in_thread(llm_model, tok, model_name="tiny")
    try:
        inputs = private_batch(tok, 2)
        runs = []
        for overlap in (True, False):
            remote = logitfuse.OpenAICompatibleLLM(url, "tiny", tokenizer=tok)
            out = fused(slm, remote, inputs, PUBLICS[:2], alpha=0.3, max_new_tokens=6, overlap=overlap)
            runs.append((out.sequences, out.alpha, dict(out.stats), remote.audit_log))
    finally:
        server.shutdown()
        server.server_close()
    assert runs[0] == runs[1]
    assert runs[0][2]["llm_calls"] == 6 and runs[0][2]["fallbacks"] == 0


def test_overlap_runs_the_llm_request_while_the_slm_computes(tok, llm_model):
    """Each LLM request and the SLM forward of the same position meet at a barrier: both must be
    running at once (run one after the other, the first to arrive would wait alone and the barrier
    break after its timeout). The output is the one without overlap."""
    slm = tiny_llama(len(tok), seed=0)
    barrier = threading.Barrier(2, timeout=20)
    meetings = []

    class MeetingLLM(logitfuse.HFLLM):
        def advance(self, new_tokens, need=None):
            meetings.append(barrier.wait())
            return super().advance(new_tokens, need)

    def meet(module, args):
        barrier.wait()  # returns None: the forward's arguments stay as they are

    inputs = private_batch(tok, 2)
    hook = slm.register_forward_pre_hook(meet)
    try:
        out = fused(slm, MeetingLLM(llm_model, tok), inputs, PUBLICS[:2], alpha=0.3, max_new_tokens=5)
    finally:
        hook.remove()
    assert len(meetings) == 5  # one request per position, each met by the SLM's forward for it
    plain = fused(slm, logitfuse.HFLLM(llm_model, tok), inputs, PUBLICS[:2], alpha=0.3, max_new_tokens=5,
                  overlap=False)
    assert out.sequences == plain.sequences


# ------------------------------------------------------------------ speculative fusion: greedy
def sent_tokens_check(audit_log, publics, sequences):
    """Replay an HFLLM audit log: before each call every row's stream must be its public prompt and
    a prefix of its output (rejected drafts never stay); returns the tokens sent that the output does
    not hold there (the discarded drafts), summed over rows."""
    streams: list[list[int]] = []
    discarded = 0
    for entry in audit_log:
        if entry["op"] == "start":
            streams = [list(r) for r in entry["token_ids"]]
            assert streams == publics
        elif entry["op"] == "rollback":
            for row, n in zip(streams, entry["n"]):
                del row[len(row) - n:]
        else:
            for r, (row, new) in enumerate(zip(streams, entry["token_ids"])):
                done = len(row) - len(publics[r])
                assert row == publics[r] + sequences[r][:done]
                match = 0
                while match < len(new) and done + match < len(sequences[r]) and new[match] == sequences[r][done + match]:
                    match += 1
                discarded += len(new) - match
                row.extend(new)
    return discarded


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("weight", ["alpha", "head"])
def test_speculative_greedy_equals_per_step(tok, slm, llm_model, k, batch, weight):
    inputs = private_batch(tok, batch)
    publics = [chat_ids(tok, p) for p in PUBLICS[:batch]]
    options = {"alpha": 0.7} if weight == "alpha" else {"head": random_head(tok, seed=1)}
    per_step = fused(slm, logitfuse.HFLLM(llm_model, tok), inputs, publics, max_new_tokens=N_NEW, **options)
    llm = logitfuse.HFLLM(llm_model, tok)
    spec = fused(slm, llm, inputs, publics, max_new_tokens=N_NEW, speculate=k, **options)
    assert spec.sequences == per_step.sequences
    for a, b in zip(spec.alpha, per_step.alpha):
        assert a == pytest.approx(b, abs=1e-5)
    stats = spec.stats
    assert stats.draft_tokens_sent == stats.draft_tokens_kept + stats.draft_tokens_discarded > 0
    assert stats.llm_calls < per_step.stats.llm_calls or stats.draft_tokens_kept == 0
    assert stats.steps == N_NEW
    # the only tokens sent besides the output are the drafts counted as discarded
    assert sent_tokens_check(llm.audit_log, publics, spec.sequences) == stats.draft_tokens_discarded


def test_speculation_keeps_and_discards_drafts(tok, slm, llm_model):
    """A mixture that often agrees with the SLM: some drafts are kept (fewer LLM calls than tokens)."""
    inputs = private_batch(tok, 2)
    spec = fused(slm, logitfuse.HFLLM(llm_model, tok), inputs, PUBLICS[:2], alpha=0.97, max_new_tokens=N_NEW,
                 speculate=4)
    assert spec.stats.draft_tokens_kept > 0 and spec.stats.llm_calls < N_NEW
    per_step = fused(slm, logitfuse.HFLLM(llm_model, tok), inputs, PUBLICS[:2], alpha=0.97, max_new_tokens=N_NEW)
    assert spec.sequences == per_step.sequences


def test_speculative_eos_stops_a_row(tok, slm, llm_model):
    inputs = private_batch(tok, 2)
    plain = fused(slm, logitfuse.HFLLM(llm_model, tok), inputs, PUBLICS[:2], alpha=0.97, max_new_tokens=N_NEW)
    eos = plain.sequences[0][3]
    per_step = fused(slm, logitfuse.HFLLM(llm_model, tok), inputs, PUBLICS[:2], alpha=0.97, max_new_tokens=N_NEW,
                     eos_token_id=eos)
    spec = fused(slm, logitfuse.HFLLM(llm_model, tok), inputs, PUBLICS[:2], alpha=0.97, max_new_tokens=N_NEW,
                 eos_token_id=eos, speculate=3)
    assert spec.sequences == per_step.sequences and spec.stopped == per_step.stopped
    assert spec.stopped[0] == "eos"


def test_hfllm_score_equals_advancing_token_by_token(tok, llm_model):
    publics = [chat_ids(tok, p) for p in PUBLICS[:2]]
    new = [[5, 77, 120], [9]]
    one = logitfuse.HFLLM(llm_model, tok)
    one.start(publics)
    steps = [one.advance([[], []]).next]
    for i in range(3):
        steps.append(one.advance([new[0][i:i + 1], new[1][i:i + 1]]).next)
    scored = logitfuse.HFLLM(llm_model, tok)
    scored.start(publics)
    out = scored.score(new)
    assert out.next.shape == (2, 4, len(tok))
    torch.testing.assert_close(out.next[0], torch.stack([s[0] for s in steps]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.next[1, -2:], torch.stack([steps[0][1], steps[1][1]]), atol=1e-5, rtol=1e-5)
    assert scored.audit_log[-1] == {"op": "score", "token_ids": new}
    # after scoring, the backend continues like the token-by-token one
    torch.testing.assert_close(scored.advance([[3], [4]]).next, one.advance([[3], [4]]).next, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ speculative fusion: sampling
def test_acceptance_rule_gives_the_target_distribution_exactly():
    """Integrate the rule over its draws (the draft x ~ q, the acceptance and residual uniforms on a
    midpoint grid): the token after one draft is distributed as p, whatever q."""
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4]])
    q = torch.tensor([[0.1, 0.6, 0.1, 0.2], [0.25, 0.25, 0.25, 0.25]])
    grid = (torch.arange(100) + 0.5) / 100
    u, v = torch.meshgrid(grid, grid, indexing="ij")
    u, v = u.reshape(-1), v.reshape(-1)  # every (acceptance, draw) pair of the grid
    cells = len(u)
    first = torch.zeros(4)
    for x in range(4):
        accepted, token = speculative_accept(p.expand(cells, 2, 4), q.expand(cells, 2, 4),
                                             torch.full((cells, 1), x), u[:, None], v)
        outcome = torch.where(accepted == 1, x, token)
        first += q[0, x] * torch.bincount(outcome, minlength=4).float() / cells
    torch.testing.assert_close(first, p[0], atol=0.01, rtol=0)

    def one(x, u, v):
        accepted, token = speculative_accept(p[None], q[None], torch.tensor([[x]]), torch.tensor([[u]]), torch.tensor([v]))
        return int(accepted), int(token)

    # a kept draft is followed by a draw from the last p
    assert one(0, 0.0, 0.05) == (1, 0) and one(0, 0.0, 0.95) == (1, 3)
    # rejected (0.9 * 0.6 >= 0.3): from the residual max(0, p - q) = (0.4, 0, 0.1, 0) / 0.5
    assert one(1, 0.9, 0.79) == (0, 0) and one(1, 0.9, 0.81) == (0, 2)
    # accepted with probability p/q = 0.5
    assert one(1, 0.49, 0.5)[0] == 1 and one(1, 0.51, 0.5)[0] == 0


def chi_square(a: list[tuple], b: list[tuple]) -> tuple[float, float]:
    """Two-sample chi-square statistic over the outcomes (cells with < 10 outcomes in both pooled),
    and its 0.999 critical value (Wilson-Hilferty)."""
    cells = sorted(set(a) | set(b))
    counts = [(a.count(c), b.count(c)) for c in cells]
    big = [c for c in counts if sum(c) >= 10]
    rest = (sum(c[0] for c in counts if sum(c) < 10), sum(c[1] for c in counts if sum(c) < 10))
    if sum(rest):
        big.append(rest)
    na, nb = len(a), len(b)
    stat = sum((ca * math.sqrt(nb / na) - cb * math.sqrt(na / nb)) ** 2 / (ca + cb) for ca, cb in big)
    df = len(big) - 1
    z = 3.09
    return stat, df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_speculative_sampling_matches_per_step_sampling():
    """The first three tokens under speculation (K = 2) are distributed as per-step fused sampling's:
    2000 rows each, two-sample chi-square at the 0.999 level, on a vocabulary of 8 with peaked
    random models; the same test tells the SLM's own distribution apart (it has the power)."""
    vocab, rows = 8, 2000
    slm, llm_model = tiny_llama(vocab, seed=3), tiny_llama(vocab, seed=4)
    for model in (slm, llm_model):
        model.lm_head.weight.data.mul_(20)  # peaked distributions: the two models disagree clearly
    private = torch.tensor([[1, 5, 2, 7]] * rows)

    def sample(alpha, speculate, seed):
        llm = logitfuse.HFLLM(llm_model)
        out = logitfuse.generate(slm, llm, private, [3, 1], alpha=alpha, max_new_tokens=3, temperature=1.0, top_k=6,
                                 speculate=speculate, generator=torch.Generator().manual_seed(seed))
        return [tuple(s) for s in out.sequences], out.stats

    per_step, _ = sample(0.4, 0, 0)
    spec, stats = sample(0.4, 2, 1)
    assert stats.draft_tokens_kept > 0 and stats.draft_tokens_discarded > 0
    for view in (lambda s: s[:2], lambda s: s[2:]):  # the joint of the first two, and the third
        stat, critical = chi_square([view(s) for s in per_step], [view(s) for s in spec])
        assert stat < critical, (stat, critical)
    slm_alone, _ = sample(1.0, 0, 2)
    stat, critical = chi_square([s[:2] for s in per_step], [s[:2] for s in slm_alone])
    assert stat > critical, (stat, critical)


# ------------------------------------------------------------------ refusals
def test_refusals_are_clear_and_send_nothing(tok, slm, llm_model):
    inputs = private_batch(tok, 2)
    llm = logitfuse.HFLLM(llm_model, tok)
    cases = [
        (dict(speculate=2, schedule="periodic(2, 3, 1)"), "schedule='always'"),
        (dict(speculate=-1), "speculate"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.1), "repetition_penalty"),
        (dict(attention_mask=inputs["attention_mask"].flip(1)), "left padded"),
    ]
    for kwargs, match in cases:
        options = dict(alpha=0.5, max_new_tokens=4, attention_mask=inputs["attention_mask"]) | kwargs
        with pytest.raises(ValueError, match=match):
            logitfuse.generate(slm, llm, inputs["input_ids"], PUBLICS[:2], **options)
    with pytest.raises(ValueError, match="public_prompt"):
        logitfuse.generate(slm, llm, inputs["input_ids"], PUBLICS, alpha=0.5, max_new_tokens=4,
                           attention_mask=inputs["attention_mask"])
    with pytest.raises(ValueError, match="vocabulary"):
        logitfuse.generate(slm, llm, [[1, 2, 10_000]], PUBLIC, alpha=0.5, max_new_tokens=4)
    with pytest.raises(TypeError, match="overlap"):
        logitfuse.generate(slm, llm, inputs["input_ids"], PUBLICS[:2], alpha=0.5, max_new_tokens=4,
                           attention_mask=inputs["attention_mask"], overlap="yes")
    assert llm.audit_log == []


def test_speculation_across_tokenizers_and_without_score_fuses_per_step_counted(tok, slm):
    sp = sentencepiece_tokenizer()
    llm = logitfuse.HFLLM(tiny_llama(len(sp), seed=1), sp)
    vocab_map = logitfuse.VocabMap.from_tokenizers(tok, sp)
    runs = {}
    for k in (0, 2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs[k] = logitfuse.generate(slm, llm, [chat_ids(tok, PRIVATE)], PUBLIC, alpha=0.5, vocab_map=vocab_map,
                                         slm_tokenizer=tok, max_new_tokens=6, speculate=k)
        assert any("different tokenizers" in str(w.message) for w in caught) == (k > 0)
    assert runs[2].sequences == runs[0].sequences and runs[2].stats.llm_calls == runs[0].stats.llm_calls
    assert runs[2].stats.speculation_fallbacks == 1 and runs[2].stats.draft_tokens_sent == 0
    assert not any(entry["op"] == "score" for entry in llm.audit_log)
    # a backend that cannot score drafts (here: no server answers the probe) means per-step fusion, counted
    remote = logitfuse.OpenAICompatibleLLM("http://127.0.0.1:9", "m", tokenizer=byte_level_tokenizer(),
                                           vocab_size=len(tok), retries=0)
    with pytest.warns(RuntimeWarning, match="fuses per step"):
        out = logitfuse.generate(slm, remote, [chat_ids(tok, PRIVATE)], PUBLIC, alpha=0.5, max_new_tokens=4,
                                 speculate=2)
    assert out.stats.speculation_fallbacks == 1 and out.stats.draft_tokens_sent == 0
    assert not any('"echo":true' in body for body in remote.audit_log[1:])  # after the probe: per-step requests


# ------------------------------------------------------------------ privacy
CANARY = "Zq8WkP3xLm2T"


@pytest.mark.parametrize("speculate", [0, 3])
def test_the_private_prompt_never_reaches_the_llm(tok, slm, llm_model, speculate):
    """A canary in the private prompts: the LLM gets the public prompts, then only generated tokens
    and (speculating) drafts, never a run of the private prompt."""
    private = [private_prompt_ids(tok, f"{CANARY} is my door code, {CANARY}.", q) for q in PUBLICS[:2]]
    publics = [chat_ids(tok, q) for q in PUBLICS[:2]]
    llm = logitfuse.HFLLM(llm_model, tok)
    out = logitfuse.generate(slm, llm, private, publics, alpha=0.9, max_new_tokens=N_NEW, speculate=speculate,
                             temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert llm.audit_log[0] == {"op": "start", "token_ids": publics}
    for entry in llm.audit_log[1:]:
        for row in entry.get("token_ids", []):
            assert CANARY not in tok.decode(row)
            assert not any(row[i:i + 4] == p[j:j + 4] for p in private for j in range(len(p) - 3)
                           for i in range(len(row) - 3))
    assert sent_tokens_check(llm.audit_log, publics, out.sequences) == out.stats.draft_tokens_discarded
    assert (out.stats.draft_tokens_sent > 0) == (speculate > 0)


def test_overlap_sends_only_public_and_generated_text_to_a_server(tok, slm, llm_model):
    server, url = serve_in_thread(llm_model, tok, model_name="tiny", log_requests=True)
    try:
        private = [private_prompt_ids(tok, f"{CANARY} is my door code.", PUBLIC)]
        remote = logitfuse.OpenAICompatibleLLM(url, "tiny", tokenizer=tok)
        out = logitfuse.generate(slm, remote, private, PUBLIC, alpha=0.5, max_new_tokens=6, overlap=True)
        bodies = list(server.received)
    finally:
        server.shutdown()
        server.server_close()
    assert len(bodies) == out.stats.llm_calls == 6
    prompts = [json.loads(body)["prompt"] for body in bodies]
    assert all(CANARY.encode() not in body for body in bodies)
    assert all(CANARY not in tok.decode(prompt) for prompt in prompts)
    public = tok.encode(PUBLIC)
    assert all(prompt[:len(public)] == public for prompt in prompts)


# ------------------------------------------------------------------ configuration
def test_configs_and_keywords_are_the_same_call(tok, slm, llm_model):
    """generate(..., FusionConfig, SamplingConfig) is what the keywords build; keywords given beside a config
    replace its fields (alpha replaces a config's head); α = 1 needs no LLM and no public prompt."""
    inputs = private_batch(tok, 2)
    head = random_head(tok)
    fusion = logitfuse.FusionConfig(head=head, schedule="periodic(2, 3, 1)")
    sampling = logitfuse.SamplingConfig(max_new_tokens=6, temperature=0.8, top_k=20, seed=3)
    by_config = fused(slm, logitfuse.HFLLM(llm_model, tok), inputs, PUBLICS[:2], fusion, sampling)
    by_keywords = fused(slm, logitfuse.HFLLM(llm_model, tok), inputs, PUBLICS[:2], head=head,
                        schedule="periodic(2, 3, 1)", max_new_tokens=6, temperature=0.8, top_k=20, seed=3)
    assert by_config.sequences == by_keywords.sequences and by_config.alpha == by_keywords.alpha
    overridden = fused(slm, logitfuse.HFLLM(llm_model, tok), inputs, PUBLICS[:2], fusion, sampling, alpha=1.0,
                       max_new_tokens=3)
    assert [len(s) for s in overridden.sequences] == [3, 3] and overridden.stats.llm_calls == 0
    alone = logitfuse.generate(slm, None, inputs["input_ids"], None, logitfuse.FusionConfig(alpha=1.0), sampling,
                               attention_mask=inputs["attention_mask"], max_new_tokens=3)
    assert alone.sequences == overridden.sequences and alone.alpha == [[1.0] * 3] * 2


def test_configuration_errors_name_the_argument(tok, slm, llm_model):
    llm = logitfuse.HFLLM(llm_model, tok)
    private = [[5, 6, 7]]
    with pytest.raises(TypeError, match=r"generate\(\) got unexpected keyword argument\(s\) temprature"):
        logitfuse.generate(slm, llm, private, PUBLIC, alpha=0.5, temprature=1.0)
    with pytest.raises(TypeError, match="expected a SamplingConfig, got FusionConfig"):
        logitfuse.generate(slm, llm, private, PUBLIC, logitfuse.FusionConfig(alpha=0.5), logitfuse.FusionConfig(alpha=0.5))
    with pytest.raises(ValueError, match="exactly one of head"):
        logitfuse.generate(slm, llm, private, PUBLIC, max_new_tokens=4)
    with pytest.raises(TypeError, match="llm=None works only with alpha=1"):
        logitfuse.generate(slm, None, private, PUBLIC, alpha=0.5)
    with pytest.raises(ValueError, match="public_prompt is missing"):
        logitfuse.generate(slm, llm, private, alpha=0.5)
    with pytest.raises(TypeError, match="slm must be a transformers causal LM"):
        logitfuse.generate(object(), llm, private, PUBLIC, alpha=0.5)
    with pytest.raises(TypeError, match=r"FusionSession\(\) got unexpected keyword argument\(s\) max_new_tokens"):
        logitfuse.FusionSession(llm, alpha=0.5, max_new_tokens=3)
    with pytest.raises(TypeError, match="head must be a logitfuse.FusionHead or PaperFusionHead"):
        logitfuse.FusionSession(llm, head=object())
    assert llm.audit_log == []


def test_a_session_takes_a_config_or_its_keywords(tok, llm_model):
    llm = logitfuse.HFLLM(llm_model, tok)
    fusion = logitfuse.FusionConfig(alpha=0.25, mode="geometric", schedule="periodic(2, 3, 1)")
    by_config = logitfuse.FusionSession(llm, fusion, eos_token_id=[0])
    by_keywords = logitfuse.FusionSession(llm, alpha=0.25, mode="geometric", schedule="periodic(2, 3, 1)",
                                          eos_token_id=[0])
    for session in (by_config, by_keywords):
        assert (session.alpha, session.mode, session.tail, session.schedule.spec) == (0.25, "geometric", "slm",
                                                                                     "periodic(2, 3, 1)")
        assert session.eos_token_ids == frozenset([0])
    assert logitfuse.FusionSession(llm, fusion, alpha=0.5).alpha == 0.5  # a keyword replaces the field
