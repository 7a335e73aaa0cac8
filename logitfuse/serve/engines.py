"""Start and stop real inference engines on loopback, for tests and benchmarks.

:class:`LlamaCppServer` runs llama.cpp's OpenAI-compatible server (``pip install
"llama-cpp-python[server]"``, ``python -m llama_cpp.server``) on a GGUF file, on ``127.0.0.1`` and a
free port, waits until it answers, and always stops it (a context manager). By default it starts
the server through :mod:`logitfuse.serve.llama_server`, which turns llama.cpp's extra CPU weight buffers
off (on VMs that report Intel AMX but fault on it, the plain server dies at its first request).
:class:`RecordingProxy` is a tiny standard-library HTTP proxy that records every request body it forwards: put it between a
backend and a server to audit what the server received.

>>> from logitfuse.serve.engines import llama_cpp_missing
>>> isinstance(llama_cpp_missing(), (str, type(None)))
True
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from collections.abc import Sequence

__all__ = ["LlamaCppServer", "LoggedServer", "RecordingProxy", "free_port", "llama_cpp_missing"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def llama_cpp_missing() -> str | None:
    """Why llama.cpp's server cannot run here (``None`` when it can)."""
    for module, hint in (("llama_cpp", "llama-cpp-python"), ("uvicorn", "llama-cpp-python[server]"),
                         ("fastapi", "llama-cpp-python[server]"), ("sse_starlette", "llama-cpp-python[server]"),
                         ("starlette_context", "llama-cpp-python[server]")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed: pip install \"{hint}\""
    return None


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


class LoggedServer:
    """What a server process started here shares: its log file (its own temporary one unless
    ``log_path`` is given, removed on exit), :meth:`log_text`, and the context manager over
    ``start()`` / ``stop()`` (which subclasses define)."""

    def _open_log(self, log_path: str | os.PathLike | None, prefix: str) -> None:
        self._own_log = log_path is None
        self.log_path = str(log_path) if log_path is not None else tempfile.mkstemp(prefix=prefix, suffix=".log")[1]

    def log_text(self) -> str:
        """Everything the server wrote so far (stdout and stderr)."""
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        if self._own_log:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass


class LlamaCppServer(LoggedServer):
    """llama.cpp's server (llama-cpp-python) on ``127.0.0.1``, as a context manager.

    Args:
        model_path: the GGUF file (e.g. ``logitfuse.zoo.gguf_path("smollm2-135m")``).
        alias (`str`, defaults to ``"llm"``): the served model name.
        port (`int`, optional): default a free port.
        n_ctx (`int`, defaults to 2048): context length.
        n_threads (`int`, optional): CPU threads (default: llama.cpp's choice).
        extra_args: more ``python -m llama_cpp.server`` arguments.
        extra_buffers (`bool`, defaults to `False`): let llama.cpp use its extra CPU weight buffers
            (repacked weights, Intel AMX tiles), i.e. run plain ``python -m llama_cpp.server``. Off by
            default, like :class:`logitfuse.LlamaCppSLM`'s: the server is started through
            ``python -m logitfuse.serve.llama_server``, which loads the model with ``use_extra_bufts=False``
            (where a VM announces AMX but does not allow it, the first completion kills the server;
            see :mod:`logitfuse.serve.llama_server`).
        logits_all (`bool`, optional): pass ``--logits_all true/false``: the server keeps the logits
            of every prompt position, which ``logprobs`` (and prompt scoring with ``echo``:
            :meth:`logitfuse.OpenAICompatibleLLM.score`) need; default: the server's own default
            (true in llama-cpp-python 0.3.x).
        startup_timeout (`float`, defaults to 180): seconds to wait for ``GET /v1/models``.
        log_path (optional): where the server's stdout/stderr go (default a temporary file; read
            it with :meth:`log_text`).

    >>> # with LlamaCppServer(zoo.gguf_path("smollm2-135m")) as server:
    >>> #     llm = OpenAICompatibleLLM(server.url, server.alias, tokenizer=tok)
    """

    def __init__(self, model_path: str | os.PathLike, *, alias: str = "llm", port: int | None = None,
                 n_ctx: int = 2048, n_threads: int | None = None, extra_args: Sequence[str] = (),
                 extra_buffers: bool = False, logits_all: bool | None = None, startup_timeout: float = 180.0,
                 log_path: str | os.PathLike | None = None):
        if not isinstance(extra_buffers, bool):
            raise TypeError(f"extra_buffers must be True or False, got {extra_buffers!r}")
        if logits_all is not None and not isinstance(logits_all, bool):
            raise TypeError(f"logits_all must be True, False or None, got {logits_all!r}")
        self.model_path, self.alias, self.extra_buffers = str(model_path), alias, extra_buffers
        self.logits_all = logits_all
        self.port = port or free_port()
        self.n_ctx, self.n_threads, self.extra_args = n_ctx, n_threads, list(extra_args)
        self.startup_timeout = float(startup_timeout)
        self._open_log(log_path, "llama_cpp_server_")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The server's command line (``logitfuse.serve.llama_server`` unless ``extra_buffers``)."""
        module = "llama_cpp.server" if self.extra_buffers else "logitfuse.serve.llama_server"
        cmd = [sys.executable, "-m", module, "--model", self.model_path, "--model_alias", self.alias,
               "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx)]
        if self.n_threads:
            cmd += ["--n_threads", str(self.n_threads), "--n_threads_batch", str(self.n_threads)]
        if self.logits_all is not None:
            cmd += ["--logits_all", "true" if self.logits_all else "false"]
        return cmd + self.extra_args

    def start(self) -> LlamaCppServer:
        """Start the server and wait until it answers (raises ``RuntimeError`` with the log's tail
        if it exits or does not answer within ``startup_timeout``)."""
        if self.process is not None:
            return self
        missing = llama_cpp_missing()
        if missing:
            raise RuntimeError(missing)
        if not os.path.isfile(self.model_path):
            raise FileNotFoundError(self.model_path)
        log = open(self.log_path, "wb")
        try:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        finally:
            log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_text()[-2000:]
                self.process = None
                raise RuntimeError(f"llama.cpp's server exited with status before answering; log tail:\n{tail}")
            try:
                status, _ = _get(self.url + "/v1/models", timeout=2.0)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.25)
        tail = self.log_text()[-2000:]
        self.stop()
        raise RuntimeError(f"llama.cpp's server did not answer within {self.startup_timeout:g} s; log tail:\n{tail}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)



class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _forward(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else None
        if body is not None:
            with self.server.lock:
                self.server.received.append(body)
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept", "authorization")}
        request = urllib.request.Request(self.server.target + self.path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.server.timeout) as response:
                status, raw, ctype = response.status, response.read(), response.headers.get("Content-Type")
        except urllib.error.HTTPError as err:
            status, raw, ctype = err.code, err.read(), err.headers.get("Content-Type")
        except OSError as err:
            status, raw, ctype = 502, json.dumps({"error": f"proxy: {type(err).__name__}"}).encode(), "application/json"
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype or "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        except OSError:
            pass

    def do_POST(self) -> None:  # noqa: N802
        self._forward("POST")

    def do_GET(self) -> None:  # noqa: N802
        self._forward("GET")


class RecordingProxy(ThreadingHTTPServer):
    """A loopback HTTP proxy to ``target`` that records every POST body it forwards (``received``,
    raw bytes, in arrival order): what the server behind it was sent, seen from outside the client.

    Use as a context manager; ``url`` is the proxy's root."""

    daemon_threads = True

    def __init__(self, target: str, *, timeout: float = 60.0):
        self.target, self.timeout = target.rstrip("/"), float(timeout)
        self.received: list[bytes] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> RecordingProxy:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
        self.server_close()
