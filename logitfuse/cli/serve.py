"""`logitfuse serve`: a local transformers model behind an OpenAI-compatible /v1/completions endpoint.

    logitfuse serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] ...

Serves a local causal LM with top-k next-token logprobs (OpenAI completions API, token ids accepted
as prompts, return_tokens_as_token_ids honoured), so that logitfuse.OpenAICompatibleLLM can use it as
the cloud side. For production use vLLM or SGLang.
"""

from __future__ import annotations

import argparse
import os
import sys

from logitfuse.errors import UsageError

__all__ = ["HELP", "add_arguments", "run", "validate"]

HELP = "serve a local transformers model over an OpenAI-compatible /v1/completions endpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
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


def validate(args: argparse.Namespace) -> None:
    """Every check before the model loads (``UsageError``); the key in force goes to ``args.api_key``."""
    from logitfuse.serve.server import is_loopback_host, valid_api_key

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} must lie in [0, 65535]")
    if args.top_k_max < 1:
        raise UsageError(f"--top-k-max {args.top_k_max} must be >= 1")
    if not 0 < args.read_timeout < float("inf"):
        raise UsageError(f"--read-timeout {args.read_timeout} must be a positive number of seconds")
    if args.max_connections < 1:
        raise UsageError(f"--max-connections {args.max_connections} must be >= 1")
    args.api_key = args.api_key if args.api_key is not None else os.environ.get("LOGITFUSE_API_KEY") or None
    if args.api_key is not None and not valid_api_key(args.api_key):
        raise UsageError("--api-key (or LOGITFUSE_API_KEY) must be visible ASCII characters without spaces")
    if not is_loopback_host(args.host) and args.api_key is None and not args.allow_insecure_remote:
        raise UsageError(f"--host {args.host} is reachable from other machines: set --api-key KEY (or "
                         "LOGITFUSE_API_KEY), or pass --allow-insecure-remote to serve without auth")
    if not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model!r} is not a folder; save one with model.save_pretrained(DIR)")


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitfuse.serve.server import CompletionServer, is_loopback_host

    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    server = CompletionServer((args.host, args.port), model, tokenizer, model_name=name, top_k_max=args.top_k_max,
                              max_requests=args.max_requests, api_key=args.api_key,
                              allow_insecure_remote=args.allow_insecure_remote, read_timeout=args.read_timeout,
                              max_connections=args.max_connections)
    auth = "bearer token required" if args.api_key else "no auth"
    print(f"logitfuse serve: {name} at {server.url}/v1 ({auth}; Ctrl-C to stop)", flush=True)
    if not is_loopback_host(args.host) and args.api_key is None:
        print(f"logitfuse serve: warning: serving {args.host} without auth (--allow-insecure-remote)",
              file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
