"""Run the decode benchmark: `python benchmarks/bench_decode.py [--quick] [--out DIR] [--device cpu|cuda]`
(the same as `logitfuse bench decode`; see logitfuse/bench/decode.py and benchmarks/RESULTS.md)."""

import sys

from logitfuse.bench.decode import main

if __name__ == "__main__":
    sys.exit(main())
