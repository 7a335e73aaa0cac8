"""Triton kernels for logitfuse, installed as ``logitfuse.kernels``.

Nothing here imports Triton or queries a device at import time: :func:`available` answers lazily.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the Triton kernels can run (Triton importable and the kernels implemented)."""
    return False
