"""OpenAICompatibleLLM against misbehaving local servers: redirects, trickled replies, servers that
never answer, ragged top-k answers, token strings of another tokenizer.

Every server here is the standard library's ``http.server`` on 127.0.0.1 with a free port, run in
a daemon thread; each handler waits on the server's ``stop`` event (never longer than a few
seconds), so shutting a server down ends its handlers too. The elapsed-time checks are hang guards
(an old client took ~100 s on the trickling server), far above what the calls need.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

import logitfuse
from logitfuse.backends import parse_top_logprobs
from logitfuse.testing.servers import completion_reply, send_json, serving, trickle


# ------------------------------------------------------------------------------------ servers
def trickle_body(handler, body):
    raw = completion_reply({"token_id:1": -0.5})
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(raw)))
    handler.end_headers()
    handler.wfile.flush()
    trickle(handler, raw)


def trickle_everything(handler, body):
    raw = completion_reply({"token_id:1": -0.5})
    trickle(handler, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(raw) + raw)


def never_answer(handler, body):
    handler.server.stop.wait(10)


def remote(url, **kwargs):
    args = dict(model="m", top_k=5, vocab_size=50, backoff=0.01)
    args.update(kwargs)
    return logitfuse.OpenAICompatibleLLM(url, **args)


# ------------------------------------------------------------------------------------ redirects
@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_refused_and_the_key_never_travels(status):
    """urllib followed a 301/302 to another address with the Bearer key (as a GET); now nothing
    is followed, the error names the address, and a redirect is not retried."""
    with serving(lambda h, b: send_json(h, completion_reply({"token_id:1": -0.5}))) as elsewhere:
        target = f"{elsewhere.url}/v1/completions"
        with serving(lambda h, b: send_json(h, b"", status, {"Location": target})) as server:
            llm = remote(server.url, api_key="sk-SECRET", on_failure="raise", retries=2)
            llm.start([[1, 2, 3]])
            with pytest.raises(logitfuse.LLMBackendError, match="redirect") as err:
                llm.advance([[]])
            assert target in str(err.value) and "base_url" in str(err.value)
            assert err.value.status == status
            assert len(server.received) == 1 and llm.stats["attempts"] == 1  # not retried
            assert server.received[0][2]["Authorization"] == "Bearer sk-SECRET"
            assert elsewhere.received == []  # the key went nowhere else
            fallback = remote(server.url, api_key="sk-SECRET", retries=0)
            fallback.start([[1, 2, 3]])
            assert not fallback.advance([[]]).ok.any()
            assert elsewhere.received == []


# ------------------------------------------------------------------------------------ deadlines
@pytest.mark.parametrize("behave", [trickle_body, trickle_everything], ids=["body", "status-and-headers"])
def test_timeout_bounds_the_whole_reply_not_each_byte(behave):
    """A valid reply trickled at 1 byte per 0.3 s held one advance() for ~100 s with timeout=0.5."""
    with serving(behave) as server:
        llm = remote(server.url, timeout=0.5, retries=0, on_failure="raise", prompt_format="ids")
        llm.start([[1, 2, 3]])
        began = time.monotonic()
        with pytest.raises(logitfuse.LLMBackendError, match="timed out.*deadline") as err:
            llm.advance([[]])
        assert time.monotonic() - began < 10  # hang guard: the deadline is 0.5 s
        assert err.value.status is None and "after 1 attempt" in str(err.value)
        fallback = remote(server.url, timeout=0.5, retries=1, prompt_format="ids")
        fallback.start([[1, 2, 3]])
        began = time.monotonic()
        assert not fallback.advance([[]]).ok.any()
        assert time.monotonic() - began < 10 and fallback.stats["attempts"] == 2


def test_a_silent_server_costs_one_probe_not_every_row_again():
    """With prompt_format="auto", the probe (row 0) timed out and then every other row was sent and
    timed out again: twice the documented time per step. The rows now share the probe's failure."""
    with serving(never_answer) as server:
        llm = remote(server.url, timeout=0.3, retries=1)
        llm.start([[1, 2], [3, 4], [5, 6]])
        out = llm.advance([[], [], []])
        assert not out.ok.any()
        assert llm.stats["attempts"] == 2 and len(server.received) == 2  # retries + 1, all row 0's probe
        assert llm.stats["failures"] == 3 and llm.stats["prompt_format"] is None  # undecided: probed again
        strict = remote(server.url, timeout=0.3, retries=0, on_failure="raise")
        strict.start([[1, 2], [3, 4]])
        with pytest.raises(logitfuse.LLMBackendError, match="timed out"):
            strict.advance([[], []])
        assert strict.stats["attempts"] == 1


def test_rows_queued_behind_max_concurrency_share_the_step_budget():
    """One row at a time against a silent server: 3 rows took 3 × timeout; the step budget is
    timeout × (retries + 1) whatever the number of rows."""
    with serving(never_answer) as server:
        llm = remote(server.url, timeout=0.3, retries=0, max_concurrency=1, prompt_format="ids",
                     on_failure="raise")
        assert llm.step_budget() == pytest.approx(0.3)
        llm.start([[1, 2], [3, 4], [5, 6]])
        with pytest.raises(logitfuse.LLMBackendError, match="timed out"):
            llm.advance([[], [], []])
        assert llm.stats["attempts"] == 1 and len(server.received) == 1
        assert remote(server.url, timeout=2, retries=2, backoff=0.5).step_budget() == pytest.approx(6 + 0.5 + 1.0)


# ------------------------------------------------------------------------------------ ragged top-k
def ragged(handler, body):
    """Row ``[..., n]`` gets ``n`` entries: ids 10, 11, ... at logprobs -1, -1.5, ..."""
    n = json.loads(body)["prompt"][-1]
    send_json(handler, completion_reply({f"token_id:{10 + i}": -1.0 - 0.5 * i for i in range(n)}))


def test_a_short_answer_keeps_every_rows_entries():
    """Rows answering 1 and 5 entries gave a (2, 1) TopK: row 1 lost 4 of its 5 entries."""
    with serving(ragged) as server:
        llm = remote(server.url, vocab_size=16, on_failure="raise")
        llm.start([[3, 1], [3, 5]])
        out = llm.advance([[], []])
    ids, logprobs = out.next
    assert out.ok.all() and ids.shape == (2, 5)
    assert ids[1].tolist() == [10, 11, 12, 13, 14] and logprobs[1].tolist() == [-1.0, -1.5, -2.0, -2.5, -3.0]
    assert ids[0, 0] == 10 and logprobs[0, 0] == -1.0
    assert len(set(ids[0].tolist())) == 5 and bool((logprobs[0, 1:] == -math.inf).all())  # padding


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
@pytest.mark.parametrize("mode", ["linear", "geometric", "logit"])
@pytest.mark.parametrize("tail", ["slm", "uniform", "zero"])
def test_padding_carries_no_mass_in_the_fusion(mode, tail):
    """The padded row fuses exactly as its one real entry alone, in the reference and the kernels
    (the Triton interpreter on CPU); a -inf entry must not count as 'reported with probability 0',
    which banned the padding ids in geometric mode and took them out of the tail."""
    from logitfuse import reference

    kernels = pytest.importorskip("logitfuse.kernels")
    if not kernels.available():
        pytest.skip("needs Triton (the kernels run in its interpreter here)")

    slm = torch.randn(2, 16, generator=torch.Generator().manual_seed(0)) * 2
    padded = logitfuse.TopK(torch.tensor([[10, 0, 1, 2, 3], [10, 11, 12, 13, 14]]),
                            torch.tensor([[-1.0] + [-math.inf] * 4, [-1.0, -1.5, -2.0, -2.5, -3.0]]))
    alone = logitfuse.TopK(padded.ids[:1, :1], padded.logprobs[:1, :1])
    kw = dict(mode=mode, tail=tail, alpha=torch.tensor([0.4, 0.7]))
    fused = logitfuse.fuse(slm, padded, **kw)  # validated: distinct ids, log-probabilities
    want = logitfuse.fuse(slm[:1], alone, **{**kw, "alpha": torch.tensor([0.4])})
    torch.testing.assert_close(fused[:1], want)
    ones = torch.ones(2)
    on_kernel = kernels.OPS.fuse(slm_logits=slm, llm=padded, slm_to_llm=logitfuse.VocabMap.identity(16, 16).slm_to_llm,
                                 alpha=kw["alpha"], v_llm=16, mode=mode, tail=tail, slm_temperature=ones,
                                 llm_temperature=ones)
    torch.testing.assert_close(on_kernel, reference.fuse_reference(
        slm_logits=slm, llm=padded, slm_to_llm=logitfuse.VocabMap.identity(16, 16).slm_to_llm, alpha=kw["alpha"],
        v_llm=16, mode=mode, tail=tail, slm_temperature=ones, llm_temperature=ones), atol=2e-4, rtol=1e-4)


def test_an_id_named_twice_is_a_malformed_reply():
    with pytest.raises(ValueError, match="twice"):
        parse_top_logprobs({"choices": [{"logprobs": {"top_logprobs": [{"token_id:1": -1.0, "token_id:01": -2.0}]}}]})


# ------------------------------------------------------------------------------------ wrong tokenizer
def strings_server(keys):
    return lambda handler, body: send_json(handler, completion_reply(keys))


def test_token_strings_of_another_tokenizer_raise(tok):
    """None of the strings maps to the tokenizer given: every step used the SLM alone, silently,
    even under on_failure="raise"."""
    with serving(strings_server({"中文": -0.5, "日本語": -1.5, "": -3.0})) as server:
        llm = remote(server.url, tokenizer=tok, vocab_size=None, prompt_format="text", on_failure="raise")
        llm.start(["Dear friends,"])
        with pytest.raises(logitfuse.LLMBackendError, match="tokenizer=") as err:
            llm.advance([[]])
        assert "'中文'" in str(err.value) and llm.stats["attempts"] == 1  # not retried
        assert llm.stats["unmapped_answers"] == 1


def test_token_strings_of_another_tokenizer_warn_once_under_fallback(tok):
    with serving(strings_server({"中文": -0.5, "日本語": -1.5})) as server:
        llm = remote(server.url, tokenizer=tok, vocab_size=None, prompt_format="text")
        llm.start(["Dear friends,"])
        with pytest.warns(RuntimeWarning, match="tokenizer=") as caught:
            outs = [llm.advance([tok.encode(" a", add_special_tokens=False)]) for _ in range(3)]
        assert server.url in str(caught[0].message)
        assert len([w for w in caught if "tokenizer=" in str(w.message)]) == 1
        assert not any(bool(o.ok.any()) for o in outs)
        assert llm.stats["unmapped_answers"] == 3 and llm.stats["failures"] == 3


def test_only_empty_strings_are_no_tokenizer_error(tok):
    """"" keys (control tokens, cut characters) never map, with any tokenizer: no error, no warning."""
    with serving(strings_server({"": -0.5})) as server:
        llm = remote(server.url, tokenizer=tok, vocab_size=None, prompt_format="text", on_failure="raise")
        llm.start(["Dear friends,"])
        out = llm.advance([[]])
        assert not out.ok.any() and llm.stats["empty_answers"] == 1 and llm.stats["unmapped_answers"] == 0
