"""Training-memory benchmark: peak memory and step time of training a fusion head through an
O(N)-memory fused cross-entropy vs the naive path that materializes the fused ``(N, V)``
log-probabilities and backpropagates through them, at N ∈ {1024, 4096, 16384} tokens, V = 49152.

Both paths train the same :class:`~logitfuse.FusionHead` (linear mode, SLM tail, dense LLM logits,
identity map) for one AdamW step per iteration. The head's input features are computed the same way
in both (in row chunks, without grad), so the paths differ only in the loss:

- ``naive``: ``logitfuse.reference.fused_cross_entropy_reference`` with autograd through the
  materialized fused log-probabilities (what a plain PyTorch implementation does).
- ``fused``: on CUDA the Triton kernel (``logitfuse.fused_cross_entropy``: ``log Z`` and its
  α-derivative online, nothing of size ``(N, V)`` kept). On CPU (no kernel there) the exact O(N)
  route of ``logitfuse.train_fuser.scoring``: ``linear_terms`` in row chunks without grad gives
  three numbers per token (``log p_S(y)``, ``log p_L(y)``, ``log Σ p_L``), and ``linear_nll`` is the
  exact linear-mode loss from them, differentiable in α.

Peak memory: each configuration runs in its own subprocess. On CUDA, ``torch.cuda.max_memory_allocated``
after the inputs are allocated, minus what the inputs hold; on CPU, the process's peak resident set
(``getrusage(RUSAGE_SELF).ru_maxrss``) minus its value right after the inputs were allocated. The
inputs (two ``(N, V)`` float32 logit tensors, ``8·N·V`` bytes) are the same in both paths and are
reported separately.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from logitfuse.bench import common

FULL_N = [1024, 4096, 16384]
QUICK_N = [256, 1024]
VOCAB = 49152
CHUNK = 512
#: fp32 (N, V) tensors alive at the naive path's peak (measured ~9 on CPU at N = 4096; a guard only)
NAIVE_TENSORS = 10


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def worker(path: str, n: int, vocab: int, device: torch.device, steps: int, warmup: int = 1) -> dict[str, Any]:
    """One configuration, in this process: returns step times and peak memory above the inputs."""
    from logitfuse import reference
    from logitfuse.functional import fused_cross_entropy, prepare_arguments
    from logitfuse.heads import FusionHead
    from logitfuse.train_fuser.scoring import linear_nll, linear_terms
    from logitfuse.vocab import VocabMap

    torch.manual_seed(0)
    vmap = VocabMap.identity(vocab, vocab)
    head = FusionHead(vocab, vocab).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    slm = torch.randn(n, vocab, device=device).mul_(3)
    llm = torch.randn(n, vocab, device=device).mul_(3)
    targets = torch.randint(0, vocab, (n,), device=device)
    common.synchronize(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = _rss_bytes()

    def features_chunked() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([head.features(slm[i:i + CHUNK], llm[i:i + CHUNK], vmap) for i in range(0, n, CHUNK)])

    def step() -> float:  # one AdamW step; returns the loss
        feats = features_chunked()
        alpha = head.alpha_from_features(feats)
        if path == "naive":
            args = prepare_arguments(slm, llm, vmap, alpha, "linear", "slm", 1.0, 1.0, validate=False)
            loss = reference.fused_cross_entropy_reference(**args, targets=targets, ignore_index=-100).mean()
        elif device.type == "cuda":
            loss = fused_cross_entropy(slm, llm, targets, alpha=alpha, vocab_map=vmap, validate=False).mean()
        else:
            with torch.no_grad():
                terms = torch.cat([linear_terms(slm[i:i + CHUNK], llm[i:i + CHUNK], targets[i:i + CHUNK], vmap, "slm", 1)[1]
                                   for i in range(0, n, CHUNK)])
            loss = linear_nll(alpha, terms).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    losses = []
    timing = common.measure(lambda: losses.append(step()), device, warmup=warmup, repeat=steps)
    loss = losses[-1]
    if device.type == "cuda":
        peak_above = torch.cuda.max_memory_allocated(device) - base
        meter = "torch.cuda.max_memory_allocated - allocated after inputs"
    else:
        peak_above = _rss_bytes() - base
        meter = "ru_maxrss - ru_maxrss after inputs (subprocess)"
    return {"path": path, "N": n, "V": vocab, "step_ms": timing["median_s"] * 1e3, "steps": timing["n"], "warmup_steps": warmup,
            "peak_above_inputs_mib": peak_above / 2**20, "inputs_mib": 2 * n * vocab * 4 / 2**20,
            "peak_total_mib": (peak_above + 2 * n * vocab * 4) / 2**20, "loss": loss, "meter": meter}


def run_subprocess(path: str, n: int, vocab: int, device: torch.device, steps: int, warmup: int, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "logitfuse.bench.train", "--worker", path, str(n), str(vocab), str(device), str(steps),
           str(torch.get_num_threads()), str(warmup)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"path": path, "N": n, "V": vocab, "skipped": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
    return {"path": path, "N": n, "V": vocab, "skipped": f"worker failed: {why}: {proc.stderr.strip()[-300:]}"}


def run(*, quick: bool, device: torch.device, ns=None, vocab: int = VOCAB, steps: int | None = None,
        warmup: int | None = None, memory_fraction: float = 0.6, timeout: float = 600.0, log=print) -> dict[str, Any]:
    ns = ns or (QUICK_N if quick else FULL_N)
    steps = steps or (1 if quick else 3)
    # a CPU step at N=1024 takes tens of seconds on a loaded 2-core machine: --quick drops no warm-up
    warmup = warmup if warmup is not None else (0 if quick else 1)
    rows = []
    for n in ns:
        pair = {}
        for path in ("fused", "naive"):
            estimate = NAIVE_TENSORS * n * vocab * 4 if path == "naive" else 4 * CHUNK * vocab * 4
            if device.type == "cuda":
                free = torch.cuda.mem_get_info(device)[0]
            else:
                free = _mem_available()
            if free is not None and estimate + 2 * n * vocab * 4 > memory_fraction * free:
                row = {"path": path, "N": n, "V": vocab,
                       "skipped": f"estimated {(estimate + 8 * n * vocab) / 2**30:.1f} GiB > {memory_fraction:.0%} of "
                                  f"{free / 2**30:.1f} GiB available"}
            else:
                row = run_subprocess(path, n, vocab, device, steps, warmup, timeout)
            pair[path] = row
            rows.append(row)
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        f, nv = pair["fused"], pair["naive"]
        if "peak_above_inputs_mib" in f and "peak_above_inputs_mib" in nv:
            # None when the naive path's peak did not rise above the inputs (tiny sizes: RSS pages already held)
            f["memory_ratio_vs_naive"] = (f["peak_above_inputs_mib"] / nv["peak_above_inputs_mib"]
                                          if nv["peak_above_inputs_mib"] > 0 else None)
            f["memory_ratio_total_vs_naive"] = f["peak_total_mib"] / nv["peak_total_mib"] if nv["peak_total_mib"] > 0 else None
            f["speedup_vs_naive"] = nv["step_ms"] / f["step_ms"]
    return {"rows": rows, "chunk": CHUNK,
            "fused_impl": "Triton fused_cross_entropy" if device.type == "cuda" else
            "chunked linear_terms + linear_nll (train_fuser.scoring), exact for linear mode"}


def plot(result: dict[str, Any], out_dir: str, stem: str):
    fig, axes = common.new_figure(ncols=2)
    if fig is None:
        return None
    for path, style in (("fused", "-o"), ("naive", "--s")):
        pts = [(r["N"], r["peak_above_inputs_mib"], r["step_ms"]) for r in result["rows"] if r["path"] == path and "step_ms" in r]
        if pts:
            xs, mem, ms = zip(*pts)
            axes[0].plot(xs, mem, style, label=path)
            axes[1].plot(xs, ms, style, label=path)
    for ax, label in zip(axes, ("peak memory above inputs (MiB)", "step time (ms)")):
        ax.set_xscale("log")
        if all(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
            ax.set_yscale("log")
        ax.set_xlabel("tokens N (V = 49152)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    axes[0].set_title("head training: memory")
    axes[1].set_title("head training: step time")
    return common.save_figure(fig, out_dir, stem)


TABLE_COLUMNS = [("path", "path"), ("N", "N"), ("V", "V"), ("step_ms", "step ms"), ("peak_above_inputs_mib", "peak above inputs MiB"),
                 ("inputs_mib", "inputs MiB"), ("memory_ratio_vs_naive", "memory / naive"),
                 ("memory_ratio_total_vs_naive", "memory incl. inputs / naive"), ("speedup_vs_naive", "× naive speed"),
                 ("skipped", "skipped")]


def add_args(parser: argparse.ArgumentParser) -> None:
    common.add_common_args(parser)
    parser.add_argument("--n", type=int, nargs="+", help="token counts (default 256 1024 with --quick, else 1024 4096 16384)")
    parser.add_argument("--vocab", type=int, default=VOCAB, help=f"vocabulary size (default {VOCAB})")
    parser.add_argument("--steps", type=int, help="timed steps (default 1 quick, 3 full)")
    parser.add_argument("--warmup", type=int, help="dropped warm-up steps (default 0 quick, 1 full)")


def execute(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.perf_counter()
    device = common.setup(args)
    info = common.machine_info(device)
    result = run(quick=args.quick, device=device, ns=args.n, vocab=args.vocab, steps=args.steps, warmup=args.warmup)
    stem = f"train_{device.type}" + ("_quick" if args.quick else "")
    return common.report(args, "train", argv, started, info, stem, result, plot, TABLE_COLUMNS, mode="linear", tail="slm")


def worker_main(argv: list[str] | None = None) -> int:
    """``python -m logitfuse.bench.train --worker PATH N V DEVICE STEPS THREADS WARMUP``: one
    configuration in a fresh process (:func:`run_subprocess`); prints its row as one JSON line."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["--worker"] or len(argv) != 8:
        print("internal entry point of `logitfuse bench train` (run that instead)", file=sys.stderr)
        return 2
    path, n, vocab, device, steps, threads, warmup = argv[1:8]
    torch.set_num_threads(int(threads))
    print(json.dumps(worker(path, int(n), int(vocab), torch.device(device), int(steps), int(warmup))))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(worker_main())
