"""logitfuse.prompts: the one chat rendering (the same ids the three former renderings gave), the
prompt builders, the bundled data, and a runtime that never imports train_fuser."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import logitfuse
from logitfuse import prompts
from logitfuse.backends import HFLLM
from logitfuse.prompts import (
    PRIVATE_SYSTEM,
    Example,
    bundled_split,
    load_examples,
    private_messages,
    public_messages,
    render_prompt,
)
from logitfuse.testing import byte_level_tokenizer, sentencepiece_tokenizer, tiny_llama

TOKENIZERS = {"byte-level": byte_level_tokenizer, "sentencepiece": sentencepiece_tokenizer}


def _former_session_and_sketch_ids(tokenizer, messages):
    """How FusionSession.format_prompt and sketch_generate rendered before: tokenize=True."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5: a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def _former_train_fuser_ids(tokenizer, messages):
    """How train_fuser.data.render_prompt rendered before (the shipped heads were trained on it)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _cases():
    examples = load_examples(bundled_split("test"), max_examples=3)
    for example in examples:
        yield example.private_messages(2)
        yield example.private_messages()
        yield example.public_messages()
    yield private_messages("Write a toast for my sister: mention <|im_start|> our trip to Rome", "Café\n\nnaïve ")
    yield public_messages(" Write a toast ")
    yield [{"role": "user", "content": "Write a short invitation for the charity event on Saturday."}]


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_render_prompt_gives_the_ids_of_all_three_former_renderings(name):
    tokenizer = TOKENIZERS[name]()
    for messages in _cases():
        ids = render_prompt(tokenizer, messages)
        assert ids == _former_train_fuser_ids(tokenizer, messages)
        assert ids == _former_session_and_sketch_ids(tokenizer, messages)
        assert all(type(i) is int for i in ids)


def test_private_prompt_text_is_pinned():
    """The exact layout the shipped heads were trained on: system prompt, profile, history, task."""
    example = Example("t1", "Write a post: about my dog Rex", "resp", (("A", "one"), ("B", "two"), ("C", "three")),
                      "Name: Ann")
    tok = byte_level_tokenizer()
    expected = (
        "<|im_start|>system\nYou are a personal writing assistant. Write as the user described below would: use their "
        "profile and writing history, and match their style.<|im_end|>\n<|im_start|>user\n## User Profile\nName: Ann"
        "\n\n## User Writing History\nTask: A\nContent: one\n\nTask: B\nContent: two\n\n## Task\nWrite a post: about "
        "my dog Rex<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(render_prompt(tok, example.private_messages(2))) == expected
    assert example.public_messages() == [{"role": "system", "content": "You are a helpful writing assistant."},
                                         {"role": "user", "content": "Write a post"}]
    assert private_messages("Do it: now", "ctx") == [{"role": "system", "content": PRIVATE_SYSTEM},
                                                     {"role": "user", "content": "## Context\nctx\n\n## Task\nDo it: now"}]


def _without_chat_template():
    tok = byte_level_tokenizer()
    return tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>")


def test_render_prompt_without_a_chat_template_joins_the_contents():
    tok = _without_chat_template()
    assert not prompts.has_chat_template(tok)
    ids = render_prompt(tok, public_messages("Write a toast"))
    assert tok.decode(ids) == "You are a helpful writing assistant.\n\nWrite a toast\n\n"


def test_session_formats_text_prompts_with_render_prompt():
    tok = byte_level_tokenizer()
    llm = HFLLM(tiny_llama(len(tok), seed=1), tok)
    session = logitfuse.FusionSession(llm, alpha=0.5, apply_chat_template=True)
    text = "Write a short invitation."
    assert session.format_prompt(text) == render_prompt(tok, [{"role": "user", "content": text}])
    assert session.format_prompt([5, 6]) == [5, 6]  # ids pass through


def test_session_chat_template_needs_one():
    bare = _without_chat_template()
    session = logitfuse.FusionSession(HFLLM(tiny_llama(len(bare), seed=1), bare), alpha=0.5, apply_chat_template=True)
    with pytest.raises(ValueError, match="apply_chat_template=True but the LLM backend's tokenizer has no chat template"):
        session.format_prompt("Write a short invitation.")


def test_train_fuser_data_keeps_its_names():
    from logitfuse.train_fuser import data

    for name in ("PRIVATE_SYSTEM", "PUBLIC_SYSTEM", "Example", "bundled_split", "load_examples", "public_instruction",
                 "render_prompt", "SPLITS", "DATA_DIR"):
        assert getattr(data, name) is getattr(prompts, name), name
    assert data.DATA_DIR.is_dir() and (data.DATA_DIR / "README.md").is_file()


def _run_isolated(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; the logitfuse.train_fuser modules it imported."""
    probe = textwrap.dedent(code) + textwrap.dedent("""
        import sys
        print(sorted(m for m in sys.modules if m.startswith("logitfuse.train_fuser")))
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return eval(done.stdout.strip().splitlines()[-1])


def test_prompts_read_the_bundled_data_without_importing_train_fuser():
    imported = _run_isolated("""
        from logitfuse.prompts import bundled_split, load_examples, shipped_path
        assert len(load_examples(bundled_split("test"))) == 240
        assert shipped_path("heads").is_dir()
    """)
    assert imported == []


def test_demo_and_its_argument_checks_never_import_train_fuser():
    imported = _run_isolated("""
        import argparse
        from logitfuse.cli import demo, generate

        def parse(module, argv):
            parser = argparse.ArgumentParser()
            module.add_arguments(parser)
            return parser.parse_args(argv)

        args = parse(demo, [])
        demo.validate(args)  # the default pair: example and shipped head found
        assert args.plan.example is not None and args.plan.head_dir is not None, args.plan
        generate.validate(parse(generate, ["--slm", "smollm2-135m", "--llm", "qwen2.5-coder-0.5b",
                                           "--instruction", "Write a toast: for my sister"]))
    """)
    assert imported == []
