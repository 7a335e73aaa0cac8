"""`logitfuse demo` / `generate --slm-engine llama.cpp`: the SLM from the zoo's GGUF file in llama.cpp.

The argument checks run in this process with tripwires on every way to load a model, as in
tests/cli/test_adversarial_cli.py: each mistake is one line, exit status 2, before anything loads. One
slow check runs the real SmolLM2-135M GGUF where the zoo has it installed.
"""

from __future__ import annotations

import re
import sys

import pytest
import torch
from logitfuse import zoo
from logitfuse.cli import main


def _argv(command: str, *extra: str) -> list[str]:
    argv = [command, "--slm-engine", "llama.cpp", "--slm", "smollm2-135m", "--llm", "qwen2.5-coder-0.5b"]
    if command == "generate":
        argv += ["--instruction", "Write a toast: for Ann"]
    return argv + list(extra)


MISTAKES = [
    (["--slm", "{folder}"], "--slm-engine llama.cpp runs a GGUF file: a zoo model's (smollm2-135m, ",
     "--slm FILE.gguf", "is none of them"),
    (["--slm", "smollm2-135m-cogenesis"], "--slm 'smollm2-135m-cogenesis' is none of", "--slm-engine transformers"),
    (["--slm", "{folder}/missing.gguf"], "missing.gguf' is not a file", "pass a GGUF file"),
    (["--adapter", "{folder}"], "--adapter is a LoRA adapter for the transformers SLM", "drop --adapter"),
    (["--device", "cuda"], "--device cuda: --slm-engine llama.cpp runs on the CPU", "--device cpu"),
    (["--head", "{hidden_head}"], "reads the SLM's hidden state, which llama.cpp does not expose",
     "--slm-features token,position"),
]


@pytest.mark.parametrize("command", ["demo", "generate"])
@pytest.mark.parametrize("case", MISTAKES, ids=lambda case: " ".join(case[0]))
def test_llama_cpp_engine_mistakes(case, command, tmp_path, empty_home, no_loading, monkeypatch,
                                   capsys, assert_usage_error):
    # as if llama-cpp-python were installed: these checks must not depend on this machine
    monkeypatch.setattr("logitfuse.cli.common.llama_cpp_python_missing", lambda: None)
    (tmp_path / "slm").mkdir()
    (tmp_path / "slm" / "config.json").write_text("{}")
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / "config.json").write_text('{"slm_features": ["hidden", "position"]}')
    extra, *fragments = case
    code = main(_argv(command, *[a.format(folder=tmp_path / "slm", hidden_head=tmp_path / "hidden") for a in extra]))
    assert_usage_error(code, capsys.readouterr().err, command, *fragments)


@pytest.mark.parametrize("command", ["demo", "generate"])
def test_llama_cpp_engine_without_llama_cpp_python(command, empty_home, no_loading, monkeypatch, capsys,
                                                   assert_usage_error):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # how Python marks a module as not importable
    code = main(_argv(command))
    assert_usage_error(code, capsys.readouterr().err, command, "--slm-engine llama.cpp needs llama-cpp-python",
                       "pip install", "--slm-engine transformers")


def test_unknown_engine_is_refused(empty_home, no_loading, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--slm-engine", "onnx", "--slm", "smollm2-135m", "--llm", "qwen2.5-coder-0.5b",
              "--instruction", "Write: x"])
    assert exit_.value.code == 2 and "--slm-engine: invalid choice: 'onnx'" in capsys.readouterr().err


def _real_models_or_skip():
    from logitfuse.decoding.llama_cpp import llama_cpp_python_missing

    missing = llama_cpp_python_missing()
    if missing:
        pytest.skip(missing)
    try:
        zoo.path("smollm2-135m"), zoo.gguf_path("smollm2-135m")
    except zoo.ZooError:
        pytest.skip("needs the real models: run `logitfuse models install smollm2-135m`")


@pytest.mark.engine
@pytest.mark.real_models
@pytest.mark.slow
def test_generate_runs_the_slm_in_llama_cpp(capsys):
    """SmolLM2-135M's GGUF in llama.cpp: alone (--alpha 1, nothing else loaded), then fused with the
    same model in transformers as the LLM (8 tokens each)."""
    _real_models_or_skip()
    threads = torch.get_num_threads()
    base = ["generate", "--slm-engine", "llama.cpp", "--slm", "smollm2-135m", "--max-new-tokens", "8",
            "--instruction", "Write a short birthday message: for my dog Biscuit, who turns five", "--color", "never"]
    try:
        assert main([*base, "--llm", "qwen2.5-coder-0.5b", "--alpha", "1"]) == 0
        alone = capsys.readouterr()
        assert main([*base, "--llm", "smollm2-135m", "--alpha", "0.5"]) == 0
        fused = capsys.readouterr()
    finally:
        torch.set_num_threads(threads)
    assert alone.out.strip() and "SLM alone (--alpha 1), no LLM calls" in alone.err, alone
    assert fused.out.strip() and "fixed α 0.5" in fused.err, fused
    assert re.search(r"\[(\d+) steps, \1 LLM calls, 0 fallbacks", fused.err), fused.err  # the LLM answered every step


@pytest.mark.parametrize("command", ["demo", "generate"])
def test_llama_cpp_engine_takes_a_gguf_file_of_the_user_s(command, tmp_path, empty_home, no_loading, monkeypatch):
    """Any FILE.gguf passes the checks (nothing is loaded); heads then record its name, the file's stem."""
    from logitfuse.cli import demo, generate

    monkeypatch.setattr("logitfuse.cli.common.llama_cpp_python_missing", lambda: None)
    module = {"demo": demo, "generate": generate}[command]
    seen = {}
    monkeypatch.setattr(module, "run", lambda args: seen.setdefault("plan", args.plan) and 0)
    (tmp_path / "My-Model.Q4_K_M.gguf").write_bytes(b"GGUF")
    argv = _argv(command, "--alpha", "0.5")
    argv[argv.index("smollm2-135m")] = str(tmp_path / "My-Model.Q4_K_M.gguf")
    assert main(argv) == 0
    assert seen["plan"].slm_name == "My-Model.Q4_K_M"


def test_a_gguf_file_needs_the_llama_cpp_engine(tmp_path, empty_home, no_loading, capsys, assert_usage_error):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    code = main(["generate", "--slm", str(tmp_path / "model.gguf"), "--llm", "qwen2.5-coder-0.5b",
                 "--instruction", "Write: x"])
    assert_usage_error(code, capsys.readouterr().err, "generate", "is a GGUF file: run it with --slm-engine llama.cpp")


@pytest.mark.engine
@pytest.mark.real_models
@pytest.mark.slow
def test_generate_runs_any_gguf_file_in_llama_cpp(tmp_path, capsys):
    """The zoo's SmolLM2-135M GGUF under another name, outside the zoo: its tokenizer comes from the file."""
    _real_models_or_skip()
    mine = tmp_path / "my-smollm.gguf"
    mine.symlink_to(zoo.gguf_path("smollm2-135m"))
    threads = torch.get_num_threads()
    try:
        code = main(["generate", "--slm-engine", "llama.cpp", "--slm", str(mine), "--llm", "qwen2.5-coder-0.5b",
                     "--alpha", "1", "--max-new-tokens", "4", "--instruction", "Write a short note: for Ann",
                     "--color", "never"])
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() and "SLM alone (--alpha 1)" in err, (out, err)
