"""Test helpers that ship with the library: tiny models and tokenizers built in-process (nothing is
downloaded), so tests, docstring examples and users' own tests can run fused decoding offline.

>>> from logitfuse.testing import byte_level_tokenizer, tiny_llama
>>> tok = byte_level_tokenizer()
>>> tiny_llama(len(tok)).config.num_hidden_layers
2
"""

from logitfuse.testing.models import CORPUS, byte_level_tokenizer, sentencepiece_tokenizer, tiny_llama

__all__ = ["CORPUS", "byte_level_tokenizer", "sentencepiece_tokenizer", "tiny_llama"]
