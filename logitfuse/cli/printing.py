"""Printing a fused run on the command line: the fused text coloured by α, its legend, and the warning
when the LLM answered no step."""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["colour_by_alpha", "legend", "llm_silence", "use_color"]


def llm_silence(stats: Any, where: str) -> str:
    """Warn on stderr when the LLM answered none of the steps it was asked; the summary's note ('' otherwise)."""
    asked = stats.llm_row_calls
    if asked == 0 or stats.fallbacks < asked:
        return ""
    print(f"warning: the LLM answered none of {asked} steps ({where} unreachable?): this text is the SLM alone",
          file=sys.stderr, flush=True)
    return "; the LLM answered none: SLM alone"


_SCALE = [27, 33, 39, 75, 111, 148, 184, 178, 172, 166, 160]  # 256-colour: blue (LLM) ... red-orange (SLM)


def use_color(choice: str, stream: Any = None) -> bool:
    """Whether to colour (``choice``: ``"auto"``, ``"always"``, ``"never"``): auto colours a terminal
    (``stream``, default stdout) unless ``NO_COLOR`` is set or ``TERM`` is dumb."""
    stream = sys.stdout if stream is None else stream
    if choice == "always":
        return True
    if choice == "never" or os.environ.get("NO_COLOR"):
        return False
    return bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TERM", "") != "dumb"


def colour_by_alpha(tokenizer: Any, ids: list[int], alpha: list[float], color: bool) -> str:
    """The text with each token coloured by who drove it (α = 1: SLM alone; 0: LLM alone)."""
    if not color or not alpha:
        return tokenizer.decode(ids, skip_special_tokens=True)
    pieces, previous = [], ""
    for n in range(1, len(ids) + 1):  # decode prefixes so multi-byte characters come out whole
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        piece, previous = text[len(previous):], text
        a = alpha[n - 1] if n - 1 < len(alpha) else 1.0
        pieces.append(f"\033[38;5;{_SCALE[round(a * (len(_SCALE) - 1))]}m{piece}")
    return "".join(pieces) + "\033[0m"


def legend(color: bool) -> str:
    """The colour scale of :func:`colour_by_alpha` as one line (empty without colour)."""
    if not color:
        return ""
    swatch = "".join(f"\033[38;5;{c}m█" for c in _SCALE)
    return f"  colour = α per token: LLM-driven {swatch}\033[0m SLM-driven\n"
