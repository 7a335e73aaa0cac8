"""Fused decoding with the LLM behind llama.cpp's server vs the same LLM in-process (HFLLM), on CPU.

Per-step latency and tokens/s of `slm.generate(..., logits_processor=[CoGenesisLogitsProcessor])`,
batch 1, greedy, a fixed number of new tokens, for:

- `slm-only`: the SLM alone (no processor), the floor;
- `hfllm`: the LLM in-process (transformers, its own KV cache, dense logits);
- `llama.cpp`: the LLM behind llama.cpp's server (`logitfuse.engines.LlamaCppServer`, which starts
  `python -m logitfuse.engines_server`: llama.cpp's extra CPU weight buffers off) on 127.0.0.1 (the zoo's GGUF file,
  text prompts re-sent each step, its prompt cache reusing the prefix; top-k log-probabilities).

Writes benchmarks/results/remote.json and prints a Markdown table. Needs
`pip install "llama-cpp-python[server]==0.3.36"` and the zoo models installed.

    python benchmarks/bench_remote.py --slm smollm2-135m --llm smollm2-135m --new-tokens 32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import logitfuse
from logitfuse import zoo
from logitfuse.engines import LlamaCppServer

PRIVATE = "My name is Martin Keller; I sell houses on Maple Drive and my party is on Saturday at 4 pm."
PUBLIC = "Write a short invitation to a garden party."


class Timed:
    """Wraps a backend's advance() to time each LLM call."""

    def __init__(self, llm):
        self.llm, self.times = llm, []
        self._advance = llm.advance

        def advance(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return self._advance(*args, **kwargs)
            finally:
                self.times.append(time.perf_counter() - t0)

        llm.advance = advance


def run_once(slm, inputs, n_new, proc, eos):
    t0 = time.perf_counter()
    with torch.no_grad():
        out = slm.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                           logits_processor=[proc] if proc is not None else None, pad_token_id=eos)
    elapsed = time.perf_counter() - t0
    return elapsed, out.shape[1] - inputs["input_ids"].shape[1]


def measure(name, slm, inputs, n_new, make_proc, eos, reps):
    rows = []
    for rep in range(reps + 1):  # the first run warms up (caches, thread pools, server prompt cache)
        proc, timed = make_proc()
        elapsed, produced = run_once(slm, inputs, n_new, proc, eos)
        if rep == 0:
            continue
        rows.append({"seconds": elapsed, "tokens": produced,
                     "llm_call_ms": [1e3 * t for t in timed.times] if timed else [],
                     "stats": dict(proc.stats) if proc is not None else {}})
    best = min(rows, key=lambda r: r["seconds"])
    secs = statistics.median(r["seconds"] for r in rows)
    calls = [t for r in rows for t in r["llm_call_ms"]]
    return {"path": name, "tokens": best["tokens"], "seconds_median": secs,
            "tokens_per_s": best["tokens"] / secs, "step_ms": 1e3 * secs / best["tokens"],
            "llm_call_ms_mean": statistics.mean(calls) if calls else None,
            "llm_call_ms_p50": statistics.median(calls) if calls else None, "reps": len(rows),
            "stats": best["stats"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slm", default="smollm2-135m")
    parser.add_argument("--llm", default="smollm2-135m", help="zoo name: its GGUF is served, its folder runs in-process")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=512, help="llama.cpp context (its per-request cost grows with it)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "remote.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    slm, slm_tok, _ = zoo.load(args.slm, install=False, progress=False)
    llm_model, llm_tok, _ = zoo.load(args.llm, install=False, progress=False)
    messages = [{"role": "system", "content": PRIVATE}, {"role": "user", "content": PUBLIC}]
    inputs = slm_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    eos = slm_tok.eos_token_id
    same_tok = slm_tok.get_vocab() == llm_tok.get_vocab()
    vmap = None if same_tok else logitfuse.VocabMap.from_tokenizers(slm_tok, llm_tok)

    def processor(llm):
        return logitfuse.CoGenesisLogitsProcessor(llm, PUBLIC, alpha=args.alpha, apply_chat_template=True,
                                                  vocab_map=vmap, slm_tokenizer=slm_tok)

    results = [measure("slm-only", slm, inputs, args.new_tokens, lambda: (None, None), eos, args.reps)]

    def hf_proc():
        llm = logitfuse.HFLLM(llm_model, llm_tok)
        timed = Timed(llm)
        return processor(llm), timed

    results.append(measure("hfllm (in-process)", slm, inputs, args.new_tokens, hf_proc, eos, args.reps))

    with LlamaCppServer(zoo.gguf_path(args.llm), alias="llm", n_ctx=args.n_ctx, n_threads=args.threads) as server:
        def remote_proc():
            llm = logitfuse.OpenAICompatibleLLM(server.url, "llm", top_k=args.top_k, tokenizer=llm_tok,
                                                prompt_format="text", on_failure="raise")
            timed = Timed(llm)
            proc = processor(llm)
            return proc, timed

        results.append(measure(f"llama.cpp server (top-{args.top_k})", slm, inputs, args.new_tokens,
                               remote_proc, eos, args.reps))

    record = {"command": "python benchmarks/bench_remote.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
              "slm": args.slm, "llm": args.llm, "new_tokens": args.new_tokens, "batch": 1, "alpha": args.alpha,
              "threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
              "torch": torch.__version__, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print("| path | tokens/s | ms/step | LLM call ms (mean / p50) |")
    print("| --- | ---: | ---: | ---: |")
    for r in results:
        call = "-" if r["llm_call_ms_mean"] is None else f"{r['llm_call_ms_mean']:.1f} / {r['llm_call_ms_p50']:.1f}"
        print(f"| {r['path']} | {r['tokens_per_s']:.1f} | {r['step_ms']:.1f} | {call} |")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
