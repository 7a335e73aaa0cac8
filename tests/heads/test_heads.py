"""Fusion heads: sizes, features, training signal, save/load, compatibility checks."""

import json

import pytest
import torch

import logitfuse
from logitfuse import FusionHead, PaperFusionHead, TopK, VocabMap
from logitfuse.reference import num_fusion_features
from logitfuse.testing import random_cross_map


def test_fusion_head_is_small_and_starts_at_init_alpha():
    head = FusionHead(v_slm=49152, v_llm=151936, init_alpha=0.25)
    n_params = sum(p.numel() for p in head.parameters())
    assert 1000 < n_params < 5000, n_params
    alpha = head(torch.randn(2, 49152), torch.randn(2, 151936), VocabMap.identity(49152, 151936))
    torch.testing.assert_close(alpha, torch.full((2,), 0.25))


def test_paper_head_has_the_papers_shape():
    head = PaperFusionHead(v_slm=100, v_llm=100)
    assert [tuple(layer.weight.shape) for layer in head.mlp if hasattr(layer, "weight")] == [(512, 200), (16, 512), (1, 16)]
    alpha = head(torch.randn(3, 100), torch.randn(3, 100))
    assert alpha.shape == (3,) and bool(((alpha > 0) & (alpha < 1)).all())


def test_features_describe_both_distributions():
    head = FusionHead(v_slm=5, v_llm=5, top_k=2)
    slm = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.05, 0.05]]))
    llm = torch.log(torch.tensor([[0.05, 0.05, 0.1, 0.1, 0.7]]))
    features = head.features(slm, llm)
    assert features.shape == (1, num_fusion_features(2))
    entropy_s, max_s, top_s = features[0, 0], features[0, 1], features[0, 2:4]
    torch.testing.assert_close(max_s, torch.tensor(0.7).log())
    torch.testing.assert_close(top_s, torch.tensor([0.7, 0.1]).log())
    torch.testing.assert_close(entropy_s, -(slm.exp() * slm).sum())
    agree, p_llm_at_slm_argmax, p_slm_at_llm_argmax = features[0, -3:]
    assert agree == 0
    torch.testing.assert_close(p_llm_at_slm_argmax, torch.tensor(0.05).log())
    torch.testing.assert_close(p_slm_at_llm_argmax, torch.tensor(0.05).log())


def test_head_accepts_topk_llm_and_a_cross_vocab_map():
    vmap = VocabMap(torch.tensor([2, -1, 0, 1]), 3)
    head = FusionHead(v_slm=4, v_llm=3, vocab_map_hash=vmap.hash)
    alpha = head(torch.randn(2, 4), TopK(torch.tensor([[0], [2]]), torch.tensor([[-0.2], [-0.9]])), vmap)
    assert alpha.shape == (2,)
    with pytest.raises(ValueError, match="trained for v_slm=4, v_llm=3"):
        head(torch.randn(2, 5), torch.randn(2, 5))


def test_head_trains_through_fused_cross_entropy():
    """The α gradient reaches the MLP: a few steps lower the fused NLL when one model is clearly better."""
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 20, (64,), generator=gen)
    good = torch.randn(64, 20, generator=gen)
    good[torch.arange(64), targets] += 4.0  # the LLM knows the answer
    slm = torch.randn(64, 20, generator=gen)
    head = FusionHead(v_slm=20, v_llm=20)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)

    def loss():
        return logitfuse.fused_cross_entropy(slm, good, targets, alpha=head(slm, good)).mean()

    before = loss().item()
    for _ in range(30):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < before - 0.3
    assert head(slm, good).mean() < 0.3  # it learned to trust the LLM


@pytest.mark.parametrize("head_class", [FusionHead, PaperFusionHead])
def test_save_and_load_give_identical_alpha(tmp_path, head_class):
    vmap = VocabMap.identity(12, 14)
    head = head_class(12, 14, slm_name="tiny-slm", llm_name="tiny-llm", vocab_map_hash=vmap.hash)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    head.save_pretrained(tmp_path / "head")
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == ["config.json", "model.safetensors"]
    loaded = head_class.from_pretrained(tmp_path / "head", vocab_map=vmap, slm_name="tiny-slm")
    slm, llm = torch.randn(4, 12), torch.randn(4, 14)
    assert torch.equal(loaded(slm, llm, vmap), head(slm, llm, vmap))
    assert type(logitfuse.load_head(tmp_path / "head")) is head_class
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["vocab_map_hash"] == vmap.hash and config["llm_name"] == "tiny-llm"


def test_loading_into_another_setting_says_what_differs(tmp_path):
    FusionHead(12, 14, slm_name="a", llm_name="b", mode="linear").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"v_slm: head has 12, setting has 13.*v_llm: head has 14, setting has 15"):
        FusionHead.from_pretrained(tmp_path, v_slm=13, v_llm=15)
    with pytest.raises(ValueError, match="vocab_map_hash"):
        head = FusionHead(12, 14, vocab_map_hash=VocabMap.identity(12, 14).hash)
        head.save_pretrained(tmp_path / "hashed")
        FusionHead.from_pretrained(tmp_path / "hashed", vocab_map=VocabMap(torch.arange(12).flip(0), 14))
    with pytest.raises(ValueError, match="llm_name: head has 'b', setting has 'c'"):
        FusionHead.from_pretrained(tmp_path, llm_name="c")
    with pytest.raises(ValueError, match="mode: head has 'linear', setting has 'geometric'"):
        FusionHead.from_pretrained(tmp_path, mode="geometric")
    with pytest.raises(ValueError, match="holds a FusionHead, not a PaperFusionHead"):
        PaperFusionHead.from_pretrained(tmp_path)


def test_loading_damaged_or_missing_files_fails_clearly(tmp_path):
    FusionHead(6, 6).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        FusionHead.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        FusionHead.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        FusionHead.from_pretrained(tmp_path / "nothing-here")


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    FusionHead(6, 6, hidden=8).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden"] = 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not fit its config.json"):
        FusionHead.from_pretrained(tmp_path)


def test_a_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    import logitfuse.heads as heads

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(heads, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        FusionHead(6, 6).save_pretrained(tmp_path / "head")
    assert list((tmp_path / "head").iterdir()) == []


def test_constructor_rejects_bad_settings():
    with pytest.raises(ValueError, match="mode='sum'"):
        FusionHead(5, 5, mode="sum")
    with pytest.raises(ValueError, match="init_alpha must lie in"):
        FusionHead(5, 5, init_alpha=1.0)
    head = FusionHead(5, 5, slm_hidden_size=8)
    with pytest.raises(ValueError, match="pass slm_hidden"):
        head(torch.randn(1, 5), torch.randn(1, 5))
    assert head(torch.randn(1, 5), torch.randn(1, 5), slm_hidden=torch.randn(1, 8)).shape == (1,)


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os

    FusionHead(4, 4).save_pretrained(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def _cross_map(v_slm: int, v_llm: int) -> VocabMap:
    return random_cross_map(v_slm, v_llm, seed=1, unmapped=3)


@pytest.mark.parametrize("head_class", [FusionHead, PaperFusionHead])
@pytest.mark.parametrize("mode", ["linear", "geometric", "logit"])
@pytest.mark.parametrize("llm_kind", ["dense", "topk"])
@pytest.mark.parametrize("vmap_kind", ["identity", "cross"])
def test_fuse_with_head_equals_head_then_fuse(head_class, mode, llm_kind, vmap_kind):
    torch.manual_seed(0)
    v_slm, v_llm = (37, 37) if vmap_kind == "identity" else (37, 53)
    vmap = VocabMap.identity(v_slm, v_llm) if vmap_kind == "identity" else _cross_map(v_slm, v_llm)
    head = head_class(v_slm, v_llm, mode=mode, tail="slm")
    slm, dense = torch.randn(3, v_slm) * 3, torch.randn(3, v_llm) * 3
    top = dense.log_softmax(-1).topk(5, dim=-1)
    llm = dense if llm_kind == "dense" else TopK(top.indices, top.values)
    with torch.no_grad():
        alpha, fused = logitfuse.fuse_with_head(slm, llm, head, vocab_map=vmap, mode=mode, tail="slm")
        expected_alpha = head(slm, llm, vmap)
        expected = logitfuse.fuse(slm, llm, alpha=expected_alpha, vocab_map=vmap, mode=mode, tail="slm")
    assert torch.equal(alpha, expected_alpha) and torch.equal(fused, expected)
    # where the head reads other distributions than the fusion mixes, both are computed as asked
    with torch.no_grad():
        _, hot = logitfuse.fuse_with_head(slm, llm, head, vocab_map=vmap, mode=mode, tail="uniform", slm_temperature=0.7)
        assert torch.equal(hot, logitfuse.fuse(slm, llm, alpha=expected_alpha, vocab_map=vmap, mode=mode, tail="uniform",
                                               slm_temperature=0.7))


def test_fuse_with_head_checks_its_inputs():
    head = FusionHead(10, 12)
    with pytest.raises(ValueError, match="v_slm=10, v_llm=12"):
        logitfuse.fuse_with_head(torch.randn(2, 10), torch.randn(2, 10), head)
    with pytest.raises(ValueError, match="NaN"):
        logitfuse.fuse_with_head(torch.full((2, 10), float("nan")), torch.randn(2, 12), head,
                                 vocab_map=VocabMap(torch.arange(10), 12))
