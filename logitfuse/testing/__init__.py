"""Test helpers that ship with the library: tiny models and tokenizers built in-process (nothing is
downloaded), so tests, docstring examples and users' own tests can run fused decoding offline.

>>> from logitfuse.testing import byte_level_tokenizer, tiny_llama
>>> tok = byte_level_tokenizer()
>>> tiny_llama(len(tok)).config.num_hidden_layers
2
"""

import importlib

__all__ = ["CORPUS", "byte_level_tokenizer", "random_cross_map", "sentencepiece_tokenizer", "tiny_llama"]


def __getattr__(name: str):
    # imported on first use: importing a transformers model class imports Triton, and the pytest
    # plugin logitfuse.testing.doctests must load before tests/conftest.py picks Triton's interpreter
    if name in __all__:
        return getattr(importlib.import_module("logitfuse.testing.models"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
