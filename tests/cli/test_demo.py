"""`logitfuse demo` and `logitfuse generate` on tiny random models saved to folders (no downloads)."""

import json

import pytest
from logitfuse.testing import byte_level_tokenizer, sentencepiece_tokenizer, tiny_llama

from logitfuse import FusionHead
from logitfuse.cli import main
from logitfuse.cli.common import vocab_map_for
from logitfuse.cli.printing import colour_by_alpha
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
                    "Fused, fixed α 0.6 (the default"):  # no α is recorded for slm + llm
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
    prompts = _sent_prompts(server)
    assert prompts and all("Write a toast" in p and "Ann" not in p for p in prompts), prompts


def _sent_prompts(server):
    """The prompts the served LLM received, decoded; the check before generating sends only the fixed
    probe text (OpenAICompatibleLLM.check_server), which is left out."""
    from logitfuse.backends.served_scoring import PROBE_TEXT

    bodies = [json.loads(raw) for raw in server.received if PROBE_TEXT not in raw.decode()]
    return [sentencepiece_tokenizer().decode(body["prompt"]) for body in bodies]


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
    prompts = _sent_prompts(server)
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
    assert "the shipped head does not fit these models" in err and "fixed α 0.68 (the shipped head does not fit)" in err  # its chosen_alpha.json
    assert _generate(model_dirs, "--llm", str(model_dirs / "llm"), "--instruction", "Write a toast: for Ann") == 0
    assert "fixed α 0.6 (no head is shipped for slm + llm; the default" in capsys.readouterr().err


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


# ------------------------------------------------------------------------------------ one engine
@pytest.fixture(scope="module")
def same_tokenizer_llm(model_dirs):
    """A second byte-level model (another seed): the SLM's tokenizer on both sides."""
    folder = model_dirs / "llm-same-tokenizer"
    tok = byte_level_tokenizer()
    tiny_llama(len(tok), seed=1).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _fused_run(model_dirs, llm, capsys, *extra, penalty="1", alpha="0.5") -> tuple[str, str, str]:
    """``(SLM-alone text, fused text, summary line)`` of a demo run (no repetition penalty unless
    ``penalty``; None: the default; ``alpha=None``: no --alpha)."""
    import re

    penalty_args = ["--repetition-penalty", penalty] if penalty is not None else []
    alpha_args = ["--alpha", alpha] if alpha is not None else []
    code = main(["demo", "--slm", str(model_dirs / "slm"), "--llm", str(llm), *alpha_args, "--max-new-tokens", "8",
                 "--max-history", "0", *penalty_args, "--color", "never", *extra])
    assert code == 0
    out = capsys.readouterr().out
    alone = re.search(r"== SLM alone, with the private context [^\n]*==\n(.*?)\n\n== LLM alone", out, re.DOTALL).group(1)
    text, summary = re.search(r"== Fused, [^\n]*==\n(.*)\n\n(\d+ steps[^\n]*)", out, re.DOTALL).groups()
    return alone.strip(), text.strip(), summary


def _before(model_dirs, llm_dir, *, private, public, penalty=1.0, alpha=0.5, head=None, n=8, **sampling):
    """``(SLM-alone text, fused text, mean α)`` as the CLI computed them before everything went through
    logitfuse.generate: ``slm.generate`` alone, and ``slm.generate`` + CoGenesisLogitsProcessor."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitfuse import HFLLM, CoGenesisLogitsProcessor
    from logitfuse.prompts import render_prompt

    slm = AutoModelForCausalLM.from_pretrained(model_dirs / "slm", dtype=torch.float32).eval()
    slm_tok = AutoTokenizer.from_pretrained(model_dirs / "slm")
    llm_model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
    llm_tok = AutoTokenizer.from_pretrained(llm_dir)
    llm = HFLLM(llm_model, llm_tok)
    vmap = vocab_map_for(slm, slm_tok, llm.vocab_size, llm_tok)
    ids = torch.tensor([render_prompt(slm_tok, private)])
    pad = slm_tok.pad_token_id if slm_tok.pad_token_id is not None else slm_tok.eos_token_id
    common = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, pad_token_id=pad,
                  repetition_penalty=penalty, do_sample=bool(sampling), **sampling)

    def text(out):
        new = out[0, ids.shape[1]:].tolist()
        while new and new[-1] in set(slm_tok.all_special_ids):
            new = new[:-1]
        return new, slm_tok.decode(new, skip_special_tokens=True)

    with torch.no_grad():
        alone = text(slm.generate(**common))[1]
        weight = dict(head=head) if head is not None else dict(alpha=alpha)
        proc = CoGenesisLogitsProcessor(llm, render_prompt(llm_tok, public), slm_tokenizer=slm_tok, slm=slm,
                                        vocab_map=vmap, **weight)
        fused_ids, fused = text(slm.generate(**common, logits_processor=[proc]))
    alphas = [float(a[0]) for a in proc.alpha_history][: len(fused_ids)]
    proc.close()
    return alone, fused, sum(alphas) / max(len(alphas), 1)


def _demo_before(model_dirs, llm_dir, **kwargs):
    from logitfuse.prompts import bundled_split, load_examples

    example = load_examples(bundled_split("test"))[0]
    alone, fused, mean_alpha = _before(model_dirs, llm_dir, private=example.private_messages(0),
                                       public=example.public_messages(), **kwargs)
    return alone.strip(), fused.strip(), mean_alpha  # the demo shows each section stripped


def test_demo_speculates_with_one_tokenizer_with_the_tokens_of_before(model_dirs, same_tokenizer_llm, capsys):
    # speculation is opt-in (the LLM also sees rejected drafts): --speculate 4
    alone, fast_text, fast = _fused_run(model_dirs, same_tokenizer_llm, capsys, "--speculate", "4")
    before_alone, before_fused, _ = _demo_before(model_dirs, same_tokenizer_llm)
    assert (alone, fast_text) == (before_alone, before_fused)
    assert "fused by logitfuse.generate (speculate 4)" in fast and "draft tokens sent" in fast
    steps, calls = (int(n) for n in fast.split(" LLM calls")[0].split(" steps, "))
    assert calls < steps and f"{calls / steps:.2f} LLM calls per generated token" in fast
    _, per_step_text, per_step = _fused_run(model_dirs, same_tokenizer_llm, capsys)  # the default: per step
    assert per_step_text == before_fused and "fused by logitfuse.generate (per step, overlap)" in per_step
    assert "8 steps, 8 LLM calls, 1.00 LLM calls per generated token, 0 saved" in per_step


def test_demo_across_tokenizers_fuses_per_step_with_the_tokens_of_before(model_dirs, capsys):
    alone, text, summary = _fused_run(model_dirs, model_dirs / "llm", capsys)
    assert (alone, text) == _demo_before(model_dirs, model_dirs / "llm")[:2]
    assert "fused by logitfuse.generate (per step, overlap)" in summary
    assert "1.00 LLM calls per generated token" in summary and "draft tokens" not in summary


def test_demo_default_penalty_gives_the_text_of_before(model_dirs, same_tokenizer_llm, capsys):
    """The demo's default (--repetition-penalty 1.1, greedy): the SLM alone and the fused text are
    those slm.generate (+ the processor) gave, one tokenizer and two, and with --speculate."""
    before = {}
    for llm in (same_tokenizer_llm, model_dirs / "llm"):
        alone, text, summary = _fused_run(model_dirs, llm, capsys, penalty=None)
        before[llm] = _demo_before(model_dirs, llm, penalty=1.1)
        assert (alone, text) == before[llm][:2]
        assert "fused by logitfuse.generate (per step, overlap)" in summary and "draft tokens" not in summary
        assert "8 steps, 8 LLM calls, 1.00 LLM calls per generated token" in summary
    _, spec_text, spec = _fused_run(model_dirs, same_tokenizer_llm, capsys, "--speculate", "2", penalty=None)
    assert spec_text == before[same_tokenizer_llm][1] and "fused by logitfuse.generate (speculate 2)" in spec
    # a penalty strong enough to change these 8 tokens: still the text of before
    strong = _fused_run(model_dirs, same_tokenizer_llm, capsys, penalty="3")[:2]
    assert strong[1] != _fused_run(model_dirs, same_tokenizer_llm, capsys)[1]
    assert strong == _demo_before(model_dirs, same_tokenizer_llm, penalty=3.0)[:2]


def test_demo_engine_mistakes_are_one_line(model_dirs, capsys):
    code = main(["demo", "--slm", str(model_dirs / "slm"), "--llm", str(model_dirs / "llm"), "--speculate", "-1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("logitfuse demo: error: ") and "--speculate -1 must be >= 0" in err
    assert len(err.splitlines()) == 1
    # one engine: the processor path (--fused-engine) is gone
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--fused-engine", "processor"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "unrecognized arguments: --fused-engine processor" in err
    assert len(err.splitlines()) == 1


def test_demo_runs_a_hidden_state_head(model_dirs, same_tokenizer_llm, tmp_path, capsys):
    """A head reading the SLM's hidden state: logitfuse.generate captures it; the text and mean α
    are those of the processor (given the SLM for its hook), and α varies with the hidden state."""
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
    _, text, summary = _fused_run(model_dirs, same_tokenizer_llm, capsys, "--head", str(tmp_path / "hidden"),
                                  alpha=None)
    _, before, mean_alpha = _demo_before(model_dirs, same_tokenizer_llm, head=FusionHead.from_pretrained(
        tmp_path / "hidden", vocab_map=vmap))
    assert text == before and "mean α 0.50" not in summary
    assert "logitfuse.generate (per step, overlap)" in summary
    assert re.search(r"mean α ([\d.]+)", summary).group(1) == f"{mean_alpha:.2f}"


def test_generate_gives_the_text_of_before(model_dirs, same_tokenizer_llm, capsys):
    """`logitfuse generate` greedy: logitfuse.generate per step with overlap, the text that slm.generate
    + CoGenesisLogitsProcessor gave, one tokenizer and two."""
    from logitfuse.prompts import private_messages, public_messages

    instruction = "Write a toast: for Ann"
    for llm in (same_tokenizer_llm, model_dirs / "llm"):
        code = _generate(model_dirs, "--llm", str(llm), "--alpha", "0.95", "--max-new-tokens", "12",
                         "--instruction", instruction)
        assert code == 0
        run = capsys.readouterr()
        _, before, _ = _before(model_dirs, llm, private=private_messages(instruction, ""),
                               public=public_messages("Write a toast"), alpha=0.95, n=12)
        assert run.out == before + "\n" and len(run.out.strip()) > 4
        assert "; fused by logitfuse.generate (per step, overlap);" in run.err and "12 steps, 12 LLM calls" in run.err


def test_generate_samples_through_logitfuse_generate_from_the_seed(model_dirs, capsys):
    runs = []
    for seed in ("0", "0", "1"):
        assert _generate(model_dirs, "--llm", str(model_dirs / "llm"), "--alpha", "0.5", "--temperature", "1.5",
                         "--max-new-tokens", "12", "--seed", seed, "--instruction", "Write a toast: for Ann") == 0
        runs.append(capsys.readouterr())
    assert "; fused by logitfuse.generate (per step, overlap);" in runs[0].err
    assert runs[0].out == runs[1].out != runs[2].out


def test_generate_with_alpha_1_gives_the_slm_alone_of_before(model_dirs, capsys):
    from logitfuse.prompts import private_messages, public_messages

    assert _generate(model_dirs, "--llm", str(model_dirs / "llm"), "--alpha", "1", "--max-new-tokens", "12",
                     "--instruction", "Write a toast: for Ann") == 0
    alone, _, _ = _before(model_dirs, model_dirs / "llm", private=private_messages("Write a toast: for Ann", ""),
                          public=public_messages("Write a toast"), n=12)
    assert capsys.readouterr().out == alone + "\n"
