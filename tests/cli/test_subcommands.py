"""The shape of the command line: one module per subcommand, all alike, and one engine underneath."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from logitfuse.cli import SUBCOMMANDS, build_parser

CLI = Path(importlib.import_module("logitfuse.cli").__file__).parent


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_each_subcommand_module_has_the_same_shape(command):
    module = importlib.import_module(f"logitfuse.cli.{SUBCOMMANDS[command]}")
    assert isinstance(module.HELP, str) and "\n" not in module.HELP and module.__doc__
    for name in ("add_arguments", "validate", "run"):
        assert callable(getattr(module, name)), (command, name)


def test_the_parser_lists_the_subcommands_in_order():
    import re

    listed = re.findall(r"^    (\w+) ", build_parser().format_help(), flags=re.MULTILINE)
    assert listed == ["demo", "generate", "serve", "train", "eval", "finetune", "judge", "models", "bench"]


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            names |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module or ""}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


def test_the_cli_chooses_tokens_only_through_logitfuse_generate():
    """No processor loop, no llama.cpp loop of its own: demo, generate and judge call logitfuse.generate."""
    banned = ("logitfuse.decoding.processor", "CoGenesisLogitsProcessor", "generate_fused_llama_cpp")
    for path in sorted(CLI.glob("*.py")):
        offending = [name for name in _imported_names(path) if any(b in name for b in banned)]
        assert not offending, (path.name, offending)
        assert ".generate(private_ids" not in path.read_text(encoding="utf-8"), path.name  # LlamaCppSLM's own loop
