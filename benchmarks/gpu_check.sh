#!/usr/bin/env bash
# One prepared GPU check for a lent machine (H200; torch 2.11, triton 3.6, transformers 5.17), sized for a
# 15-minute device budget: the machine's start and the transfers take 2-4 minutes, one command at most 10,
# so the whole script ends within GPU_CHECK_BUDGET seconds (default 540). The most important checks come
# first; each step has its own timeout, cut to what is left of the budget, and a step that does not fit
# any more is skipped (listed as such), so a slow step cannot eat the rest and the run always ends with
# its summary. A failing step does not stop the others.
#
#   step               timeout  typical on an H200 (estimates)
#   setup              -        ~20 s   versions, offline editable install (or a PYTHONPATH shim)
#   gpu-tests          120 s    ~60 s   pytest -m gpu: the Triton kernels against the reference
#   kernels            150 s    ~100 s  mix kernels at full size, torch.compile for dense:identity only
#   models             200 s    ~3 s    offline: the network probe fails and the step is skipped;
#                                       online: gguf, then the Qwen pair and SmolLM2 (~3 min)
#   speculate          150 s    ~90 s   logitfuse.generate per step (overlap on/off), speculate 2/4/8 and
#                                       the processor on the Qwen2.5-Coder 0.5B + 1.5B pair (when installed;
#                                       else tiny random models, ~30 s)
#   sampling            60 s    ~30 s   fused sampling vs sort-based top-p
#   decode             110 s    ~80 s   the decode benchmark (zoo pair, or tiny bodies with V = 49152)
#   train              100 s    ~60 s   fused cross-entropy memory and time
#   speculate-latency  120 s    ~90 s   the Qwen pair behind an EMULATED 0.15 s LLM round trip, one example
#   speculate-llama    100 s    ~60 s   the SLM in llama.cpp (needs llama-cpp-python and SmolLM2's GGUF)
#
# Writes under $OUT (default benchmarks/results/gpu): gpu_check.log (everything printed, step statuses at
# the end) and one JSON per benchmark (kernels_cuda.json, speculate*.json, sampling_cuda.json,
# decode_cuda*.json, train_cuda.json): at most 8 files, no PNGs (redraw here with
# `logitfuse bench plot <files_at>/*.json --out benchmarks/results`).
# Run from the repository root:  bash benchmarks/gpu_check.sh
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results/gpu}"
BUDGET="${GPU_CHECK_BUDGET:-540}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"  # absolute: the benchmarks may run from another folder (below)
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
STATUS=()

step() {  # step NAME SECONDS CMD...: run under min(SECONDS, budget left), record the exit status, never abort
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    if ((left < 30)); then
        STATUS+=("$name skipped: ${left}s of the ${BUDGET}s budget left")
        echo "=== $name skipped: ${left}s of the ${BUDGET}s budget left"
        return 0
    fi
    if ((limit > left)); then limit=$left; fi
    local start=$SECONDS rc=0
    echo "=== $name (timeout ${limit}s, $((SECONDS))s into the run): $*"
    timeout --kill-after=5 "$limit" "$@" || rc=$?
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
if ! timeout 60 pip install --no-deps --no-build-isolation --no-index -q -e . ; then
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
BENCH=(bash -c 'cd "$0" && exec python -m logitfuse.cli.bench "$@"' "$BENCH_DIR")
installed() { in_bench_dir python -c 'import sys; from logitfuse import zoo; [zoo.path(n) for n in sys.argv[1:]]' "$@" \
    2>/dev/null; }

# 1. the Triton kernels: correctness, then speed (torch.compile only for dense:identity, the target's case;
#    each compiled structure costs ~1 min of compile)
step gpu-tests 120 pytest -m gpu -q -p no:cacheprovider
step kernels 150 "${BENCH[@]}" kernels --device cuda --out "$OUT" --no-plot --compile-only dense:identity

# 2. the real models, where the network reaches PyPI (a lent machine reaches nothing: skipped in seconds);
#    a partial install is harmless, the checks below look at what is there
if python -c 'import socket; socket.create_connection(("pypi.org", 443), timeout=3)' 2>/dev/null; then
    export PIP_RETRIES=1 PIP_TIMEOUT=15
    step models 200 bash -c 'pip install -q "gguf>=0.10" && cd "$0" && python -m logitfuse.cli models install --quiet \
        qwen2.5-coder-0.5b qwen2.5-coder-1.5b smollm2-135m' "$BENCH_DIR"
else
    echo "no network here: the zoo models are used only if already installed"
fi

# 3. fast fused decoding (overlap, exact speculation) on the same-tokenizer Qwen pair
QWEN=0
installed qwen2.5-coder-0.5b qwen2.5-coder-1.5b && QWEN=1
SPEC=(speculate --device cuda --out "$OUT" --no-plot --slm qwen2.5-coder-0.5b --llm qwen2.5-coder-1.5b
      --new-tokens 64 --speculate 0 2 4 8 --alpha 0.5 --head none)
if ((QWEN)); then
    step speculate 150 "${BENCH[@]}" "${SPEC[@]}" --examples 2
else
    echo "the Qwen pair is not installed here: speculate runs tiny random models"
    step speculate 60 "${BENCH[@]}" speculate --device cuda --out "$OUT" --no-plot --tiny --alpha 0.5 --head none
fi

# 4. the other benchmarks at full size
step sampling 60 "${BENCH[@]}" sampling --device cuda --out "$OUT" --no-plot
if installed smollm2-135m qwen2.5-coder-0.5b; then
    step decode 110 "${BENCH[@]}" decode --device cuda --out "$OUT" --no-plot
else
    echo "zoo models not installed here: decode runs tiny random models with V=49152"
    step decode 110 "${BENCH[@]}" decode --device cuda --out "$OUT" --no-plot --tiny --tiny-vocab 49152
fi
step train 100 "${BENCH[@]}" train --device cuda --out "$OUT" --no-plot

# 5. what is left of the budget: the Qwen pair behind an EMULATED round trip, and the llama.cpp SLM
if ((QWEN)); then
    step speculate-latency 120 "${BENCH[@]}" "${SPEC[@]}" --examples 1 --llm-latency 0.15
fi
if installed smollm2-135m qwen2.5-coder-0.5b && in_bench_dir python -c 'import llama_cpp' 2>/dev/null; then
    step speculate-llama 100 "${BENCH[@]}" speculate --device cuda --out "$OUT" --no-plot --slm smollm2-135m \
        --llm qwen2.5-coder-0.5b --slm-engine llama.cpp --speculate 0 --examples 1 --new-tokens 64 --alpha 0.5 --head none
fi

date -u
echo "=== summary ($SECONDS s of the ${BUDGET}s budget)"
printf '%s\n' "${STATUS[@]}"
ls -la "$OUT"
