"""Run the kernels benchmark: `python benchmarks/bench_kernels.py [--quick] [--out DIR] [--device cpu|cuda]`
(the same as `logitfuse bench kernels`; see logitfuse/bench/kernels.py and benchmarks/RESULTS.md)."""

import sys

from logitfuse.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main())
