"""Benchmarks of logitfuse: ``logitfuse bench {kernels,sampling,decode,train,remote,speculate}``.

The source lives in the repository's top-level ``benchmarks/`` folder, next to the results
(``benchmarks/results/``, ``benchmarks/RESULTS.md``) and the GPU script (``benchmarks/gpu_check.sh``),
and installs as ``logitfuse.bench`` (setup.py's ``package_dir``, as ``kernels/`` installs as
``logitfuse.kernels``): import it only under that name, never as a top-level ``benchmarks``.

Each benchmark module provides ``add_args``, ``execute`` and ``plot`` (:mod:`logitfuse.cli.bench`
registers them), times with :mod:`logitfuse.bench.common` (one helper, :func:`~logitfuse.bench.common.measure`)
and writes one JSON (machine, versions, command, rows) and one PNG plot (matplotlib, the optional
``bench`` extra) under ``--out`` (default ``benchmarks/results``). Nothing is imported eagerly:
importing this package costs nothing, and no benchmark module needs an optional package to import.
"""

BENCHMARKS = ("kernels", "sampling", "decode", "train", "remote", "speculate", "fleet")
