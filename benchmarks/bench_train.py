"""Run the train benchmark: `python benchmarks/bench_train.py [--quick] [--out DIR] [--device cpu|cuda]`
(the same as `logitfuse bench train`; see logitfuse/bench/train.py and benchmarks/RESULTS.md)."""

import sys

from logitfuse.bench.train import main

if __name__ == "__main__":
    sys.exit(main())
