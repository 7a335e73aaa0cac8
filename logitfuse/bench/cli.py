"""``logitfuse bench {kernels,sampling,decode,train}``: register with :func:`add_bench_subcommand`."""

from __future__ import annotations

import argparse
import importlib
import sys

from logitfuse.bench import BENCHMARKS

_HELP = {
    "kernels": "fused mix: Triton kernel vs eager vs torch.compile, bandwidth vs copy",
    "sampling": "fused mix-and-sample vs mix + sort-based top-p (+ FlashInfer when installed)",
    "decode": "tokens/s: SLM alone, LLM alone, fused (CoGenesisLogitsProcessor), paper-shaped loop",
    "train": "peak memory and step time: O(N) fused cross-entropy vs naive (N, V) log-probs",
}


def _module(name: str):
    return importlib.import_module(f"logitfuse.bench.{name}")


def _runner(name: str):
    def run(args: argparse.Namespace) -> int:
        # for the JSON's command line: what followed the benchmark's name (`logitfuse bench NAME ...`
        # or `python -m logitfuse.bench.cli NAME ...`)
        argv = sys.argv[1:]
        argv = argv[argv.index(name) + 1:] if name in argv else []
        return _module(name).execute(args, argv)

    return run


def add_bench_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench`` with one sub-subcommand per benchmark; each sets ``func`` (args -> exit status)."""
    bench = subparsers.add_parser("bench", help="run the benchmarks (JSON + PNG under --out)",
                                  description="Benchmarks of logitfuse; each writes one JSON and one PNG.")
    inner = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    inner.required = True
    for name in BENCHMARKS:
        parser = inner.add_parser(name, help=_HELP[name], description=_HELP[name])
        _module(name).add_args(parser)
        parser.set_defaults(func=_runner(name))
    parser = inner.add_parser("plot", help="redraw PNGs from benchmark JSON files (e.g. ones written with --no-plot)")
    parser.add_argument("files", nargs="+", help="JSON files written by `logitfuse bench ...`")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: next to each JSON)")
    parser.set_defaults(func=_run_replot)


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


def _run_replot(args: argparse.Namespace) -> int:
    for png in replot(args.files, args.out):
        print(f"wrote {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m logitfuse.bench.cli NAME [options]`` without the main CLI."""
    parser = argparse.ArgumentParser(prog="logitfuse")
    add_bench_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
