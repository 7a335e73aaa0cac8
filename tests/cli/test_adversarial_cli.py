"""The command line as a new user meets it: every ordinary mistake is one line on stderr,
``logitfuse <command>: error: ...``, exit status 2, no traceback, and nothing loaded first.

Most cases call :func:`logitfuse.cli.main` in this process with tripwires on every way to load or
install a model (a mistake must be caught before any of them); a few run the real ``logitfuse``
command line in subprocesses to hold the whole contract end to end. ``LOGITFUSE_HOME`` points at an
empty temporary folder throughout, so no installed model is ever touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from logitfuse.cli import main


pytestmark = pytest.mark.usefixtures("empty_home")  # conftest.py: no installed model is ever touched


@pytest.fixture
def folders(tmp_path):
    """Folders that pass as model folders (a config.json; never loaded here), a head, a context file."""
    for name in ("slm", "llm", "head"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "other-head").mkdir()
    (tmp_path / "other-head" / "config.json").write_text(json.dumps({"slm_name": "smollm2-135m"}))
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "context.txt").write_text("private")
    return tmp_path


def _f(folders, name):
    return str(folders / name)


GENERATE_MISTAKES = [
    (["--slm", "no-such-model"], "--slm 'no-such-model' is neither a zoo model"),
    (["--llm", "{empty}"], "is a folder without config.json"),
    (["--llm", "{missing}"], "nor an existing model folder"),
    (["--head", "{missing}"], "--head", "does not exist"),
    (["--head", "{empty}"], "has no config.json"),
    (["--head", "{other-head}"], "was trained for --slm 'smollm2-135m', not 'slm'"),
    (["--head", "{head}", "--alpha", "0.5"], "both given"),
    (["--alpha", "2"], "--alpha 2 must lie in [0, 1]"),
    (["--alpha", "nan"], "--alpha nan must lie in [0, 1]"),
    (["--alpha", "-0.5"], "--alpha -0.5 must lie in [0, 1]"),
    (["--schedule", "bogus"], "--schedule 'bogus'", "periodic(P, K, T)"),
    (["--schedule", "periodic(1, 2, 0)"], "T=0 must be an int >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
    (["--context", "{missing}"], "--context", "is not a file"),
    (["--context", "{empty}"], "is not a file"),
    (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
    (["--temperature", "-1"], "--temperature -1 must be >= 0"),
    (["--top-p", "2"], "--top-p 2 must lie in (0, 1]"),
    (["--top-p", "0"], "--top-p 0 must lie in (0, 1]"),
    (["--top-k", "0"], "--top-k 0 must be >= 1"),
    (["--seed", "-3"], "--seed -3 must be >= 0"),
    (["--instruction", "Tell Ann the door code is 4711"], "--instruction has no ': '", "--public TEXT"),
    (["--public", "  "], "--public is empty"),
    (["--mode", "geometric"], "--mode and --tail shape a fixed α", "--alpha"),
    (["--llm", "http://127.0.0.1:9"], "--llm is a URL: pass --llm-tokenizer"),
    (["--llm", "http://", "--llm-tokenizer", "{llm}"], "--llm 'http://' has no host"),
    (["--llm", "http://127.0.0.1:99999", "--llm-tokenizer", "{llm}"], "is not a valid URL"),
    (["--llm", "http://127.0.0.1:9", "--llm-tokenizer", "nope"], "--llm-tokenizer 'nope' is neither"),
]


@pytest.mark.parametrize("case", GENERATE_MISTAKES, ids=lambda case: " ".join(case[0]))
def test_generate_mistakes(case, folders, no_loading, capsys, assert_usage_error):
    argv, *fragments = case
    argv = [a.format(**{n: _f(folders, n) for n in ("empty", "missing", "head", "other-head", "llm")}) for a in argv]
    base = {"--slm": _f(folders, "slm"), "--llm": _f(folders, "llm"), "--instruction": "Write a toast: for Ann"}
    for flag, _value in zip(argv[::2], argv[1::2]):
        base.pop(flag, None)
    code = main(["generate", *[x for kv in base.items() for x in kv], *argv])
    assert_usage_error(code, capsys.readouterr().err, "generate", *fragments)


DEMO_MISTAKES = [
    (["--slm", "no-such-model"], "neither a zoo model"),
    (["--alpha", "2"], "--alpha 2 must lie in [0, 1]"),
    (["--head", "{missing}"], "does not exist"),
    (["--schedule", "entropy_gate(-1)"], "--schedule 'entropy_gate(-1)'"),
    (["--max-new-tokens", "-4"], "--max-new-tokens -4 must be >= 1"),
    (["--max-history", "-1"], "--max-history -1 must be >= 0"),
    (["--repetition-penalty", "0"], "--repetition-penalty 0 must be > 0"),
    (["--example", "no-such-tid"], "--example 'no-such-tid' is not a tid"),
]


@pytest.mark.parametrize("case", DEMO_MISTAKES, ids=lambda case: " ".join(case[0]))
def test_demo_mistakes(case, folders, no_loading, capsys, assert_usage_error):
    argv, *fragments = case
    argv = [a.format(missing=_f(folders, "missing")) for a in argv]
    base = ["--slm", _f(folders, "slm"), "--llm", _f(folders, "llm")] if "--slm" not in argv else ["--llm", _f(folders, "llm")]
    code = main(["demo", *base, *argv])
    assert_usage_error(code, capsys.readouterr().err, "demo", *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("command", ["demo", "generate", "train", "bench"])
def test_cuda_without_a_gpu_is_refused(command, folders, no_loading, capsys, assert_usage_error):
    models = ["--slm", _f(folders, "slm"), "--llm", _f(folders, "llm")]
    argv = {"demo": ["demo", *models], "generate": ["generate", *models, "--instruction", "a: b"],
            "train": ["train", *models, "--out", _f(folders, "run")], "bench": ["bench", "sampling"]}[command]
    code = main([*argv, "--device", "cuda"])
    assert_usage_error(code, capsys.readouterr().err, command if command != "bench" else "bench",
                       "--device cuda but no cuda device is available here", "--device cpu")


TRAIN_EVAL_MISTAKES = [
    (["train", "--slm", "no-such-model", "--out", "{run}"], "train", "--slm 'no-such-model' is neither"),
    (["train", "--out", "{a-file}"], "train", "--out", "is a file, not a folder"),
    (["train", "--out", "{a-file}/sub"], "train", "is a file, not a folder"),
    (["train", "--out", "{run}", "--max-examples", "1"], "train", "--max-examples 1 must be >= 2"),
    (["train", "--out", "{run}", "--lr", "0"], "train", "--lr 0 must be > 0"),
    (["train", "--out", "{run}", "--data", "{empty}"], "train", "--data", "has no context_aware_dev.json"),
    (["train", "--out", "{run}", "--llm-top-k", "0"], "train", "--llm-top-k 0 must be >= 1"),
    (["eval", "--head", "{missing}"], "eval", "--head", "does not exist"),
    (["eval", "--head", "{empty}"], "eval", "holds no trained heads"),
]


@pytest.mark.parametrize("case", TRAIN_EVAL_MISTAKES, ids=lambda case: " ".join(case[0]))
def test_train_and_eval_mistakes(case, folders, no_loading, capsys, assert_usage_error):
    argv, command, *fragments = case
    names = {n: _f(folders, n) for n in ("run", "a-file", "empty", "missing")}
    argv = [a.format(**names) for a in argv]
    models = ["--llm", _f(folders, "llm")] + ([] if "--slm" in argv else ["--slm", _f(folders, "slm")])
    code = main([*argv, *models])
    assert_usage_error(code, capsys.readouterr().err, command, *fragments)


MODELS_MISTAKES = [
    (["models", "--home", "{a-file}", "install", "smollm2-135m"], "--home", "is a file, not a folder"),
    (["models", "install", "smollm2-135m", "--home", "{a-file}"], "is a file, not a folder"),
    (["models", "--home", "{a-file}/sub", "list"], "is a file, not a folder"),
    (["models", "path", "smollm2-135m", "--home", "{a-file}"], "is a file, not a folder"),
    (["models", "install"], "name a model to install (or --all)"),
    (["models", "install", "smollm2-135m", "nope"], "unknown model 'nope'"),
    (["models", "path", "nope"], "unknown model 'nope'"),
]


@pytest.mark.parametrize("case", MODELS_MISTAKES, ids=lambda case: " ".join(case[0]))
def test_models_mistakes(case, folders, no_loading, capsys, empty_home, assert_usage_error):
    argv, *fragments = case
    code = main([a.format(**{"a-file": _f(folders, "a-file")}) for a in argv])
    assert_usage_error(code, capsys.readouterr().err, "models", *fragments)
    assert not empty_home.exists()  # nothing was started


def test_models_home_is_taken_before_or_after_the_subcommand(folders, capsys):
    for argv in (["models", "--home", _f(folders, "h1"), "list"], ["models", "list", "--home", _f(folders, "h1")]):
        assert main(argv) == 0
        assert f"(models live in {_f(folders, 'h1')};" in capsys.readouterr().out


BENCH_MISTAKES = [
    (["bench", "sampling", "--batch", "0"], "--batch 0 must be >= 1"),
    (["bench", "kernels", "--vocab", "64", "-3"], "--vocab -3 must be >= 2"),
    (["bench", "train", "--out", "{a-file}"], "--out", "is a file, not a folder"),
    (["bench", "sampling", "--threads", "0"], "--threads 0 must be >= 1"),
    (["bench", "kernels", "--compile-only", "dense"], "--compile-only 'dense' is not LLM:MAP"),
    (["bench", "decode", "--slm", "nope"], "--slm 'nope' is not a zoo model"),
    (["bench", "decode", "--quick"], "--slm smollm2-135m is not installed: run `logitfuse models install smollm2-135m`"),
    (["bench", "plot", "{missing}"], "is not a file"),
    (["bench", "plot", "{not-json}"], "not a benchmark JSON"),
]


@pytest.mark.parametrize("case", BENCH_MISTAKES, ids=lambda case: " ".join(case[0]))
def test_bench_mistakes(case, folders, no_loading, capsys, assert_usage_error):
    argv, *fragments = case
    (folders / "not-json.json").write_text('{"benchmark": "nope"}')
    names = {"a-file": _f(folders, "a-file"), "missing": _f(folders, "missing"), "not-json": _f(folders, "not-json.json")}
    code = main([a.format(**names) for a in argv])
    assert_usage_error(code, capsys.readouterr().err, "bench", *fragments)


# ------------------------------------------------------------------ end to end, as subprocesses
SUBPROCESS_CASES = [
    (["generate", "--slm", "no-such-model", "--llm", "qwen2.5-coder-0.5b", "--instruction", "a: b"], "generate",
     "--slm 'no-such-model' is neither a zoo model"),
    (["generate", "--slm", "smollm2-135m", "--llm", "smollm2-135m", "--instruction", "a: b", "--max-new-tokens", "x"],
     "generate", "argument --max-new-tokens: invalid int value: 'x'"),
    (["models", "--home", "{a-file}", "list"], "models", "is a file, not a folder"),
]


def test_the_command_line_reports_mistakes_in_one_line(folders, empty_home, assert_usage_error):
    """The real `logitfuse` process: one line, exit status 2, no traceback (run side by side)."""
    env = dict(os.environ, LOGITFUSE_HOME=str(empty_home), NO_COLOR="1")
    runs = []
    for argv, command, fragment in SUBPROCESS_CASES:
        argv = [a.format(**{"a-file": _f(folders, "a-file")}) for a in argv]
        runs.append((subprocess.Popen([sys.executable, "-m", "logitfuse.cli", *argv], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env), command, fragment))
    for process, command, fragment in runs:
        out, err = process.communicate(timeout=300)
        assert out == ""
        assert_usage_error(process.returncode, err, command, fragment)
    assert not empty_home.exists()  # no model was installed or looked for on disk
