"""Tiny tokenizers and models built in-process for tests: nothing is downloaded.

- :func:`byte_level_tokenizer`: a GPT-2 style byte-level BPE (``Ġ`` for spaces), like SmolLM2/Qwen.
- :func:`sentencepiece_tokenizer`: a sentencepiece-style BPE (``▁`` for spaces, ``<0xNN>`` byte
  fallback tokens), like Llama/Gemma.
- :func:`tiny_llama`: a 2-layer random LlamaForCausalLM over a given vocabulary size.

All are deterministic and cached per process.
"""

from __future__ import annotations

import functools
import json

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a short invitation for the charity event on Saturday.",
    "Dear friends, please join us for dinner and a walk in the park.",
    "My name is Martin and I sell houses on Maple Drive.",
    "Thank you for your help with the garden; the roses look lovely.",
    "We will build homes and hope together, one brick at a time.",
    "Café, naïve, résumé: words with accents are written in UTF-8.",
    "Numbers like 2024, 3.14 and 42 appear in text too!",
] * 4

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@functools.cache
def byte_level_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on :data:`CORPUS` (256 byte symbols + merges + 3 special tokens)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return _wrap(tokenizer)


@functools.cache
def sentencepiece_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A sentencepiece-style BPE: ``▁`` marks spaces, and 256 ``<0xNN>`` tokens cover any byte."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    trained.train_from_iterator(CORPUS, trainer)
    spec = json.loads(trained.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token, _ in learned:
        if token not in vocab:
            vocab[token] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(tokenizer)


def tiny_llama(vocab_size: int, seed: int = 0, *, hidden_size: int = 32, num_layers: int = 2) -> LlamaForCausalLM:
    """A random 2-layer Llama over ``vocab_size`` tokens, in eval mode, deterministic per ``seed``."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def random_cross_map(v_slm: int, v_llm: int, *, seed: int, unmapped: int):
    """A :class:`logitfuse.VocabMap` shaped like one between two tokenizers: half the SLM tokens
    have an exact LLM twin (one to one), every other LLM token hands its mass to a random SLM token
    (``llm_to_slm``, several to one), and ``unmapped`` of those LLM tokens to none."""
    from logitfuse.vocab import VocabMap

    g = torch.Generator().manual_seed(seed)
    slm_to_llm = torch.full((v_slm,), -1)
    exact = torch.randperm(v_llm, generator=g)[: v_slm // 2]
    slm_to_llm[: v_slm // 2] = exact
    llm_to_slm = torch.randint(0, v_slm, (v_llm,), generator=g)
    llm_to_slm[exact] = torch.arange(v_slm // 2)
    others = torch.isin(torch.arange(v_llm), exact, invert=True).nonzero().flatten()
    llm_to_slm[others[:unmapped]] = -1
    return VocabMap(slm_to_llm, v_llm, llm_to_slm=llm_to_slm)
