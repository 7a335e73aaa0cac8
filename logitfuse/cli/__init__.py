"""The ``logitfuse`` command line: one module per subcommand, all of one shape.

Each ``logitfuse.cli.<module>`` (listed in :data:`SUBCOMMANDS`) has ``HELP`` (its one-line help; the
module docstring is its ``--help`` description), ``add_arguments(parser)``, ``validate(args)`` (every
check of the arguments, before any model loads: a mistake raises :class:`logitfuse.errors.UsageError`,
printed by :func:`main` as one line on stderr with exit status 2) and ``run(args) -> int`` (the exit
status). Code they share lives in :mod:`logitfuse.cli.common` (demo, generate, judge) and
:mod:`logitfuse.cli.train` (train, eval).

    logitfuse demo | generate ...                 fused generation (logitfuse.generate)
    logitfuse serve --model DIR ...               a local model behind /v1/completions
    logitfuse train | eval | finetune ...         fusion heads; LoRA-tuning the SLM
    logitfuse judge ...                           generate per system, score with an LLM judge
    logitfuse models {list,install,path}          the zoo
    logitfuse bench {kernels,sampling,decode,train,remote,speculate,plot}   the benchmarks
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from logitfuse.errors import UsageError

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

#: subcommand -> the module of logitfuse.cli that implements it, in the order --help lists them
SUBCOMMANDS = {"demo": "demo", "generate": "generate", "serve": "serve", "train": "train", "eval": "evaluate",
               "finetune": "finetune", "judge": "judge", "models": "models", "bench": "bench"}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2 (the usage is in --help)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _module(command: str):
    return importlib.import_module(f"logitfuse.cli.{SUBCOMMANDS[command]}")


def build_parser() -> argparse.ArgumentParser:
    """The ``logitfuse`` parser, one subparser per entry of :data:`SUBCOMMANDS`."""
    parser = OneLineParser(
        prog="logitfuse",
        description="Decoding-time logit fusion between a cloud LLM and a private on-device SLM (CoGenesis).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for command in SUBCOMMANDS:
        module = _module(command)
        sub = subparsers.add_parser(command, help=module.HELP, description=module.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``logitfuse`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    module = _module(args.command)
    try:
        module.validate(args)
        return int(module.run(args) or 0)
    except UsageError as err:
        print(f"logitfuse {args.command}: error: {err}", file=sys.stderr)
        return 2
