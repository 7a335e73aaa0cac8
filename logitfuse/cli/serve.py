"""`logitfuse serve`: a local transformers model behind an OpenAI-compatible /v1/completions endpoint.

    logitfuse serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] ...

Serves a local causal LM with top-k next-token logprobs (OpenAI completions API, token ids accepted
as prompts, return_tokens_as_token_ids honoured), so that logitfuse.OpenAICompatibleLLM can use it as
the cloud side. For production use vLLM or SGLang.

Every check (the folders, the device, the address and that the port is free) comes before the model
loads. Ctrl-C (SIGINT) or SIGTERM stops it cleanly: the completions in progress stop (answered 503),
then the exit status is 130 (SIGINT) or 0 (SIGTERM).
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import re
import signal
import sys
import threading
from typing import Any

from logitfuse import zoo
from logitfuse.errors import UsageError, check_device
from logitfuse.zoo import check_model

__all__ = ["HELP", "add_arguments", "run", "validate"]

HELP = "serve a local transformers model over an OpenAI-compatible /v1/completions endpoint"

#: files of which a tokenizer folder holds one at least (tokenizer.save_pretrained writes the first two)
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")
_GRACE_S = 30.0  # seconds a stop waits for the completions in progress to end


class _Stop(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a transformers model folder (config.json + weights), a zoo "
                        "name or a Hugging Face Hub id (ORG/NAME)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (default 8000)")
    parser.add_argument("--top-k-max", type=int, default=20, help="largest logprobs a request may ask for (default 20)")
    parser.add_argument("--served-model-name", default=None, help="name clients send as 'model' (default: the folder name, zoo name or Hub id)")
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
    parser.add_argument("--max-request-tokens", type=int, default=16384,
                        help="the most tokens one request may ask for: its prompts' tokens plus max_tokens per "
                             "prompt, summed over its prompts; more are answered 400 (default 16384)")
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
    if args.max_request_tokens < 2:
        raise UsageError(f"--max-request-tokens {args.max_request_tokens} must be >= 2 (a prompt token and "
                         "one to generate)")
    if ":" in args.host or re.fullmatch(r"[0-9.]+", args.host):
        try:
            ipaddress.ip_address(args.host)
        except ValueError:
            raise UsageError(f"--host {args.host} is not an IP address; use 127.0.0.1 (this machine only), ::1, "
                             "0.0.0.0 (every interface) or a host name") from None
    args.api_key = args.api_key if args.api_key is not None else os.environ.get("LOGITFUSE_API_KEY") or None
    if args.api_key is not None and not valid_api_key(args.api_key):
        raise UsageError("--api-key (or LOGITFUSE_API_KEY) must be visible ASCII characters without spaces")
    if not is_loopback_host(args.host) and args.api_key is None and not args.allow_insecure_remote:
        raise UsageError(f"--host {args.host} is reachable from other machines: set --api-key KEY (or "
                         "LOGITFUSE_API_KEY), or pass --allow-insecure-remote to serve without auth")
    if not os.path.isdir(args.model) and (args.model in zoo.known_names() or zoo.is_hub_id(args.model)):
        check_model("--model", args.model)  # a zoo name or a Hub id (in the local cache when offline): run() resolves it
        if args.tokenizer is not None:
            _check_tokenizer(args)
    else:
        if not os.path.isdir(args.model):
            raise UsageError(f"--model {args.model!r} is not a folder, a zoo model nor a Hugging Face Hub id (ORG/NAME); "
                             "save one with model.save_pretrained(DIR)")
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise UsageError(f"--model {args.model!r} has no config.json, so it is no transformers model folder; "
                             "save one with model.save_pretrained(DIR)")
        _check_tokenizer(args)
    check_device("--device", args.device)
    _check_port(args.host, args.port)


def _check_tokenizer(args: argparse.Namespace) -> None:
    if args.tokenizer is not None and not os.path.isdir(args.tokenizer):
        raise UsageError(f"--tokenizer {args.tokenizer!r} is not a folder; save one with "
                         "tokenizer.save_pretrained(DIR), or leave --tokenizer out to use --model's")
    folder = args.tokenizer or args.model
    if not any(os.path.isfile(os.path.join(folder, name)) for name in _TOKENIZER_FILES):
        flag, fix = ("--tokenizer", "") if args.tokenizer else ("--model", ", or pass --tokenizer DIR")
        raise UsageError(f"{flag} {folder!r} holds no tokenizer (no {' or '.join(_TOKENIZER_FILES[:2])}); save "
                         f"one there with tokenizer.save_pretrained(DIR){fix}")


def _check_port(host: str, port: int) -> None:
    """The address can be bound now (it may still be taken before the model has loaded: run() says so)."""
    from logitfuse.serve.server import check_bindable

    try:
        check_bindable(host, port)
    except OSError as err:
        raise UsageError(_bind_error(host, port, err)) from None


def _bind_error(host: str, port: int, err: OSError) -> str:
    if err.errno == errno.EADDRINUSE:
        return f"--port {port} is in use on {host}; stop what holds it, or pick another --port (0 picks a free one)"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"--port {port} on {host} needs privileges; pick a --port of 1024 or above (0 picks a free one)"
    if err.errno == errno.EADDRNOTAVAIL:
        return f"--host {host} is no address of this machine; use 127.0.0.1, or 0.0.0.0 for every interface"
    reason = err.strerror or type(err).__name__
    return f"--host {host} --port {port} cannot be bound ({reason}); use --host 127.0.0.1, or another --port"


def _fail(message: str) -> int:
    print(f"logitfuse serve: error: {message}", file=sys.stderr, flush=True)
    return 1


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitfuse.serve.server import CompletionServer, is_loopback_host

    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    folder_given = os.path.isdir(args.model)
    try:
        folder = args.model if folder_given else zoo.resolve(args.model, install=True)  # a zoo name or a Hub id
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or folder)
    except Exception as err:  # noqa: BLE001 - a broken folder, a model torch cannot place: one line, exit 1
        return _fail(f"cannot load --model {args.model!r} (or its tokenizer): {_first_line(err)}")
    name = args.served_model_name or (os.path.basename(os.path.normpath(args.model)) if folder_given else args.model)
    try:
        server = CompletionServer((args.host, args.port), model, tokenizer, model_name=name,
                                  top_k_max=args.top_k_max, max_requests=args.max_requests, api_key=args.api_key,
                                  allow_insecure_remote=args.allow_insecure_remote, read_timeout=args.read_timeout,
                                  max_connections=args.max_connections, max_request_tokens=args.max_request_tokens)
    except OSError as err:  # the port was taken while the model loaded
        return _fail(_bind_error(args.host, args.port, err))
    auth = "bearer token required" if args.api_key else "no auth"
    code, signalled = 0, False
    restore = _stop_on_signals()
    try:
        print(f"logitfuse serve: {name} at {server.url}/v1 ({auth}; Ctrl-C to stop)", flush=True)
        if not is_loopback_host(args.host) and args.api_key is None:
            print(f"logitfuse serve: warning: serving {args.host} without auth (--allow-insecure-remote)",
                  file=sys.stderr, flush=True)
        server.serve_forever(poll_interval=0.1)
    except _Stop as stop:
        code, signalled = stop.code, True
        print("logitfuse serve: stopping", file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # SIGINT when the handler could not be installed
        code = 130
    finally:
        finished = server.finish_work(_GRACE_S)
        server.server_close()
        restore()
    if not finished:  # a forward pass still runs: leave without finalizing under it (that aborts)
        print("logitfuse serve: a completion did not stop in time; exiting without waiting for it",
              file=sys.stderr, flush=True)
    if signalled or not finished:
        # A signal ended the process's server: nothing is left to save (every request was answered or
        # refused), and finalizing the interpreter with torch's worker threads still parked can abort
        # (std::terminate, seen under SIGTERM on a loaded CPU): leave at once with the exit status.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _stop_on_signals() -> Any:
    """SIGINT and SIGTERM end serve_forever (as :class:`_Stop`: exit status 130, 0); a second one while
    stopping leaves at once. Returns the function that puts the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    codes = {signal.SIGINT: 130, signal.SIGTERM: 0}
    previous = {signum: signal.getsignal(signum) for signum in codes}

    def again(signum: int, frame: Any) -> None:
        os._exit(codes[signum])

    def stop(signum: int, frame: Any) -> None:
        for other in codes:
            signal.signal(other, again)
        raise _Stop(codes[signum])

    for signum in codes:
        signal.signal(signum, stop)

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore
