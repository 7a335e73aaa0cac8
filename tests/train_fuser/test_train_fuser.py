"""train_fuser: data loading, the privacy split, exact cached losses, training, evaluation, the CLI."""

import json
import math

import pytest
import torch
from logitfuse.testing import byte_level_tokenizer, sentencepiece_tokenizer, tiny_llama

import logitfuse
from logitfuse import FusionHead, VocabMap
from logitfuse.cli import build_parser, main
from logitfuse.cli.train import score_split
from logitfuse.train_fuser.data import bundled_split, load_examples, public_instruction
from logitfuse.train_fuser.evaluate import evaluate_cached
from logitfuse.train_fuser.scoring import (
    Pair, Scored, Variant, align_response, cache_example, default_variants, linear_nll, linear_terms,
)
from logitfuse.train_fuser.train import TrainConfig, fit_cached

# ------------------------------------------------------------------ data and the privacy split


@pytest.mark.parametrize("split", ["dev", "test"])
def test_public_prompt_never_holds_private_fields(split):
    examples = load_examples(bundled_split(split))
    assert len(examples) == {"dev": 150, "test": 240}[split]
    for example in examples:
        public = json.dumps(example.public_messages(), ensure_ascii=False)
        tail = example.instruction[len(example.public_instruction):].lstrip(": ").strip()
        assert tail and tail not in public, example.tid
        assert example.additional_profile not in public
        for line in example.additional_profile.splitlines():
            value = line.split(": ", 1)[-1]
            assert len(value) < 12 or value not in public, (example.tid, value)
        for title, text in example.profile:
            assert text not in public and title not in public, example.tid
        private = json.dumps(example.private_messages(), ensure_ascii=False)
        assert example.instruction in json.loads(private)[1]["content"]


def test_public_instruction_is_the_title():
    assert public_instruction("Write a toast: mention my sister Ann's wedding") == "Write a toast"
    assert public_instruction("No colon here") == "No colon here"


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def record(**overrides):
    base = {
        "tid": "1_2_3",
        "conversations": [{"from": "user", "value": "Write a note: about my cat"}, {"from": "assistant", "value": "Hello cat."}],
        "profile": [{"title": "Old note", "text": "My cat Tom is grey.", "id": "1"}],
        "additional_profile": "Name: Ann\nAge: 30",
    }
    base.update(overrides)
    return base


@pytest.mark.parametrize(
    "records,message",
    [
        ([record(), {"tid": "x"}], r"record 1 \(tid x\): missing field 'conversations'"),
        ([record(profile=[{"title": "t"}])], r"record 0 \(tid 1_2_3\), profile item 0: missing field 'text'"),
        ([record(conversations=[{"from": "user", "value": "hi"}])], "needs a 'user' and an 'assistant' turn"),
        ([record(additional_profile=["not", "a string"])], "field 'additional_profile' should be a str"),
        ({"not": "a list"}, "expected a JSON list of samples"),
    ],
)
def test_malformed_data_is_rejected_with_file_and_record(tmp_path, records, message):
    path = write_json(tmp_path / "bad.json", records)
    with pytest.raises(ValueError, match=message) as info:
        load_examples(path)
    assert str(path) in str(info.value)


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("[{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_examples(path)


# ------------------------------------------------------------------ exact cached losses


@pytest.mark.parametrize("llm_kind", ["dense", "topk"])
@pytest.mark.parametrize("tail", ["slm", "uniform", "zero"])
def test_cached_linear_loss_equals_fused_cross_entropy(llm_kind, tail):
    gen = torch.Generator().manual_seed(0)
    n, v_slm, v_llm = 9, 40, 33
    slm, llm = torch.randn(n, v_slm, generator=gen) * 2, torch.randn(n, v_llm, generator=gen) * 2
    # a random partial one-to-one map (VocabMap refuses an LLM id used twice)
    unmapped, perm = torch.rand(v_slm, generator=gen) < 0.3, torch.randperm(v_slm, generator=gen)
    vmap = VocabMap(torch.where(unmapped | (perm >= v_llm), -1, perm), v_llm)
    inputs = Variant(None if llm_kind == "dense" else 5, tail).llm_input(llm)
    targets = torch.randint(0, v_slm, (n,), generator=gen)
    alpha = torch.rand(n, generator=gen)
    _, terms = linear_terms(slm, inputs, targets, vmap, tail, feature_k=4)
    expected = logitfuse.fused_cross_entropy(slm, inputs, targets, alpha=alpha, vocab_map=vmap, tail=tail)
    torch.testing.assert_close(linear_nll(alpha, terms), expected, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ alignment across tokenizers


@pytest.mark.parametrize("direction", ["bpe_to_sp", "sp_to_bpe"])
def test_aligned_positions_share_the_same_text_prefix(direction):
    bpe, sp = byte_level_tokenizer(), sentencepiece_tokenizer()
    slm_tok, llm_tok = (bpe, sp) if direction == "bpe_to_sp" else (sp, bpe)
    text = "Dear friends, please join us for the café walk; naïve résumé!"
    slm_ids, llm_ids, index = align_response(slm_tok, llm_tok, text)
    assert len(index) == len(slm_ids) and (index >= 0).float().mean() > 0.3
    for t, j in enumerate(index.tolist()):
        if j >= 0:
            slm_prefix = slm_tok.decode(slm_ids[:t]).lstrip()
            llm_prefix = llm_tok.decode(llm_ids[:j]).lstrip()
            assert slm_prefix == llm_prefix, (t, j, slm_prefix, llm_prefix)


def test_same_tokenizer_aligns_every_position():
    tok = byte_level_tokenizer()
    slm_ids, llm_ids, index = align_response(tok, tok, "Thank you for the roses.")
    assert slm_ids == llm_ids and index.tolist() == list(range(len(slm_ids)))


# ------------------------------------------------------------------ training and evaluation


def synthetic_cache(n_examples=12, length=30, vocab=25, seed=0):
    """Examples where the LLM is sharp and right on even positions and the SLM on odd ones:
    a head that reads the entropies can beat any fixed α."""
    gen = torch.Generator().manual_seed(seed)
    vmap = VocabMap.identity(vocab, vocab)
    pair = Pair(None, None, None, None, vmap)
    variants = default_variants(top_k=5)
    examples = []
    for _ in range(n_examples):
        targets = torch.randint(0, vocab, (length,), generator=gen)
        slm, llm = torch.randn(length, vocab, generator=gen), torch.randn(length, vocab, generator=gen)
        rows = torch.arange(length)
        llm[rows[::2], targets[::2]] += 6.0
        slm[rows[1::2], targets[1::2]] += 6.0
        examples.append(cache_example(pair, Scored(targets, slm, llm, None, length), variants, feature_k=4))
    keys = examples[0].keys()
    cache = {k: torch.cat([e[k] for e in examples]) for k in keys}
    cache["example"] = torch.cat([torch.full((length,), i) for i in range(n_examples)])
    return cache, variants, vmap


def test_training_lowers_the_fused_nll_below_every_fixed_alpha():
    cache, variants, vmap = synthetic_cache()
    features, terms = cache["dense.features"], cache["dense.terms"]
    head = FusionHead(vmap.v_slm, vmap.v_llm)
    before = linear_nll(head.alpha_from_features(features), terms).mean().item()
    fit = fit_cached(head, features, terms, cache["example"], TrainConfig(max_epochs=150, patience=30), progress=False)
    with torch.no_grad():
        after = linear_nll(head.alpha_from_features(features), terms).mean().item()
    assert after < before - 0.2
    best_fixed = min(linear_nll(torch.full((len(terms),), a), terms).mean().item() for a in torch.linspace(0, 1, 21).tolist())
    assert after < best_fixed - 0.1
    assert min(fit.val_nll) == fit.val_nll[fit.best_epoch]


def test_training_is_deterministic_with_a_seed():
    cache, _, vmap = synthetic_cache(n_examples=6)
    alphas = []
    for _ in range(2):
        head = FusionHead(vmap.v_slm, vmap.v_llm)
        torch.manual_seed(123)  # a different global state must not matter
        fit_cached(head, cache["dense.features"], cache["dense.terms"], cache["example"], TrainConfig(max_epochs=10), progress=False)
        alphas.append(head.alpha_from_features(cache["dense.features"]).detach())
    assert torch.equal(alphas[0], alphas[1])


def test_cached_training_refuses_other_modes():
    cache, _, vmap = synthetic_cache(n_examples=2)
    with pytest.raises(ValueError, match="linear-mode loss"):
        fit_cached(FusionHead(vmap.v_slm, vmap.v_llm, mode="geometric"), cache["dense.features"], cache["dense.terms"], cache["example"])


def test_evaluation_table_has_every_row():
    cache, variants, vmap = synthetic_cache(n_examples=4)
    cache["llm_context.terms"] = cache["dense.terms"]
    heads = {v.name: FusionHead(vmap.v_slm, vmap.v_llm, tail=v.tail) for v in variants}
    rows = evaluate_cached(cache, variants, heads)
    methods = {(r["llm_input"], r["method"]) for r in rows}
    assert ("-", "SLM with context (alpha=1)") in methods
    assert ("dense", "LLM with context (upper bound, leaks context)") in methods
    for variant in ("dense", "top5-slm", "top5-uniform", "top5-zero"):
        for method in ("LLM without context (alpha=0)", "fixed alpha=0.25", "fixed alpha=0.5", "fixed alpha=0.75",
                       "trained head", "per-token best alpha (oracle)"):
            assert (variant, method) in methods, (variant, method)
    by = {(r["llm_input"], r["method"]): r for r in rows}
    oracle = by[("dense", "per-token best alpha (oracle)")]["nll"]
    assert all(oracle <= r["nll"] + 1e-6 for r in rows if r["llm_input"] == "dense" and "context" not in r["method"])
    assert math.isclose(by[("dense", "trained head")]["mean_alpha"], 0.5, abs_tol=1e-6)


# ------------------------------------------------------------------ end to end on tiny models


@pytest.fixture(scope="module")
def tiny_pair_dirs(tmp_path_factory):
    """An SLM and an LLM with different tokenizers, saved as transformers folders."""
    root = tmp_path_factory.mktemp("models")
    for name, tok, seed in (("slm", byte_level_tokenizer(), 0), ("llm", sentencepiece_tokenizer(), 1)):
        model = tiny_llama(len(tok), seed=seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    data = root / "data"
    data.mkdir()
    records = [record(tid=f"0_0_{i}", conversations=[
        {"from": "user", "value": f"Write a short note {i}: about my garden and the roses"},
        {"from": "assistant", "value": "Thank you for your help with the garden; the roses look lovely."}]) for i in range(5)]
    write_json(data / "context_aware_dev.json", records)
    write_json(data / "context_aware_test.json", records[:3])
    return root


def parse(argv):
    return build_parser().parse_args(argv)


def rows_by(rows, llm_input, method):
    return next(r for r in rows if r["llm_input"] == llm_input and r["method"] == method)


def test_train_and_eval_end_to_end(tiny_pair_dirs, tmp_path, capsys):
    root = tiny_pair_dirs
    common = ["--slm", str(root / "slm"), "--llm", str(root / "llm"), "--data", str(root / "data"),
              "--dtype", "float32", "--llm-top-k", "5"]
    assert main(["train", *common, "--out", str(tmp_path / "run"), "--max-epochs", "5",
                 "--paper-head", "--paper-examples", "3", "--paper-epochs", "1"]) == 0
    heads = sorted(p.name for p in (tmp_path / "run" / "heads").iterdir())
    assert heads == ["dense", "paper-dense", "top5-slm", "top5-uniform", "top5-zero"]
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    assert summary["examples"] == 5 and summary["positions"] > 0
    head = FusionHead.from_pretrained(tmp_path / "run" / "heads" / "dense")
    assert head.slm_name == "slm" and head.llm_name == "llm" and head.llm_top_k is None

    assert main(["eval", *common, "--head", str(tmp_path / "run"), "--paper-examples", "2"]) == 0
    table = (tmp_path / "run" / "results.md").read_text()
    assert "trained head" in table and "LLM with context" in table and "aligned share" in table
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
    # full table (2 + 4 variants x 7, with the fixed α chosen on the training data), then the dense rows
    # again on the paper head's 2 examples, then its row
    assert len(rows) == 2 + 4 * 7 + 8 + 1 and rows[-1]["method"].startswith("paper head")
    chosen = [r for r in rows if r["method"].endswith("(chosen on the training splits)")]
    assert [r["llm_input"] for r in chosen] == ["dense", "top5-slm", "top5-uniform", "top5-zero"]
    assert chosen[0]["method"] == f"fixed alpha={summary['heads']['dense']['best_fixed_alpha']:g} (chosen on the training splits)"
    # the head's paired difference from that baseline: the two rows' NLLs apart, over all test examples
    for fixed in chosen:
        head_row = rows_by(rows, fixed["llm_input"], "trained head")
        paired = head_row["vs_chosen_alpha"]
        assert paired["diff"] == pytest.approx(head_row["nll"] - fixed["nll"], abs=1e-9)
        n = json.loads((tmp_path / "run" / "results.json").read_text())["info"]["test examples"]
        assert paired["examples"] == n > 1 and 0 <= paired["better"] <= n and paired["se"] >= 0
    assert "Trained head − fixed α chosen on the training splits" in table
    assert f"- dense: {rows_by(rows, 'dense', 'trained head')['vs_chosen_alpha']['diff']:+.4f}" in table
    assert {r["llm_input"] for r in rows[-9:]} == {"dense, first 2 examples"}
    assert {r["tokens"] for r in rows[-9:]} == {rows[-1]["tokens"]} and rows[-1]["tokens"] < rows[0]["tokens"]
    assert all(math.isfinite(r["nll"]) for r in rows)


@pytest.fixture
def counted_scoring(tiny_pair_dirs, tmp_path, monkeypatch):
    """``(pair, dev examples, calls)``: ``calls`` lists the tid of every example scored from then on."""
    from logitfuse.cli import train as cli_mod

    root = tiny_pair_dirs
    args = parse(["train", "--slm", str(root / "slm"), "--llm", str(root / "llm"), "--out", str(tmp_path), "--dtype", "float32"])
    calls, real = [], cli_mod.score_example
    monkeypatch.setattr(cli_mod, "score_example", lambda p, e, **k: calls.append(e.tid) or real(p, e, **k))
    return cli_mod.load_pair(args), load_examples(root / "data" / "context_aware_dev.json"), calls


def test_scoring_cache_is_reused(counted_scoring, tmp_path):
    pair, examples, calls = counted_scoring
    first, _ = score_split(pair, examples, tmp_path / "cache", default_variants(5), feature_k=4, llm_with_context=False, progress=False)
    assert len(calls) == 5
    again, metadata = score_split(pair, examples, tmp_path / "cache", default_variants(5), feature_k=4, llm_with_context=False, progress=False)
    assert len(calls) == 5 and torch.equal(first["dense.terms"], again["dense.terms"])
    assert metadata["tids"] == [e.tid for e in examples]
    score_split(pair, examples[:2], tmp_path / "cache", default_variants(5), feature_k=4, llm_with_context=False, progress=False)
    assert len(calls) == 7  # other examples: scored again


def test_scoring_resumes_shard_by_shard(counted_scoring, tmp_path):
    """An interrupted or extended run scores only the shards it lacks; other settings are scored again."""
    pair, examples, calls = counted_scoring
    cache = tmp_path / "cache"
    split = dict(feature_k=4, llm_with_context=False, progress=False, shard_size=2)
    whole, _ = score_split(pair, examples, tmp_path / "whole", default_variants(5), **split)
    calls.clear()
    score_split(pair, examples[:3], cache, default_variants(5), slm_hidden=True, **split)  # shards 0 and 1
    (cache / "shard-00001.safetensors").unlink()  # as if interrupted while writing shard 1
    calls.clear()
    extended, metadata = score_split(pair, examples, cache, default_variants(5), **split)  # no hidden asked
    assert calls == [e.tid for e in examples[2:]]  # shard 0 kept; shards 1 and 2 scored
    assert metadata["tids"] == [e.tid for e in examples] and metadata["setting"]["slm_hidden"]
    assert torch.equal(extended["dense.terms"], whole["dense.terms"]) and len(extended["slm_hidden"]) == len(whole["targets"])
    calls.clear()
    score_split(pair, examples, cache, default_variants(5), **dict(split, feature_k=3))  # another setting
    assert calls == [e.tid for e in examples]
    calls.clear()
    _, metadata = score_split(pair, examples[:2], cache, default_variants(5), **dict(split, feature_k=3))
    assert calls == [] and metadata["tids"] == [e.tid for e in examples[:2]]  # the shards after it are removed
    assert sorted(p.name for p in cache.iterdir()) == ["shard-00000.safetensors"]


def test_the_paper_head_s_evaluation_shows_a_progress_bar(tiny_pair_dirs, capsys):
    """evaluate_streaming runs both models per example (minutes on real models): a bar with an ETA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitfuse.heads import PaperFusionHead
    from logitfuse.train_fuser.evaluate import evaluate_streaming
    from logitfuse.train_fuser.scoring import Pair, default_variants

    models = [(AutoModelForCausalLM.from_pretrained(tiny_pair_dirs / n), AutoTokenizer.from_pretrained(tiny_pair_dirs / n))
              for n in ("slm", "llm")]
    pair = Pair.build(*models[0], *models[1], "slm", "llm")
    head = PaperFusionHead(pair.vocab_map.v_slm, pair.vocab_map.v_llm)
    examples = load_examples(tiny_pair_dirs / "data" / "context_aware_test.json")[:2]
    evaluate_streaming(head, pair, examples, default_variants(5)[0])
    err = capsys.readouterr().err
    assert "scoring (paper head)" in err and "2/2" in err, err
