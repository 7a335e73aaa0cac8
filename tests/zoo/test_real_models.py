"""Checks on the real models of the zoo, where they are installed (``logitfuse models install NAME``).

Everything here skips, saying why, when the model is not installed under the zoo home
(``$LOGITFUSE_HOME``, default ``~/.cache/logitfuse``); CI does not download them.
"""

from __future__ import annotations

import json

import pytest

from logitfuse import zoo

pytestmark = pytest.mark.real_models


def _installed_or_skip(name):
    if not zoo.is_installed(name):
        pytest.skip(f"needs the real models: run `logitfuse models install {name}` (looked in {zoo.home()})")
    return zoo.path(name)


@pytest.mark.parametrize("name", [spec.name for spec in zoo.list_models()])
def test_installed_folder_matches_its_spec(name):
    folder = _installed_or_skip(name)
    spec = zoo.get_spec(name)
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == spec.vocab_size
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert json.loads((folder / zoo.MARKER).read_text())["sha256"] == spec.sha256
    assert zoo.resolve(name) == folder
    assert zoo.gguf_path(name).stat().st_size > spec.size_mb * 900_000


def test_smollm2_gguf_still_has_the_pinned_hash():
    _installed_or_skip("smollm2-135m")
    zoo.verify_sha256(zoo.gguf_path("smollm2-135m"), zoo.get_spec("smollm2-135m").sha256)


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france():
    folder = _installed_or_skip("smollm2-135m")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert len(tokenizer) == model.config.vocab_size == 49_152

    text = "The capital of France is"
    inputs = tokenizer(text, return_tensors="pt")
    assert tokenizer.decode(inputs.input_ids[0], skip_special_tokens=True) == text
    with torch.no_grad():
        logits = model(**inputs).logits
        assert torch.isfinite(logits.float()).all()
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    continuation = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in continuation, continuation
