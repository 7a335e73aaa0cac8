"""Every example in a public docstring runs and prints what it says."""

import doctest
import importlib

import pytest

MODULES = [
    "logitfuse",
    "logitfuse.functional",
    "logitfuse.types",
    "logitfuse.vocab",
    "logitfuse.backends",
    "logitfuse.backends.hf",
    "logitfuse.backends.openai",
    "logitfuse.backends.strings",
    "logitfuse.heads",
    "logitfuse.train_fuser.data",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0
