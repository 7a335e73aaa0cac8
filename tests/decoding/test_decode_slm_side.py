"""logitfuse.generate with fusion heads that read SLM-side features (hidden state, last token,
position): the processor's tokens and α, the hook removed after, and clear refusals where the loop
cannot give a head its inputs (speculation, the llama.cpp engine)."""

from __future__ import annotations

import pytest
import torch

import logitfuse
from logitfuse.heads import FusionHead
from logitfuse.decoding.llama_cpp import LlamaCppSLM, llama_cpp_python_missing
from logitfuse.heads.slm_side import HiddenStateCapture
from logitfuse.testing.generation import PRIVATE, PUBLIC, chat_ids, generate, left_pad, private_prompt_ids

PUBLICS = [PUBLIC, "Dear friends,", "Thank you for your help with the garden"]
PRIVATES = [PRIVATE, "I am Ana; I love roses.", "Secret: 1234"]
N_NEW = 10


def side_head(tok, slm, groups, *, gate_hidden=0, seed=1):
    """A head reading ``groups`` whose every weight is random (a fresh head's last layer is zero)."""
    head = FusionHead(len(tok), len(tok), slm_features=groups, gate_hidden=gate_hidden,
                      slm_hidden_size=slm.config.hidden_size if "hidden" in groups else 0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return head.eval()


def batch_inputs(tok):
    return left_pad([private_prompt_ids(tok, p, q) for p, q in zip(PRIVATES, PUBLICS)])


@pytest.mark.parametrize("schedule", ["always", "head_gate(0)"])
def test_a_hidden_state_head_gives_the_processors_tokens_and_alpha(tok, slm, llm_model, schedule):
    """Three left-padded rows of different lengths; with head_gate the gate reads the hidden state too."""
    head = side_head(tok, slm, ["hidden", "token", "position"], gate_hidden=8)
    inputs, publics = batch_inputs(tok), [chat_ids(tok, p) for p in PUBLICS]
    proc = logitfuse.CoGenesisLogitsProcessor(logitfuse.HFLLM(llm_model, tok), publics, head=head, slm=slm,
                                              schedule=schedule)
    expected = generate(slm, inputs, N_NEW, proc).tolist()
    proc.close()
    out = logitfuse.generate(slm, logitfuse.HFLLM(llm_model, tok), inputs["input_ids"], publics, head=head,
                             attention_mask=inputs["attention_mask"], max_new_tokens=N_NEW, schedule=schedule)
    assert out.sequences == expected
    assert out.alpha == [[float(step[r]) for step in proc.alpha_history] for r in range(3)]
    assert dict(out.stats) == dict(proc.stats)
    if schedule != "always":  # the gate skipped some calls and made others: both paths were exercised
        assert 0 < out.stats.saved_calls < 3 * N_NEW
    assert not slm.get_output_embeddings()._forward_pre_hooks  # the hook is gone after the call


def offline_alpha(head, slm, llm_model, private, public, generated, shift=0):
    """The head's α over one explicit forward of each model on the whole text (``shift=1``: the hidden
    state one position earlier)."""
    with torch.no_grad():
        with HiddenStateCapture(slm, keep_all=True) as capture:
            slm_logits = slm(input_ids=torch.tensor([private + generated[:-1]])).logits[0, len(private) - 1:]
        hidden = capture.latest[0, len(private) - 1 - shift:capture.latest.shape[1] - shift]
        llm_logits = llm_model(input_ids=torch.tensor([public + generated[:-1]])).logits[0, len(public) - 1:]
        return head(slm_logits, llm_logits, slm_hidden=hidden)


@pytest.mark.parametrize("same_model", [False, True])
def test_the_hidden_state_is_each_steps_own(tok, slm, llm_model, same_model):
    """α from the loop equals the head on one explicit forward over the whole text, and not the head on
    the hidden state one position earlier (the test can tell a stale hidden state). With one model on
    both sides, the LLM's forwards pass the hook too: the loop reads the SLM's before asking the LLM."""
    llm_model = slm if same_model else llm_model
    head = side_head(tok, slm, ["hidden"])
    private, public = private_prompt_ids(tok, PRIVATE, PUBLIC), chat_ids(tok, PUBLIC)
    out = logitfuse.generate(slm, logitfuse.HFLLM(llm_model, tok), [private], public, head=head, max_new_tokens=N_NEW)
    online = torch.tensor(out.alpha[0])
    assert torch.allclose(online, offline_alpha(head, slm, llm_model, private, public, out.sequences[0]), atol=1e-5)
    assert not torch.allclose(online, offline_alpha(head, slm, llm_model, private, public, out.sequences[0], 1),
                              atol=1e-3)


@pytest.mark.parametrize("groups", [["hidden"], ["token"], ["position"]])
def test_speculation_refuses_any_slm_side_head_before_anything_is_sent(tok, slm, llm_model, groups):
    llm = logitfuse.HFLLM(llm_model, tok)
    with pytest.raises(ValueError, match=r"speculate > 0 cannot give the head its SLM-side features .*use speculate=0"):
        logitfuse.generate(slm, llm, [private_prompt_ids(tok, PRIVATE, PUBLIC)], PUBLIC, max_new_tokens=4,
                           head=side_head(tok, slm, groups), speculate=2)
    assert llm.audit_log == []
    assert not slm.get_output_embeddings()._forward_pre_hooks


def test_a_hidden_state_head_for_another_slm_is_refused(tok, slm, llm_model):
    head = FusionHead(len(tok), len(tok), slm_features=["hidden"], slm_hidden_size=slm.config.hidden_size + 4)
    llm = logitfuse.HFLLM(llm_model, tok)
    with pytest.raises(ValueError, match=rf"slm has hidden size {slm.config.hidden_size} but the head was trained on an "
                                         rf"SLM with slm_hidden_size={slm.config.hidden_size + 4}"):
        logitfuse.generate(slm, llm, [private_prompt_ids(tok, PRIVATE, PUBLIC)], PUBLIC, max_new_tokens=4, head=head)
    assert llm.audit_log == []
    assert not slm.get_output_embeddings()._forward_pre_hooks


@pytest.mark.engine
def test_the_llama_cpp_engine_refuses_a_hidden_state_head_and_takes_a_token_position_one(tok, slm, llm_model, tmp_path):
    missing = llama_cpp_python_missing()
    if missing:
        pytest.skip(missing)
    from logitfuse.testing.gguf import write_tiny_gguf

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tok, slm)
    engine = LlamaCppSLM(path, n_ctx=256, n_threads=1, tokenizer=tok)
    try:
        private, public = private_prompt_ids(tok, PRIVATE, PUBLIC), chat_ids(tok, PUBLIC)
        llm = logitfuse.HFLLM(llm_model, tok)
        with pytest.raises(ValueError, match="llama.cpp SLM does not expose"):
            logitfuse.generate(engine, llm, [private], public, max_new_tokens=4,
                               head=side_head(tok, slm, ["hidden", "position"]))
        assert llm.audit_log == []
        head = side_head(tok, slm, ["token", "position"])  # the GGUF holds the same weights as slm
        ref = logitfuse.generate(slm, logitfuse.HFLLM(llm_model, tok), [private], public, head=head,
                                 max_new_tokens=N_NEW, eos_token_id=sorted(engine.eos_token_ids))
        out = logitfuse.generate(engine, logitfuse.HFLLM(llm_model, tok), [private], public, head=head,
                                 max_new_tokens=N_NEW)
        assert out.sequences == ref.sequences
        torch.testing.assert_close(torch.tensor(out.alpha), torch.tensor(ref.alpha), atol=1e-4, rtol=0)
    finally:
        engine.close()
