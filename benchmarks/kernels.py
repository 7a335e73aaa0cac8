"""Kernel benchmark: the fused mix (``fuse``) as Triton kernel, PyTorch eager reference and
``torch.compile`` of the reference, over batch sizes, vocabulary sizes, dense / top-k LLM inputs and
identity / cross-vocabulary maps.

Effective bandwidth counts the bytes of both inputs read once and the output written once
(``B·V_S·4 + B·V_L·4 + B·V_S·4`` for dense fp32 inputs; for top-k the LLM side is ``B·K·(8 + 4)``;
the vocabulary map is not counted) over the median time, and is reported as a fraction of a
``dst.copy_(src)`` bandwidth measured on the same device in the same run.

On CUDA the times come from ``triton.testing.do_bench`` (median). On CPU only the reference (eager
and compiled) is timed: the Triton interpreter is a test tool, not a speed figure.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from logitfuse import reference
from logitfuse.bench import common
from logitfuse.functional import prepare_arguments
from logitfuse.types import TopK
from logitfuse.vocab import VocabMap

FULL_B = [1, 8, 64, 256]
FULL_V = [32000, 49152, 152064, 262144]
QUICK_B = [1, 8]
QUICK_V = [32000, 152064]
TOP_K = 20


def make_inputs(batch: int, vocab: int, llm_kind: str, map_kind: str, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Validated keyword arguments of ``fuse_reference`` / the kernel for one configuration."""
    # drawn on the device itself: creating (256, 262144) inputs on the host would dominate a GPU run
    g = torch.Generator(device=device).manual_seed(seed)
    slm = torch.randn(batch, vocab, generator=g, device=device) * 3
    if map_kind == "identity":
        vmap = VocabMap.identity(vocab, vocab)
    else:  # a permutation of the LLM vocabulary with 10% of SLM tokens unmapped
        gc = torch.Generator().manual_seed(seed)
        perm = torch.randperm(vocab, generator=gc)
        perm[torch.rand(vocab, generator=gc) < 0.1] = -1
        vmap = VocabMap(perm, vocab)
    if llm_kind == "dense":
        llm: Any = torch.randn(batch, vocab, generator=g, device=device) * 3
    else:
        dense = torch.randn(batch, vocab, generator=g, device=device) * 3
        lp, ids = dense.log_softmax(-1).topk(TOP_K, dim=-1)
        llm = TopK(ids, lp)
    args = prepare_arguments(slm, llm, vmap, 0.5, "linear", "slm", 1.0, 1.0, validate=False)
    return args


def traffic_bytes(args: dict[str, Any]) -> int:
    slm = args["slm_logits"]
    batch, v_slm = slm.shape
    llm = args["llm"]
    if isinstance(llm, TopK):
        llm_bytes = llm.ids.numel() * llm.ids.element_size() + llm.logprobs.numel() * llm.logprobs.element_size()
    else:
        llm_bytes = llm.numel() * llm.element_size()
    return slm.numel() * slm.element_size() + llm_bytes + batch * v_slm * 4


def run(*, quick: bool, device: torch.device, batches=None, vocabs=None, llm_kinds=("dense", "topk"),
        map_kinds=("identity", "cross"), compile_reference: bool = True, compile_only=None, copy_mib: int = 256,
        log=print) -> dict[str, Any]:
    batches = batches or (QUICK_B if quick else FULL_B)
    vocabs = vocabs or (QUICK_V if quick else FULL_V)
    copy_bw = common.copy_bandwidth(device, copy_mib << 20, quick=quick)
    log(f"copy bandwidth on {device}: {copy_bw / 1e9:.1f} GB/s")
    kernel_fuse = None
    if device.type == "cuda":
        from logitfuse import kernels

        kernel_fuse = kernels.OPS.fuse
    compiled = None
    compile_error = None
    if compile_reference:
        try:
            import torch._dynamo

            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            # dynamic shapes: one compile per input structure (+ one for B = 1, which dynamo
            # specializes); a static compile per shape takes ~45 s on 2 CPU cores
            compiled = torch.compile(reference.fuse_reference, dynamic=True)
        except Exception as exc:  # record, do not fail the run
            compile_error = f"{type(exc).__name__}: {exc}"
    rows = []
    for llm_kind in llm_kinds:
        for map_kind in map_kinds:
            for vocab in vocabs:
                for batch in batches:
                    args = make_inputs(batch, vocab, llm_kind, map_kind, device)
                    nbytes = traffic_bytes(args)
                    row: dict[str, Any] = dict(llm=llm_kind, map=map_kind, B=batch, V=vocab, bytes=nbytes)
                    impls = [("eager", lambda a=args: reference.fuse_reference(**a))]
                    if kernel_fuse is not None:
                        impls.insert(0, ("triton", lambda a=args: kernel_fuse(**a)))
                    if compiled is not None and (compile_only is None or (llm_kind, map_kind) in compile_only):
                        impls.append(("compiled", lambda a=args: compiled(**a)))
                    for name, fn in impls:
                        try:
                            if name == "compiled":  # the first call compiles: timed once, on its own
                                row["compile_s"] = common.measure(fn, device, warmup=0, repeat=1)["median_s"]
                            t = common.time_fn(fn, device, quick=quick)["median_s"]
                            row[f"{name}_ms"] = t * 1e3
                            row[f"{name}_gbps"] = nbytes / t / 1e9
                            row[f"{name}_frac_copy"] = nbytes / t / copy_bw
                        except Exception as exc:
                            row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                            if name == "compiled":
                                compile_error = compile_error or row[f"{name}_error"]
                    for fast in ("triton", "compiled"):
                        if row.get(f"{fast}_ms") and row.get("eager_ms"):
                            row[f"{fast}_speedup_vs_eager"] = row["eager_ms"] / row[f"{fast}_ms"]
                    if row.get("triton_ms") and row.get("compiled_ms"):
                        row["triton_speedup_vs_compiled"] = row["compiled_ms"] / row["triton_ms"]
                    rows.append(row)
                    log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                                 if not k.endswith("_error")))
                    del args
    return {"copy_bandwidth_gbps": copy_bw / 1e9, "rows": rows, "compile_error": compile_error,
            "compile_dynamic": True, "compiled_structures": "all" if compile_only is None else sorted(compile_only),
            "timed": [n for n in ("triton", "eager", "compiled") if any(f"{n}_ms" in r for r in rows)]}


def plot(result: dict[str, Any], out_dir: str, stem: str):
    return common.plot_per_vocab_size(
        result["rows"], out_dir, stem, impls=(("triton", "-o"), ("compiled", "--s"), ("eager", ":^")), metric="gbps",
        ylabel="effective GB/s", title="fuse, {llm_kind} LLM, identity map", keep=lambda r: r["map"] == "identity",
        hline=(result["copy_bandwidth_gbps"], "copy bandwidth"))


TABLE_COLUMNS = [("llm", "LLM"), ("map", "map"), ("B", "B"), ("V", "V"), ("triton_ms", "Triton ms"),
                 ("eager_ms", "eager ms"), ("compiled_ms", "compiled ms"), ("triton_frac_copy", "Triton / copy BW"),
                 ("eager_frac_copy", "eager / copy BW"), ("compiled_frac_copy", "compiled / copy BW"),
                 ("triton_speedup_vs_eager", "Triton × eager"), ("triton_speedup_vs_compiled", "Triton × compiled"),
                 ("compiled_speedup_vs_eager", "compiled × eager")]


def add_args(parser: argparse.ArgumentParser) -> None:
    common.add_common_args(parser)
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: the grid)")
    parser.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes (default: the grid)")
    parser.add_argument("--copy-mib", type=int, default=256, help="buffer size of the copy-bandwidth measurement (default 256 MiB)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--compile-only", nargs="+", metavar="LLM:MAP",
                        help="compile the reference only for these structures, e.g. dense:identity (saves compile time)")


def execute(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.perf_counter()
    device = common.setup(args)
    info = common.machine_info(device)
    result = run(quick=args.quick, device=device, batches=args.batch, vocabs=args.vocab,
                 compile_reference=not args.no_compile,
                 compile_only={tuple(x.split(":")) for x in args.compile_only} if args.compile_only else None,
                 copy_mib=args.copy_mib)
    stem = f"kernels_{device.type}" + ("_quick" if args.quick else "")
    return common.report(args, "kernels", argv, started, info, stem, result, plot, TABLE_COLUMNS,
                         top_k=TOP_K, dtype="float32", mode="linear", tail="slm")

