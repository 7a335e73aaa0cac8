"""The N-weight mixture head: features, weights, files, training, and its use by the Mixture rule."""

import json

import pytest
import torch

from logitfuse import reference
from logitfuse.heads import FusionHead
from logitfuse.heads.mixture import MixtureHead, load_mixture_head, mixture_features, num_mixture_features
from logitfuse.rules import Mixture
from logitfuse.rules.combine import combine
from logitfuse.train_fuser.train import TrainConfig, fit_mixture, mixture_head_nll


def random_logprobs(n, b, v, seed=0):
    return torch.log_softmax(torch.randn(n, b, v, generator=torch.Generator().manual_seed(seed)) * 3, dim=-1)


@pytest.mark.parametrize("v, k", [(1, 1), (7, 4), (1000, 3)])
def test_two_input_features_are_the_fusion_head_s(v, k):
    lp = random_logprobs(2, 5, v)
    assert mixture_features(lp, k).shape == (5, num_mixture_features(2, k))
    torch.testing.assert_close(mixture_features(lp, k), reference.fusion_features(lp[0], lp[1], k))


def test_features_of_n_inputs_read_each_input():
    lp = random_logprobs(4, 3, 37)
    features = mixture_features(lp, 2)
    assert features.shape == (3, num_mixture_features(4, 2)) and torch.isfinite(features).all()
    changed = lp.clone()
    changed[3] = random_logprobs(1, 3, 37, seed=9)[0]  # only the last input changes
    other = mixture_features(changed, 2)
    assert torch.equal(other[:, : 3 * 4], features[:, : 3 * 4])  # the first three inputs' own columns
    assert not torch.equal(other, features)


def test_weights_are_a_softmax_over_inputs_and_start_equal():
    head = MixtureHead(("slm", "llm", "small"), top_k=3, hidden=16)
    weights = head(random_logprobs(3, 6, 50))
    assert weights.shape == (6, 3)
    torch.testing.assert_close(weights, torch.full((6, 3), 1 / 3))
    with torch.no_grad():
        head.mlp[2].bias.copy_(torch.tensor([2.0, 0.0, -1.0]))
    weights = head(random_logprobs(3, 6, 50))
    torch.testing.assert_close(weights.sum(-1), torch.ones(6))
    assert (weights[:, 0] > weights[:, 1]).all() and (weights[:, 1] > weights[:, 2]).all()


@pytest.mark.parametrize("names", [("slm",), ("slm", "slm"), ("slm", "")])
def test_bad_input_names_are_refused(names):
    with pytest.raises(ValueError, match="input_names"):
        MixtureHead(names)


def test_wrong_number_of_inputs_is_refused():
    with pytest.raises(ValueError, match=r"\(N=3, B, V\)"):
        MixtureHead(("a", "b", "c"))(random_logprobs(2, 4, 9))


def test_save_and_load_round_trip(tmp_path):
    head = MixtureHead(("slm", "llm", "small"), top_k=2, hidden=8)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p))
    head.set_feature_scale(torch.randn(20, num_mixture_features(3, 2)))
    head.save_pretrained(tmp_path / "mixture")
    loaded = load_mixture_head(tmp_path / "mixture")
    lp = random_logprobs(3, 5, 40)
    assert loaded.input_names == ("slm", "llm", "small") and loaded.top_k == 2
    torch.testing.assert_close(loaded(lp), head(lp))


def test_load_refuses_another_head_and_damaged_files(tmp_path):
    FusionHead(11, 11).save_pretrained(tmp_path / "alpha")
    with pytest.raises(ValueError, match="is not a mixture head.*logitfuse train --rule"):
        load_mixture_head(tmp_path / "alpha")
    MixtureHead(("a", "b")).save_pretrained(tmp_path / "mixture")
    (tmp_path / "mixture" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="is not a mixture head"):
        load_mixture_head(tmp_path / "mixture")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_mixture_head(tmp_path / "missing")
    MixtureHead(("a", "b")).save_pretrained(tmp_path / "edited")
    config = json.loads((tmp_path / "edited" / "config.json").read_text())
    (tmp_path / "edited" / "config.json").write_text(json.dumps(dict(config, top_k=7)))
    with pytest.raises(ValueError, match="does not describe these weights"):
        load_mixture_head(tmp_path / "edited")


def test_saving_nan_weights_is_refused(tmp_path):
    head = MixtureHead(("a", "b"))
    with torch.no_grad():
        head.mlp[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        head.save_pretrained(tmp_path / "bad")


def synthetic_mixture_cache(n_examples=16, length=40, seed=0):
    """Two inputs; which one predicts the reference depends on feature 0 (no fixed weights can follow it)."""
    g = torch.Generator().manual_seed(seed)
    t = n_examples * length
    features = torch.randn(t, num_mixture_features(2, 1), generator=g)
    first_good = features[:, 0] > 0
    good, bad = torch.tensor(0.9).log(), torch.tensor(0.02).log()
    lp = torch.stack([torch.where(first_good, good, bad), torch.where(first_good, bad, good)], dim=-1)
    return features, lp, torch.arange(n_examples).repeat_interleave(length)


def test_training_beats_every_fixed_weight_when_the_best_input_varies():
    features, lp, example = synthetic_mixture_cache()
    head = MixtureHead(("a", "b"), top_k=1, hidden=8)
    fit_mixture(head, features, lp, example, TrainConfig(lr=1e-2, max_epochs=200, patience=20), progress=False)
    test_features, test_lp, _ = synthetic_mixture_cache(seed=1)
    with torch.no_grad():
        learned = mixture_head_nll(torch.log_softmax(head.logits_from_features(test_features), -1), test_lp).mean()
    fixed = min(mixture_head_nll(torch.tensor([w, 1 - w]).log().expand(len(test_lp), -1), test_lp).mean()
                for w in torch.linspace(0.01, 0.99, 99).tolist())
    assert learned < fixed - 0.3


def test_training_refuses_mismatched_columns():
    features, lp, example = synthetic_mixture_cache(n_examples=2)
    with pytest.raises(ValueError, match="one column per input"):
        fit_mixture(MixtureHead(("a", "b", "c"), top_k=1), features, lp, example)


def test_the_mixture_rule_takes_the_head_and_combines_with_its_weights():
    head = MixtureHead(("slm", "llm", "small"), top_k=2, hidden=8)
    with torch.no_grad():
        head.mlp[2].bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    rule = Mixture(("slm", "llm", "small"), head=head)
    lp = random_logprobs(3, 4, 30)
    coef = rule.coefficients(lp)
    torch.testing.assert_close(coef, head(lp))
    fused = combine(lp, coef.contiguous(), rule=rule.combine_rule)
    expected = torch.logsumexp(coef.t()[..., None].log() + lp, dim=0)  # log Σ w_i p_i
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="trained for the inputs"):
        Mixture(("slm", "llm"), head=head)
