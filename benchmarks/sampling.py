"""Sampling benchmark: fused mix-and-sample (``fuse_sample``) against the reference pipeline (mix,
then torch sort-based top-p and ``torch.multinomial``), and against FlashInfer's
``flashinfer.sampling.top_p_sampling_from_probs`` on the mixed distribution when FlashInfer is
importable (CUDA only).

On CUDA ``fuse_sample`` is the Triton kernel (nothing of size ``(B, V)`` written but per-block
partials); on CPU it is the reference (``logitfuse.reference.fuse_sample_reference``), which is what
a CPU user gets, so the CPU figures compare two torch pipelines.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from logitfuse import reference
from logitfuse.bench import common
from logitfuse.bench.kernels import make_inputs

FULL_B = [1, 8, 64, 256]
FULL_V = [32000, 152064, 262144]
QUICK_B = [1, 8]
QUICK_V = [32000, 152064]
TOP_P = 0.9


def sort_top_p_sample(fused_logprobs: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """The usual torch pipeline (HF ``TopPLogitsWarper`` style): softmax, sort, cumsum, mask, multinomial."""
    probs = fused_logprobs.softmax(dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    drawn = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(1, drawn).squeeze(1)


def _flashinfer():
    try:
        import flashinfer.sampling as fs  # noqa: F401

        return fs
    except Exception:
        return None


def run(*, quick: bool, device: torch.device, batches=None, vocabs=None, llm_kinds=("dense", "topk"), log=print) -> dict[str, Any]:
    batches = batches or (QUICK_B if quick else FULL_B)
    vocabs = vocabs or (QUICK_V if quick else FULL_V)
    fused_sample = reference.fuse_sample_reference
    fuse = reference.fuse_reference
    if device.type == "cuda":
        from logitfuse import kernels

        fused_sample, fuse = kernels.OPS.fuse_sample, kernels.OPS.fuse
    fs = _flashinfer() if device.type == "cuda" else None
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for llm_kind in llm_kinds:
        for vocab in vocabs:
            for batch in batches:
                args = make_inputs(batch, vocab, llm_kind, "identity", device)
                sample_args = dict(args, temperature=torch.ones(batch, device=device),
                                   top_k=torch.zeros(batch, dtype=torch.long, device=device),
                                   top_p=torch.full((batch,), TOP_P, device=device))
                uniform = torch.rand(batch, device=device, generator=gen)
                impls = [
                    ("fused", lambda a=sample_args, u=uniform: fused_sample(**a, uniform=u)),
                    ("mix_then_sort", lambda a=args: sort_top_p_sample(fuse(**a), TOP_P, gen)),
                ]
                if fs is not None:
                    impls.append(("mix_then_flashinfer",
                                  lambda a=args: fs.top_p_sampling_from_probs(fuse(**a).softmax(-1), TOP_P, generator=gen)))
                row: dict[str, Any] = dict(llm=llm_kind, B=batch, V=vocab, top_p=TOP_P)
                for name, fn in impls:
                    try:
                        row[f"{name}_ms"] = common.time_fn(fn, device, quick=quick)["median_s"] * 1e3
                    except Exception as exc:
                        row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                if row.get("fused_ms") and row.get("mix_then_sort_ms"):
                    row["fused_speedup_vs_sort"] = row["mix_then_sort_ms"] / row["fused_ms"]
                if row.get("fused_ms") and row.get("mix_then_flashinfer_ms"):
                    row["fused_speedup_vs_flashinfer"] = row["mix_then_flashinfer_ms"] / row["fused_ms"]
                rows.append(row)
                log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return {"rows": rows, "flashinfer": fs is not None,
            "fused_impl": "triton kernel" if device.type == "cuda" else "torch reference (fuse_sample_reference)"}


def plot(result: dict[str, Any], out_dir: str, stem: str):
    return common.plot_per_vocab_size(
        result["rows"], out_dir, stem, impls=(("fused", "-o"), ("mix_then_sort", "--s"), ("mix_then_flashinfer", ":^")),
        metric="ms", ylabel="median ms per call", title=f"top-p {TOP_P} sampling, {{llm_kind}} LLM")


TABLE_COLUMNS = [("llm", "LLM"), ("B", "B"), ("V", "V"), ("fused_ms", "fused ms"), ("mix_then_sort_ms", "mix + sort ms"),
                 ("mix_then_flashinfer_ms", "mix + FlashInfer ms"), ("fused_speedup_vs_sort", "fused × sort"),
                 ("fused_speedup_vs_flashinfer", "fused × FlashInfer")]


def add_args(parser: argparse.ArgumentParser) -> None:
    common.add_common_args(parser)
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: the grid)")
    parser.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes (default: the grid)")


def execute(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.perf_counter()
    device = common.setup(args)
    info = common.machine_info(device)
    result = run(quick=args.quick, device=device, batches=args.batch, vocabs=args.vocab)
    stem = f"sampling_{device.type}" + ("_quick" if args.quick else "")
    return common.report(args, "sampling", argv, started, info, stem, result, plot, TABLE_COLUMNS, mode="linear", tail="slm")

