"""Smoke tests of the benchmarks (logitfuse.bench): each runs at a tiny size and writes well-formed
JSON. Structure only: no timing is ever asserted (timings on a shared CPU mean nothing)."""

from __future__ import annotations

import argparse
import json

import pytest

torch = pytest.importorskip("torch")

from logitfuse.bench import BENCHMARKS  # noqa: E402
from logitfuse.bench.cli import add_bench_subcommand  # noqa: E402


def _read(path) -> dict:
    payload = json.loads(path.read_text(encoding="utf-8"))
    for key in ("benchmark", "command", "machine", "rows"):
        assert key in payload, key
    assert payload["machine"]["versions"]["torch"]
    assert isinstance(payload["rows"], list) and payload["rows"]
    return payload


def test_cli_registers_every_benchmark():
    parser = argparse.ArgumentParser(prog="logitfuse")
    add_bench_subcommand(parser.add_subparsers(dest="command"))
    for name in BENCHMARKS:
        args = parser.parse_args(["bench", name, "--quick", "--out", "x", "--device", "cpu"])
        assert callable(args.func) and args.quick and args.out == "x"


def test_kernels_writes_json(tmp_path):
    from logitfuse.bench import kernels

    assert kernels.main(["--quick", "--batch", "2", "--vocab", "64", "--no-compile", "--copy-mib", "4",
                         "--device", "cpu", "--out", str(tmp_path)]) == 0
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
    from logitfuse.bench import sampling

    assert sampling.main(["--quick", "--batch", "2", "--vocab", "64", "--device", "cpu", "--out", str(tmp_path)]) == 0
    payload = _read(tmp_path / "sampling_cpu_quick.json")
    assert payload["flashinfer"] is False
    assert all(r["fused_ms"] > 0 and r["mix_then_sort_ms"] > 0 for r in payload["rows"])


def test_sort_top_p_sample_draws_from_the_nucleus():
    from logitfuse.bench.sampling import sort_top_p_sample

    logprobs = torch.tensor([[0.0, -30.0, -30.0, -30.0]]).log_softmax(-1).expand(5, 4)
    ids = sort_top_p_sample(logprobs, 0.9, torch.Generator().manual_seed(0))
    assert ids.tolist() == [0] * 5


def test_decode_tiny_writes_json(tmp_path):
    from logitfuse.bench import decode

    argv = ["--tiny", "--batch", "1", "--new-tokens", "3", "--paper-tokens", "3", "--device", "cpu", "--out", str(tmp_path)]
    assert decode.main(argv) == 0
    payload = _read(tmp_path / "decode_cpu_tiny.json")
    configs = [(r["config"], r["B"]) for r in payload["rows"]]
    assert configs == [("slm", 1), ("llm", 1), ("fused", 1), ("fused", 1), ("paper_loop", 1)]
    fused = [r for r in payload["rows"] if r["config"] == "fused"]
    assert all(r["llm_calls"] == 3 and "fusion_overhead_frac_in_loop" in r for r in fused)
    assert payload["rows"][-1]["fused_speedup"] > 0 and payload["models"]["tiny"] is True


def test_train_writes_json(tmp_path, monkeypatch):
    from logitfuse.bench import train

    # the worker in this process instead of a fresh interpreter per configuration (two torch imports
    # would cost ~10 s each on a loaded 2-core machine); the memory figures are then meaningless,
    # the JSON structure is what is tested
    def in_process(path, n, vocab, device, steps, warmup, timeout):
        return train.worker(path, n, vocab, device, steps, warmup)

    monkeypatch.setattr(train, "run_subprocess", in_process)

    argv = ["--n", "64", "--vocab", "128", "--steps", "1", "--warmup", "0", "--device", "cpu", "--out", str(tmp_path)]
    assert train.main(argv) == 0
    payload = _read(tmp_path / "train_cpu.json")
    paths = {r["path"]: r for r in payload["rows"]}
    assert set(paths) == {"fused", "naive"}
    for row in paths.values():
        assert "skipped" not in row, row.get("skipped")
        assert row["step_ms"] > 0 and row["N"] == 64 and row["V"] == 128
    # both paths compute the same loss (the O(N) route is exact for linear mode)
    assert paths["fused"]["loss"] == pytest.approx(paths["naive"]["loss"], rel=1e-4)
    assert "memory_ratio_vs_naive" in paths["fused"]
