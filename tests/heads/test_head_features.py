"""Fusion heads with SLM-side features (hidden state, last token, position): config, old heads, bad
inputs, and the decoding paths that capture the hidden state without a second forward."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import logitfuse
from logitfuse.heads import SHA256_KEY, FusionHead
from logitfuse.heads.slm_side import NO_TOKEN, HiddenStateCapture, SLMSideEncoder

ALL_GROUPS = ["hidden", "token", "position"]


def _randomized(head: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The head with random weights everywhere (a fresh head's last layer is zero: α constant)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return head.eval()


def _mlp_by_hand(weights: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    gelu = torch.nn.functional.gelu
    x = gelu(x @ weights[f"{prefix}0.weight"].T + weights[f"{prefix}0.bias"])
    x = gelu(x @ weights[f"{prefix}2.weight"].T + weights[f"{prefix}2.bias"])
    return (x @ weights[f"{prefix}4.weight"].T + weights[f"{prefix}4.bias"]).squeeze(-1)


def _side(batch: int, d: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return dict(slm_hidden=torch.randn(batch, d, generator=generator) * 3,
                last_tokens=torch.randint(-1, 40, (batch,), generator=generator),
                positions=torch.randint(0, 300, (batch,), generator=generator))


@pytest.mark.parametrize("name", ["dense", "top20-slm"])
def test_old_heads_load_and_give_the_alpha_of_their_weights(name):
    folder = Path(__file__).parents[1] / "data" / "heads-v1" / name  # saved before the feature groups existed
    head = logitfuse.load_head(folder)
    config = json.loads((folder / "config.json").read_text())
    assert "slm_features" not in config and SHA256_KEY in config  # saved before the groups existed
    assert head.slm_features == [] and head.gate is None and not head.reads_slm_side
    features = torch.randn(64, 15, generator=torch.Generator().manual_seed(3)) * 4
    expected = torch.sigmoid(_mlp_by_hand(load_file(folder / "model.safetensors"), "mlp.", features / 10.0))
    with torch.no_grad():
        assert torch.allclose(head.alpha_from_features(features), expected, atol=1e-6, rtol=0)


def test_a_head_with_slm_features_saves_its_groups_and_loads_the_same(tmp_path):
    head = _randomized(FusionHead(9, 9, slm_hidden_size=12, slm_features=ALL_GROUPS, gate_hidden=8))
    slm, llm, side = torch.randn(5, 9), torch.randn(5, 9), _side(5, 12)
    head.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["slm_features"], config["slm_hidden_size"], config["hidden_projection"], config["gate_hidden"]) == (
        ALL_GROUPS, 12, 16, 8)
    loaded = logitfuse.load_head(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(slm, llm, **side), head(slm, llm, **side))
        assert torch.equal(loaded.call_gain(slm, **side), head.call_gain(slm, **side))
        # every group moves α: change one input at a time
        alpha = head(slm, llm, **side)
        for key, other in (("slm_hidden", side["slm_hidden"] + 1), ("last_tokens", side["last_tokens"] + 7),
                           ("positions", side["positions"] + 50)):
            assert not torch.allclose(head(slm, llm, **{**side, key: other}), alpha)


def test_a_head_saved_before_the_groups_existed_still_loads(tmp_path):
    """A head with a hidden-state projection from before `slm_features`: no such keys in its config,
    its projection's weights at the top level (`project_hidden.*`), 16 wide."""
    head = _randomized(FusionHead(7, 7, slm_hidden_size=6))
    head.save_pretrained(tmp_path)
    tensors = {name.replace("slm_encoder.", ""): t for name, t in load_file(tmp_path / "model.safetensors").items()}
    save_file(tensors, tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("slm_features", "hidden_projection", "token_buckets", "gate_hidden", SHA256_KEY):
        del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = logitfuse.load_head(tmp_path)
    features, hidden = torch.randn(4, 15), torch.randn(4, 6)
    projected = hidden @ tensors["project_hidden.weight"].T + tensors["project_hidden.bias"]
    expected = torch.sigmoid(_mlp_by_hand(tensors, "mlp.", torch.cat([features / 10.0, projected], dim=-1)))
    with torch.no_grad():
        assert torch.allclose(loaded.alpha_from_features(features, hidden), expected, atol=1e-6, rtol=0)


def test_heads_stay_small_at_real_sizes():
    for v, d in ((49152, 576), (151936, 1536)):
        head = FusionHead(v, v, slm_hidden_size=d, slm_features=ALL_GROUPS, hidden_projection=32, gate_hidden=32)
        assert sum(p.numel() for p in head.parameters()) < 250_000


def test_bad_slm_side_inputs_name_the_argument_and_the_fix():
    head = FusionHead(9, 9, slm_hidden_size=12, slm_features=ALL_GROUPS)
    slm, llm, side = torch.randn(2, 9), torch.randn(2, 9), _side(2, 12)
    with pytest.raises(ValueError, match=r"reads the SLM's last hidden state.*pass slm_hidden= \(2, 12\).*slm=model"):
        head(slm, llm, **{**side, "slm_hidden": None})
    with pytest.raises(ValueError, match=r"slm_hidden has shape \(2, 8\), expected \(2, 12\).*hidden size 12 \(slm_hidden_size\)"):
        head(slm, llm, **{**side, "slm_hidden": torch.randn(2, 8)})
    with pytest.raises(ValueError, match=r"reads positions.*position in the response"):
        head(slm, llm, **{**side, "positions": None})
    with pytest.raises(ValueError, match=r"last_tokens must be an integer tensor of shape \(2,\)"):
        head(slm, llm, **{**side, "last_tokens": torch.zeros(3, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"\['words'\] not among the SLM-side feature groups"):
        FusionHead(9, 9, slm_features=["token", "words"])
    with pytest.raises(ValueError, match=r"the 'hidden' group needs the SLM's hidden size"):
        FusionHead(9, 9, slm_features=["hidden"])
    with pytest.raises(ValueError, match="no call gate.*--gate-hidden"):
        head.call_gain(slm, **side)
    with pytest.raises(ValueError, match="reads SLM-side features"):
        logitfuse.fuse_with_head(slm, llm, head)


def test_the_first_position_has_its_own_token_row():
    encoder = SLMSideEncoder(["token"], token_buckets=64)
    buckets = encoder.bucket(torch.tensor([NO_TOKEN, 0, 1, 2, 10**6]))
    assert buckets[0] == 0 and bool((buckets[1:] > 0).all()) and bool((buckets < 64).all())


def test_hidden_state_capture_reads_the_output_layers_input(slm, tok):
    ids = tok(["private text"], return_tensors="pt")["input_ids"]
    with torch.no_grad(), HiddenStateCapture(slm, keep_all=True) as capture:
        logits = slm(input_ids=ids).logits
        final_norm_output = slm.model(input_ids=ids).last_hidden_state
    assert capture.forwards == 1  # the bare decoder's forward does not reach the output layer
    assert torch.equal(capture.latest, final_norm_output)
    assert torch.equal(slm.lm_head(capture.latest), logits)


# ---------------------------------------------------------------- decoding: the hidden state of each step's own forward
PUBLIC, PRIVATE = "Write an invitation:", "Martin sells houses on Maple Drive. Write an invitation:"


def _hidden_head(tok, slm, **kwargs):
    return _randomized(FusionHead(len(tok), len(tok), slm_hidden_size=slm.config.hidden_size, slm_features=ALL_GROUPS,
                                  **kwargs), seed=1)


def test_the_processor_gives_the_alpha_of_the_head_on_one_explicit_forward(tok, slm, llm_model):
    head = _hidden_head(tok, slm)
    public_ids = tok(PUBLIC)["input_ids"]
    private = tok([PRIVATE], return_tensors="pt")
    proc = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), public_ids, head=head, slm=slm)
    with HiddenStateCapture(slm) as counter:
        out = slm.generate(**private, logits_processor=[proc], max_new_tokens=6, do_sample=False, pad_token_id=0)
    proc.close()
    online = torch.stack([a[0] for a in proc.alpha_history])
    assert counter.forwards == len(online) == 6  # one SLM forward per step: the processor ran none of its own
    prompt_len = private["input_ids"].shape[1]
    generated = out[0, prompt_len:].tolist()
    # offline: one forward of each model over the whole text; the hidden states from the same hook, all positions
    with torch.no_grad(), HiddenStateCapture(slm, keep_all=True) as capture:
        slm_logits = slm(input_ids=out[:, :-1]).logits[0, prompt_len - 1:]
        llm_logits = llm_model(input_ids=torch.tensor([public_ids + generated[:-1]])).logits[0, len(public_ids) - 1:]
        offline = head(slm_logits, llm_logits, slm_hidden=capture.latest[0, prompt_len - 1:],
                       last_tokens=torch.tensor([NO_TOKEN] + generated[:-1]), positions=torch.arange(len(generated)))
    assert torch.allclose(online, offline, atol=1e-5)
    # the step before's hidden state would give other α: the rows are the right ones
    with torch.no_grad():
        shifted = head(slm_logits, llm_logits, slm_hidden=capture.latest[0, prompt_len - 2:-1],
                       last_tokens=torch.tensor([NO_TOKEN] + generated[:-1]), positions=torch.arange(len(generated)))
    assert not torch.allclose(online, shifted, atol=1e-3)


def test_a_hidden_state_head_without_the_hidden_state_is_refused_before_anything_is_sent(tok, slm, llm_model):
    head = _hidden_head(tok, slm)
    llm = logitfuse.HFLLM(llm_model, tok)
    with pytest.raises(ValueError, match=r"pass slm=<the transformers model that generates>"):
        logitfuse.CoGenesisLogitsProcessor(llm, PUBLIC, head=head)
    other = FusionHead(len(tok), len(tok), slm_hidden_size=slm.config.hidden_size + 4, slm_features=["hidden"])
    with pytest.raises(ValueError, match=rf"slm has hidden size {slm.config.hidden_size} but the head was trained on an "
                                         rf"SLM with slm_hidden_size={slm.config.hidden_size + 4}"):
        logitfuse.CoGenesisLogitsProcessor(llm, PUBLIC, head=other, slm=slm)
    session = logitfuse.FusionSession(llm, head=head)
    session.start([PUBLIC], v_slm=len(tok))
    with pytest.raises(ValueError, match=r"pass slm_hidden= \(batch_size, \d+\) to FusionSession.step"):
        session.step([[]], torch.randn(1, len(tok)))
    assert session.stats.llm_calls == 0
    from logitfuse.heads.protocol import check_slm_side_inputs  # the one refusal every engine calls

    with pytest.raises(ValueError, match="llama.cpp SLM does not expose"):
        check_slm_side_inputs(head, hidden=False, side=True, where="the llama.cpp SLM", fix="use another head")
    check_slm_side_inputs(head, hidden=True, side=True, where="the transformers SLM", fix="")  # can give it
    with pytest.raises(ValueError, match=r"speculate > 0 cannot give the head its SLM-side features"):
        check_slm_side_inputs(head, hidden=True, side=False, where="speculate > 0", fix="use speculate=0")


# ---------------------------------------------------------------- training on cached SLM-side inputs
def side_signal_cache(n_examples=10, length=24, vocab=20, hidden_size=6, seed=0):
    """Positions where the LLM is right in the first half of each response and the SLM in the second;
    whichever is wrong is just as sharp on another token, so the distributions do not tell which one
    to trust: only the SLM-side inputs do (the position; the last token, 1 or 2; the hidden state's
    first coordinate, +2 or -2)."""
    from logitfuse.train_fuser.scoring import Pair, Scored, cache_example, default_variants

    gen = torch.Generator().manual_seed(seed)
    pair, variants = Pair(None, None, None, None, logitfuse.VocabMap.identity(vocab, vocab)), default_variants(5)
    examples = []
    for _ in range(n_examples):
        targets = torch.randint(0, vocab, (length,), generator=gen)
        wrong = (targets + torch.randint(1, vocab, (length,), generator=gen)) % vocab
        llm_right = torch.arange(length) < length // 2
        slm, llm = torch.randn(length, vocab, generator=gen), torch.randn(length, vocab, generator=gen)
        rows = torch.arange(length)
        llm[rows, torch.where(llm_right, targets, wrong)] += 6.0
        slm[rows, torch.where(llm_right, wrong, targets)] += 6.0
        hidden = torch.randn(length, hidden_size, generator=gen)
        hidden[:, 0] = torch.where(llm_right, 2.0, -2.0)
        scored = Scored(targets, slm, llm, None, length, slm_hidden=hidden,
                        last_tokens=torch.where(llm_right, 1, 2), positions=torch.arange(length))
        examples.append(cache_example(pair, scored, variants, feature_k=4, slm_hidden=True))
    cache = {key: torch.cat([e[key] for e in examples]) for key in examples[0]}
    cache["example"] = torch.cat([torch.full((length,), i) for i in range(n_examples)])
    return cache, variants


def fitted_head(cache, slm_features, gate_hidden=0, hidden_size=6):
    from logitfuse.train_fuser.train import TrainConfig, fit_cached, slm_side_inputs

    vocab = 20
    head = FusionHead(vocab, vocab, slm_features=slm_features, slm_hidden_size=hidden_size if "hidden" in slm_features else 0,
                      gate_hidden=gate_hidden)
    config = TrainConfig(lr=1e-2, max_epochs=80, patience=80, batch_size=64)
    fit_cached(head, cache["dense.features"], cache["dense.terms"], cache["example"], config, progress=False,
               slm_side=slm_side_inputs(cache, head))
    return head, config


@pytest.mark.parametrize("group", ["hidden", "token", "position"])
def test_a_head_learns_what_only_its_slm_side_group_tells(group):
    from logitfuse.train_fuser.evaluate import head_alpha
    from logitfuse.train_fuser.scoring import linear_nll

    cache, variants = side_signal_cache()
    terms = cache["dense.terms"]
    best_fixed = min(linear_nll(torch.full((len(terms),), a), terms).mean().item() for a in (0.3, 0.4, 0.5, 0.6, 0.7))
    plain, _ = fitted_head(cache, [])
    with_group, _ = fitted_head(cache, [group])
    nll = {name: linear_nll(head_alpha(cache, variants[0], head), terms).mean().item()
           for name, head in (("plain", plain), ("group", with_group))}
    assert nll["plain"] > best_fixed - 0.1  # the distributions alone do not say whom to trust
    assert nll["group"] < best_fixed - 0.5, (nll, best_fixed)


def test_scoring_keeps_the_hidden_state_of_the_logits_forward(tok, slm, llm_model):
    from logitfuse.train_fuser.data import Example
    from logitfuse.train_fuser.scoring import Pair, cache_example, default_variants, score_example

    pair = Pair.build(slm, tok, llm_model, tok, "slm", "llm")
    example = Example(tid="1_1_1", instruction="Write a note: about the roses", response="The roses are red.",
                      profile=(), additional_profile="")
    scored = score_example(pair, example)
    assert torch.allclose(slm.lm_head(scored.slm_hidden), scored.slm_logits, atol=1e-5)
    n = len(scored.targets)
    assert scored.last_tokens.tolist() == [NO_TOKEN] + scored.targets[:-1].tolist()
    assert scored.positions.tolist() == list(range(n))
    cached = cache_example(pair, scored, default_variants(5), feature_k=4, slm_hidden=True)
    assert cached["slm_hidden"].dtype == torch.float16 and cached["slm_hidden"].shape == (n, slm.config.hidden_size)
    assert "slm_hidden" not in cache_example(pair, scored, default_variants(5), feature_k=4)
