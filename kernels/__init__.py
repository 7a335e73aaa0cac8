"""Triton kernels for logitfuse, installed as ``logitfuse.kernels``.

Nothing here imports Triton or queries a device at import time: :func:`available` answers lazily,
and :data:`OPS` (the kernels, with the same signatures as the reference functions in
:mod:`logitfuse.reference`) is built on first access.

One file per op: :mod:`.row_stats`, :mod:`.mix` (``fuse``), :mod:`.sample` (``fuse_sample``),
:mod:`.cross_entropy` (``fused_cross_entropy``), :mod:`.features` (``fusion_feature_stats``, a
FusionHead's per-row statistics), :mod:`.combine` (the N-input rules' ``combine``, dispatched by
:func:`logitfuse.rules.combine.combine`); shared jit building blocks in :mod:`._common`. The package imports
nothing from ``logitfuse`` but :mod:`logitfuse.types`; which implementation runs is decided by the
dispatcher, :func:`logitfuse.functional.ops_for`.
Passes over a row (each module's docstring has the details):

- ``row_stats``: 1 (online log-sum-exp and entropy; per-block top-k candidates merged in torch);
- ``fusion_feature_stats``: 1 over the SLM row (``row_stats``), then 2 over the SLM row with the LLM
  values gathered through the map (row scalars; then the pulled-back row's statistics);
- ``fuse``: 2 in every mode and tail rule (row scalars and ``log Z``; then the write); a dense LLM
  row is also read once streamed for its log-sum-exp;
- ``combine``: 2 (``log Z`` online, then the write), + 1 over input 0 with a plausibility cut;
- ``fused_cross_entropy``: 1 (``log Z`` and ``∂log Z/∂α`` online, then the target token alone);
- ``fuse_sample``: 2 + at most 31 for top-k + at most 32 for top-p + 2 (bisections on the bit
  pattern of the probabilities instead of a sort; greedy rows stop after 2), nothing written but
  the id and its log-probability.

Every op works on CUDA tensors; on CPU tensors only under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from types import SimpleNamespace

if __name__ != "logitfuse.kernels":  # pragma: no cover - exercised by tests/test_repository_root.py in a subprocess
    # Python started in the repository root (``python -c``, ``python -m pytest``, a REPL) finds this
    # folder as a top-level ``kernels`` package, ahead of the unrelated ``kernels`` distribution that
    # transformers imports. Hand the name over to that distribution (or to nothing), never pose as it.
    import importlib.machinery
    import os

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    del sys.modules[__name__]
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds after this body
    _spec.loader.exec_module(_module)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the Triton kernels can run here: Triton is importable (no device is queried)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=1)
def _build_ops() -> SimpleNamespace:
    from .cross_entropy import fused_cross_entropy
    from .features import fusion_feature_stats
    from .mix import fuse
    from .row_stats import row_stats
    from .sample import fuse_sample

    return SimpleNamespace(
        fuse=fuse, fuse_sample=fuse_sample, fused_cross_entropy=fused_cross_entropy, row_stats=row_stats,
        fusion_feature_stats=fusion_feature_stats,
    )


def __getattr__(name: str):
    # ``OPS`` is built on first access, so that importing this package never imports Triton
    if name == "OPS":
        if not available():
            raise ImportError("logitfuse.kernels.OPS needs Triton (pip install triton); the torch reference runs without it")
        return _build_ops()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["OPS", "available"]
