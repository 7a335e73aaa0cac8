"""Evaluation of fusion rules on cached per-position terms (logitfuse.train_fuser.rules_eval), and the
`logitfuse train --rule` / `logitfuse eval --rule` commands on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from logitfuse.cli import main
from logitfuse.heads.mixture import load_mixture_head
from logitfuse.prompts import Example
from logitfuse.rules import parse_rule
from logitfuse.rules.combine import combine
from logitfuse.testing import byte_level_tokenizer, sentencepiece_tokenizer, tiny_llama
from logitfuse.train_fuser import rules_eval
from logitfuse.train_fuser.rules_eval import (Grid, RuleInput, Study, Vocabularies, best_grid_value, best_mixture_weights,
                                             mixture_nll, rules_study, score_inputs, simplex_grid, study_rows,
                                             summarize_example)


def random_logprobs(n, t, v, seed=0):
    return torch.log_softmax(torch.randn(n, t, v, generator=torch.Generator().manual_seed(seed)) * 2, dim=-1)


SMALL_STUDY = Study(
    inputs=(RuleInput("slm", "s", "private"), RuleInput("slm_public", "s", "public"), RuleInput("base_public", "b", "public"),
            RuleInput("llm", "l", "public"), RuleInput("small", "m", "public"), RuleInput("llm_shipped", "l", "public")),
    mixture=("slm", "llm", "small"),
    grids=(Grid("steer", "arithmetic", ("llm", "slm", "slm_public"), (0.0, 0.5, 1.0)),
           Grid("proxy", "arithmetic", ("llm", "slm_public", "base_public"), (0.0, 0.5, 1.0)),
           Grid("cd", "contrastive", ("llm", "small"), (0.0, 0.5)),
           Grid("cd-tau0.1", "contrastive", ("llm", "small"), (0.0, 0.5), plausibility=0.1)),
    feature_k=2,
    rules=(parse_rule("steer(0.5)"),),
)


def summarized(t=23, v=57, seed=0):
    lp = random_logprobs(len(SMALL_STUDY.inputs), t, v, seed)
    logprobs = {item.name: lp[i] for i, item in enumerate(SMALL_STUDY.inputs)}
    targets = torch.randint(0, v, (t,), generator=torch.Generator().manual_seed(seed + 1))
    return logprobs, targets, summarize_example(SMALL_STUDY, logprobs, targets, combine)


def test_grid_terms_are_the_rules_log_probabilities_at_the_reference():
    logprobs, targets, out = summarized()
    rows = torch.arange(len(targets))
    for i, beta in enumerate((0.0, 0.5, 1.0)):  # steering, written out: llm + β(slm − slm_public), renormalized
        z = logprobs["llm"] + beta * (logprobs["slm"] - logprobs["slm_public"])
        torch.testing.assert_close(out["grid.steer"][:, i], torch.log_softmax(z, -1)[rows, targets])
    torch.testing.assert_close(out["rule.steer(0.5)"], out["grid.steer"][:, 1])
    # contrastive with the cut: the reference token below τ·max p_llm gets -inf; the others renormalize over the kept set
    z = logprobs["llm"] - 0.5 * logprobs["small"]
    keep = logprobs["llm"] >= logprobs["llm"].amax(-1, keepdim=True) + math.log(0.1)
    expected = torch.log_softmax(z.masked_fill(~keep, -math.inf), -1)[rows, targets]
    torch.testing.assert_close(out["grid.cd-tau0.1"][:, 1], expected)
    cut = ~keep[rows, targets]
    assert cut.any() and (~cut).any()
    assert torch.isneginf(out["grid.cd-tau0.1"][cut, 1]).all()
    for name, lp in logprobs.items():
        torch.testing.assert_close(out[f"lp.{name}"], lp[rows, targets])


def test_mixture_nll_is_the_combine_mixture_at_the_reference():
    logprobs, targets, out = summarized(seed=3)
    weights = torch.tensor([0.2, 0.5, 0.3])
    stacked = torch.stack([logprobs[n] for n in ("slm", "llm", "small")])
    fused = combine(stacked, weights.expand(len(targets), -1).contiguous(), rule="mixture")
    torch.testing.assert_close(mixture_nll(out, ("slm", "llm", "small"), weights).float(),
                               -fused[torch.arange(len(targets)), targets])


def test_best_mixture_weights_is_the_grid_minimum():
    _, _, out = summarized(seed=5)
    names = ("slm", "llm", "small")
    best = best_mixture_weights(out, names, step=0.05)
    grid = simplex_grid(3, 0.05)
    brute = min(mixture_nll(out, names, w).mean().item() for w in grid)
    assert mixture_nll(out, names, best).mean().item() == pytest.approx(brute, abs=1e-12)
    assert len(simplex_grid(3, 0.01)) == 5151 and torch.allclose(grid.sum(1), torch.ones(len(grid), dtype=torch.float64))


def test_best_grid_value_averages_over_the_kept_positions_only():
    grid = Grid("cd-tau0.1", "contrastive", ("llm", "small"), (0.0, 0.5), plausibility=0.1)
    # λ = 0.5 cuts the hard position (-inf) and is better on the other: it wins on the kept positions
    cache = {"grid.cd-tau0.1": torch.tensor([[-1.0, -0.5], [-3.0, -math.inf]])}
    assert best_grid_value(cache, grid) == 0.5


def test_study_rows_compare_each_rule_with_its_baseline():
    caches = []
    for seed in (0, 10):
        parts = [summarized(t=15, seed=seed + i)[2] for i in range(4)]
        cache = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        cache["example"] = torch.arange(4).repeat_interleave(15)
        caches.append(cache)
    dev, test = caches
    rows, chosen = study_rows(SMALL_STUDY, dev, test)
    by = {r["method"]: r for r in rows}
    mix2 = by["2-way mix (SLM + LLM)"]
    assert mix2["params"] == f"α={chosen['mix2'][0]:g}"
    three = by["3-way mixture (SLM + LLM + small LLM)"]
    assert three["vs_baseline"]["diff"] == pytest.approx(three["nll"] - mix2["nll"], abs=1e-9)
    assert three["baseline_nll"] == pytest.approx(mix2["nll"])
    cd = next(r for r in rows if r["method"].startswith("contrastive") and "τ=0.1" in r["method"])
    assert 0 < cd["coverage"] < 1 and math.isfinite(cd["nll"])
    # paired with the LLM over the same kept positions
    assert cd["vs_baseline"]["diff"] == pytest.approx(cd["nll"] - cd["baseline_nll"], abs=1e-9)
    assert all(r["vs_baseline"]["examples"] == 4 for r in rows if "vs_baseline" in r)


def test_rules_study_names_missing_inputs_and_refuses_mix():
    study = rules_study([parse_rule("contrastive(0.5,0.1,amateur=small)")], "S", "L", {"small": "M"}, max_history=1)
    assert [i.name for i in study.inputs] == ["slm", "slm_public", "llm", "small"]
    assert study.input("small").tail_from == "slm_public" and study.input("small").prompt == "public"
    with pytest.raises(ValueError, match="reads small.*--input NAME=MODEL"):
        rules_study([parse_rule("contrastive(0.5,0.1,amateur=small)")], "S", "L", {}, max_history=1)
    with pytest.raises(ValueError, match="two-model"):
        rules_study([parse_rule("mix")], "S", "L", {}, max_history=1)


# ------------------------------------------------------------------ scoring real (tiny) models

CANARY = "Zq7xK2pL9mWv"


def example(profile: str) -> Example:
    return Example("1_2_3", "Write a note: about my garden", "Thank you for the roses; they look lovely.",
                   (("Old note", f"My door code is {profile}."),), f"Name: Ann. Secret: {profile}")


@pytest.fixture(scope="module")
def tiny_models():
    slm_tok, llm_tok = byte_level_tokenizer(), sentencepiece_tokenizer()
    return {"s": (tiny_llama(len(slm_tok), seed=0), slm_tok), "l": (tiny_llama(len(llm_tok), seed=1), llm_tok)}


def tiny_study():
    return Study(inputs=(RuleInput("slm", "s", "private"), RuleInput("slm_public", "s", "public"),
                         RuleInput("llm", "l", "public", tail_from="slm_public")),
                 mixture=("slm", "llm"), feature_k=2, rules=(parse_rule("steer(0.5)"),))


def test_public_inputs_never_depend_on_the_private_prompt(tiny_models, tmp_path):
    study = tiny_study()
    vocab = Vocabularies(study, lambda name: (tiny_models[name][1], tiny_models[name][0].config.vocab_size))
    files = {}
    for canary in (CANARY, "h4TtR8cYbN1s"):
        work = tmp_path / canary
        score_inputs(vocab, {"test": [example(canary)]}, work, lambda name: tiny_models[name][0], progress=False)
        files[canary] = {path.name: load_file(str(path)) for path in work.glob("*.safetensors")}
    a, b = files.values()
    assert sorted(a) == sorted(b) and len(a) == 3
    for name in a:
        same = torch.equal(a[name]["lp"], b[name]["lp"])
        assert same == (not name.endswith(".slm.safetensors")), name  # only the private input moves
    lp = next(v for k, v in a.items() if k.endswith(".llm.safetensors"))["lp"]
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(len(lp)))


def test_an_input_scored_with_another_model_is_scored_again(tiny_models, tmp_path):
    study = tiny_study()
    vocab = Vocabularies(study, lambda name: (tiny_models[name][1], tiny_models[name][0].config.vocab_size))
    loads = []

    def load(name):
        loads.append(name)
        return tiny_models[name][0]

    score_inputs(vocab, {"test": [example("x")]}, tmp_path, load, progress=False)
    score_inputs(vocab, {"test": [example("x")]}, tmp_path, load, progress=False)
    assert loads == ["s", "l"]  # the second run reuses every file
    settings = json.loads((tmp_path / "inputs.json").read_text())
    settings["llm"]["model"] = "another"
    (tmp_path / "inputs.json").write_text(json.dumps(settings))
    score_inputs(vocab, {"test": [example("x")]}, tmp_path, load, progress=False)
    assert loads == ["s", "l", "l"]


@pytest.mark.parametrize("tail_from", [None, "nothing", "other"])
def test_a_pulled_input_needs_a_tail_on_the_pivot_tokenizer(tiny_models, tail_from):
    study = Study(inputs=(RuleInput("slm", "s", "private"), RuleInput("other", "l", "public", tail_from="slm"),
                          RuleInput("llm", "l", "public", tail_from=tail_from)), mixture=("slm", "llm"))
    with pytest.raises(ValueError, match="must name an input on the pivot's tokenizer"):
        Vocabularies(study, lambda name: (tiny_models[name][1], tiny_models[name][0].config.vocab_size))


# ------------------------------------------------------------------ the commands

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, tok, seed in (("slm", byte_level_tokenizer(), 0), ("llm", sentencepiece_tokenizer(), 1),
                            ("small", sentencepiece_tokenizer(), 2)):
        model = tiny_llama(len(tok), seed=seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    data = root / "data"
    data.mkdir()
    records = [{"tid": f"0_0_{i}", "conversations": [
        {"from": "user", "value": f"Write a short note {i}: about my garden and the roses"},
        {"from": "assistant", "value": "Thank you for your help with the garden; the roses look lovely."}],
        "profile": [{"title": "Old note", "text": "My cat Tom is grey.", "id": "1"}],
        "additional_profile": "Name: Ann"} for i in range(5)]
    for split, chunk in (("dev", records), ("test", records[:3])):
        (data / f"context_aware_{split}.json").write_text(json.dumps(chunk))
    return root


def test_train_a_mixture_head_and_evaluate_rules(model_dirs, tmp_path, capsys):
    root = model_dirs
    common = ["--slm", str(root / "slm"), "--llm", str(root / "llm"), "--data", str(root / "data"),
              "--input", f"small={root / 'small'}", "--max-history", "1"]
    assert main(["train", *common, "--rule", "mixture(slm,llm,small)", "--out", str(tmp_path / "run"),
                 "--max-epochs", "5"]) == 0
    head = load_mixture_head(tmp_path / "run" / "heads" / "mixture")
    assert head.input_names == ("slm", "llm", "small")
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    assert summary["examples"] == 5 and len(summary["fixed_weights"]) == 3
    assert sum(summary["fixed_weights"]) == pytest.approx(1, abs=1e-6)

    assert main(["eval", *common, "--rule", "mixture(slm,llm,small)", "--rule", "steer(0.5)",
                 "--rule", "contrastive(0.5,0.1,amateur=small)", "--head", str(tmp_path / "run"),
                 "--out", str(tmp_path / "eval")]) == 0
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    methods = [r["method"] for r in rows]
    assert methods[:4] == ["SLM alone (private prompt)", "LLM alone (public prompt)", "steer(0.5)",
                           "contrastive(0.5,0.1,expert=llm,amateur=small)"]
    fixed, learned = rows[-2], rows[-1]
    assert fixed["method"].endswith("fixed weights chosen on the training data")
    assert learned["vs_baseline"]["diff"] == pytest.approx(learned["nll"] - fixed["nll"], abs=1e-9)
    assert all(math.isfinite(r["nll"]) for r in rows)
    assert "steer(0.5)" in (tmp_path / "eval" / "results.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["train", "--rule", "steer(0.5)", "--out", "OUT"], "trains a mixture head"),
    (["train", "--rule", "mixture(slm,llm,small)", "--out", "OUT"], "reads small.*--input NAME=MODEL"),
    (["train", "--rule", "mixture(slm,llm)", "--input", "small", "--out", "OUT"], "is not NAME=MODEL"),
    (["train", "--rule", "mixture(slm,llm)", "--input", "llm=x", "--out", "OUT"], "is built in"),
    (["train", "--input", "small=x", "--out", "OUT"], "--input names an input of a --rule"),
    (["eval", "--rule", "mixture(slm,llm)", "--out", "OUT"], "takes its weights from a mixture head"),
    (["eval", "--rule", "steer(2)"], "--rule needs --out"),
    (["eval", "--rule", "mix", "--out", "OUT"], "two-model"),
    (["eval", "--rule", "nonsense(1)", "--out", "OUT"], "is not one of"),
    (["eval", "--out", "OUT"], "--head is required"),
])
def test_rule_mistakes_are_one_line_before_loading(model_dirs, tmp_path, capsys, monkeypatch, argv, message):
    from logitfuse import zoo

    def tripwire(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(zoo, "load", tripwire)
    monkeypatch.setattr(rules_eval, "score_study", tripwire)
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    common = ["--slm", str(model_dirs / "slm"), "--llm", str(model_dirs / "llm"), "--data", str(model_dirs / "data")]
    assert main([argv[0], *common, *argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert __import__("re").search(message, err), err
