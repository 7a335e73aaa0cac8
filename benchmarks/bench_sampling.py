"""Run the sampling benchmark: `python benchmarks/bench_sampling.py [--quick] [--out DIR] [--device cpu|cuda]`
(the same as `logitfuse bench sampling`; see logitfuse/bench/sampling.py and benchmarks/RESULTS.md)."""

import sys

from logitfuse.bench.sampling import main

if __name__ == "__main__":
    sys.exit(main())
