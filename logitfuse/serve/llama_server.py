"""Run llama-cpp-python's OpenAI-compatible server with llama.cpp's extra CPU weight buffers off.

::

    python -m logitfuse.serve.llama_server --model model.gguf --model_alias llm --host 127.0.0.1 --port 8080

It takes the arguments of ``python -m llama_cpp.server`` and passes them through unchanged, plus one
of its own: ``--extra-buffers`` keeps llama.cpp's defaults (then it is plain ``python -m
llama_cpp.server``). :class:`logitfuse.serve.engines.LlamaCppServer` starts the server through it.

Why: when a CPU announces them, llama.cpp loads a model's weights into "extra" CPU buffer types
(weights repacked for wider kernels, and Intel AMX tiles on CPUs that report AMX). Some virtual
machines report AMX in CPUID but do not let a process use it; this project's Firecracker build
machine is one. With llama-cpp-python 0.3.36 the server there loads the model, answers
``GET /v1/models``, then dies at its first completion request without a Python traceback: the
kernel log (``dmesg``) shows::

    traps: python[19288] general protection fault ip:7f1bdd27c193 sp:7ffc8765d440 error:0
        in libggml-cpu.so.0[7c193,7f1bdd214000+156000]

and offset ``0x7c193`` of ``libggml-cpu.so`` is an ``ldtilecfg`` (the AMX tile configuration
instruction) in ``ggml_backend_amx_mul_mat``. llama.cpp's model parameter ``use_extra_bufts`` turns
these buffers off, but the server has no option for it. So this launcher wraps
``llama_cpp.llama_cpp.llama_model_default_params``, the function ``llama_cpp.Llama`` starts its
model parameters from, so that it returns ``use_extra_bufts=False``, then runs the server's
``__main__``. The weights then stay in the GGUF file's own layout and go through llama.cpp's generic
quantized CPU kernels (the same choice as :class:`logitfuse.LlamaCppSLM`'s ``extra_buffers=False``);
on machines where the extra buffers work they are faster, and ``--extra-buffers`` keeps them.

>>> split_launcher_args(["--extra-buffers", "--model", "m.gguf", "--port", "8080"])
(True, ['--model', 'm.gguf', '--port', '8080'])
>>> split_launcher_args(["--model", "m.gguf", "--extra_buffers"])
(True, ['--model', 'm.gguf'])
>>> split_launcher_args(["--model", "m.gguf"])
(False, ['--model', 'm.gguf'])
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Sequence

__all__ = ["disable_extra_buffers", "main", "split_launcher_args"]

EXTRA_BUFFERS_FLAGS = ("--extra-buffers", "--extra_buffers")
PROG = "python -m logitfuse.serve.llama_server"
HELP = f"""usage: {PROG} [--extra-buffers] [llama_cpp.server arguments...]

Runs `python -m llama_cpp.server` with llama.cpp's extra CPU weight buffers (repacked weights, Intel
AMX tiles) turned off (use_extra_bufts=False): on VMs that report AMX but fault on its instructions,
the plain server dies at its first completion request.

  --extra-buffers   keep llama.cpp's default weight buffers (the plain server)

The llama_cpp.server arguments follow.
"""


def split_launcher_args(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """Split a command line into (``--extra-buffers`` given, the arguments for ``llama_cpp.server``)."""
    argv = [str(arg) for arg in argv]
    return any(arg in EXTRA_BUFFERS_FLAGS for arg in argv), [arg for arg in argv if arg not in EXTRA_BUFFERS_FLAGS]


def disable_extra_buffers() -> None:
    """Make every ``llama_cpp.Llama`` created from now on in this process load its model with
    ``use_extra_bufts=False`` (wraps ``llama_cpp.llama_cpp.llama_model_default_params``; idempotent).

    Process-wide and not undone: meant for a process that runs one server."""
    import llama_cpp.llama_cpp as lib

    defaults = lib.llama_model_default_params
    if getattr(defaults, "without_extra_buffers", False):
        return

    def llama_model_default_params():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_model_default_params.without_extra_buffers = True
    llama_model_default_params.__doc__ = "llama.cpp's default model parameters, with use_extra_bufts=False."
    lib.llama_model_default_params = llama_model_default_params


def main(argv: Sequence[str] | None = None) -> None:
    """Run llama-cpp-python's server on ``argv`` (default ``sys.argv[1:]``) after
    :func:`disable_extra_buffers`, unless ``--extra-buffers`` is among them."""
    from logitfuse.serve.engines import llama_cpp_missing

    extra_buffers, server_argv = split_launcher_args(sys.argv[1:] if argv is None else argv)
    missing = llama_cpp_missing()
    if missing:
        print(f"{PROG}: error: {missing}", file=sys.stderr)
        raise SystemExit(2)
    if "-h" in server_argv or "--help" in server_argv:
        print(HELP)
    if not extra_buffers:
        disable_extra_buffers()
        print(f"{PROG}: llama.cpp's extra CPU weight buffers are off (use_extra_bufts=False); "
              "--extra-buffers keeps them", file=sys.stderr, flush=True)
    sys.argv = [PROG, *server_argv]
    runpy.run_module("llama_cpp.server", run_name="__main__")  # argparse names PROG (sys.argv[0])


if __name__ == "__main__":
    main()
