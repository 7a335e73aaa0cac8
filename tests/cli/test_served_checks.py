"""Issue 23, item 4: `logitfuse generate --llm URL` checks the served model, --top-k and --llm-tokenizer
against the server before generating (one line, exit 2), and names the pair by the served model.

Tiny random models in folders (no downloads); the LLM served by `logitfuse serve` in-process on 127.0.0.1.
"""

from __future__ import annotations

import json

import pytest

from logitfuse.backends.served_scoring import PROBE_TEXT
from logitfuse.cli import main
from logitfuse.serve.server import serve_in_thread
from logitfuse.testing import byte_level_tokenizer, sentencepiece_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Folders of a byte-level SLM and a sentencepiece LLM, and the LLM served as 'tiny' (recording bodies)."""
    root = tmp_path_factory.mktemp("served-checks")
    models = {}
    for name, tok, seed in (("slm", byte_level_tokenizer(), 0), ("llm", sentencepiece_tokenizer(), 1)):
        models[name] = tiny_llama(len(tok), seed=seed)
        models[name].save_pretrained(root / name)
        tok.save_pretrained(root / name)
    server, url = serve_in_thread(models["llm"], sentencepiece_tokenizer(), model_name="tiny", log_requests=True)
    yield root, server, url
    server.shutdown()
    server.server_close()


def _generate(root, url, *extra):
    return main(["generate", "--slm", str(root / "slm"), "--llm", url, "--max-new-tokens", "3", "--color", "never",
                 "--instruction", "Write a toast: for Ann", "--head", "none", "--alpha", "0.5", *extra])


@pytest.mark.parametrize("extra, flag, message", [
    (["--llm-tokenizer", "{slm}"], "--llm-tokenizer", "tokenizer= is not the served model's ('tiny'"),
    (["--llm-tokenizer", "{llm}", "--served-model", "qwen"], "--served-model", "lists 'tiny', not model='qwen'"),
    (["--llm-tokenizer", "{llm}", "--top-k", "21"], "--top-k", "top_k=21 is above the max_logprobs=20"),
])
def test_a_mismatched_server_is_one_line_and_exit_2_before_generating(pair, capsys, extra, flag, message):
    root, server, url = pair
    server.received.clear()
    extra = [e.format(slm=root / "slm", llm=root / "llm") for e in extra]
    assert _generate(root, url, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"logitfuse generate: error: {flag}: ") and message in err[-1], err
    assert "Traceback" not in "".join(err) and not any(line.startswith("[") for line in err)  # no summary
    # only the checks' fixed probe text reached the server (GET /v1/models is not recorded): nothing of the instruction
    assert all(PROBE_TEXT in body.decode() for body in server.received)


def test_a_matching_server_generates_and_the_pair_is_named_by_the_served_model(pair, capsys):
    root, server, url = pair
    server.received.clear()
    code = main(["generate", "--slm", str(root / "slm"), "--llm", url, "--llm-tokenizer", str(root / "llm"),
                 "--max-new-tokens", "3", "--color", "never", "--instruction", "Write a toast: for Ann",
                 "--head", "none", "--on-failure", "raise"])
    assert code == 0
    err = capsys.readouterr().err
    assert f"+ 'tiny' served at {url}/v1/completions (tokenizer llm)" in err, err
    assert "0 fallbacks" in err
    generated = [json.loads(body) for body in server.received if PROBE_TEXT not in body.decode()]
    assert generated and all(isinstance(body["prompt"], list) for body in generated)
