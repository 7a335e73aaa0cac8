"""The ``logitfuse`` command line.

One subcommand per module of work; each is registered by a ``_add_<name>(subparsers)`` function that
sets ``func`` on its parser (listed in ``_SUBCOMMANDS``), so a new command never touches :func:`main`.

    logitfuse demo | generate ...                 (logitfuse.cli.demo)
    logitfuse serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] ...
    logitfuse train ... / eval ... / finetune ... (logitfuse.cli.train)
    logitfuse judge ...                           (logitfuse.cli.judge)
    logitfuse models {list,install,path}          (logitfuse.zoo)
    logitfuse bench {kernels,sampling,decode,train,remote,plot}   (logitfuse.bench: benchmarks/)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from logitfuse.errors import UsageError

__all__ = ["build_parser", "main"]


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2 (the usage is in --help)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


# ------------------------------------------------------------------------------------- serve
def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a local transformers model over an OpenAI-compatible /v1/completions endpoint",
        description=(
            "Serve a local causal LM with top-k next-token logprobs (OpenAI completions API, token ids "
            "accepted as prompts, return_tokens_as_token_ids honoured), so that "
            "logitfuse.OpenAICompatibleLLM can use it as the cloud side. For production use vLLM or SGLang."
        ),
    )
    parser.add_argument("--model", required=True, help="a transformers model folder (config.json + weights)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (default 8000)")
    parser.add_argument("--top-k-max", type=int, default=20, help="largest logprobs a request may ask for (default 20)")
    parser.add_argument("--served-model-name", default=None, help="name clients send as 'model' (default: the folder name)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every request (default: the environment "
                             "variable LOGITFUSE_API_KEY if set, else no auth; the variable keeps the key out of ps)")
    parser.add_argument("--allow-insecure-remote", action="store_true",
                        help="allow a --host other than loopback without an API key (anyone who reaches the port "
                             "can use the model)")
    parser.add_argument("--read-timeout", type=float, default=10.0,
                        help="seconds a client has to send a whole request; slower ones are cut off (default 10)")
    parser.add_argument("--max-connections", type=int, default=32,
                        help="connections served at once; more are answered 503 (default 32)")
    parser.add_argument("--max-requests", type=int, default=None, help=argparse.SUPPRESS)  # scripts and tests
    parser.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitfuse.serve.server import CompletionServer, is_loopback_host, valid_api_key

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} must lie in [0, 65535]")
    if args.top_k_max < 1:
        raise UsageError(f"--top-k-max {args.top_k_max} must be >= 1")
    if not 0 < args.read_timeout < float("inf"):
        raise UsageError(f"--read-timeout {args.read_timeout} must be a positive number of seconds")
    if args.max_connections < 1:
        raise UsageError(f"--max-connections {args.max_connections} must be >= 1")
    api_key = args.api_key if args.api_key is not None else os.environ.get("LOGITFUSE_API_KEY") or None
    if api_key is not None and not valid_api_key(api_key):
        raise UsageError("--api-key (or LOGITFUSE_API_KEY) must be visible ASCII characters without spaces")
    remote = not is_loopback_host(args.host)
    if remote and api_key is None and not args.allow_insecure_remote:
        raise UsageError(f"--host {args.host} is reachable from other machines: set --api-key KEY (or "
                         "LOGITFUSE_API_KEY), or pass --allow-insecure-remote to serve without auth")
    if not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model!r} is not a folder; save one with model.save_pretrained(DIR)")
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    server = CompletionServer((args.host, args.port), model, tokenizer, model_name=name, top_k_max=args.top_k_max,
                              max_requests=args.max_requests, api_key=api_key,
                              allow_insecure_remote=args.allow_insecure_remote, read_timeout=args.read_timeout,
                              max_connections=args.max_connections)
    auth = "bearer token required" if api_key else "no auth"
    print(f"logitfuse serve: {name} at {server.url}/v1 ({auth}; Ctrl-C to stop)", flush=True)
    if remote and api_key is None:
        print(f"logitfuse serve: warning: serving {args.host} without auth (--allow-insecure-remote)",
              file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


# -------------------------------------------------------------------- commands owned elsewhere
def _add_train_eval(subparsers: argparse._SubParsersAction) -> None:
    from logitfuse.cli.train import add_subcommands

    add_subcommands(subparsers)  # `train` and `eval`


def _add_demo_generate(subparsers: argparse._SubParsersAction) -> None:
    from logitfuse.cli.demo import add_subcommands

    add_subcommands(subparsers)  # `demo` and `generate`


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    from logitfuse.cli.bench import add_bench_subcommand

    add_bench_subcommand(subparsers)  # `bench {kernels,sampling,decode,train,remote,plot}`


def _add_judge(subparsers: argparse._SubParsersAction) -> None:
    from logitfuse.cli.judge import add_judge_subcommand

    add_judge_subcommand(subparsers)  # `judge`: generate per system, score with an LLM judge


def _add_models(subparsers: argparse._SubParsersAction) -> None:
    from logitfuse.cli.models import add_models_subcommand

    add_models_subcommand(subparsers)  # `models {list,install,path}`


# ------------------------------------------------------------------------------------- main
# Each registrar adds one or more subparsers and sets `func` (args -> exit status) on them.
_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demo_generate, _add_serve, _add_train_eval, _add_models, _add_bench, _add_judge,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="logitfuse",
        description="Decoding-time logit fusion between a cloud LLM and a private on-device SLM (CoGenesis).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``logitfuse`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        print(f"logitfuse {args.command}: error: {err}", file=sys.stderr)
        return 2
