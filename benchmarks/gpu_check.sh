#!/usr/bin/env bash
# One prepared GPU check for a lent machine (H200; torch 2.11, triton 3.6, transformers 5.17, no network).
# Runs the gpu-marked tests, then every benchmark at full size, writing under $OUT:
#   $OUT/gpu_check.log (everything printed, step statuses at the end) and one JSON per benchmark
#   (kernels_cuda.json, sampling_cuda.json, decode_cuda*.json, train_cuda.json, speculate*.json): up to 8
#   files, no PNGs
#   (the file count that comes back is limited; redraw here with
#   `logitfuse bench plot <files_at>/*.json --out benchmarks/results`).
# Every step has a timeout and a failing step does not stop the others; the whole run is about 8 minutes, plus
# up to 8 for the speculate steps (drop them, or run them alone, when the device time is short).
# Run from the repository root:  bash benchmarks/gpu_check.sh
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"  # absolute: the benchmarks may run from another folder (below)
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
STATUS=()

step() {  # step NAME SECONDS CMD...: run with a timeout, record the exit status, never abort the script
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS rc=0
    echo "=== $name (timeout ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    STATUS+=("$name rc=$rc $((SECONDS - start))s")
    echo "=== $name rc=$rc in $((SECONDS - start))s"
}

date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python -c 'import sys, torch, triton, transformers; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "triton", triton.__version__, "transformers", transformers.__version__,
"gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'

# logitfuse is copied in, not installed. An editable install without build isolation works offline when
# setuptools is present; otherwise assemble the package layout (kernels/, train_fuser/ and the benchmark
# modules of benchmarks/ become logitfuse.kernels / logitfuse.train_fuser / logitfuse.bench, as setup.py's
# package_dir does) in a temp folder on PYTHONPATH,
# and run the benchmarks from that folder: `python -m` puts the current folder first on sys.path, where
# the repository's own logitfuse/ (without kernels/) would shadow the assembled package.
BENCH_DIR="$PWD"
if ! pip install --no-deps --no-build-isolation --no-index -q -e . ; then
    SHIM="$(mktemp -d)"
    cp -r logitfuse "$SHIM/logitfuse"
    cp -r kernels "$SHIM/logitfuse/kernels"
    cp -r train_fuser "$SHIM/logitfuse/train_fuser"
    mkdir "$SHIM/logitfuse/bench" && cp benchmarks/*.py "$SHIM/logitfuse/bench/"  # the code, not the results
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    BENCH_DIR="$SHIM"
    echo "editable install failed: using PYTHONPATH=$SHIM"
fi
in_bench_dir() { (cd "$BENCH_DIR" && "$@"); }
in_bench_dir python -c 'import logitfuse, logitfuse.kernels, logitfuse.bench; print("logitfuse from", logitfuse.__file__)' || true
# `timeout` cannot call a shell function: BENCH is a command line that changes folder first
BENCH=(bash -c 'cd "$0" && exec python -m logitfuse.bench.cli "$@"' "$BENCH_DIR")

step gpu-tests 90 pytest -m gpu -q -p no:cacheprovider
# torch.compile only for dense:identity (the target's case); each compiled structure costs ~1 min of compile
step kernels 160 "${BENCH[@]}" kernels --device cuda --out "$OUT" --no-plot --compile-only dense:identity
step sampling 60 "${BENCH[@]}" sampling --device cuda --out "$OUT" --no-plot
# real models when the zoo is installed on this box, else tiny random bodies with a real-size vocabulary
if in_bench_dir python -c 'from logitfuse import zoo; zoo.path("smollm2-135m"); zoo.path("qwen2.5-coder-0.5b")' 2>/dev/null; then
    step decode 110 "${BENCH[@]}" decode --device cuda --out "$OUT" --no-plot
else
    echo "zoo models not installed here: decode runs tiny random models with V=49152"
    step decode 110 "${BENCH[@]}" decode --device cuda --out "$OUT" --no-plot --tiny --tiny-vocab 49152
fi
step train 100 "${BENCH[@]}" train --device cuda --out "$OUT" --no-plot
# fast fused decoding (issue 14): speculation on the same-tokenizer Qwen pair, raw and behind an EMULATED
# 0.15 s LLM round trip (decode tokens/s beside end to end); the SLM in llama.cpp (CPU) on the demo pair
# when llama-cpp-python is here. The decode step above already puts logitfuse.generate beside the paper loop.
if in_bench_dir python -c 'from logitfuse import zoo; zoo.path("qwen2.5-coder-0.5b"); zoo.path("qwen2.5-coder-1.5b")' 2>/dev/null; then
    SPEC=(speculate --device cuda --out "$OUT" --no-plot --slm qwen2.5-coder-0.5b --llm qwen2.5-coder-1.5b
          --examples 2 --new-tokens 64 --speculate 0 2 4 8 --alpha 0.5 --head none)
    step speculate 150 "${BENCH[@]}" "${SPEC[@]}"
    step speculate-latency 200 "${BENCH[@]}" "${SPEC[@]}" --llm-latency 0.15
    if in_bench_dir python -c 'import llama_cpp' 2>/dev/null; then
        step speculate-llama 150 "${BENCH[@]}" speculate --device cuda --out "$OUT" --no-plot --slm smollm2-135m \
            --llm qwen2.5-coder-0.5b --slm-engine llama.cpp --speculate 0 --examples 2 --new-tokens 64 --alpha 0.5 --head none
    fi
else
    echo "zoo models not installed here: speculate runs tiny random models"
    step speculate 90 "${BENCH[@]}" speculate --device cuda --out "$OUT" --no-plot --tiny --alpha 0.5 --head none
fi

date -u
echo "=== summary"
printf '%s\n' "${STATUS[@]}"
ls -la "$OUT"
