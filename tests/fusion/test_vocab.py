"""VocabMap: identity with padding, maps built from two different tiny tokenizers, persistence."""

import pytest
import torch
from logitfuse.testing import byte_level_tokenizer, sentencepiece_tokenizer

import logitfuse
from logitfuse import VocabMap


def test_identity_handles_padded_vocabularies():
    wider_slm = VocabMap.identity(6, 4)
    assert wider_slm.slm_to_llm.tolist() == [0, 1, 2, 3, -1, -1]
    assert wider_slm.coverage == pytest.approx(4 / 6)
    wider_llm = VocabMap.identity(4, 6)
    assert wider_llm.slm_to_llm.tolist() == [0, 1, 2, 3] and wider_llm.coverage == 1.0
    shared = VocabMap.identity(6, 6, n_shared=5)
    assert shared.slm_to_llm.tolist() == [0, 1, 2, 3, 4, -1]
    with pytest.raises(ValueError, match="n_shared=7 must lie in"):
        VocabMap.identity(6, 6, n_shared=7)


def test_constructor_rejects_bad_maps():
    with pytest.raises(ValueError, match=r"outside \[-1, v_llm=3\)"):
        VocabMap(torch.tensor([0, 3]), 3)
    with pytest.raises(TypeError, match="integer ids"):
        VocabMap(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(TypeError, match="1-D integer tensor"):
        VocabMap(torch.zeros(2, 2, dtype=torch.long), 3)


def test_padded_identity_fuses_with_mismatched_widths():
    slm, llm = torch.randn(2, 6), torch.randn(2, 4)
    fused = logitfuse.fuse(slm, llm, alpha=0.0, tail="uniform", vocab_map=VocabMap.identity(6, 4))
    # the two SLM padding ids are unknown to the LLM and share its (floored) tail mass
    torch.testing.assert_close(fused[:, :4].exp().sum(-1), torch.ones(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("direction", ["bpe_to_sp", "sp_to_bpe"])
def test_maps_between_byte_level_and_sentencepiece_tokenizers(direction):
    bpe, sp = byte_level_tokenizer(), sentencepiece_tokenizer()
    slm_tok, llm_tok = (bpe, sp) if direction == "bpe_to_sp" else (sp, bpe)
    vmap = VocabMap.from_tokenizers(slm_tok, llm_tok)
    assert vmap.v_slm == len(slm_tok) and vmap.v_llm == len(llm_tok)
    slm_ids, llm_ids = slm_tok.get_vocab(), llm_tok.get_vocab()
    space = {"bpe_to_sp": ("Ġ", "▁"), "sp_to_bpe": ("▁", "Ġ")}[direction]
    pairs = [
        ("ll", "ll"),                                    # a plain shared subword
        (space[0], space[1]),                            # the space marker of each scheme
        ("<|im_end|>", "<|im_end|>"),                    # special tokens match by exact string
    ]
    for slm_token, llm_token in pairs:
        assert vmap.slm_to_llm[slm_ids[slm_token]] == llm_ids[llm_token], (slm_token, llm_token)
    # a word with a leading space: "Ġthe" in byte-level BPE is "▁the" in sentencepiece, when both learned it
    shared_words = [w for w in ("the", "for", "and", "in") if f"Ġ{w}" in bpe.get_vocab() and f"▁{w}" in sp.get_vocab()]
    assert shared_words, "the tiny tokenizers should share some words"
    for word in shared_words:
        slm_token = ("Ġ" if direction == "bpe_to_sp" else "▁") + word
        llm_token = ("▁" if direction == "bpe_to_sp" else "Ġ") + word
        assert vmap.slm_to_llm[slm_ids[slm_token]] == llm_ids[llm_token]
    # é is two UTF-8 bytes: byte-level "Ã©" and sentencepiece "é" are the same text
    if "Ã©" in bpe.get_vocab() and "é" in sp.get_vocab():
        a, b = ("Ã©", "é") if direction == "bpe_to_sp" else ("é", "Ã©")
        assert vmap.slm_to_llm[slm_ids[a]] == llm_ids[b]
    assert 0.5 < vmap.coverage <= 1.0


def test_byte_tokens_map_to_byte_level_symbols():
    bpe, sp = byte_level_tokenizer(), sentencepiece_tokenizer()
    vmap = VocabMap.from_tokenizers(sp, bpe)
    sp_ids, bpe_ids = sp.get_vocab(), bpe.get_vocab()
    assert vmap.slm_to_llm[sp_ids["<0x0A>"]] == bpe_ids["Ċ"]  # newline
    assert vmap.slm_to_llm[sp_ids["<0x41>"]] == bpe_ids["A"]
    # "▁" and "<0x20>" are both a space: the real token claims it, the byte token stays unmapped
    assert vmap.slm_to_llm[sp_ids["▁"]] == bpe_ids["Ġ"]
    assert vmap.slm_to_llm[sp_ids["<0x20>"]] == -1
    mapped = vmap.slm_to_llm[vmap.slm_to_llm >= 0]
    assert mapped.unique().numel() == mapped.numel(), "the map must be one-to-one"


def test_same_tokenizer_gives_the_identity():
    bpe = byte_level_tokenizer()
    vmap = VocabMap.from_tokenizers(bpe, bpe)
    assert torch.equal(vmap.slm_to_llm, torch.arange(len(bpe)))
    padded = VocabMap.from_tokenizers(bpe, bpe, v_slm=len(bpe) + 3, v_llm=len(bpe) + 8)
    assert padded.v_slm == len(bpe) + 3 and padded.v_llm == len(bpe) + 8
    assert padded.slm_to_llm[-3:].tolist() == [-1, -1, -1]


def test_from_tokenizers_rejects_slow_tokenizers():
    with pytest.raises(TypeError, match="fast"):
        VocabMap.from_tokenizers(object(), byte_level_tokenizer())


def test_save_load_roundtrip_and_hash(tmp_path):
    vmap = VocabMap.from_tokenizers(byte_level_tokenizer(), sentencepiece_tokenizer())
    vmap.save(tmp_path / "map.safetensors")
    loaded = VocabMap.load(tmp_path / "map.safetensors")
    assert torch.equal(loaded.slm_to_llm, vmap.slm_to_llm) and loaded.v_llm == vmap.v_llm
    assert loaded.hash == vmap.hash and loaded == vmap
    assert len(vmap.hash) == 64
    assert VocabMap.identity(5, 5).hash == VocabMap.identity(5, 5).hash  # stable
    assert VocabMap.identity(5, 5).hash != VocabMap.identity(5, 6).hash
    assert [p.name for p in tmp_path.iterdir()] == ["map.safetensors"]  # no temp file left behind


def test_load_rejects_damaged_files(tmp_path):
    path = tmp_path / "map.safetensors"
    VocabMap.identity(50, 50).save(path)
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(ValueError, match="not a readable VocabMap file"):
        VocabMap.load(path)
    data[-8:] = b"\x07" * 8  # payload changed, header intact
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        VocabMap.load(path)
    with pytest.raises(FileNotFoundError):
        VocabMap.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("direction", ["bpe_to_sp", "sp_to_bpe"])
def test_llm_tokens_hand_their_mass_to_the_longest_slm_prefix(direction):
    from logitfuse.vocab import normalized_vocab

    bpe, sp = byte_level_tokenizer(), sentencepiece_tokenizer()
    slm_tok, llm_tok = (bpe, sp) if direction == "bpe_to_sp" else (sp, bpe)
    vmap = VocabMap.from_tokenizers(slm_tok, llm_tok)
    slm_text, llm_text = normalized_vocab(slm_tok), normalized_vocab(llm_tok)
    exact = vmap.slm_to_llm >= 0
    assert torch.equal(vmap.llm_to_slm[vmap.slm_to_llm[exact]], torch.arange(vmap.v_slm)[exact])
    handed = 0
    for j, i in enumerate(vmap.llm_to_slm.tolist()):
        kind, text = llm_text[j]
        if i < 0:
            assert kind == "added", (j, text)
            continue
        if kind != "added" and vmap.slm_to_llm[i] != j:
            handed += 1
            prefix = slm_text[i][1]
            assert text.startswith(prefix)  # equal when the LLM has two tokens for one text (▁ and <0x20>)
            longer = [t for k, t in slm_text.values() if k != "added" and text.startswith(t) and len(t) > len(prefix)]
            assert not longer, (text, prefix, longer)
    assert handed > 0


def test_maps_with_llm_to_slm_round_trip_and_hash(tmp_path):
    vmap = VocabMap.from_tokenizers(byte_level_tokenizer(), sentencepiece_tokenizer())
    vmap.save(tmp_path / "m.safetensors")
    loaded = VocabMap.load(tmp_path / "m.safetensors")
    assert torch.equal(loaded.llm_to_slm, vmap.llm_to_slm) and loaded.hash == vmap.hash
    assert VocabMap(vmap.slm_to_llm, vmap.v_llm).hash != vmap.hash
    with pytest.raises(ValueError, match="disagrees with slm_to_llm"):
        VocabMap(torch.tensor([1, 0]), 2, llm_to_slm=torch.tensor([0, 1]))
