"""Kernel benchmark: the fused mix (``fuse``) as Triton kernel, PyTorch eager reference and
``torch.compile`` of the reference, over batch sizes, vocabulary sizes, dense / top-k LLM inputs and
identity / cross-vocabulary maps; with ``--op combine``, the same for the N-input combine op of the
fusion rules (:mod:`logitfuse.rules.combine`): N = 2, 3, 4 inputs, rule ``mixture``, rule ``sum``
(coefficients 1, then ±0.5: logit arithmetic) and ``sum`` with the plausibility cut τ = 0.1
(contrastive decoding), at B = 1 and 16 on Qwen2.5's 151,936-token pivot vocabulary.

Effective bandwidth counts the bytes of the inputs read once and the output written once
(``fuse``: ``B·V_S·4 + B·V_L·4 + B·V_S·4`` for dense fp32 inputs; for top-k the LLM side is
``B·K·(8 + 4)``; the vocabulary map is not counted; ``combine``: ``N·B·V·4 + B·V·4``) over the median
time, and is reported as a fraction of a ``dst.copy_(src)`` bandwidth measured on the same device
in the same run. The combine kernel is timed without the host read of its empty-row check
(``logitfuse.kernels.combine.combine_forward``); the reference includes its own.

On CUDA the times come from ``triton.testing.do_bench`` (median). On CPU only the reference (eager
and compiled) is timed: the Triton interpreter is a test tool, not a speed figure.
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

import torch

from logitfuse import reference
from logitfuse.bench import common
from logitfuse.functional import prepare_arguments
from logitfuse.rules.combine import combine_reference
from logitfuse.types import TopK
from logitfuse.vocab import VocabMap

FULL_B = [1, 8, 64, 256]
FULL_V = [32000, 49152, 152064, 262144]
QUICK_B = [1, 8]
QUICK_V = [32000, 152064]
TOP_K = 20
OPS = ("fuse", "combine")
COMBINE_B = [1, 16]
COMBINE_V = [151936]
COMBINE_N = [2, 3, 4]
#: (rule, plausibility τ) of the combine rows
COMBINE_RULES = [("mixture", None), ("sum", None), ("sum", 0.1)]


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


def make_combine_inputs(n_inputs: int, batch: int, vocab: int, rule: str, device: torch.device,
                        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs, coef)`` of the combine op: N normalized random rows; mixture weights 1/N, or sum
    coefficients (1, 0.5, -0.5, 0.5, ...): a base plus expert/anti-expert differences."""
    g = torch.Generator(device=device).manual_seed(seed)
    logprobs = (torch.randn(n_inputs, batch, vocab, generator=g, device=device) * 3).log_softmax(-1)
    if rule == "mixture":
        coef = torch.full((batch, n_inputs), 1 / n_inputs, device=device)
    else:
        coef = torch.tensor([1.0] + [0.5 * (-1) ** i for i in range(n_inputs - 1)], device=device).expand(batch, -1)
    return logprobs, coef.contiguous()


def time_row(row: dict[str, Any], impls, device: torch.device, *, quick: bool, copy_bw: float) -> str | None:
    """Time each ``(name, fn)`` of ``impls`` into ``row`` (``{name}_ms``, ``_gbps``, ``_frac_copy``; the
    first call of ``compiled`` as ``compile_s``; an error as ``{name}_error``), then the speedups.
    Returns the compile error, if any."""
    compile_error = None
    nbytes = row["bytes"]
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
                compile_error = row[f"{name}_error"]
    for fast in ("triton", "compiled"):
        if row.get(f"{fast}_ms") and row.get("eager_ms"):
            row[f"{fast}_speedup_vs_eager"] = row["eager_ms"] / row[f"{fast}_ms"]
    if row.get("triton_ms") and row.get("compiled_ms"):
        row["triton_speedup_vs_compiled"] = row["compiled_ms"] / row["triton_ms"]
    return compile_error


def combine_rows(*, quick: bool, device: torch.device, batches, vocabs, inputs, compile_reference: bool,
                 copy_bw: float, log=print) -> tuple[list[dict[str, Any]], str | None]:
    """The combine op's rows (Triton on CUDA, eager reference, ``torch.compile`` of the reference)."""
    kernel = None
    if device.type == "cuda":
        from logitfuse.kernels.combine import combine_forward as kernel
    compiled, compile_error = None, None
    if compile_reference:
        try:
            compiled = torch.compile(combine_reference, dynamic=True)
        except Exception as exc:  # record, do not fail the run
            compile_error = f"{type(exc).__name__}: {exc}"
    rows = []
    for rule, plausibility in COMBINE_RULES:
        for n_inputs in inputs:
            for vocab in vocabs:
                for batch in batches:
                    logprobs, coef = make_combine_inputs(n_inputs, batch, vocab, rule, device)
                    row: dict[str, Any] = dict(op="combine", rule=rule, tau=plausibility, N=n_inputs, B=batch,
                                               V=vocab, bytes=(n_inputs + 1) * batch * vocab * 4)
                    fns = [("eager", combine_reference)]
                    if kernel is not None and n_inputs <= 4:
                        fns.insert(0, ("triton", kernel))
                    if compiled is not None:
                        fns.append(("compiled", compiled))
                    impls = [(name, functools.partial(fn, logprobs, coef, rule=rule, plausibility=plausibility))
                             for name, fn in fns]
                    error = time_row(row, impls, device, quick=quick, copy_bw=copy_bw)
                    compile_error = compile_error or error
                    rows.append(row)
                    log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                                 if not k.endswith("_error")))
                    del logprobs, coef, impls
    return rows, compile_error


def run(*, quick: bool, device: torch.device, batches=None, vocabs=None, llm_kinds=("dense", "topk"),
        map_kinds=("identity", "cross"), compile_reference: bool = True, compile_only=None, copy_mib: int = 256,
        ops=("fuse",), inputs=None, log=print) -> dict[str, Any]:
    """The rows of the ops in ``ops`` (``"fuse"``, ``"combine"``); ``batches``/``vocabs`` replace each
    op's grid, ``inputs`` the combine op's N."""
    copy_bw = common.copy_bandwidth(device, copy_mib << 20, quick=quick)
    log(f"copy bandwidth on {device}: {copy_bw / 1e9:.1f} GB/s")
    rows, compile_error = [], None
    if "fuse" in ops:
        rows, compile_error = fuse_rows(quick=quick, device=device, batches=batches, vocabs=vocabs,
                                        llm_kinds=llm_kinds, map_kinds=map_kinds, compile_reference=compile_reference,
                                        compile_only=compile_only, copy_bw=copy_bw, log=log)
    if "combine" in ops:
        more, error = combine_rows(quick=quick, device=device, batches=batches or COMBINE_B,
                                   vocabs=vocabs or COMBINE_V, inputs=inputs or COMBINE_N,
                                   compile_reference=compile_reference, copy_bw=copy_bw, log=log)
        rows, compile_error = rows + more, compile_error or error
    return {"copy_bandwidth_gbps": copy_bw / 1e9, "rows": rows, "compile_error": compile_error,
            "compile_dynamic": True, "compiled_structures": "all" if compile_only is None else sorted(compile_only),
            "ops": list(ops), "timed": [n for n in ("triton", "eager", "compiled") if any(f"{n}_ms" in r for r in rows)]}


def fuse_rows(*, quick: bool, device: torch.device, batches, vocabs, llm_kinds, map_kinds, compile_reference: bool,
              compile_only, copy_bw: float, log=print) -> tuple[list[dict[str, Any]], str | None]:
    """The two-way ``fuse`` rows (Triton on CUDA, eager reference, ``torch.compile`` of the reference)."""
    batches = batches or (QUICK_B if quick else FULL_B)
    vocabs = vocabs or (QUICK_V if quick else FULL_V)
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
                    row: dict[str, Any] = dict(op="fuse", llm=llm_kind, map=map_kind, B=batch, V=vocab, bytes=nbytes)
                    impls = [("eager", lambda a=args: reference.fuse_reference(**a))]
                    if kernel_fuse is not None:
                        impls.insert(0, ("triton", lambda a=args: kernel_fuse(**a)))
                    if compiled is not None and (compile_only is None or (llm_kind, map_kind) in compile_only):
                        impls.append(("compiled", lambda a=args: compiled(**a)))
                    error = time_row(row, impls, device, quick=quick, copy_bw=copy_bw)
                    compile_error = compile_error or error
                    rows.append(row)
                    log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                                 if not k.endswith("_error")))
                    del args
    return rows, compile_error


def plot(result: dict[str, Any], out_dir: str, stem: str):
    fuse = [r for r in result["rows"] if r.get("op", "fuse") == "fuse"]
    if not fuse:
        return plot_combine(result, out_dir, stem)
    return common.plot_per_vocab_size(
        fuse, out_dir, stem, impls=(("triton", "-o"), ("compiled", "--s"), ("eager", ":^")), metric="gbps",
        ylabel="effective GB/s", title="fuse, {llm_kind} LLM, identity map", keep=lambda r: r["map"] == "identity",
        hline=(result["copy_bandwidth_gbps"], "copy bandwidth"))


def plot_combine(result: dict[str, Any], out_dir: str, stem: str):
    """The combine rows: effective GB/s against N, one panel per rule, a line per implementation and B."""
    rows = result["rows"]
    rules = sorted({(r["rule"], r["tau"] or 0.0) for r in rows})
    fig, axes = common.new_figure(ncols=len(rules), width=4.5)
    if fig is None:
        return common.save_figure(fig, out_dir, stem)
    for ax, (rule, tau) in zip(axes, rules):
        for impl, style in (("triton", "-o"), ("compiled", "--s"), ("eager", ":^")):
            for batch in sorted({r["B"] for r in rows}):
                pts = [(r["N"], r[f"{impl}_gbps"]) for r in rows
                       if (r["rule"], r["tau"] or 0.0) == (rule, tau) and r["B"] == batch and f"{impl}_gbps" in r]
                if pts:
                    ax.plot(*zip(*sorted(pts)), style, label=f"{impl} B={batch}", markersize=4)
        ax.axhline(result["copy_bandwidth_gbps"], color="k", lw=0.8, label="copy bandwidth")
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["N"] for r in rows}))
        ax.set_xlabel("inputs N")
        ax.set_ylabel("effective GB/s")
        ax.set_title(f"combine, {rule}" + (f", cut τ={tau:g}" if tau else "") + f", V={rows[0]['V']}")
        ax.legend(fontsize=6, ncol=2)
    return common.save_figure(fig, out_dir, stem)


TABLE_COLUMNS = [("llm", "LLM"), ("map", "map"), ("B", "B"), ("V", "V"), ("triton_ms", "Triton ms"),
                 ("eager_ms", "eager ms"), ("compiled_ms", "compiled ms"), ("triton_frac_copy", "Triton / copy BW"),
                 ("eager_frac_copy", "eager / copy BW"), ("compiled_frac_copy", "compiled / copy BW"),
                 ("triton_speedup_vs_eager", "Triton × eager"), ("triton_speedup_vs_compiled", "Triton × compiled"),
                 ("compiled_speedup_vs_eager", "compiled × eager")]
#: the combine rows' table: the rule, τ and N in place of the LLM input and the map
COMBINE_COLUMNS = [("rule", "rule"), ("tau", "τ"), ("N", "N"), *TABLE_COLUMNS[2:]]
#: both ops in one table
BOTH_COLUMNS = [("op", "op"), *TABLE_COLUMNS[:2], *COMBINE_COLUMNS[:3], *TABLE_COLUMNS[2:]]


def add_args(parser: argparse.ArgumentParser) -> None:
    common.add_common_args(parser)
    parser.add_argument("--op", nargs="+", choices=OPS, default=["fuse"],
                        help="which ops to time: fuse (two-way mix, the default) and/or combine (N-input fusion rules: "
                             f"N = {', '.join(map(str, COMBINE_N))}, B = {', '.join(map(str, COMBINE_B))}, "
                             f"V = {COMBINE_V[0]} unless --batch/--vocab/--inputs say otherwise)")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: the grid)")
    parser.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes (default: the grid)")
    parser.add_argument("--inputs", type=int, nargs="+", choices=range(1, 9), metavar="N",
                        help=f"numbers of inputs of the combine rows, 1 to 8 (default {' '.join(map(str, COMBINE_N))}; "
                             "above 4 there is no kernel)")
    parser.add_argument("--copy-mib", type=int, default=256, help="buffer size of the copy-bandwidth measurement (default 256 MiB)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--compile-only", nargs="+", metavar="LLM:MAP",
                        help="fuse rows: compile the reference only for these structures, e.g. dense:identity "
                             "(saves compile time)")


def execute(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.perf_counter()
    device = common.setup(args)
    info = common.machine_info(device)
    ops = tuple(op for op in OPS if op in args.op)
    result = run(quick=args.quick, device=device, batches=args.batch, vocabs=args.vocab,
                 compile_reference=not args.no_compile,
                 compile_only={tuple(x.split(":")) for x in args.compile_only} if args.compile_only else None,
                 copy_mib=args.copy_mib, ops=ops, inputs=args.inputs)
    stem = f"kernels_{device.type}" + ("_quick" if args.quick else "") + ("" if ops == ("fuse",) else "_" + "_".join(ops))
    columns = {("fuse",): TABLE_COLUMNS, ("combine",): COMBINE_COLUMNS}.get(ops, BOTH_COLUMNS)
    fuse_settings = dict(top_k=TOP_K, mode="linear", tail="slm") if "fuse" in ops else {}
    return common.report(args, "kernels", argv, started, info, stem, result, plot, columns, dtype="float32",
                         **fuse_settings)
