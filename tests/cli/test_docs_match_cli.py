"""The docs match the command line: every ``--flag`` that README.md and docs/*.md give a ``logitfuse
<command>`` (in code: fenced blocks and inline code, and inline code in a section whose heading names
the command) is one that command's ``--help`` lists."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from logitfuse.cli import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_COMMAND = re.compile(r"\blogitfuse\s+(" + "|".join(SUBCOMMANDS) + r")\b([^`|;&#)]*)")
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")


def _code(text: str) -> list[tuple[int, str]]:
    """``(line number, code)``: the lines of fenced blocks (continuation lines joined) and inline code spans."""
    found, fenced, block = [], False, []
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            block.append(line.rstrip())
            if not line.rstrip().endswith("\\"):
                found.append((number, " ".join(part.rstrip("\\") for part in block)))
                block = []
        else:
            found += [(number, span) for span in re.findall(r"`([^`]+)`", line)]
    return found


def _help(argv: list[str]) -> str | None:
    """The --help text of ``logitfuse <argv>`` (a subcommand, or a subcommand of models/bench); ``None``
    where that is not a command."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    return out.getvalue() if done.value.code == 0 else None


def _argv(command: str, rest: str) -> list[str]:
    """``[command]``, or ``[command, sub-subcommand]`` for `logitfuse models install` and the like."""
    first = rest.split()[0] if rest.split() else ""
    return [command, first] if command in ("models", "bench") and re.fullmatch(r"[a-z]+", first) else [command]


def _uses() -> list[tuple[str, list[str], str]]:
    """``(where, [command, sub-subcommand?], flag)`` for every flag the docs give a command: in code
    that starts ``logitfuse <command>``, and in inline code under a heading that names one (the
    flag tables of docs/cli.md)."""
    uses = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        section: dict[int, list[str] | None] = {}  # line number -> the command its heading names
        current = None
        for number, line in enumerate(text.splitlines(), 1):
            if line.startswith("#"):
                named = _COMMAND.search(line.replace("`", " "))
                current = _argv(named.group(1), named.group(2)) if named else None
            section[number] = current
        for number, code in _code(text):
            where = f"{doc.relative_to(ROOT)}:{number}"
            matches = list(_COMMAND.finditer(code))
            for match in matches:
                argv = _argv(match.group(1), match.group(2))
                uses += [(where, argv, flag) for flag in _FLAG.findall(match.group(2))]
            if not matches and section.get(number) and "logitfuse" not in code:
                uses += [(where, section[number], flag) for flag in _FLAG.findall(code)]
    return uses


def test_the_docs_name_flags_of_commands():
    assert len(_uses()) > 50  # the extraction finds the docs' commands


def test_every_flag_the_docs_give_a_command_is_in_its_help():
    helps, missing = {}, []
    for where, argv, flag in _uses():
        key = " ".join(argv)
        if key not in helps:
            helps[key] = _help(argv)
        if helps[key] is None:
            missing.append(f"{where}: `logitfuse {key}` is not a command")
            continue
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[key]):
            missing.append(f"{where}: logitfuse {key} {flag}")
    assert not missing, "\n".join(missing)
