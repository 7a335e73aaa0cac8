"""The learned call gate (schedule ``head_gate(tau)``): parsing and checks, decoding decisions equal
to the gate applied offline to the same SLM-side inputs, and skipped steps send nothing."""

import importlib.util
import json

import pytest
import torch

import logitfuse
from logitfuse.heads import FusionHead
from logitfuse.decoding.schedules import HeadGate, parse
from logitfuse.heads.slm_side import NO_TOKEN, HiddenStateCapture

PUBLIC, PRIVATE = "Write an invitation:", "Martin sells houses on Maple Drive. Write an invitation:"


def _gated_head(tok, slm, seed=1):
    head = FusionHead(len(tok), len(tok), slm_hidden_size=slm.config.hidden_size,
                      slm_features=["hidden", "token", "position"], gate_hidden=8)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return head.eval()


def test_head_gate_specs_parse_and_bad_ones_say_what_to_write():
    assert isinstance(parse("head_gate(0.05)"), HeadGate) and parse(" head_gate( -1e-2 ) ").spec == "head_gate(-0.01)"
    with pytest.raises(ValueError, match=r"tau must be a number, e.g. 'head_gate\(0.05\)'"):
        parse("head_gate(1.2.3)")
    with pytest.raises(ValueError, match="tau=nan must be a finite number"):
        HeadGate(float("nan"))
    with pytest.raises(ValueError, match=r"not one of .*'head_gate\(tau\)'"):
        parse("head_gate()")
    with pytest.raises(ValueError, match="call gain"):
        HeadGate(0.1).should_call(0, None)


def test_head_gate_needs_a_head_with_a_gate(tok, llm_model):
    llm = logitfuse.HFLLM(llm_model, tok)
    for weight in (dict(head=FusionHead(len(tok), len(tok))), dict(alpha=0.5)):
        with pytest.raises(ValueError, match=r"needs a fusion head with a call gate \(logitfuse train --gate-hidden 32\)"):
            logitfuse.FusionSession(llm, schedule="head_gate(0.1)", **weight)


def test_gate_decisions_equal_the_offline_gate_and_skipped_steps_send_nothing(served, slm, tok):
    server, url = served
    server.received.clear()
    head, tau, steps = _gated_head(tok, slm), 0.0, 8
    llm = logitfuse.OpenAICompatibleLLM(url, "tiny", top_k=5, tokenizer=tok)
    public_ids = tok(PUBLIC)["input_ids"]
    proc = logitfuse.CoGenesisLogitsProcessor(llm, public_ids, head=head, slm=slm, schedule=f"head_gate({tau})")
    private = tok([PRIVATE], return_tensors="pt")
    out = slm.generate(**private, logits_processor=[proc], max_new_tokens=steps, do_sample=False, pad_token_id=0)
    proc.close()
    called = [float(a[0]) != 1.0 for a in proc.alpha_history]
    # offline: the gate on one explicit forward over the generated text (nothing from the LLM)
    prompt_len = private["input_ids"].shape[1]
    generated = out[0, prompt_len:].tolist()
    with torch.no_grad(), HiddenStateCapture(slm, keep_all=True) as capture:
        slm_logits = slm(input_ids=out[:, :-1]).logits[0, prompt_len - 1:]
        gain = head.call_gain(slm_logits, capture.latest[0, prompt_len - 1:],
                              last_tokens=torch.tensor([NO_TOKEN] + generated[:-1]), positions=torch.arange(steps))
    assert float((gain - tau).abs().min()) > 1e-4  # no decision on a knife's edge
    assert called == (gain >= tau).tolist()
    assert 0 < sum(called) < steps  # the gate both called and skipped
    stats = proc.stats
    assert (stats.llm_calls, stats.saved_calls) == (sum(called), steps - sum(called))
    # one request per called step, none for a skipped one; each carries the tokens kept up to its step
    prompts = [json.loads(body)["prompt"] for body in server.received]
    assert prompts == [public_ids + generated[:t] for t in range(steps) if called[t]]


# ---------------------------------------------------------------- training the gate, NLL against the share of calls
def test_the_gate_learns_where_calls_pay_and_beats_the_entropy_gate():
    from test_head_features import fitted_head, side_signal_cache

    from logitfuse.train_fuser.evaluate import call_fraction_rows, gate_curves
    from logitfuse.train_fuser.train import fit_gate, slm_side_inputs

    cache, variants = side_signal_cache()
    head, config = fitted_head(cache, ["position"], gate_hidden=8)
    before = {name: p.clone() for name, p in head.named_parameters() if not name.startswith("gate.")}
    fit_gate(head, cache["dense.features"], cache["dense.terms"], cache["example"], config, progress=False,
             slm_side=slm_side_inputs(cache, head))
    assert all(torch.equal(p, before[name]) for name, p in head.named_parameters() if not name.startswith("gate."))
    rows = {r["method"].split("(")[0].split(":")[0]: r for r in call_fraction_rows(cache, variants[0], head, (0.5,))}
    assert set(rows) == {"head_gate", "entropy_gate", "periodic", "oracle gate "}
    assert all(abs(r["calls"] - 0.5) < 0.05 for r in rows.values())
    # the LLM helps only in the first half of each response: the gate finds it, the SLM's entropy cannot
    assert rows["head_gate"]["nll"] < rows["entropy_gate"]["nll"] - 0.5
    assert rows["oracle gate "]["nll"] <= rows["head_gate"]["nll"] + 1e-6
    curves = gate_curves(cache, variants[0], head)
    assert set(curves) == {"head_gate", "entropy_gate", "oracle gate (knows the gain)", "periodic"}
    assert [round(x, 2) for x, _ in curves["periodic"]] == [0.25, 0.5, 0.75]
    calls_at_all = curves["head_gate"][-1]  # fraction 1.0: every position fused, whatever the gate
    assert calls_at_all[0] == 1.0 and calls_at_all[1] == pytest.approx(curves["entropy_gate"][-1][1])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tok, slm, llm_model):
    """Two tiny models with one tokenizer saved as transformers folders, and the three data splits."""
    root = tmp_path_factory.mktemp("gate-run")
    for name, model in (("slm", slm), ("llm", llm_model)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "data").mkdir()
    for split, n in (("train_wo_profile", 3), ("dev", 4), ("test", 2)):
        records = [{"tid": f"{split}_{i}", "profile": [], "additional_profile": "", "conversations": [
            {"from": "user", "value": f"Write note {i}: about the garden gate"},
            {"from": "assistant", "value": "The gate squeaks; the roses by it bloom early this year."}]} for i in range(n)]
        (root / "data" / f"context_aware_{split}.json").write_text(json.dumps(records))
    return root


def test_train_on_two_splits_with_slm_features_then_eval_reports_calls(tiny_run, tmp_path, capsys, monkeypatch):
    from logitfuse.cli import main
    from logitfuse.cli import train as train_cli
    from logitfuse.train_fuser.scoring import read_shards

    common = ["--slm", str(tiny_run / "slm"), "--llm", str(tiny_run / "llm"), "--data", str(tiny_run / "data"),
              "--llm-top-k", "5", "--cache", str(tmp_path / "caches")]
    out = tmp_path / "run"
    assert main(["train", *common, "--out", str(out), "--split", "train_wo_profile", "--split", "dev",
                 "--max-examples", "5", "--slm-features", "hidden,token,position", "--max-epochs", "3",
                 "--gate-hidden", "8"]) == 0
    summary = json.loads((out / "train.json").read_text())
    assert summary["splits"] == {"train_wo_profile": 3, "dev": 2} and summary["examples"] == 5
    assert all("gate_val_mse" in h for h in summary["heads"].values())
    cache, metadata = read_shards(tmp_path / "caches" / "cache-dev")
    assert cache["slm_hidden"].dtype == torch.float16 and cache["slm_hidden"].shape[1] == 32  # tiny_llama's width
    assert metadata["tids"] == ["dev_0", "dev_1"]
    head = logitfuse.load_head(out / "heads" / "dense")
    assert head.slm_features == ["hidden", "token", "position"] and head.gate is not None
    assert main(["eval", *common, "--head", str(out), "--no-llm-context"]) == 0
    rows = json.loads((out / "calls.json").read_text())["rows"]
    methods = {r["method"].split("(")[0] for r in rows if r["llm_input"] == "dense"}
    assert methods == {"head_gate", "entropy_gate", "periodic", "oracle gate "}
    assert sorted({r["target_calls"] for r in rows}) == [0.25, 0.5, 0.75]
    if importlib.util.find_spec("matplotlib"):  # the plot is skipped without it (CI installs no matplotlib)
        assert (out / "call_fraction-dense.png").read_bytes()[:4] == b"\x89PNG"
    assert "head_gate(" in capsys.readouterr().out
    # an ablation without SLM-side features on the same examples reuses the shared caches: nothing is scored
    monkeypatch.setattr(train_cli, "score_example", lambda *a, **k: pytest.fail("scored again"))
    assert main(["train", *common, "--out", str(tmp_path / "plain"), "--split", "train_wo_profile",
                 "--max-epochs", "2", "--gate-hidden", "0"]) == 0
    assert logitfuse.load_head(tmp_path / "plain" / "heads" / "dense").slm_features == []


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--split", "test"], "--split test: the test split is held out for `logitfuse eval`"),
    (["--split", "train"], "--split train: not a split; train on train_wo_profile and/or dev"),
    (["--slm-features", "hidden,words"], "--slm-features=['hidden', 'words']: ['words'] not among"),
    (["--gate-hidden", "-1"], "--gate-hidden"),
])
def test_train_refuses_bad_splits_and_feature_groups_in_one_line(tiny_run, tmp_path, capsys, argv, fragment):
    from logitfuse.cli import main

    code = main(["train", "--slm", str(tiny_run / "slm"), "--llm", str(tiny_run / "llm"), "--out", str(tmp_path / "o"),
                 *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("logitfuse train: error: ") and fragment in err, err
