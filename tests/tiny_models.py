"""The tiny in-process models and tokenizers now live in :mod:`logitfuse.testing` (kept for old imports)."""

from logitfuse.testing.models import CORPUS, byte_level_tokenizer, sentencepiece_tokenizer, tiny_llama  # noqa: F401
