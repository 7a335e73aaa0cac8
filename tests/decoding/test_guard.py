"""Contract test of the generation-mode guard (logitfuse.decoding.guard) against the installed transformers.

The guard reads the running ``generate``'s mode off the call stack, so it relies on how transformers
structures ``generate``. These tests fail when the installed transformers changes that structure (or
when setup.py allows a transformers the guard does not know): run them on every transformers version
setup.py allows (``KNOWN_VERSIONS``; checked by hand: 4.46.3, 5.17.0, 5.25.0).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import GenerationConfig, LogitsProcessor

import logitfuse
from logitfuse.decoding import guard
from logitfuse.testing.generation import PRIVATE, PUBLIC, generate, left_pad, private_prompt_ids

SETUP = Path(__file__).resolve().parents[2] / "setup.py"


class Verdicts(LogitsProcessor):
    """Records what the guard says at every call ``generate`` makes."""

    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append(guard.generation_problem())
        return scores


def test_setup_py_allows_exactly_the_transformers_the_guard_knows():
    requirements = re.findall(r'"(transformers[^"]*)"', SETUP.read_text())
    assert requirements == [guard.REQUIREMENT]


def test_the_installed_transformers_is_known_and_has_the_structure_the_guard_reads():
    low, high = guard.KNOWN_VERSIONS
    assert low <= Version(transformers.__version__) < high
    assert guard.structure_problems() == []
    guard.check_transformers()


MODES = {
    "greedy": ({}, True),
    "sample": ({"do_sample": True}, True),
    "beam search": ({"num_beams": 2}, True),
    "beam sample": ({"num_beams": 2, "do_sample": True}, True),
    "prompt lookup": ({"prompt_lookup_num_tokens": 3, "eos_token_id": "eos"}, False),  # 4.46 needs an eos id
    "assisted": ({"assistant_model": "slm"}, False),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_guard_tells_the_modes_apart_inside_generate(tok, slm, mode):
    """What the guard reads off the stack in each mode, on this transformers: greedy, sampling and beam
    search are served; prompt lookup and assisted decoding (also inside the assistant's own generate)
    are not, at every call."""
    options, served = MODES[mode]
    options = {k: {"slm": slm, "eos": tok.eos_token_id}.get(v, v) if isinstance(v, str) else v for k, v in options.items()}
    verdicts = Verdicts()
    torch.manual_seed(0)
    generate(slm, left_pad([private_prompt_ids(tok, PRIVATE, PUBLIC)]), 4, verdicts, **options)
    assert verdicts.seen
    if served:
        assert verdicts.seen == [None] * len(verdicts.seen)
    else:
        assert all(problem is not None and "generate()" in problem for problem in verdicts.seen), verdicts.seen


def test_outside_generate_the_caller_owns_the_loop(tok):
    scores = torch.zeros(1, len(tok))
    verdicts = Verdicts()
    verdicts(torch.tensor([[1, 2]]), scores)
    assert verdicts.seen == [None]


@pytest.mark.parametrize("version", ["4.45.2", "6.0.0", "7.1"])
def test_an_unknown_version_is_refused_naming_it_and_the_fix(version):
    with pytest.raises(guard.UnsupportedTransformersError, match=re.escape(version)) as refused:
        guard.check_transformers(version)
    assert guard.REQUIREMENT in str(refused.value) and "logitfuse.generate" in str(refused.value)


def test_a_changed_structure_is_refused(monkeypatch):
    """A transformers whose generation modes read differently is not read blindly."""
    monkeypatch.setattr(GenerationConfig, "get_generation_mode", lambda self, assistant_model=None: None)
    assert guard.structure_problems()
    with pytest.raises(guard.UnsupportedTransformersError, match="changed"):
        guard.check_transformers()


def test_the_processor_is_refused_on_an_unknown_transformers_before_anything_is_sent(tok, llm_model, monkeypatch):
    llm = logitfuse.HFLLM(llm_model, tok)
    monkeypatch.setattr(transformers, "__version__", "6.0.0")
    with pytest.raises(guard.UnsupportedTransformersError, match="transformers 6.0.0"):
        logitfuse.CoGenesisLogitsProcessor(llm, PUBLIC, alpha=0.5)
    assert llm.audit_log == []
