"""The weight of a fused CLI run without --alpha: the head shipped for the pair, else the fixed α
recorded beside it (``chosen_alpha.json``), else DEFAULT_ALPHA, the median of the recorded ones."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from logitfuse.cli import build_parser, common, generate
from logitfuse.cli.common import CHOSEN_ALPHA_FILE, DEFAULT_ALPHA, Plan, chosen_alpha, choose_weight, load_weight
from logitfuse.errors import UsageError
from logitfuse.heads import FusionHead
from logitfuse.prompts import shipped_path
from logitfuse.vocab import VocabMap

HEADS = shipped_path("heads")
SHIPPED = sorted(path.parent for path in HEADS.glob("*/*/config.json"))


def _plan(*argv: str) -> Plan:
    """``logitfuse generate ARGV``'s plan, from the checks alone (nothing is loaded)."""
    args = build_parser().parse_args(["generate", "--instruction", "Write a toast: for Ann", *argv])
    generate.validate(args)
    return args.plan


def _record(folder: Path) -> dict:
    return json.loads((folder / CHOSEN_ALPHA_FILE).read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------ the shipped records
def test_every_shipped_head_records_its_chosen_alpha():
    assert SHIPPED, HEADS
    for folder in SHIPPED:
        record, config = _record(folder), json.loads((folder / "config.json").read_text(encoding="utf-8"))
        assert (record["slm_name"], record["llm_name"]) == (config["slm_name"], config["llm_name"]), folder
        assert f"{record['slm_name']}__{record['llm_name']}" == folder.parent.name and record["variant"] == folder.name
        assert chosen_alpha(folder) == record["chosen_alpha"]
        # where it came from: the training run's command, its data and the file that holds the number
        assert record["command"].startswith("logitfuse train ") and record["chosen_on"]["examples"] > 0
        assert (Path(__file__).parents[2] / record["source"]).is_file(), record["source"]


def test_the_fallback_default_is_the_median_of_the_recorded_alphas():
    """DEFAULT_ALPHA is the median α chosen, with the dense LLM, on the training data of the pairs
    whose heads ship (0.25, 0.51, 0.68, 0.85 when it was set: median 0.595), to 0.05."""
    dense = [_record(folder)["chosen_alpha"] for folder in SHIPPED if folder.name == "dense"]
    assert len(dense) >= 4
    assert DEFAULT_ALPHA == pytest.approx(statistics.median(dense), abs=0.05)
    assert DEFAULT_ALPHA == 0.6


def test_the_alpha_help_states_the_default_and_its_source(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"else {DEFAULT_ALPHA:g}, the median α chosen on the training data of the measured pairs" in help_text
    assert CHOSEN_ALPHA_FILE in help_text


# ------------------------------------------------------------------------------------ choosing the weight
def test_a_pair_with_nothing_shipped_gets_the_default():
    plan = _plan("--slm", "smollm2-135m", "--llm", "qwen2.5-coder-1.5b")
    assert plan.head_dir is None and plan.alpha == DEFAULT_ALPHA
    assert plan.note == "no head is shipped for smollm2-135m + qwen2.5-coder-1.5b; the default"
    plan = _plan("--slm", "smollm2-135m", "--llm", "qwen2.5-coder-1.5b", "--head", "none")
    assert plan.alpha == DEFAULT_ALPHA
    assert plan.note == "the default: nothing is recorded for smollm2-135m + qwen2.5-coder-1.5b"


@pytest.mark.parametrize("slm,llm", [("smollm2-135m", "qwen2.5-coder-0.5b"),
                                     ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"),
                                     ("smollm2-135m-cogenesis", "qwen2.5-coder-0.5b"),
                                     ("smollm2-135m-cogenesis", "qwen2.5-coder-1.5b")])
def test_a_shipped_pair_gets_its_head_and_its_recorded_alpha_with_head_none(slm, llm):
    folder = HEADS / f"{slm}__{llm}" / "dense"
    plan = _plan("--slm", slm, "--llm", llm)
    assert plan.head_dir == folder and plan.alpha is None
    assert plan.fallback[0] == _record(folder)["chosen_alpha"] != DEFAULT_ALPHA
    plan = _plan("--slm", slm, "--llm", llm, "--head", "none")
    assert plan.head_dir is None and plan.alpha == _record(folder)["chosen_alpha"]
    assert plan.note == f"chosen on the training data of the dense head of {slm} + {llm}"
    assert _plan("--slm", slm, "--llm", llm, "--alpha", "0.3").alpha == 0.3  # --alpha wins


def test_a_served_llm_gets_the_top20_record():
    plan = _plan("--slm", "smollm2-135m", "--llm", "http://127.0.0.1:1", "--llm-tokenizer", "qwen2.5-coder-0.5b",
                 "--head", "none")
    assert plan.alpha == _record(HEADS / "smollm2-135m__qwen2.5-coder-0.5b" / "top20-slm")["chosen_alpha"]
    assert "top20-slm head" in plan.note


@pytest.fixture
def heads_at(tmp_path, monkeypatch):
    """Shipped heads read from ``tmp_path/heads`` instead of the package's."""
    monkeypatch.setattr(common, "shipped_path", lambda *parts: Path(tmp_path, *parts))
    return tmp_path / "heads"


def _args(**kw):
    return build_parser().parse_args(["generate", "--instruction", "x", "--slm", "a", "--llm", "b",
                                      *[f"--{k}={v}" for k, v in kw.items()]])


def test_the_recorded_alpha_is_read_and_used_where_the_head_does_not_fit(heads_at, capsys):
    folder = heads_at / "a__b" / "dense"
    FusionHead(8, 8, vocab_map_hash=VocabMap.identity(8, 8).hash).save_pretrained(folder)
    (folder / CHOSEN_ALPHA_FILE).write_text(json.dumps({"chosen_alpha": 0.42}))
    plan = Plan("a", "b")
    choose_weight(_args(), plan, "dense")
    assert plan.head_dir == folder and plan.fallback[0] == 0.42
    head, alpha, label = load_weight(plan, VocabMap.identity(16, 16))  # another vocabulary: it does not fit
    assert (head, alpha, label) == (None, 0.42, "fixed α 0.42 (the shipped head does not fit)")
    assert "using a fixed α 0.42, chosen on the training data of the dense head of a + b" in capsys.readouterr().err
    plan = Plan("a", "b")
    choose_weight(_args(head="none"), plan, "top20-slm")  # no top-20 record: the dense one
    assert plan.alpha == 0.42 and plan.head_dir is None


@pytest.mark.parametrize("text,fragment", [
    ("{not json", "is not readable JSON"),
    ("[0.5]", "got a list, not an object"),
    ('{"alpha": 0.5}', "got None"),
    ('{"chosen_alpha": 1.5}', "got 1.5"),
    ('{"chosen_alpha": "0.5"}', "got '0.5'"),
    ('{"chosen_alpha": true}', "got True"),
])
def test_a_malformed_record_is_a_clear_error(heads_at, text, fragment):
    folder = heads_at / "a__b" / "dense"
    folder.mkdir(parents=True)
    (folder / CHOSEN_ALPHA_FILE).write_text(text)
    for argv in ({}, {"head": "none"}):
        with pytest.raises(UsageError) as err:
            choose_weight(_args(**argv), Plan("a", "b"), "dense")
        message = str(err.value)
        assert str(folder / CHOSEN_ALPHA_FILE) in message and fragment in message, message
        assert "pass --alpha A" in message
    plan = Plan("a", "b")
    choose_weight(_args(alpha="0.5"), plan, "dense")  # --alpha reads no record
    assert plan.alpha == 0.5


def test_a_malformed_record_stops_the_cli_before_anything_loads(heads_at, no_loading, capsys, assert_usage_error):
    folder = heads_at / "smollm2-135m__qwen2.5-coder-0.5b" / "dense"
    folder.mkdir(parents=True)
    (folder / CHOSEN_ALPHA_FILE).write_text('{"chosen_alpha": -1}')
    code = generate_main("--slm", "smollm2-135m", "--llm", "qwen2.5-coder-0.5b")
    assert_usage_error(code, capsys.readouterr().err, "generate", CHOSEN_ALPHA_FILE, "must be a number in [0, 1]")


def generate_main(*argv: str) -> int:
    from logitfuse.cli import main

    return main(["generate", "--instruction", "Write a toast: for Ann", *argv])


# ------------------------------------------------------------------------------------ with the real models
@pytest.mark.real_models
@pytest.mark.slow
@pytest.mark.parametrize("llm", ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_the_tuned_slm_gets_its_shipped_head_with_the_real_models(llm):
    """The heads shipped for smollm2-135m-cogenesis load onto the real pair's vocabulary map (the
    tokenizers only: no model weights are read)."""
    from transformers import AutoTokenizer

    from logitfuse import zoo

    try:
        folders = [zoo.tuned_path("smollm2-135m-cogenesis"), zoo.path(llm)]
    except zoo.ZooError:
        pytest.skip(f"needs the real models: run `logitfuse models install smollm2-135m-cogenesis {llm}`")
    slm_tok, llm_tok = (AutoTokenizer.from_pretrained(folder) for folder in folders)
    v_slm = json.loads((folders[0] / "config.json").read_text())["vocab_size"]
    v_llm = json.loads((folders[1] / "config.json").read_text())["vocab_size"]
    vmap = VocabMap.from_tokenizers(slm_tok, llm_tok, v_slm=v_slm, v_llm=v_llm)
    plan = _plan("--slm", "smollm2-135m-cogenesis", "--llm", llm)
    head, alpha, label = load_weight(plan, vmap)
    assert head is not None and alpha is None and label == f"trained head smollm2-135m-cogenesis__{llm}/dense"
