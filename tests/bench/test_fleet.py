"""`logitfuse bench fleet`: record fused runs against `logitfuse serve` on a tiny model, replay them
from N devices at once. Structure and bytes only: no timing is ever asserted."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from logitfuse.bench import fleet  # noqa: E402
from logitfuse.cli import main  # noqa: E402
from logitfuse.serve.server import serve_in_thread  # noqa: E402
from logitfuse.testing.servers import send_json, serving  # noqa: E402

NEW = 5
K = 2


@pytest.fixture(scope="module")
def server(llm_model, tok):
    server, url = serve_in_thread(llm_model, tok, model_name="tiny", log_requests=True, max_connections=64)
    yield server, url
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def recorded(server, slm, tok):
    """Per mode, the runs of two examples recorded against the server, and what the server received."""
    srv, url = server
    fmt, method = fleet.server_formats(url, "tiny", tok)
    assert (fmt, method) == ("ids", "echo")
    prompts = fleet.example_prompts(tok, 2, 2, tiny=True)
    out = {}
    for mode, k in ((fleet.PER_STEP, 0), (f"speculate {K}", K)):
        before = len(srv.received)
        runs = fleet.record_runs(slm, tok, url, "tiny", prompts, new_tokens=NEW, speculate=k, alpha=0.5,
                                 prompt_format=fmt, score_method=method, log=lambda *a: None)
        out[mode] = (runs, [bytes(b) for b in srv.received[before:]])
    return out


def _bodies(run):
    return [body for call in run["calls"] for body in call["bodies"]]


def test_the_recording_is_what_the_server_received(recorded):
    for runs, received in recorded.values():
        assert [body.encode() for run in runs for body in _bodies(run)] == received


def test_per_step_decides_one_token_per_request(recorded):
    runs, _ = recorded[fleet.PER_STEP]
    for run in runs:
        assert run["tokens"] == NEW and [c["tokens"] for c in run["calls"]] == [1] * NEW
        assert all(len(c["bodies"]) == 1 for c in run["calls"]) and run["stats"]["llm_calls"] == NEW
        prompts = [json.loads(b)["prompt"] for b in _bodies(run)]  # each request one token longer
        assert [len(p) - len(prompts[0]) for p in prompts] == list(range(NEW))


def test_speculative_calls_decide_their_kept_drafts_and_one_more(recorded):
    runs, _ = recorded[f"speculate {K}"]
    for run in runs:
        counts = [c["tokens"] for c in run["calls"]]
        assert sum(counts) == run["tokens"] == NEW and all(1 <= n <= K + 1 for n in counts)
        # independent of the per-call split: every call decides its kept drafts and one token more
        assert sum(counts) == len(run["calls"]) + run["stats"]["draft_tokens_kept"]
        assert all(json.loads(b)["echo"] for b in _bodies(run))
    # the two random models disagree: some drafts are rejected, and still fewer calls than tokens
    assert sum(r["stats"]["draft_tokens_kept"] for r in runs) < sum(r["stats"]["draft_tokens_sent"] for r in runs)
    assert sum(len(r["calls"]) for r in runs) < 2 * NEW


@pytest.mark.parametrize("clients", [1, 3])
def test_replay_sends_the_recorded_bytes(recorded, server, clients):
    srv, url = server
    for mode, (runs, _) in recorded.items():
        before = len(srv.received)
        sent = []
        result = fleet.replay(runs, url, "tiny", clients, sent=sent)
        received = [bytes(b) for b in srv.received[before:]]
        expected = [body for d in range(clients) for body in _bodies(runs[d % len(runs)])]
        assert sorted(received) == sorted(b.encode() for b in expected)  # byte for byte, whatever the interleaving
        for d in range(clients):  # each device in its recorded order
            assert [b for i, b in sent if i == d] == _bodies(runs[d % len(runs)])
        tokens = sum(runs[d % len(runs)]["tokens"] for d in range(clients))
        assert result["tokens"] == tokens and result["requests"] == len(expected) and result["errors"] == 0
        assert result["top1_match"] == 1.0  # a deterministic server answers as it did when recording
        if mode == fleet.PER_STEP:
            assert result["requests_per_token"] == 1 and result["llm_calls_per_token"] == 1
        else:
            assert result["requests_per_token"] < 1 and result["llm_calls_per_token"] < 1
        assert result["latency_ms_p50"] <= result["latency_ms_p99"]


def test_plain_completions_count_the_tokens_returned(recorded, server):
    _, url = server
    runs, _ = recorded[fleet.PER_STEP]
    bodies = fleet.plain_bodies(runs, 4, logprobs=True)  # logitfuse serve counts tokens it returns with logprobs
    assert json.loads(bodies[0])["prompt"] == json.loads(runs[0]["calls"][0]["bodies"][0])["prompt"]
    result = fleet.plain(bodies, url, "tiny", 3)
    assert result["errors"] == 0 and 3 <= result["tokens"] <= 12 and result["requests"] == 3


def test_metrics_are_summed_over_labels_and_differenced():
    text = ("# HELP vllm:prefix_cache_queries Prefix cache queries\n# TYPE vllm:prefix_cache_queries counter\n"
            'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0\n'
            'vllm:prefix_cache_queries_total{engine="1",model_name="m"} 20.0\n'
            'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 90.0\n'
            "vllm:prompt_tokens_total 120\nvllm:generation_tokens_total 7\nother_metric 3\n"
            'vllm:prompt_tokens_by_source_total{engine="0",source="local_cache_hit"} 90.0\n')

    def behave(handler, body):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(text)))
        handler.end_headers()
        handler.wfile.write(text.encode())

    with serving(behave) as fake:
        found = fleet.scrape_metrics(fake.url)
    assert found == {"prefix_cache_queries": 120.0, "prefix_cache_hits": 90.0, "prompt_tokens": 120.0,
                     "generation_tokens": 7.0}
    later = {**found, "prefix_cache_queries": 220.0, "prefix_cache_hits": 170.0, "prompt_tokens": 220.0}
    delta = fleet.metrics_delta(found, later)
    assert delta["prefix_cache_hit_rate"] == 0.8 and delta["prompt_tokens_computed"] == 20.0
    # where the server counts the tokens it computed itself, that count is the one reported
    found["prompt_tokens_local_compute"], later["prompt_tokens_local_compute"] = 30.0, 55.0
    assert fleet.metrics_delta(found, later)["prompt_tokens_computed"] == 25.0
    with serving(lambda handler, body: send_json(handler, b'{"error": "no"}', 404)) as fake:
        assert fleet.scrape_metrics(fake.url) is None


def test_cli_writes_results_and_replays_a_saved_recording(tmp_path):
    argv = ["bench", "fleet", "--tiny", "--clients", "1,3", "--examples", "2", "--new-tokens", "4", "--speculate", "2",
            "--record", str(tmp_path / "rec.json"), "--no-plot"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    first = json.loads((tmp_path / "a" / "results.json").read_text())
    assert (tmp_path / "a" / "results.md").read_text().startswith("# Fleet: logitfuse serve")
    assert [(r["clients"], r["phase"]) for r in first["rows"]] == [
        (n, p) for n in (1, 3) for p in ("plain", "per-step", "speculate 2")]
    rows = {(r["clients"], r["phase"]): r for r in first["rows"]}
    assert rows[(3, "per-step")]["tokens"] == 12 and rows[(3, "per-step")]["llm_calls_per_token"] == 1
    assert rows[(3, "speculate 2")]["llm_calls_per_token"] < 1 and rows[(3, "plain")]["over_plain"] == 1
    assert all(r["server_metrics"] is None for r in first["rows"])  # logitfuse serve has no /metrics
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0  # the saved recording, replayed
    second = json.loads((tmp_path / "b" / "results.json").read_text())
    assert second["recording"] == first["recording"] and second["record_s"] < first["record_s"] + 60


# ------------------------------------------------------------------------------------ flags
@pytest.fixture
def nothing_loads(nothing_loads, monkeypatch):
    """The shared tripwires (tests/bench/conftest.py), and the fleet's own server starts."""
    monkeypatch.setattr(fleet, "serve_in_thread", nothing_loads, raising=False)
    monkeypatch.setattr(fleet, "logitfuse_serve", nothing_loads)


@pytest.mark.parametrize("argv, fragment", [
    ([], "pass one server: --server URL (a running one), --serve-zoo NAME (started here) or --tiny"),
    (["--tiny", "--server", "http://127.0.0.1:1"], "pass one server: --server URL (a running one), --serve-zoo NAME "
                                                   "(started here) or --tiny; got --server and --tiny"),
    (["--server", "127.0.0.1:8000"], "--server '127.0.0.1:8000' must be a URL starting with http://"),
    (["--tiny", "--clients", "1,x"], "--clients '1,x' is not a comma-separated list of device counts"),
    (["--tiny", "--clients", "1,0"], "--clients 0 must be >= 1"),
    (["--tiny", "--new-tokens", "0"], "--new-tokens 0 must be >= 1"),
    (["--tiny", "--examples", "0"], "--examples 0 must be >= 1"),
    (["--tiny", "--speculate", "-1"], "--speculate -1 must be >= 0"),
    (["--tiny", "--alpha", "1"], "--alpha 1 is the SLM alone"),
    (["--tiny", "--device-ms", "-5"], "--device-ms -5 must be >= 0"),
    (["--tiny", "--engine", "llama.cpp"], "--engine llama.cpp starts llama.cpp's server on --serve-zoo NAME's GGUF"),
    (["--serve-zoo", "nope"], "--slm qwen2.5-coder-0.5b is not installed"),
    (["--server", "http://127.0.0.1:1", "--slm", "nope"], "--slm 'nope' is not a zoo model"),
])
def test_mistakes_are_one_line_before_anything_loads(argv, fragment, nothing_loads, capsys):
    code = main(["bench", "fleet", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("logitfuse bench: error: "), err
    assert fragment in err


def test_record_must_be_a_file(nothing_loads, tmp_path, capsys):
    assert main(["bench", "fleet", "--tiny", "--record", str(tmp_path)]) == 2
    assert f"--record {str(tmp_path)!r} is a folder" in capsys.readouterr().err
