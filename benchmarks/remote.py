"""Remote-LLM decoding benchmark: fused decoding with the LLM behind llama.cpp's server vs the same
LLM in-process (:class:`~logitfuse.HFLLM`), batch 1, on one machine.

Per-step latency and tokens/s of ``slm.generate(..., logits_processor=[CoGenesisLogitsProcessor])``,
greedy, exactly ``--new-tokens`` new tokens, for three paths:

- ``slm-only``: the SLM alone (no processor), the floor;
- ``hfllm (in-process)``: the LLM in transformers, its own KV cache, dense logits;
- ``llama.cpp server (top-K)``: the LLM behind llama.cpp's server
  (:class:`logitfuse.serve.engines.LlamaCppServer`, which starts ``python -m logitfuse.serve.llama_server``:
  llama.cpp's extra CPU weight buffers off) on 127.0.0.1, serving the zoo's GGUF file of ``--llm``;
  text prompts re-sent each step, its prompt cache reusing the prefix; top-K log-probabilities;
- ``generate, served, overlap`` / ``generate, served, no overlap``: the same served LLM under our own
  decode loop, ``logitfuse.generate(..., overlap=True/False)`` (EOS off, exactly ``--new-tokens``):
  with overlap the LLM's request for a position is in flight while the SLM computes its forward.

For every fused path, ``step / max(SLM, LLM)`` is its step time over the larger of the SLM-only step
and the median LLM round trip timed inside that path (1 = the two fully overlapped; about
(SLM + LLM) / max(SLM, LLM) when they run one after the other; issue 14's target with overlap: 1.15).

How it is measured (:func:`logitfuse.bench.common.measure`): per path one whole generation is
dropped (caches, thread pools, the server's prompt cache), then ``--reps`` generations are timed,
each with a fresh processor built before the clock starts; the median is reported. Every LLM call
(the backend's ``advance``) is timed inside the loop (:class:`~logitfuse.bench.common.CallTimer`).
llama.cpp runs with as many threads as torch (``--threads``).

Needs ``pip install "logitfuse[engine]"`` (llama-cpp-python's server) and the zoo models installed
(``logitfuse models install NAME``); both are checked before anything loads.

    logitfuse bench remote --slm smollm2-135m --llm smollm2-135m --new-tokens 32 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from logitfuse.bench import common

PRIVATE = "My name is Martin Keller; I sell houses on Maple Drive and my party is on Saturday at 4 pm."
PUBLIC = "Write a short invitation to a garden party."


def time_path(name: str, generate: Callable[[Any], int], make_processor: Callable[[], tuple[Any, Any]],
              reps: int, device: torch.device) -> dict[str, Any]:
    """Time ``generate(processor)`` (returns the tokens it produced): one dropped run, then ``reps``.

    ``make_processor()`` gives ``(processor or None, CallTimer of the LLM calls or None)``; one pair
    per run is built before anything is timed.
    """
    runs = [make_processor() for _ in range(reps + 1)]
    produced: list[int] = []

    def once() -> None:
        processor, _ = runs[len(produced)]
        produced.append(generate(processor))

    timing = common.measure(once, device, warmup=1, repeat=reps)
    timed_runs = list(zip(runs[1:], produced[1:], timing["times_s"]))
    (best_proc, _), tokens, _ = min(timed_runs, key=lambda run: run[2])
    calls = [1e3 * t for (_, timer), _, _ in timed_runs if timer is not None for t in timer.times_s]
    seconds = timing["median_s"]
    return {"path": name, "tokens": tokens, "seconds_median": seconds, "tokens_per_s": tokens / seconds,
            "step_ms": 1e3 * seconds / tokens, "llm_call_ms_mean": statistics.mean(calls) if calls else None,
            "llm_call_ms_p50": statistics.median(calls) if calls else None, "reps": timing["n"],
            "stats": dict(best_proc.stats) if best_proc is not None else {}}


class LoopRun:
    """One ``logitfuse.generate`` run against ``backend`` (what :func:`time_path` builds per run);
    :attr:`stats` holds its statistics once it ran."""

    def __init__(self, backend: Any, overlap: bool):
        self.backend, self.overlap, self.stats = backend, overlap, {}


def add_overlap_ratios(rows: list[dict[str, Any]]) -> None:
    """``step_over_max_slm_llm`` for each row with LLM calls: its step over max(SLM-only step, its LLM call).

    >>> rows = [{"path": "slm-only", "step_ms": 10.0, "llm_call_ms_p50": None},
    ...         {"path": "fused", "step_ms": 45.0, "llm_call_ms_p50": 40.0}]
    >>> add_overlap_ratios(rows); rows[1]["step_over_max_slm_llm"]
    1.125
    """
    slm_step = next(r["step_ms"] for r in rows if r["path"] == "slm-only")
    for row in rows:
        if row["llm_call_ms_p50"] is not None:
            row["step_over_max_slm_llm"] = row["step_ms"] / max(slm_step, row["llm_call_ms_p50"])


def run(*, slm: str, llm: str, device: torch.device, new_tokens: int, reps: int, top_k: int, alpha: float,
        n_ctx: int, log=print) -> dict[str, Any]:
    import logitfuse
    from logitfuse import zoo
    from logitfuse.serve.engines import LlamaCppServer

    t0 = time.perf_counter()
    slm_model, slm_tok, _ = zoo.load(slm, device=str(device), install=False, progress=False)
    llm_model, llm_tok, _ = zoo.load(llm, device=str(device), install=False, progress=False)
    log(f"models {slm} / {llm} on {device} (loaded in {time.perf_counter() - t0:.1f} s)")
    messages = [{"role": "system", "content": PRIVATE}, {"role": "user", "content": PUBLIC}]
    inputs = slm_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True).to(device)
    eos = slm_tok.eos_token_id
    vmap = None if slm_tok.get_vocab() == llm_tok.get_vocab() else logitfuse.VocabMap.from_tokenizers(slm_tok, llm_tok)

    def generate(processor) -> int:
        with torch.no_grad():
            out = slm_model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                     logits_processor=[processor] if processor is not None else None, pad_token_id=eos)
        return out.shape[1] - inputs["input_ids"].shape[1]

    def timed(backend) -> common.CallTimer:
        """Time the backend's LLM calls (its ``advance``, an instance attribute from now on)."""
        backend.advance = common.CallTimer(backend.advance, device)
        return backend.advance

    def fused(backend) -> tuple[Any, common.CallTimer]:
        timer = timed(backend)
        return logitfuse.CoGenesisLogitsProcessor(backend, PUBLIC, alpha=alpha, apply_chat_template=True,
                                                  vocab_map=vmap, slm_tokenizer=slm_tok), timer

    rows = [time_path("slm-only", generate, lambda: (None, None), reps, device),
            time_path("hfllm (in-process)", generate, lambda: fused(logitfuse.HFLLM(llm_model, llm_tok)), reps, device)]
    log(rows[0])
    log(rows[1])
    with LlamaCppServer(zoo.gguf_path(llm), alias="llm", n_ctx=n_ctx, n_threads=torch.get_num_threads()) as server:
        def served():
            return logitfuse.OpenAICompatibleLLM(server.url, "llm", top_k=top_k, tokenizer=llm_tok,
                                                 prompt_format="text", on_failure="raise")

        def remote():
            return fused(served())

        rows.append(time_path(f"llama.cpp server (top-{top_k})", generate, remote, reps, device))
        log(rows[-1])

        def loop(run: LoopRun) -> int:  # EOS off: exactly new_tokens, as min_new_tokens does above
            out = logitfuse.generate(slm_model, run.backend, inputs["input_ids"], PUBLIC, alpha=alpha,
                                     max_new_tokens=new_tokens, overlap=run.overlap, eos_token_id=[],
                                     apply_chat_template=True, vocab_map=vmap, slm_tokenizer=slm_tok)
            run.stats = dict(out.stats)
            return len(out.sequences[0])

        for overlap in (True, False):
            def loop_run(overlap=overlap) -> tuple[LoopRun, common.CallTimer]:
                backend = served()
                return LoopRun(backend, overlap), timed(backend)

            rows.append(time_path(f"generate, served, {'overlap' if overlap else 'no overlap'}", loop, loop_run, reps,
                                  device))
            log(rows[-1])
    add_overlap_ratios(rows)
    return {"models": {"slm": slm, "llm": llm, "llm_gguf": zoo.gguf_path(llm).name,
                       "vocab_map": "identity" if vmap is None else "cross"}, "rows": rows}


def plot(result: dict[str, Any], out_dir: str, stem: str):
    fig, axes = common.new_figure(ncols=2)
    if fig is None:
        return None
    rows = result["rows"]
    names = [r["path"] for r in rows]
    axes[0].bar(names, [r["tokens_per_s"] for r in rows], color=[f"C{i}" for i in range(len(rows))])
    axes[0].set_ylabel("tokens/s (B=1)")
    axes[0].set_title("fused decoding, LLM in-process vs served")
    with_calls = [r for r in rows if r["llm_call_ms_p50"] is not None]
    axes[1].bar([r["path"] for r in with_calls], [r["llm_call_ms_p50"] for r in with_calls], color="C1")
    axes[1].set_ylabel("LLM call ms (median)")
    axes[1].set_title("one LLM step")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    m = result["models"]
    fig.suptitle(f"SLM {m['slm']} / LLM {m['llm']}", fontsize=8)
    return common.save_figure(fig, out_dir, stem)


TABLE_COLUMNS = [("path", "path"), ("tokens_per_s", "tokens/s"), ("step_ms", "ms/step"),
                 ("llm_call_ms_mean", "LLM call ms (mean)"), ("llm_call_ms_p50", "LLM call ms (median)"),
                 ("step_over_max_slm_llm", "step / max(SLM, LLM)")]


def add_args(parser: argparse.ArgumentParser) -> None:
    common.add_common_args(parser, device="cpu")
    parser.add_argument("--slm", default="smollm2-135m", help="zoo name of the SLM (default smollm2-135m)")
    parser.add_argument("--llm", default="smollm2-135m",
                        help="zoo name of the LLM: its GGUF is served, its folder runs in-process (default smollm2-135m)")
    parser.add_argument("--new-tokens", type=int, help="new tokens per generation (default 8 with --quick, else 32)")
    parser.add_argument("--reps", type=int, help="timed generations per path, after one dropped (default 1 with --quick, else 2)")
    parser.add_argument("--top-k", type=int, default=20, help="log-probabilities per step from the server (default 20)")
    parser.add_argument("--alpha", type=float, default=0.5, help="fixed fusion weight of the SLM (default 0.5)")
    parser.add_argument("--n-ctx", type=int, default=512, help="llama.cpp context (its per-request cost grows with it; default 512)")


def execute(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.perf_counter()
    device = common.setup(args)
    info = common.machine_info(device)
    new_tokens = args.new_tokens or (8 if args.quick else 32)
    reps = args.reps or (1 if args.quick else 2)
    result = run(slm=args.slm, llm=args.llm, device=device, new_tokens=new_tokens, reps=reps, top_k=args.top_k,
                 alpha=args.alpha, n_ctx=args.n_ctx)
    stem = "remote" + ("_quick" if args.quick else "")
    return common.report(args, "remote", argv, started, info, stem, result, plot, TABLE_COLUMNS, batch=1,
                         new_tokens=new_tokens, reps=reps, top_k=args.top_k, alpha=args.alpha, n_ctx=args.n_ctx,
                         llama_cpp_threads=torch.get_num_threads())
