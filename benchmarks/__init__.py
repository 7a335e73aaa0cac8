"""Benchmarks of logitfuse: ``logitfuse bench {kernels,sampling,decode,train}``.

Each module has ``main(argv=None)`` (also run by the thin scripts in the repository's
``benchmarks/`` folder) and writes one JSON (machine, versions, command, rows) and one PNG plot
(matplotlib, the optional ``bench`` extra) under ``--out`` (default ``benchmarks/results``).
Nothing is imported eagerly: importing this package costs nothing.
"""

BENCHMARKS = ("kernels", "sampling", "decode", "train")
