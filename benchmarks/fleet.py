"""Fleet benchmark: N devices doing fused decoding against one LLM server, beside the same server
generating plain completions for N clients, in one run.

The cloud pays one request per fused token per user (fewer with speculation), each re-sending a
growing prompt. This measures what that costs a real server, in three phases per number of devices
N (``--clients``, e.g. 1,2,4,8,16,32):

- ``plain``: N concurrent plain completions of ``--new-tokens`` tokens from the public prompts
  (``max_tokens``; ``ignore_eos`` and ``min_tokens`` where the server takes them: vLLM both,
  llama.cpp's server ``min_tokens``, ``logitfuse serve`` neither, so it stops at EOS): the
  baseline. The tokens actually returned are counted.
- ``per-step``: N devices replay recorded per-step fused generations (one request per token).
- ``speculate K``: N devices replay recorded ``speculate=K`` generations (one scoring request per
  K drafts, accepted + 1 tokens each).

**Record, then replay.** Real fused generation runs once per example (``logitfuse.generate``, greedy,
exactly ``--new-tokens`` tokens, EOS off) with the SLM in this process reading the private CoGenesis
prompt and the server reading the public one, through :class:`RecordingLLM`: every request body the
backend sent, grouped by LLM call, the tokens each call decided and the top-1 of each reply. The
devices then replay those bodies byte for byte (device ``d`` replays example ``d mod M``, each
request waiting for the previous reply; ``--device-ms`` of think time before each call): no model
runs on the device side, so the devices' compute does not measure this machine's cores. The body
format is the server's (token ids for vLLM and ``logitfuse serve``, text for llama.cpp), so a
recording belongs to one server kind; ``--record FILE`` saves it, or replays it when FILE exists.

Reported per phase: wall time, tokens/s (all devices' tokens over the wall time) and its ratio to
``plain`` at the same N, per-token latency seen by a device (a call's latency over the tokens it
decided: p50 and p99 over all tokens), LLM requests and calls per token, errors, the share of
replies whose top-1 matches the recording, the client process's CPU seconds (the devices share this
machine with the server), and the server's own counters from ``GET /metrics`` when it has them
(vLLM: prefix-cache queries and hits, prompt tokens, prompt tokens computed = prompt tokens −
prefix-cache hits; ``null`` for servers without /metrics).

The server: ``--server URL`` (used as it is; ``--served-model`` names the model), or ``--serve-zoo
NAME`` (started here on 127.0.0.1: ``logitfuse serve`` in its own process, or llama.cpp's server on
the zoo GGUF with ``--engine llama.cpp``), or ``--tiny`` (tiny random models, ``logitfuse serve`` in
this process; for tests). The SLM (``--slm``) must use the served model's tokenizer.

    logitfuse bench fleet --serve-zoo qwen2.5-coder-0.5b --clients 1,2,4,8,16,32 --new-tokens 16
    logitfuse bench fleet --serve-zoo qwen2.5-coder-0.5b --engine llama.cpp --clients 1,2,4,8,16,32
    logitfuse bench fleet --server http://127.0.0.1:8000 --served-model qwen2.5-coder-0.5b --record vllm.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from logitfuse.backends.openai import OpenAICompatibleLLM
from logitfuse.bench import common

DEFAULT_MODEL = "qwen2.5-coder-0.5b"
DEFAULT_OUT = "benchmarks/results/fleet"
RECORD_FORMAT = "logitfuse-fleet-record/1"
PLAIN = "plain"
PER_STEP = "per-step"
#: vLLM's counters (prometheus_client exposes a Counter ``x`` as ``x_total``); older names after the first
METRICS = {"prefix_cache_queries": ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"),
           "prefix_cache_hits": ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
           "prompt_tokens": ("vllm:prompt_tokens",), "generation_tokens": ("vllm:generation_tokens",),
           # newer vLLM splits prompt tokens by where their KV came from
           "prompt_tokens_local_compute": ('vllm:prompt_tokens_by_source{source="local_compute"}',)}


# ------------------------------------------------------------------------------------ replies
def top1(reply: Any) -> list[str | None] | None:
    """The most likely key at each position of a completions reply's ``top_logprobs`` (``None`` where
    a position has none, e.g. an echoed first token), or ``None`` when the reply has no log-probabilities.

    >>> top1({"choices": [{"logprobs": {"top_logprobs": [None, {"a": -0.1, "b": -2.0}]}}]})
    [None, 'a']
    """
    try:
        tops = reply["choices"][0]["logprobs"]["top_logprobs"]
        return [max(top, key=top.get) if top else None for top in tops]
    except (KeyError, IndexError, TypeError, ValueError):
        return None


class RecordingLLM(OpenAICompatibleLLM):
    """An :class:`~logitfuse.OpenAICompatibleLLM` that groups the requests it sends by LLM call (one
    ``advance`` or ``score``) and keeps the top-1 of every reply, for replaying.

    :attr:`calls` holds, per call, ``(first, end, length)``: its requests are ``audit_log[first:end]``
    and ``length`` is the row's LLM sequence length when the call began (after the rollback of the
    previous call's rejected drafts). :attr:`top1` holds :func:`top1` of each reply as it arrived,
    before it is read (build it with ``retries=0``: then one reply per logged request, even one the
    backend then refuses: llama.cpp's server answers a request whose one sampled token is EOS with
    no log-probabilities, a step the backend's ``on_failure="fallback"`` fuses with the SLM alone).
    One row only.

    >>> llm = RecordingLLM("http://127.0.0.1:8000", "m", vocab_size=100, prompt_format="ids", score_method="none")
    >>> llm.calls, llm.top1
    ([], [])
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[int, int, int]] = []
        self.top1: list[list[str | None] | None] = []

    def advance(self, new_tokens, need=None):
        return self._call(super().advance, new_tokens, need)

    def score(self, new_tokens, need=None):
        return self._call(super().score, new_tokens, need)

    def _call(self, method, new_tokens, need):
        first, length = len(self.audit_log), len(self.sequences()[0])
        out = method(new_tokens, need)
        self.calls.append((first, len(self.audit_log), length))
        return out

    def post(self, body, parse=None, *, deadline=None):
        def keep(reply):
            self.top1.append(top1(reply))
            return reply if parse is None else parse(reply)

        return super().post(body, keep, deadline=deadline)


def tokens_per_call(lengths: list[int], total: int) -> list[int]:
    """The tokens each LLM call decided, from the row's LLM sequence length when each call began.

    Call ``i`` feeds the token chosen after call ``i - 1`` (none for the first call) and its drafts;
    the rejected drafts are rolled back before call ``i + 1``. So by the time call ``i + 1`` begins,
    the LLM holds every token decided by calls ``1..i`` but the last one (chosen from call ``i``'s
    reply, sent with call ``i + 1``): ``decided(i) = lengths[i + 1] - lengths[0] + 1``; the last call
    decided what is left of ``total``.

    >>> tokens_per_call([10, 10, 11, 12], 4)  # per-step: one token per call
    [1, 1, 1, 1]
    >>> tokens_per_call([10, 12, 15], 8)  # speculate 4: kept 2, then 2, then the rest
    [3, 3, 2]
    """
    decided = [n - lengths[0] + 1 for n in lengths[1:]] + [total]
    return [b - a for a, b in zip([0, *decided[:-1]], decided)]


# ------------------------------------------------------------------------------------ record
def server_formats(url: str, model: str, tokenizer: Any) -> tuple[str, str]:
    """``(prompt_format, score_method)`` of the server: one probe with a fixed text (nothing of any
    user's), so that the recorded runs send no probe of their own."""
    probe = OpenAICompatibleLLM(url, model, tokenizer=tokenizer, timeout=120)
    probe.supports_score  # noqa: B018 - the property probes the server once
    if probe.stats["score_method"] is None:
        raise RuntimeError(f"{url}: the server did not answer the probe request (is it up, serving {model!r}?)")
    return probe.stats["prompt_format"] or "ids", probe.stats["score_method"]


def record_runs(slm: Any, tokenizer: Any, url: str, model: str, prompts: list[tuple[list[int], list[int]]], *,
                new_tokens: int, speculate: int, alpha: float, prompt_format: str, score_method: str,
                log=print) -> list[dict[str, Any]]:
    """Fused generation of each ``(private ids, public ids)`` example against the server (greedy,
    exactly ``new_tokens`` tokens): per run, its calls (request bodies, tokens decided, replies' top-1)."""
    import logitfuse

    runs = []
    for index, (private, public) in enumerate(prompts):
        llm = RecordingLLM(url, model, top_k=20, tokenizer=tokenizer, timeout=300, retries=0,
                           prompt_format=prompt_format, score_method=score_method)
        out = logitfuse.generate(slm, llm, [private], public, alpha=alpha, max_new_tokens=new_tokens,
                                 speculate=speculate, overlap=False, eos_token_id=[])
        stats = dict(out.stats)
        total = len(out.sequences[0])
        if speculate and stats.get("speculation_fallbacks"):
            raise RuntimeError(f"{url}: speculation fell back to per-step fusion (the server cannot score drafts)")
        if len(llm.top1) != len(llm.audit_log):
            raise RuntimeError(f"{len(llm.audit_log)} requests but {len(llm.top1)} replies: the server did not "
                               "answer while recording")
        lengths = [length for _, _, length in llm.calls]
        counts = tokens_per_call(lengths, total)
        if total != new_tokens or min(counts) < 1 or max(counts) > speculate + 1:
            raise RuntimeError(f"example {index}: {total} tokens in calls of {counts}: not a clean recording")
        calls = [{"bodies": llm.audit_log[first:end], "top1": llm.top1[first:end], "tokens": n}
                 for (first, end, _), n in zip(llm.calls, counts)]
        runs.append({"example": index, "tokens": total, "calls": calls, "stats": stats,
                     "held_back": llm.stats["held_back"], "failures": llm.stats["failures"]})
        log(f"  recorded example {index}: {total} tokens, {len(calls)} LLM calls, "
            f"{sum(len(c['bodies']) for c in calls)} requests, {llm.stats['failures']} refused replies (SLM alone)")
    return runs


# ------------------------------------------------------------------------------------ replay
def scrape_metrics(url: str) -> dict[str, float] | None:
    """The server's counters of :data:`METRICS` from ``GET /metrics`` (Prometheus text; every label
    set summed), or ``None`` when it has no such endpoint or none of them."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=10) as response:
            text = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{") if "{" in line.split(" ", 1)[0] else line.partition(" ")
        try:
            value = float(rest.rsplit("}", 1)[-1].split()[0])
        except (IndexError, ValueError):
            continue
        name = name.strip().removesuffix("_total")
        if 'source="local_compute"' in rest:
            name += '{source="local_compute"}'
        sums[name] = sums.get(name, 0.0) + value
    found = {}
    for key, names in METRICS.items():
        hit = next((n for n in names if n in sums), None)
        if hit is not None:
            found[key] = sums[hit]
    return found or None


def metrics_delta(before: dict | None, after: dict | None) -> dict[str, float | None] | None:
    """What a phase added to the server's counters, with the prefix-cache hit rate and the prompt
    tokens computed: the server's own count where it gives one (vLLM's ``prompt_tokens_by_source``
    ``local_compute``), else prompt tokens − prefix-cache hits.

    >>> metrics_delta({"prefix_cache_queries": 10, "prefix_cache_hits": 5, "prompt_tokens": 10},
    ...               {"prefix_cache_queries": 110, "prefix_cache_hits": 95, "prompt_tokens": 110})["prompt_tokens_computed"]
    10
    """
    if before is None or after is None:
        return None
    delta = {k: after[k] - before.get(k, 0) for k in after}
    queries, hits = delta.get("prefix_cache_queries"), delta.get("prefix_cache_hits")
    delta["prefix_cache_hit_rate"] = hits / queries if queries and hits is not None else None
    prompt = delta.get("prompt_tokens")
    delta["prompt_tokens_computed"] = prompt - hits if prompt is not None and hits is not None else None
    if delta.get("prompt_tokens_local_compute") is not None:
        delta["prompt_tokens_computed"] = delta["prompt_tokens_local_compute"]
    return delta


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 100]).

    >>> percentile([4.0, 1.0, 3.0, 2.0], 50), percentile([4.0, 1.0, 3.0, 2.0], 99), percentile([], 50)
    (2.0, 4.0, None)
    """
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _client(url: str, model: str, timeout: float) -> OpenAICompatibleLLM:
    # the transport only (post: deadlines, no redirects); nothing is parsed or logged
    return OpenAICompatibleLLM(url, model, vocab_size=1, timeout=timeout, retries=0, on_failure="raise")


def run_devices(work: list[Any], device: Any) -> tuple[list[Any], float]:
    """``device(i, work[i])`` in one thread per device, all released at once; ``(results, wall seconds)``."""
    results: list[Any] = [None] * len(work)
    started: list[float] = []
    gate = threading.Barrier(len(work), action=lambda: started.append(time.perf_counter()))

    def one(i: int) -> None:
        gate.wait()
        results[i] = device(i, work[i])

    threads = [threading.Thread(target=one, args=(i,), name=f"fleet-device-{i}") for i in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - started[0]


def replay(runs: list[dict[str, Any]], url: str, model: str, clients: int, *, device_ms: float = 0.0,
           timeout: float = 600.0, sent: list | None = None) -> dict[str, Any]:
    """``clients`` devices at once, device ``d`` replaying ``runs[d % len(runs)]`` call after call (each
    request waits for the previous reply). ``sent``: when a list, each device's bodies are appended to
    it as ``(device, body)`` in the order it sent them."""

    def device(i: int, run: dict[str, Any]) -> dict[str, Any]:
        client = _client(url, model, timeout)
        per_token, matches, requests, errors, tokens = [], 0, 0, 0, 0
        for call in run["calls"]:
            if device_ms:
                time.sleep(device_ms / 1e3)
            t0 = time.perf_counter()
            try:
                for body, want in zip(call["bodies"], call["top1"]):
                    if sent is not None:
                        sent.append((i, body))
                    requests += 1
                    matches += top1(client.post(body.encode("utf-8"))) == want
            except Exception:  # noqa: BLE001 - counted: a failed call decides no token here
                errors += 1
                continue
            seconds = time.perf_counter() - t0
            tokens += call["tokens"]
            per_token += [seconds / call["tokens"]] * call["tokens"]
        return {"per_token": per_token, "matches": matches, "requests": requests, "errors": errors, "tokens": tokens,
                "calls": len(run["calls"])}

    return _summary(*run_devices([runs[d % len(runs)] for d in range(clients)], device))


def plain(bodies: list[bytes], url: str, model: str, clients: int, *, timeout: float = 600.0) -> dict[str, Any]:
    """``clients`` concurrent plain completions, device ``d`` sending ``bodies[d % len(bodies)]``; the
    tokens each got back are the reply's ``usage.completion_tokens``."""

    def device(i: int, body: bytes) -> dict[str, Any]:
        client = _client(url, model, timeout)
        t0 = time.perf_counter()
        try:
            reply = client.post(body)
        except Exception:  # noqa: BLE001 - counted
            return {"per_token": [], "matches": None, "requests": 1, "errors": 1, "tokens": 0, "calls": 1}
        seconds = time.perf_counter() - t0
        tokens = completion_tokens(reply)
        return {"per_token": [seconds / max(tokens, 1)] * tokens, "matches": None, "requests": 1, "errors": 0,
                "tokens": tokens, "calls": 1}

    return _summary(*run_devices([bodies[d % len(bodies)] for d in range(clients)], device))


def completion_tokens(reply: Any) -> int:
    """The tokens a completion returned (``usage.completion_tokens``; 0 when the reply has none)."""
    try:
        return int(reply["usage"]["completion_tokens"] or 0)
    except (KeyError, TypeError, ValueError):
        return 0


def _summary(devices: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    tokens = sum(d["tokens"] for d in devices)
    per_token = [t for d in devices for t in d["per_token"]]
    requests = sum(d["requests"] for d in devices)
    matched = [d["matches"] for d in devices if d["matches"] is not None]
    p50, p99 = percentile(per_token, 50), percentile(per_token, 99)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall if wall > 0 else None,
            "latency_ms_p50": None if p50 is None else 1e3 * p50, "latency_ms_p99": None if p99 is None else 1e3 * p99,
            "requests": requests, "requests_per_token": requests / tokens if tokens else None,
            "llm_calls_per_token": sum(d["calls"] for d in devices) / tokens if tokens else None,
            "errors": sum(d["errors"] for d in devices),
            "top1_match": sum(matched) / requests if matched and requests else None}


def plain_bodies(runs: list[dict[str, Any]], new_tokens: int, *, logprobs: bool = False) -> list[bytes]:
    """A plain completion request per recorded run: its first request's public prompt, greedy,
    ``max_tokens`` with EOS ignored where the server takes ``ignore_eos`` / ``min_tokens``; with
    ``logprobs``, ``"logprobs": 0`` (the sampled tokens' own only: for a server that counts
    ``usage.completion_tokens`` only then, as ``logitfuse serve`` does)."""
    bodies = []
    for run in runs:
        first = json.loads(run["calls"][0]["bodies"][0])
        body = {"model": first["model"], "prompt": first["prompt"], "max_tokens": new_tokens, "temperature": 0.0,
                "ignore_eos": True, "min_tokens": new_tokens, **({"logprobs": 0} if logprobs else {})}
        bodies.append(json.dumps(body, separators=(",", ":")).encode("utf-8"))
    return bodies


def phase(name: str, clients: int, url: str, measure: Any) -> dict[str, Any]:
    """One timed phase with the server's counters around it and this process's CPU seconds."""
    before, cpu = scrape_metrics(url), time.process_time()
    row = {"clients": clients, "phase": name, **measure()}
    row["client_cpu_s"] = time.process_time() - cpu
    row["server_metrics"] = metrics_delta(before, scrape_metrics(url))
    return row


def fleet(recordings: dict[str, list[dict[str, Any]]], url: str, model: str, clients: list[int], *,
          new_tokens: int, device_ms: float = 0.0, log=print) -> list[dict[str, Any]]:
    """Per N of ``clients``: the plain phase, then each recorded fused mode; ratios to plain at the same N.

    A warm-up plain completion goes first (dropped); when its reply counts no tokens although it holds
    text, the plain requests ask for ``"logprobs": 0`` (:func:`plain_bodies`)."""
    warm = json.loads(plain_bodies(recordings[PER_STEP], 2)[0])
    reply = _client(url, model, 600).post(json.dumps(warm).encode("utf-8"))
    uncounted = not completion_tokens(reply) and bool(reply["choices"][0].get("text"))
    if uncounted:
        log("the server counts no completion tokens without logprobs: plain requests ask for logprobs 0")
    bodies = plain_bodies(recordings[PER_STEP], new_tokens, logprobs=uncounted)
    rows = []
    for n in clients:
        base = phase(PLAIN, n, url, lambda n=n: plain(bodies, url, model, n))
        ours = [base] + [phase(mode, n, url, lambda runs=runs, n=n: replay(runs, url, model, n, device_ms=device_ms))
                         for mode, runs in recordings.items()]
        for row in ours:
            row["over_plain"] = row["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        rows += ours
    return rows


# ------------------------------------------------------------------------------------ servers
def _wait_until_up(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before answering")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.25)
    raise RuntimeError(f"the server did not answer {url}/v1/models within {timeout:g} s")


@contextlib.contextmanager
def logitfuse_serve(model: str, *, threads: int | None = None, startup_timeout: float = 300.0):
    """``logitfuse serve --model MODEL`` (float32) in its own process on 127.0.0.1; yields its URL."""
    from logitfuse.serve.engines import free_port

    port = free_port()
    command = [sys.executable, "-m", "logitfuse.cli", "serve", "--model", model, "--port", str(port),
               "--served-model-name", model, "--dtype", "float32", "--max-connections", "256"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_up(url, process, startup_timeout)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextlib.contextmanager
def started_server(args: argparse.Namespace, llm: Any = None, tokenizer: Any = None):
    """The server of the run: ``(url, served model name, what it is)``."""
    if args.tiny:
        from logitfuse.serve.server import serve_in_thread

        server, url = serve_in_thread(llm, tokenizer, model_name="tiny", top_k_max=20, max_connections=256)
        try:
            yield url, "tiny", "logitfuse serve (in process, tiny random model)"
        finally:
            server.shutdown()
            server.server_close()
    elif args.server:
        yield args.server.rstrip("/"), args.served_model or args.slm, f"given: {args.server}"
    elif args.engine == "llama.cpp":
        import torch

        from logitfuse import zoo
        from logitfuse.serve.engines import LlamaCppServer

        gguf = zoo.gguf_path(args.serve_zoo)
        with LlamaCppServer(gguf, alias=args.serve_zoo, n_ctx=4096, logits_all=True,
                            n_threads=args.threads or torch.get_num_threads()) as server:
            yield server.url, args.serve_zoo, f"llama.cpp's server (llama-cpp-python), {gguf.name}, logits_all"
    else:
        with logitfuse_serve(args.serve_zoo, threads=args.threads) as url:
            yield url, args.serve_zoo, f"logitfuse serve --model {args.serve_zoo} --dtype float32"


# ------------------------------------------------------------------------------------ the run
def load_recording(path: str) -> dict[str, Any]:
    payload = json.loads(Path(path).read_text(encoding="utf-8"))
    if payload.get("format") != RECORD_FORMAT:
        raise ValueError(f"{path} is not a fleet recording ({RECORD_FORMAT})")
    return payload


def load_models(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """``(slm, llm or None, tokenizer)``: tiny random models over one byte-level tokenizer, or the zoo SLM."""
    if args.tiny:
        from logitfuse.testing import byte_level_tokenizer, tiny_llama

        tok = byte_level_tokenizer()
        return tiny_llama(len(tok), seed=0), tiny_llama(len(tok), seed=1), tok
    from logitfuse import zoo

    slm, tok, _ = zoo.load(args.slm, dtype="float32", device="cpu", install=False, progress=False)
    return slm, None, tok


def example_prompts(tokenizer: Any, n: int, max_history: int, tiny: bool) -> list[tuple[list[int], list[int]]]:
    """``(private ids, public ids)`` of the first ``n`` CoGenesis test examples."""
    from logitfuse.prompts import bundled_split, load_examples, render_prompt

    out = []
    for example in load_examples(bundled_split("test"), max_examples=n):
        private = render_prompt(tokenizer, example.private_messages(max_history))
        public = render_prompt(tokenizer, example.public_messages())
        out.append((private[-256:] if tiny else private, public))  # a byte-level tokenizer makes thousands of ids
    return out


def record_or_load(args: argparse.Namespace, url: str, model: str, slm: Any, tok: Any, log=print) -> dict[str, Any]:
    if args.record and Path(args.record).is_file():
        recording = load_recording(args.record)
        log(f"replaying {args.record} (recorded {recording['recorded_utc']} against {recording['server']})")
        return recording
    prompt_format, score_method = server_formats(url, model, tok)
    if args.speculate and score_method == "none":
        raise RuntimeError(f"{url} cannot score drafts (no echo / prompt_logprobs): pass --speculate 0")
    prompts = example_prompts(tok, args.examples, args.max_history, args.tiny)
    modes = {PER_STEP: 0, **({f"speculate {args.speculate}": args.speculate} if args.speculate else {})}
    runs = {}
    for mode, k in modes.items():
        log(f"recording {mode} ({len(prompts)} examples, {args.new_tokens} tokens each, {prompt_format} prompts)")
        runs[mode] = record_runs(slm, tok, url, model, prompts, new_tokens=args.new_tokens, speculate=k,
                                 alpha=args.alpha, prompt_format=prompt_format, score_method=score_method, log=log)
    import datetime as dt

    recording = {"format": RECORD_FORMAT, "server": args.server_label, "served_model": model,
                 "prompt_format": prompt_format, "score_method": score_method, "new_tokens": args.new_tokens,
                 "alpha": args.alpha, "slm": "tiny" if args.tiny else args.slm,
                 "recorded_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "runs": runs}
    if args.record:
        from logitfuse.fileio import atomic_write_text

        atomic_write_text(Path(args.record), json.dumps(recording) + "\n")
        log(f"wrote the recording to {args.record}")
    return recording


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    slm, llm, tok = load_models(args)
    with started_server(args, llm, tok) as (url, model, label):
        args.server_label = label
        t0 = time.perf_counter()
        recording = record_or_load(args, url, model, slm, tok, log=log)
        record_s = time.perf_counter() - t0
        del slm  # nothing runs on the device side from here
        rows = fleet(recording["runs"], url, model, args.clients, new_tokens=recording["new_tokens"],
                     device_ms=args.device_ms, log=log)
    runs = recording["runs"]
    summary = {mode: {"examples": len(r), "tokens": sum(x["tokens"] for x in r),
                      "llm_calls": sum(len(x["calls"]) for x in r),
                      "requests": sum(len(c["bodies"]) for x in r for c in x["calls"]),
                      "draft_tokens_sent": sum(x["stats"].get("draft_tokens_sent", 0) for x in r),
                      "draft_tokens_kept": sum(x["stats"].get("draft_tokens_kept", 0) for x in r),
                      "held_back": sum(x["held_back"] for x in r),
                      "failed_replies": sum(x.get("failures", 0) for x in r)} for mode, r in runs.items()}
    for s in summary.values():
        s["llm_calls_per_token"] = s["llm_calls"] / s["tokens"]
        s["acceptance_rate"] = s["draft_tokens_kept"] / s["draft_tokens_sent"] if s["draft_tokens_sent"] else None
    return {"server": label, "served_model": model, "prompt_format": recording["prompt_format"],
            "score_method": recording["score_method"], "slm": recording["slm"], "alpha": recording["alpha"],
            "new_tokens": recording["new_tokens"], "clients": args.clients, "device_ms": args.device_ms,
            "recording": summary, "record_s": record_s, "rows": rows}


# ------------------------------------------------------------------------------------ output
TABLE_COLUMNS = [("clients", "N"), ("phase", "phase"), ("tokens", "tokens"), ("wall_s", "wall s"),
                 ("tokens_per_s", "tokens/s"), ("over_plain", "× plain"), ("latency_ms_p50", "ms/token p50"),
                 ("latency_ms_p99", "ms/token p99"), ("requests_per_token", "requests/token"),
                 ("llm_calls_per_token", "LLM calls/token"), ("errors", "errors"), ("top1_match", "top-1 = record"),
                 ("client_cpu_s", "client CPU s"), ("prefix_hit_rate", "prefix-cache hit rate"),
                 ("prompt_tokens_computed", "prompt tokens computed")]


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        metrics = row.get("server_metrics") or {}
        out.append({**row, "prefix_hit_rate": metrics.get("prefix_cache_hit_rate"),
                    "prompt_tokens_computed": metrics.get("prompt_tokens_computed")})
    return out


def plot(result: dict[str, Any], out_dir: str, stem: str):
    fig, axes = common.new_figure(ncols=2)
    if fig is None:
        return None
    rows = result["rows"]
    phases = list(dict.fromkeys(r["phase"] for r in rows))
    for i, phase_name in enumerate(phases):  # one colour per phase in both panels
        pts = sorted((r["clients"], r["tokens_per_s"] or 0, r["over_plain"] or 0) for r in rows if r["phase"] == phase_name)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i}", label=phase_name)
        if phase_name != PLAIN:
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], "o-", color=f"C{i}", label=phase_name)
    axes[1].axhline(0.5, color="k", lw=0.8, label="target 0.5 (N = 32, speculation)")
    clients = sorted({r["clients"] for r in rows})
    for ax, title in ((axes[0], "server tokens/s (all devices)"), (axes[1], "fused / plain tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(n) for n in clients])
        ax.set_xlabel("devices N")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['server']}; {result['new_tokens']} tokens per device", fontsize=8)
    return common.save_figure(fig, out_dir, stem)


def parse_clients(text: str) -> list[int]:
    """``--clients``: comma-separated device counts (``ValueError`` when it is not one).

    >>> parse_clients("1,2, 4")
    [1, 2, 4]
    """
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values:
        raise ValueError(text)
    return values


def add_args(parser: argparse.ArgumentParser) -> None:
    common.add_common_args(parser, device="cpu")
    parser.set_defaults(out=DEFAULT_OUT)
    where = parser.add_argument_group("the server (one of)")
    where.add_argument("--server", default=None, help="URL of a running OpenAI-compatible server (used as it is)")
    where.add_argument("--serve-zoo", default=None, metavar="NAME",
                       help="start a server on this zoo model here: `logitfuse serve` (default) or llama.cpp's")
    where.add_argument("--tiny", action="store_true", help="tiny random models, `logitfuse serve` in process (tests)")
    parser.add_argument("--engine", default="logitfuse", choices=["logitfuse", "llama.cpp"],
                        help="the server --serve-zoo starts (default logitfuse: `logitfuse serve`)")
    parser.add_argument("--served-model", default=None, help="the model name to send (default: --serve-zoo, else --slm)")
    parser.add_argument("--slm", default=DEFAULT_MODEL,
                        help=f"zoo name of the SLM that records the fused runs; it must use the served model's "
                             f"tokenizer (default {DEFAULT_MODEL})")
    parser.add_argument("--clients", default="1,2,4,8,16,32", help="device counts N, comma-separated (default 1,2,4,8,16,32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per device and phase (default 32)")
    parser.add_argument("--speculate", type=int, default=4, help="draft length K of the speculative phase; 0: none (default 4)")
    parser.add_argument("--examples", type=int, default=8, help="distinct CoGenesis test examples recorded, M (default 8)")
    parser.add_argument("--alpha", type=float, default=0.5, help="fixed fusion weight of the SLM while recording (default 0.5)")
    parser.add_argument("--max-history", type=int, default=2, help="writing-history items in the private prompt (default 2)")
    parser.add_argument("--device-ms", type=float, default=0.0, help="think time of a device before each LLM call (default 0)")
    parser.add_argument("--record", default=None, metavar="FILE",
                        help="save the recording here, or replay it when FILE exists (one server kind per file)")


def execute(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.perf_counter()
    device = common.setup(args)
    info = common.machine_info(device)
    args.clients = parse_clients(args.clients) if isinstance(args.clients, str) else args.clients
    result = run(args)
    payload = {"benchmark": "fleet", "command": common.command_line("fleet", argv), "quick": args.quick,
               "wall_s": round(time.perf_counter() - started, 1), "machine": info, **result}
    payload["loadavg_after_1_5_15"] = list(os.getloadavg())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = common.write_json(out, "results", payload)
    png = None if args.no_plot else plot(result, str(out), "results")
    table = common.markdown_table(table_rows(result["rows"]), TABLE_COLUMNS)
    print(table)
    markdown = write_markdown(out, payload, table)
    print(f"wrote {path}, {markdown}" + (f" and {png}" if png else ""))
    return 0


def write_markdown(out: Path, payload: dict[str, Any], table: str) -> Path:
    """``out/results.md``: the command, the server, the recording and the table (beside results.json)."""
    from logitfuse.fileio import atomic_write_text

    recorded = "; ".join(f"{mode}: {s['tokens']} tokens in {s['llm_calls']} LLM calls ({s['requests']} requests)"
                         + (f", acceptance {s['acceptance_rate']:.2f}" if s["acceptance_rate"] is not None else "")
                         + (f", {s['failed_replies']} replies without log-probabilities (those steps fused with the "
                            "SLM alone)" if s["failed_replies"] else "")
                         for mode, s in payload["recording"].items())
    load = payload["machine"].get("loadavg_1_5_15")
    lines = [f"# Fleet: {payload['server']}", "",
             f"`{payload['command']}`: {payload['wall_s']:.0f} s wall (recording {payload['record_s']:.0f} s), "
             f"{common.machine_line(payload['machine'])}; load average after: "
             f"{payload['loadavg_after_1_5_15'][0]:.1f}" + (f", before: {load[0]:.1f}" if load else ""), "",
             f"Served model `{payload['served_model']}` ({payload['prompt_format']} prompts, drafts scored by "
             f"{payload['score_method']}); SLM `{payload['slm']}`, α = {payload['alpha']}, "
             f"{payload['new_tokens']} tokens per device and phase. Recorded: {recorded}.", "", table, ""]
    return atomic_write_text(out / "results.md", "\n".join(lines))
