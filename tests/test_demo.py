"""`logitfuse demo` and `logitfuse generate` on tiny random models saved to folders (no downloads)."""

import json

import pytest
from tiny_models import byte_level_tokenizer, sentencepiece_tokenizer, tiny_llama

from logitfuse import FusionHead
from logitfuse.cli import main
from logitfuse.demo import colour_by_alpha, vocab_map_for
from logitfuse.server import serve_in_thread


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A byte-level SLM and a sentencepiece LLM (two tokenizers), as transformers folders."""
    root = tmp_path_factory.mktemp("demo-models")
    for name, tok, seed in (("slm", byte_level_tokenizer(), 0), ("llm", sentencepiece_tokenizer(), 1)):
        tiny_llama(len(tok), seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def test_demo_runs_side_by_side_on_tiny_models(model_dirs, capsys):
    code = main(["demo", "--slm", str(model_dirs / "slm"), "--llm", str(model_dirs / "llm"), "--head", "none",
                 "--max-new-tokens", "4", "--max-history", "1", "--color", "never"])
    assert code == 0
    out = capsys.readouterr().out
    for section in ("What the cloud LLM saw", "SLM alone, with the private context", "LLM alone, without it",
                    "Fused, fixed alpha=0.25"):
        assert section in out
    assert "4 steps, 4 LLM calls" in out
    # the LLM's section shows the task title only, never the private tail of the instruction
    saw = out.split("What the cloud LLM saw (all of it) ==")[1].split("==")[0]
    assert "Design an invitation for 'Homes for Humanity' charity event" in saw
    assert "bi-monthly volunteering" not in saw


def test_demo_uses_a_head_for_the_pair(model_dirs, tmp_path, capsys):
    slm_tok, llm_tok = byte_level_tokenizer(), sentencepiece_tokenizer()
    vmap = vocab_map_for(tiny_llama(len(slm_tok)), slm_tok, len(llm_tok), llm_tok)
    FusionHead(vmap.v_slm, vmap.v_llm, vocab_map_hash=vmap.hash).save_pretrained(tmp_path / "head")
    code = main(["demo", "--slm", str(model_dirs / "slm"), "--llm", str(model_dirs / "llm"), "--head", str(tmp_path / "head"),
                 "--max-new-tokens", "3", "--max-history", "0", "--color", "always"])
    assert code == 0
    out = capsys.readouterr().out
    assert "trained head" in out and "mean α 0.50" in out and "\033[38;5;" in out


def test_generate_keeps_the_private_instruction_tail_local(model_dirs, tmp_path, capsys):
    context = tmp_path / "context.txt"
    context.write_text("My sister Ann lives in Rome; we both love roses.")
    code = main(["generate", "--slm", str(model_dirs / "slm"), "--llm", str(model_dirs / "llm"),
                 "--context", str(context), "--instruction", "Write a toast: mention Ann and our trip to Rome",
                 "--max-new-tokens", "5", "--color", "never"])
    assert code == 0
    captured = capsys.readouterr()
    assert "the LLM saw: 'Write a toast'" in captured.err and "5 steps" in captured.err


def test_generate_against_a_served_llm(model_dirs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dirs / "llm")
    server, url = serve_in_thread(model, AutoTokenizer.from_pretrained(model_dirs / "llm"), log_requests=True)
    try:
        code = main(["generate", "--slm", str(model_dirs / "slm"), "--llm", url, "--llm-tokenizer", str(model_dirs / "llm"),
                     "--instruction", "Write a toast: for Ann", "--max-new-tokens", "4", "--on-failure", "raise",
                     "--color", "never"])
    finally:
        server.shutdown()
        server.server_close()
    assert code == 0
    assert "4 steps" in capsys.readouterr().err
    llm_tok = sentencepiece_tokenizer()
    prompts = [llm_tok.decode(json.loads(body)["prompt"]) for body in server.received]
    assert prompts and all("Write a toast" in p and "Ann" not in p for p in prompts), prompts


def test_a_url_llm_needs_its_tokenizer(model_dirs):
    with pytest.raises(SystemExit, match="--llm-tokenizer"):
        main(["generate", "--slm", str(model_dirs / "slm"), "--llm", "http://127.0.0.1:9", "--instruction", "x"])


def test_colour_by_alpha_marks_each_token():
    tok = byte_level_tokenizer()
    ids = tok.encode("Dear friends")
    plain = colour_by_alpha(tok, ids, [0.0] * len(ids), color=False)
    coloured = colour_by_alpha(tok, ids, [0.0] + [1.0] * (len(ids) - 1), color=True)
    assert plain == "Dear friends"
    assert coloured.count("\033[38;5;") == len(ids) and coloured.endswith("\033[0m")
