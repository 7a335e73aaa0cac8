"""Incremental cross-tokenizer conversion: the LLM stream always spells exactly the generated text."""

from __future__ import annotations

import codecs

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitfuse.vocab.retokenize import IncrementalRetokenizer, token_bytes
from logitfuse.testing import CORPUS, byte_level_tokenizer, sentencepiece_tokenizer

PAIRS = {
    "sp->bl": (sentencepiece_tokenizer, byte_level_tokenizer),
    "bl->sp": (byte_level_tokenizer, sentencepiece_tokenizer),
    "sp->sp": (sentencepiece_tokenizer, sentencepiece_tokenizer),
    "bl->bl": (byte_level_tokenizer, byte_level_tokenizer),
}


def expected_text(slm_tok, ids):
    return codecs.getincrementaldecoder("utf-8")("replace").decode(token_bytes(slm_tok, ids))


def run(slm_tok, llm_tok, ids, chunks, lookbehind):
    retok = IncrementalRetokenizer(slm_tok, llm_tok, batch_size=1, lookbehind=lookbehind)
    stream, i = [], 0
    for size in chunks:
        rollback, new = retok.push(0, ids[i:i + size])
        i += size
        assert 0 <= rollback <= len(stream)
        del stream[len(stream) - rollback:]
        stream.extend(new)
        # the invariant holds after every push, not only at the end
        assert token_bytes(llm_tok, stream) == retok.text(0).encode("utf-8")
        assert stream == retok.llm_ids(0)
    return retok, stream


@pytest.mark.parametrize("pair", sorted(PAIRS))
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_random_token_streams(pair, data):
    slm_tok, llm_tok = (f() for f in PAIRS[pair])
    if data.draw(st.booleans(), label="real text"):
        text = data.draw(st.sampled_from(CORPUS)) + data.draw(st.text(max_size=8), label="suffix")
        ids = list(slm_tok.encode(text, add_special_tokens=False))
    else:  # arbitrary tokens: byte tokens give invalid and split UTF-8, special tokens appear mid-text
        ids = data.draw(st.lists(st.integers(0, len(slm_tok) - 1), min_size=1, max_size=25), label="ids")
    chunks = data.draw(st.lists(st.integers(1, 3), min_size=len(ids), max_size=len(ids)), label="chunks")
    lookbehind = data.draw(st.integers(0, 6), label="lookbehind")
    retok, stream = run(slm_tok, llm_tok, ids, chunks, lookbehind)
    assert retok.text(0) == expected_text(slm_tok, ids)


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_real_text_roundtrip_and_few_rollbacks(pair):
    slm_tok, llm_tok = (f() for f in PAIRS[pair])
    text = " ".join(CORPUS[:8])
    ids = list(slm_tok.encode(text, add_special_tokens=False))
    retok, stream = run(slm_tok, llm_tok, ids, [1] * len(ids), lookbehind=4)
    assert retok.text(0) == token_bytes(slm_tok, ids).decode("utf-8")
    assert llm_tok.decode(stream).strip() == text.strip()


def test_partial_utf8_is_held_back():
    sp, bl = sentencepiece_tokenizer(), byte_level_tokenizer()
    first, second = sp.convert_tokens_to_ids(["<0xC3>", "<0xA9>"])  # "é" as two byte tokens
    retok = IncrementalRetokenizer(sp, bl, batch_size=2)
    assert retok.push(0, [first]) == (0, [])  # half a character: nothing for the LLM yet
    assert retok.text(0) == ""
    rollback, new = retok.push(0, [second])
    assert rollback == 0 and token_bytes(bl, new) == "é".encode()
    assert retok.text(1) == ""  # rows are independent


def test_sentencepiece_fragment_gets_no_extra_space():
    """Metaspace(prepend_scheme="first") encodes "bar" as "▁bar": encode_exact must not."""
    sp, bl = sentencepiece_tokenizer(), byte_level_tokenizer()
    retok = IncrementalRetokenizer(bl, sp, batch_size=1)
    assert token_bytes(sp, sp.encode("bar", add_special_tokens=False)) == b" bar"
    for fragment in ["bar", "ar", " bar", "é", "\n", "x<|im_start|>y", "\ufffd"]:
        assert token_bytes(sp, retok.encode_exact(fragment)) == fragment.encode()


def test_arguments_are_checked():
    bl = byte_level_tokenizer()
    with pytest.raises(ValueError, match="batch_size"):
        IncrementalRetokenizer(bl, bl, batch_size=0)
    with pytest.raises(ValueError, match="lookbehind"):
        IncrementalRetokenizer(bl, bl, batch_size=1, lookbehind=-1)
