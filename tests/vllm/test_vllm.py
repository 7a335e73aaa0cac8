"""logitfuse against a real vLLM server (issue 24): `pytest -m vllm` (.ci/run-vllm; where vLLM or the
model is missing, every test skips with one line saying which and how to get it).

vLLM (the CPU build, in its own environment) serves SmolLM2-135M in float32; the same weights run
in-process as the SLM and as the reference. Covered: the server checks (wrong served model, a top_k
above --max-logprobs: refused before generating), per-step fusion with token-id keys (the same
tokens as `logitfuse serve` on the same weights) and the privacy audit (a random canary in the
private prompt, looked for in the bytes a recording proxy forwarded and in vLLM's own request log),
exact speculation through prompt_logprobs, teacher-forced scoring (what `logitfuse train/eval --llm
URL` reads) against in-process scoring, and a server killed mid-generation (--on-failure raise from
the command line; fallback in-process).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

import logitfuse
from logitfuse.backends import LLMBackendError, ServerMismatchError
from logitfuse.serve.engines import RecordingProxy
from logitfuse.serve.server import serve_in_thread
from logitfuse.train_fuser.served import ServedScorer

pytestmark = pytest.mark.vllm

MODEL = "smollm2-135m"
SERVED = "smol"


@pytest.fixture(scope="session")
def missing() -> str | None:
    """Why the suite cannot run here (one line), or None."""
    from logitfuse import zoo
    from logitfuse.serve.vllm import vllm_missing

    if not zoo.is_installed(MODEL):
        return f"{MODEL} is not installed: run `logitfuse models install {MODEL}`"
    return vllm_missing()


def start_server(**options):
    """A started VLLMServer on the suite's model (float32: compared with in-process float32 scoring)."""
    from logitfuse import zoo
    from logitfuse.serve.vllm import VLLMServer

    return VLLMServer(str(zoo.path(MODEL)), served_model=SERVED, dtype="float32", **options).start()


@pytest.fixture(scope="session")
def vllm_server(missing):
    """The shared server, with vLLM's own request log on (the privacy audit reads it)."""
    if missing:
        pytest.skip(f"vLLM suite: {missing}")
    server = start_server(log_requests=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tokenizer(vllm_server):
    from transformers import AutoTokenizer

    from logitfuse import zoo

    return AutoTokenizer.from_pretrained(zoo.path(MODEL))


@pytest.fixture(scope="session")
def model(vllm_server):
    """The same weights in-process (float32): the SLM, and the reference the server is compared with."""
    from logitfuse import zoo

    return zoo.load(MODEL, dtype="float32")[0]


CANARY = f"Keller{secrets.token_hex(5)}"  # a new one every run
PUBLIC = "Write a short invitation to a garden party."
PRIVATE = f"My name is Martin {CANARY}; I sell houses on Maple Drive and my party is on Saturday. {PUBLIC}"
#: the largest |log p| difference allowed between vLLM and transformers on the same float32 weights:
#: both compute in float32 with different kernels (GEMM blocking, attention), which moves log-probabilities
#: by rounding only; 3.6e-5 was the largest seen (21 positions of SmolLM2-135M), so 1e-3 leaves 25x room
#: and still fails for any real difference (bfloat16 weights move them by 1e-2 and more)
SCORE_TOLERANCE = 1e-3


def llm_for(url: str, tokenizer, **options) -> logitfuse.OpenAICompatibleLLM:
    return logitfuse.OpenAICompatibleLLM(url, SERVED, tokenizer=tokenizer, **options)


def fused(model, tokenizer, llm, **options) -> logitfuse.FusedGeneration:
    private = tokenizer([PRIVATE], return_tensors="pt")["input_ids"]
    settings = dict(alpha=0.5, max_new_tokens=24, slm_tokenizer=tokenizer, eos_token_id=[]) | options
    return logitfuse.generate(model, llm, private, PUBLIC, **settings)


def prompts_sent(bodies: list[bytes]) -> list[list[int] | str]:
    return [json.loads(body)["prompt"] for body in bodies]


def holds_canary(prompt: list[int] | str, tokenizer) -> bool:
    """Whether a request's prompt carries the canary: as text, or as token ids (decoded)."""
    text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
    return CANARY in text or CANARY[6:] in text  # the random part alone too


# ------------------------------------------------------------------ checks before generating
def test_the_server_passes_the_checks_with_its_own_settings(vllm_server, tokenizer):
    check = llm_for(vllm_server.url, tokenizer, top_k=20).check_server()
    assert check.models == (SERVED,) and check.tokenizer == "tokenize"


@pytest.mark.parametrize("options, argument, message", [
    (dict(top_k=21), "top_k", r"refuses top_k=21 .*greater than max allowed: 20"),
])
def test_a_top_k_above_max_logprobs_is_refused(vllm_server, tokenizer, options, argument, message):
    with pytest.raises(ServerMismatchError, match=message) as caught:
        llm_for(vllm_server.url, tokenizer, **options).check_server()
    assert caught.value.argument == argument


def test_a_wrong_served_model_is_refused(vllm_server, tokenizer):
    llm = logitfuse.OpenAICompatibleLLM(vllm_server.url, "not-" + SERVED, tokenizer=tokenizer)
    with pytest.raises(ServerMismatchError, match=rf"lists '{SERVED}', not model='not-{SERVED}'"):
        llm.check_server()


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "logitfuse.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.mark.parametrize("flag, value, message", [
    ("--served-model", "not-smol", "--served-model: .*lists 'smol', not model='not-smol'"),
    ("--top-k", "21", "--top-k: .*refuses top_k=21"),
])
def test_the_command_line_refuses_a_mismatch_before_generating(vllm_server, tmp_path, flag, value, message):
    context = tmp_path / "profile.txt"
    context.write_text(f"My name is Martin {CANARY}.\n")
    done = cli("generate", "--slm", MODEL, "--llm", vllm_server.url, "--llm-tokenizer", MODEL,
               "--served-model", SERVED, "--context", str(context), "--instruction", PUBLIC + ": mention my name",
               "--max-new-tokens", "8", flag, value)
    assert done.returncode == 2 and done.stdout == "", done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()  # what the LLM will see, then the error: one line
    assert lines[-1].startswith("logitfuse generate: error: ") and re.search(message, lines[-1]), done.stderr
    assert "Traceback" not in done.stderr
    assert CANARY not in vllm_server.log_text()


# ------------------------------------------------------------------ per-step fusion and privacy
def test_per_step_fusion_gives_the_tokens_of_logitfuse_serve_on_the_same_weights(vllm_server, model, tokenizer):
    with RecordingProxy(vllm_server.url) as proxy:
        llm = llm_for(proxy.url, tokenizer, top_k=20, on_failure="raise")
        out = fused(model, tokenizer, llm)
    reference_server, url = serve_in_thread(model, tokenizer, model_name=SERVED)
    try:
        expected = fused(model, tokenizer, llm_for(url, tokenizer, top_k=20, on_failure="raise"))
    finally:
        reference_server.shutdown()
        reference_server.server_close()
    assert out.sequences == expected.sequences
    assert out.stats.llm_calls == 24 and out.stats.fallbacks == 0
    assert llm.stats["prompt_format"] == "ids" and llm.stats["failures"] == 0
    # what vLLM answered: top-20 keyed by token id (return_tokens_as_token_ids), not by token string
    with urllib.request.urlopen(urllib.request.Request(vllm_server.url + "/v1/completions", data=proxy.received[-1],
                                                       headers={"Content-Type": "application/json"})) as reply:
        top = json.load(reply)["choices"][0]["logprobs"]["top_logprobs"][0]
    assert len(top) == 20 and all(key.startswith("token_id:") for key in top)


def test_no_private_canary_reaches_vllm(vllm_server, model, tokenizer):
    with RecordingProxy(vllm_server.url) as proxy:
        llm = llm_for(proxy.url, tokenizer, top_k=20, on_failure="raise")
        out = fused(model, tokenizer, llm, max_new_tokens=16)
        sent = prompts_sent(proxy.received)
        # the detector finds a canary where one is sent (the same check, on a public prompt that holds it)
        leaky = llm_for(proxy.url, tokenizer, top_k=20)
        leaky.start([PRIVATE])
        leaky.advance([[]])
        leaked = prompts_sent(proxy.received[len(sent):])
    assert out.stats.llm_calls == 16 and len(sent) >= 16
    assert not any(holds_canary(prompt, tokenizer) for prompt in sent)
    assert any(holds_canary(prompt, tokenizer) for prompt in leaked)
    # vLLM's own request log (its DEBUG request logger): every prompt it was given, as token ids; the
    # canary is in those of the deliberate leak only
    logged = [json.loads(ids) for ids in re.findall(r"prompt_token_ids: (\[[\d, ]*\])", vllm_server.log_text())]
    assert sum(prompt in logged for prompt in sent) == len(sent)
    assert [prompt for prompt in logged if holds_canary(prompt, tokenizer)] == leaked


# ------------------------------------------------------------------ exact speculation
@pytest.mark.parametrize("score_method", ["prompt_logprobs", "auto"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculation_gives_per_step_fusions_tokens(vllm_server, model, tokenizer, k, score_method):
    per_step = fused(model, tokenizer, llm_for(vllm_server.url, tokenizer, top_k=20, on_failure="raise"))
    llm = llm_for(vllm_server.url, tokenizer, top_k=20, on_failure="raise", score_method=score_method)
    spec = fused(model, tokenizer, llm, speculate=k)
    assert spec.sequences == per_step.sequences
    assert spec.stats.speculation_fallbacks == 0 and spec.stats.fallbacks == 0
    assert spec.stats.llm_calls < per_step.stats.llm_calls  # drafts accepted: fewer calls than tokens
    assert llm.stats["score_method"] == ("prompt_logprobs" if score_method == "prompt_logprobs" else "echo")


# ------------------------------------------------------------------ teacher-forced scoring
def test_served_scoring_equals_in_process_scoring(vllm_server, model, tokenizer):
    """ServedScorer is what `logitfuse train/eval --llm URL` score with (train_fuser/served.py)."""
    from logitfuse.prompts import bundled_split, load_examples, render_prompt

    examples = load_examples(bundled_split("test"), max_examples=3)
    for method in ("prompt_logprobs", "echo"):
        scorer = ServedScorer(vllm_server.url, SERVED, tokenizer, top_k=20)
        scorer.backend.score_method = scorer.backend._score_method = method
        assert scorer.problem() is None
        for example in examples:
            prompt = render_prompt(tokenizer, example.public_messages())
            response = tokenizer.encode(example.response, add_special_tokens=False)[:48]
            top = scorer.score_topk(prompt, response)
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0].float(), -1)
            rows = logprobs[len(prompt) - 1: len(prompt) - 1 + len(response)]
            assert top.ids.shape == (len(response), 20)
            assert (rows.gather(1, top.ids) - top.logprobs).abs().max().item() <= SCORE_TOLERANCE
            # the served top-20 is the in-process top-20, up to ties within the tolerance
            kth = rows.topk(20).values[:, -1:]
            assert bool((rows.gather(1, top.ids) >= kth - SCORE_TOLERANCE).all())


# ------------------------------------------------------------------ faults (own server; runs last)
@pytest.fixture(scope="module")
def doomed(missing):
    """A second server of the same model, for the tests that kill it."""
    if missing:
        pytest.skip(f"vLLM suite: {missing}")
    server = start_server()
    yield server
    server.stop()


def completions_served(server) -> float:
    return server.metrics().get("vllm:request_success_total", 0.0)


def test_a_server_killed_mid_generation_is_one_line_with_the_text_so_far(doomed, tmp_path):
    context = tmp_path / "profile.txt"
    context.write_text("My name is Martin Keller; I sell houses on Maple Drive.\n")
    before = completions_served(doomed)
    process = subprocess.Popen(
        [sys.executable, "-m", "logitfuse.cli", "generate", "--slm", MODEL, "--llm", doomed.url, "--llm-tokenizer",
         MODEL, "--served-model", SERVED, "--context", str(context), "--instruction", PUBLIC + ": mention my job",
         "--max-new-tokens", "400", "--alpha", "0.5", "--on-failure", "raise"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 300
    while completions_served(doomed) < before + 8 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    doomed.kill()
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("logitfuse generate: error: ") and doomed.url in lines[-1]
    assert not any(line.startswith("Traceback") for line in lines)
    assert stdout.strip(), "the text generated before the server died is kept"


def test_a_server_killed_mid_generation_falls_back_to_the_slm(doomed, model, tokenizer):
    doomed.start()  # again: the previous test killed it

    class KilledAfter(logitfuse.OpenAICompatibleLLM):
        """Kills the real server after its fifth step (nothing else changes)."""

        calls = 0

        def advance(self, new_tokens, need=None):
            type(self).calls += 1
            if type(self).calls == 6:
                doomed.kill()
            return super().advance(new_tokens, need)

    alive = fused(model, tokenizer, llm_for(doomed.url, tokenizer, top_k=20, on_failure="raise"), max_new_tokens=5)
    llm = KilledAfter(doomed.url, SERVED, tokenizer=tokenizer, top_k=20, on_failure="fallback", retries=1)
    out = fused(model, tokenizer, llm, max_new_tokens=12)
    assert len(out.sequences[0]) == 12 and out.sequences[0][:5] == alive.sequences[0]
    assert out.stats.fallbacks == 12 - 5 and llm.stats["failures"] == 12 - 5
    with pytest.raises(LLMBackendError):
        llm_for(doomed.url, tokenizer, on_failure="raise").check_server()
