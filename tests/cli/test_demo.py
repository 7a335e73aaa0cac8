"""`logitfuse demo` and `logitfuse generate` on tiny random models saved to folders (no downloads)."""

import json

import pytest
from logitfuse.testing import byte_level_tokenizer, sentencepiece_tokenizer, tiny_llama

from logitfuse import FusionHead
from logitfuse.cli import main
from logitfuse.cli.demo import colour_by_alpha, vocab_map_for
from logitfuse.serve.server import serve_in_thread


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
                    "Fused, fixed α 0.25"):
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


def test_a_url_llm_needs_its_tokenizer(model_dirs, capsys):
    code = main(["generate", "--slm", str(model_dirs / "slm"), "--llm", "http://127.0.0.1:9", "--instruction", "x: y"])
    assert code == 2
    assert capsys.readouterr().err.startswith("logitfuse generate: error: --llm is a URL: pass --llm-tokenizer")


def _generate(model_dirs, *extra):
    return main(["generate", "--slm", str(model_dirs / "slm"), "--max-new-tokens", "3", "--color", "never", *extra])


@pytest.fixture
def recording_llm(model_dirs):
    """The tiny LLM served on 127.0.0.1, keeping every /v1/completions body it receives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dirs / "llm")
    server, url = serve_in_thread(model, AutoTokenizer.from_pretrained(model_dirs / "llm"), log_requests=True)
    yield server, url
    server.shutdown()
    server.server_close()


def test_generate_sends_only_the_public_prompt_and_says_so_first(model_dirs, recording_llm, capsys):
    server, url = recording_llm
    code = _generate(model_dirs, "--llm", url, "--llm-tokenizer", str(model_dirs / "llm"),
                     "--instruction", "Thank my neighbour Zoe for feeding the cat", "--public", "A thank-you note",
                     "--on-failure", "raise")
    assert code == 0
    err = capsys.readouterr().err
    announced = err.index("will see: 'A thank-you note'")
    assert announced < err.index("the LLM saw: 'A thank-you note'")
    prompts = [sentencepiece_tokenizer().decode(json.loads(body)["prompt"]) for body in server.received]
    assert prompts and all("A thank-you note" in p and "Zoe" not in p for p in prompts), prompts


def test_generate_refuses_an_instruction_with_no_public_part(model_dirs, recording_llm, capsys):
    server, url = recording_llm
    code = _generate(model_dirs, "--llm", url, "--llm-tokenizer", str(model_dirs / "llm"), "--served-model", "m",
                     "--instruction", "Thank my neighbour Zoe for feeding the cat")
    assert code == 2 and server.received == []
    err = capsys.readouterr().err
    assert err.startswith("logitfuse generate: error: --instruction has no ': '") and "--public TEXT" in err


def test_generate_with_alpha_1_never_contacts_the_llm(model_dirs, recording_llm, capsys):
    server, url = recording_llm
    code = _generate(model_dirs, "--llm", url, "--llm-tokenizer", str(model_dirs / "llm"), "--alpha", "1",
                     "--instruction", "Write a toast: for Ann")
    assert code == 0 and server.received == []
    assert "SLM alone (--alpha 1), no LLM calls" in capsys.readouterr().err


def test_generate_warns_when_the_llm_answered_no_step(model_dirs, capsys):
    import socket

    with socket.socket() as sock:  # a port nothing listens on: every request is refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = _generate(model_dirs, "--llm", f"http://127.0.0.1:{port}", "--llm-tokenizer", str(model_dirs / "llm"),
                     "--served-model", "m", "--alpha", "0.5", "--instruction", "Write a toast: for Ann")
    assert code == 0
    err = capsys.readouterr().err
    assert f"warning: the LLM answered none of 3 steps (http://127.0.0.1:{port} unreachable?): this text is the SLM " \
           "alone" in err
    assert "3 fallbacks" in err and "the LLM answered none: SLM alone]" in err


def test_generate_uses_the_shipped_head_of_the_pair_by_default(model_dirs, tmp_path, capsys):
    """Folders named like the shipped pair get its head by default (which cannot fit tiny models: it
    says so and falls back on a fixed α); another pair has none and says that."""
    for name, source in (("smollm2-135m", "slm"), ("qwen2.5-coder-0.5b", "llm")):
        (tmp_path / name).symlink_to(model_dirs / source, target_is_directory=True)
    code = main(["generate", "--slm", str(tmp_path / "smollm2-135m"), "--llm", str(tmp_path / "qwen2.5-coder-0.5b"),
                 "--instruction", "Write a toast: for Ann", "--max-new-tokens", "2", "--color", "never"])
    assert code == 0
    err = capsys.readouterr().err
    assert "the shipped head does not fit these models" in err and "fixed α 0.25 (the shipped head does not fit)" in err
    assert _generate(model_dirs, "--llm", str(model_dirs / "llm"), "--instruction", "Write a toast: for Ann") == 0
    assert "fixed α 0.25 (no head is shipped for slm + llm)" in capsys.readouterr().err


def test_generate_uses_a_head_given_with_head(model_dirs, tmp_path, capsys):
    slm_tok, llm_tok = byte_level_tokenizer(), sentencepiece_tokenizer()
    vmap = vocab_map_for(tiny_llama(len(slm_tok)), slm_tok, len(llm_tok), llm_tok)
    FusionHead(vmap.v_slm, vmap.v_llm, vocab_map_hash=vmap.hash).save_pretrained(tmp_path / "run" / "dense")
    code = _generate(model_dirs, "--llm", str(model_dirs / "llm"), "--head", str(tmp_path / "run" / "dense"),
                     "--instruction", "Write a toast: for Ann")
    assert code == 0 and "; trained head run/dense;" in capsys.readouterr().err


def test_colour_by_alpha_marks_each_token():
    tok = byte_level_tokenizer()
    ids = tok.encode("Dear friends")
    plain = colour_by_alpha(tok, ids, [0.0] * len(ids), color=False)
    coloured = colour_by_alpha(tok, ids, [0.0] + [1.0] * (len(ids) - 1), color=True)
    assert plain == "Dear friends"
    assert coloured.count("\033[38;5;") == len(ids) and coloured.endswith("\033[0m")


# ------------------------------------------------------------------------------------ the fused run's loop
@pytest.fixture(scope="module")
def same_tokenizer_llm(model_dirs):
    """A second byte-level model (another seed): the SLM's tokenizer on both sides."""
    folder = model_dirs / "llm-same-tokenizer"
    tok = byte_level_tokenizer()
    tiny_llama(len(tok), seed=1).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _fused_run(model_dirs, llm, capsys, *extra, penalty="1", alpha="0.5") -> tuple[str, str]:
    """``(fused text, summary line)`` of a demo run (no repetition penalty unless ``penalty``; None: the default;
    ``alpha=None``: no --alpha)."""
    import re

    penalty_args = ["--repetition-penalty", penalty] if penalty is not None else []
    alpha_args = ["--alpha", alpha] if alpha is not None else []
    code = main(["demo", "--slm", str(model_dirs / "slm"), "--llm", str(llm), *alpha_args, "--max-new-tokens", "8",
                 "--max-history", "0", *penalty_args, "--color", "never", *extra])
    assert code == 0
    out = capsys.readouterr().out
    text, summary = re.search(r"== Fused, [^\n]*==\n(.*)\n\n(\d+ steps[^\n]*)", out, re.DOTALL).groups()
    return text, summary


def test_demo_speculates_with_one_tokenizer_and_matches_the_processor(model_dirs, same_tokenizer_llm, capsys):
    # speculation is opt-in (the LLM also sees rejected drafts): --speculate 4
    fast_text, fast = _fused_run(model_dirs, same_tokenizer_llm, capsys, "--speculate", "4")
    slow_text, slow = _fused_run(model_dirs, same_tokenizer_llm, capsys, "--fused-engine", "processor")
    assert fast_text == slow_text
    assert "fused by logitfuse.generate (speculate 4)" in fast and "draft tokens sent" in fast
    assert "8 steps, 8 LLM calls, 1.00 LLM calls per generated token, 0 saved" in slow
    assert "fused by slm.generate + CoGenesisLogitsProcessor" in slow
    steps, calls = (int(n) for n in fast.split(" LLM calls")[0].split(" steps, "))
    assert calls < steps and f"{calls / steps:.2f} LLM calls per generated token" in fast
    per_step_text, per_step = _fused_run(model_dirs, same_tokenizer_llm, capsys)  # the default: per step
    assert per_step_text == slow_text and "fused by logitfuse.generate (per step, overlap)" in per_step


def test_demo_across_tokenizers_takes_the_loop_per_step(model_dirs, capsys):
    fast_text, fast = _fused_run(model_dirs, model_dirs / "llm", capsys)
    slow_text, _ = _fused_run(model_dirs, model_dirs / "llm", capsys, "--fused-engine", "processor")
    assert fast_text == slow_text and "fused by logitfuse.generate (per step, overlap)" in fast
    assert "1.00 LLM calls per generated token" in fast and "draft tokens" not in fast


def test_demo_default_penalty_takes_the_loop_and_matches_the_processor(model_dirs, same_tokenizer_llm, capsys):
    """The demo's default (--repetition-penalty 1.1, greedy) runs logitfuse.generate per step with overlap,
    with the processor's text, and still prints LLM calls per token."""
    processor_text = {}
    for llm in (same_tokenizer_llm, model_dirs / "llm"):  # one tokenizer, and two
        fast_text, fast = _fused_run(model_dirs, llm, capsys, penalty=None)
        processor_text[llm], slow = _fused_run(model_dirs, llm, capsys, "--fused-engine", "processor", penalty=None)
        assert fast_text == processor_text[llm]
        assert "fused by logitfuse.generate (per step, overlap)" in fast and "draft tokens" not in fast
        assert "fused by slm.generate + CoGenesisLogitsProcessor" in slow
        assert "8 steps, 8 LLM calls, 1.00 LLM calls per generated token" in fast
    spec_text, spec = _fused_run(model_dirs, same_tokenizer_llm, capsys, "--speculate", "2", penalty=None)
    assert spec_text == processor_text[same_tokenizer_llm] and "fused by logitfuse.generate (speculate 2)" in spec
    # a penalty strong enough to change these 8 tokens: still the processor's text
    strong, _ = _fused_run(model_dirs, same_tokenizer_llm, capsys, "--fused-engine", "processor", penalty="3")
    assert strong != _fused_run(model_dirs, same_tokenizer_llm, capsys)[0]
    assert _fused_run(model_dirs, same_tokenizer_llm, capsys, penalty="3")[0] == strong


@pytest.mark.parametrize("argv, fragment", [
    (["--fused-engine", "processor", "--speculate", "2"], "--speculate 2 needs logitfuse.generate"),
    (["--speculate", "-1"], "--speculate -1 must be >= 0"),
])
def test_demo_fused_engine_mistakes_are_one_line(model_dirs, capsys, argv, fragment):
    code = main(["demo", "--slm", str(model_dirs / "slm"), "--llm", str(model_dirs / "llm"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("logitfuse demo: error: ") and fragment in err and len(err.splitlines()) == 1


def test_demo_runs_a_hidden_state_head_on_both_loops(model_dirs, same_tokenizer_llm, tmp_path, capsys):
    """A head reading the SLM's hidden state: the processor is given the SLM (its hook), the loop
    captures it too; both give the same text, and α varies with the hidden state."""
    import re

    import torch

    tok = byte_level_tokenizer()
    slm = tiny_llama(len(tok))
    vmap = vocab_map_for(slm, tok, len(tok), tok)
    head = FusionHead(vmap.v_slm, vmap.v_llm, vocab_map_hash=vmap.hash, slm_features=["hidden"],
                      slm_hidden_size=slm.config.hidden_size)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    head.save_pretrained(tmp_path / "hidden")
    loop_text, loop = _fused_run(model_dirs, same_tokenizer_llm, capsys, "--head", str(tmp_path / "hidden"),
                                 alpha=None)
    processor_text, processor = _fused_run(model_dirs, same_tokenizer_llm, capsys, "--head", str(tmp_path / "hidden"),
                                           "--fused-engine", "processor", alpha=None)
    assert loop_text == processor_text and "mean α 0.50" not in loop
    assert "logitfuse.generate (per step, overlap)" in loop and "CoGenesisLogitsProcessor" in processor
    assert re.search(r"mean α [\d.]+", loop).group() == re.search(r"mean α [\d.]+", processor).group()


def test_generate_takes_the_loop_with_the_processors_text(model_dirs, same_tokenizer_llm, capsys):
    """`logitfuse generate` greedy: logitfuse.generate per step with overlap (as the demo), the text of
    slm.generate + CoGenesisLogitsProcessor (--fused-engine processor), one tokenizer and two; sampling
    keeps the processor."""
    for llm in (same_tokenizer_llm, model_dirs / "llm"):
        runs = {}
        for engine in ("auto", "processor"):
            code = _generate(model_dirs, "--llm", str(llm), "--alpha", "0.95", "--max-new-tokens", "12",
                             "--instruction", "Write a toast: for Ann", "--fused-engine", engine)
            assert code == 0
            runs[engine] = capsys.readouterr()
        assert runs["auto"].out == runs["processor"].out and len(runs["auto"].out.strip()) > 4
        assert "; fused by logitfuse.generate (per step, overlap);" in runs["auto"].err
        assert "; fused by slm.generate + CoGenesisLogitsProcessor;" in runs["processor"].err
        assert "12 steps, 12 LLM calls" in runs["auto"].err
    assert _generate(model_dirs, "--llm", str(model_dirs / "llm"), "--alpha", "0.5", "--temperature", "0.7",
                     "--instruction", "Write a toast: for Ann") == 0
    assert "; fused by slm.generate + CoGenesisLogitsProcessor;" in capsys.readouterr().err
