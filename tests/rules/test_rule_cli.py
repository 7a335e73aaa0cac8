"""`logitfuse generate --rule`: mistakes are one line and exit status 2 before any model loads; a rule
runs end to end on tiny model folders (one and two tokenizers)."""

from __future__ import annotations

import pytest

from logitfuse import zoo
from logitfuse.cli import main
from logitfuse.zoo import installer, loader


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No installed model is touched, no Hub lookup."""
    monkeypatch.setenv("LOGITFUSE_HOME", str(tmp_path / "zoo-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load or install fails the test: a mistake must be caught first."""
    import transformers

    def tripwire(*args, **kwargs):
        raise AssertionError(f"something was loaded before the arguments were checked: {args!r}")

    for owner, name in ((zoo, "load"), (installer, "pip_install"), (loader, "merge_adapter"),
                        (transformers.AutoModelForCausalLM, "from_pretrained"),
                        (transformers.AutoTokenizer, "from_pretrained")):
        monkeypatch.setattr(owner, name, tripwire)


@pytest.fixture
def folders(tmp_path):
    """Folders that pass as model folders (a config.json; never loaded here) and a head folder."""
    for name in ("slm", "llm", "expert", "anti", "head"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    return tmp_path


MISTAKES = [
    (["--rule", "blend(1)"], "--rule: rule 'blend(1)' is not one of mix, mixture"),
    (["--rule", "steer()"], "--rule: rule 'steer()': steer takes one number"),
    (["--rule", "mixture(slm=0.5,other=0.5)"], "reads the input 'other': pass --input other=MODEL"),
    (["--rule", "arithmetic(1)"], "--rule 'arithmetic(1)' reads the input 'expert': pass --input expert=MODEL"),
    (["--rule", "arithmetic(1)", "--input", "expert={expert}"], "reads the input 'anti'"),
    (["--rule", "steer(1)", "--input", "expert={expert}"], "--input expert= is not read by --rule 'steer(1)'"),
    (["--input", "expert={expert}"], "is not read by --rule 'mix'"),
    (["--rule", "arithmetic(1)", "--input", "expert"], "--input 'expert' must be NAME=MODEL"),
    (["--rule", "steer(1)", "--input", "llm={expert}"], "--input llm= is given twice (or is built in"),
    (["--rule", "arithmetic(1)", "--input", "expert=nope", "--input", "anti={anti}"], "--input expert= 'nope' is neither"),
    (["--rule", "steer(1)", "--alpha", "0.5"], "--alpha 0.5 shapes the two-model mix", "drop --alpha"),
    (["--rule", "steer(1)", "--mode", "geometric"], "--mode geometric shapes the two-model mix"),
    (["--rule", "steer(1)", "--schedule", "entropy_gate(2)"], "--schedule entropy_gate(2) shapes the two-model mix"),
    (["--rule", "steer(1)", "--speculate", "2"], "--speculate 2 shapes the two-model mix"),
    (["--rule", "steer(1)", "--head", "{head}"], "has its own weights: drop --head"),
    (["--rule", "mixture(slm,llm)"], "takes its weights from a mixture head: pass --head FOLDER"),
    (["--rule", "mixture(slm,llm)", "--head", "{missing}"], "is not a folder"),
]


@pytest.mark.parametrize("case", MISTAKES, ids=lambda case: " ".join(case[0]))
def test_rule_mistakes_are_one_line_before_loading(case, folders, no_loading, capsys):
    argv, *fragments = case
    argv = [a.format(**{n: str(folders / n) for n in ("expert", "anti", "head", "missing")}) for a in argv]
    code = main(["generate", "--slm", str(folders / "slm"), "--llm", str(folders / "llm"),
                 "--instruction", "Write a toast: for Ann", *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("logitfuse generate: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_the_llama_cpp_slm_cannot_be_its_own_public_input(folders, no_loading, capsys, monkeypatch):
    import logitfuse.cli.common as common

    monkeypatch.setattr(common, "check_slm_engine", lambda args: None)  # as if llama-cpp-python were installed
    code = main(["generate", "--slm", str(folders / "slm"), "--llm", str(folders / "llm"), "--slm-engine", "llama.cpp",
                 "--instruction", "Write a toast: for Ann", "--rule", "steer(1)"])
    err = capsys.readouterr().err
    assert code == 2 and "use --slm-engine transformers" in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Tiny model folders: an SLM and an LLM on one byte-level tokenizer, an expert on a sentencepiece one."""
    from logitfuse.testing import byte_level_tokenizer, sentencepiece_tokenizer, tiny_llama

    root = tmp_path_factory.mktemp("models")
    for name, tok, seed in (("slm", byte_level_tokenizer(), 0), ("llm", byte_level_tokenizer(), 1),
                            ("expert", sentencepiece_tokenizer(), 2), ("anti", byte_level_tokenizer(), 3)):
        tiny_llama(len(tok), seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


@pytest.mark.parametrize("rule, extra", [
    ("steer(0.5)", []),
    ("contrastive(0.5,0.1)", []),
    ("mixture(0.3,0.7)", []),
    ("arithmetic(1)", ["--input", "expert={expert}", "--input", "anti={anti}"]),  # the expert on another tokenizer
])
def test_generate_runs_a_rule_on_tiny_models(rule, extra, model_dirs, tmp_path, capsys):
    context = tmp_path / "context.txt"
    context.write_text("Door code 4711.")
    extra = [a.format(expert=model_dirs / "expert", anti=model_dirs / "anti") for a in extra]
    code = main(["generate", "--slm", str(model_dirs / "slm"), "--llm", str(model_dirs / "llm"), "--context",
                 str(context), "--instruction", "Write a toast: for Ann", "--max-new-tokens", "5", "--threads", "1",
                 "--rule", rule, *extra])
    out = capsys.readouterr()
    assert code == 0, out.err
    summary = out.err.strip().splitlines()[-1]
    assert f"rule {rule}" in summary and "5 steps" in summary
    inputs = len(logitfuse_inputs(rule))
    assert f"{5 * inputs} model calls over {inputs} inputs" in summary


def logitfuse_inputs(rule: str) -> list[str]:
    """The inputs besides the SLM that a rule reads."""
    from logitfuse.rules import parse_rule

    return [n for n in parse_rule(rule).inputs if n != "slm"]
