"""Decoding benchmark: tokens/s and per-step latency of the SLM alone, the LLM alone, and fused
decoding (``slm.generate(..., logits_processor=[CoGenesisLogitsProcessor(HFLLM(...), ...)])``), per
batch size; plus a baseline shaped like the CoGenesis paper's code at batch 1: every step the LLM
re-reads the whole prefix (no KV cache) and a :class:`~logitfuse.PaperFusionHead` over both full
logit vectors (2V -> 512 -> 16 -> 1) picks α; beside it, at the same length, the fastest exact
configuration: :func:`logitfuse.generate` with overlap (``generate_overlap``) and, with
``--slm-engine llama.cpp``, the same with the SLM's GGUF file in llama.cpp (``generate_overlap_llama_cpp``).

How it is measured (gpt-fast habits, the clocks of :mod:`logitfuse.bench.common`): greedy
decoding, EOS disabled so every row runs all steps, one short warm-up generation of each kind
dropped, the device synchronized before each clock read. A recorder ``LogitsProcessor`` stamps the
clock at every step, so per-step latency is the median gap between
consecutive steps (prefill excluded) and tokens/s = batch · (steps - 1) / (last stamp - first stamp).
In the fused run the LLM backend's ``start``/``advance`` and the processor's call are also timed
inside the same loop (:class:`~logitfuse.bench.common.CallTimer`): fusion overhead = processor time - LLM time (α head + fusion + bookkeeping),
reported over the step's SLM + LLM time; and the back-to-back ratio fused step / (SLM-alone step +
LLM-alone step).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from logitfuse.backends import HFLLM
from logitfuse.bench import common
from logitfuse.functional import fuse
from logitfuse.heads import FusionHead, PaperFusionHead
from logitfuse.decoding.processor import CoGenesisLogitsProcessor
from logitfuse.vocab import VocabMap

PRIVATE_TEXT = ("Context: my name is Martin, I sell houses on Maple Drive and I host a charity dinner on "
                "Saturday at 7pm at the Oak Hall. ")
PUBLIC_TEXT = "Write a short invitation for a charity dinner."


# ------------------------------------------------------------------------------------ models
def tiny_model(vocab_size: int, seed: int, hidden: int = 64, layers: int = 2):
    """A random Llama (no download), like ``logitfuse.testing.tiny_llama``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=0,
                         eos_token_id=None, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def load_zoo(name: str, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitfuse import zoo

    folder = zoo.path(name)
    # float32 on CPU (about 2x faster than bf16 there), bf16 on CUDA
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _no_eos(model, pad_id: int) -> None:
    gc = model.generation_config
    gc.eos_token_id = None
    gc.pad_token_id = pad_id
    gc.do_sample = False
    for key in ("temperature", "top_p", "top_k"):
        if hasattr(gc, key):
            setattr(gc, key, None)


class Setup:
    """The two models, tokenizers, vocabulary map and prompts of one benchmark run."""

    def __init__(self, *, tiny: bool, slm_name: str, llm_name: str, device: torch.device, tiny_vocab: int = 512):
        self.device = device
        if tiny:
            self.slm, self.slm_tok = tiny_model(tiny_vocab, 0).to(device), None
            self.llm_model, self.llm_tok = tiny_model(tiny_vocab, 1).to(device), None
            self.names = (f"tiny-llama-v{tiny_vocab}(seed 0)", f"tiny-llama-v{tiny_vocab}(seed 1)")
            g = torch.Generator().manual_seed(0)
            self.private_ids = torch.randint(1, tiny_vocab, (40,), generator=g).tolist()
            self.public_ids = torch.randint(1, tiny_vocab, (12,), generator=g).tolist()
            self.vmap = None
            self.pad_slm = self.pad_llm = 0
        else:
            self.slm, self.slm_tok = load_zoo(slm_name, device)
            # always a separate instance, also when both names are the same
            self.llm_model, self.llm_tok = load_zoo(llm_name, device)
            self.names = (slm_name, llm_name)
            self.private_ids = self.slm_tok(PRIVATE_TEXT + PUBLIC_TEXT)["input_ids"]
            self.public_ids = self.llm_tok(PUBLIC_TEXT)["input_ids"]
            same = self.slm_tok.get_vocab() == self.llm_tok.get_vocab()
            self.vmap = None if same else VocabMap.from_tokenizers(self.slm_tok, self.llm_tok)
            self.pad_slm, self.pad_llm = int(self.slm_tok.pad_token_id), int(self.llm_tok.pad_token_id)
        _no_eos(self.slm, self.pad_slm)
        _no_eos(self.llm_model, self.pad_llm)
        self.v_slm = int(self.slm.get_output_embeddings().weight.shape[0])
        self.v_llm = int(self.llm_model.get_output_embeddings().weight.shape[0])
        if self.vmap is None:
            self.vmap_used = VocabMap.identity(self.v_slm, self.v_llm)
        else:
            self.vmap_used = self.vmap

    def private_batch(self, batch: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor([self.private_ids] * batch, device=self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def public_batch(self, batch: int) -> list[list[int]]:
        return [list(self.public_ids) for _ in range(batch)]


# ------------------------------------------------------------------------------------ clocks in the loop
class StepClock(LogitsProcessor):
    """Stamps the clock (device synchronized) at every step; returns the scores unchanged."""

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores):
        self.stamps.append(common.now(self.device))
        return scores


class TimedProcessor(LogitsProcessor):
    """Wraps a processor; :attr:`timer` (a :class:`~logitfuse.bench.common.CallTimer`) times its calls."""

    def __init__(self, inner, device: torch.device):
        self.timer = common.CallTimer(inner, device)

    def __call__(self, input_ids, scores):
        return self.timer(input_ids, scores)


def time_backend(llm: HFLLM, device: torch.device) -> list[common.CallTimer]:
    """Time ``llm.start`` and ``llm.advance`` inside the processor's calls (instance attributes)."""
    timers = []
    for name in ("start", "advance"):
        timer = common.CallTimer(getattr(llm, name), device)
        setattr(llm, name, timer)
        timers.append(timer)
    return timers


def step_figures(stamps: list[float], batch: int) -> dict[str, float]:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    if not gaps:
        return {}
    return {"step_ms": statistics.median(gaps) * 1e3, "tokens_per_s": batch * len(gaps) / (stamps[-1] - stamps[0]),
            "steps_timed": len(gaps)}


# ------------------------------------------------------------------------------------ configurations
def run_slm_alone(s: Setup, batch: int, new_tokens: int) -> dict[str, Any]:
    clock = StepClock(s.device)
    with torch.inference_mode():
        s.slm.generate(**s.private_batch(batch), max_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([clock]), pad_token_id=s.pad_slm)
    return step_figures(clock.stamps, batch)


def run_llm_alone(s: Setup, batch: int, new_tokens: int) -> dict[str, Any]:
    """Greedy decoding through :class:`HFLLM` (the LLM's cost inside fused decoding)."""
    llm = HFLLM(s.llm_model, s.llm_tok)
    stamps = []
    with torch.inference_mode():
        llm.start(s.public_batch(batch))
        nxt = llm.next_logits.argmax(-1)
        for _ in range(new_tokens):
            stamps.append(common.now(s.device))
            out = llm.advance([[int(t)] for t in nxt.tolist()])
            nxt = out.next.argmax(-1)
        stamps.append(common.now(s.device))
    return step_figures(stamps, batch)


def run_fused(s: Setup, batch: int, new_tokens: int, head_kind: str) -> dict[str, Any]:
    llm = HFLLM(s.llm_model, s.llm_tok)
    backend_timers = time_backend(llm, s.device)
    kwargs: dict[str, Any] = {}
    if head_kind == "head":
        kwargs["head"] = FusionHead(s.v_slm, s.v_llm).to(s.device)
    else:
        kwargs["alpha"] = 0.5
    if s.vmap is not None:
        kwargs.update(vocab_map=s.vmap, slm_tokenizer=s.slm_tok, eos_token_id=[])
    proc = CoGenesisLogitsProcessor(llm, s.public_batch(batch), **kwargs)
    clock = StepClock(s.device)
    timed = TimedProcessor(proc, s.device)
    with torch.inference_mode():
        t0 = common.now(s.device)
        s.slm.generate(**s.private_batch(batch), max_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([clock, timed]), pad_token_id=s.pad_slm)
        total = common.now(s.device) - t0
    out = step_figures(clock.stamps, batch)
    llm_s = sum(timer.seconds for timer in backend_timers)
    overhead_s = timed.timer.seconds - llm_s
    models_s = total - overhead_s  # SLM forwards + generate's own work + LLM forwards
    out.update(total_s=total, processor_s=timed.timer.seconds, llm_s=llm_s, fusion_overhead_s=overhead_s,
               fusion_overhead_ms_per_step=overhead_s / max(timed.timer.calls, 1) * 1e3,
               fusion_overhead_frac_in_loop=overhead_s / models_s, llm_calls=proc.stats["llm_calls"])
    return out


class PaperLoopProcessor(LogitsProcessor):
    """The paper's loop, as a processor: each step the LLM re-reads the public prompt plus the whole
    generated text (``use_cache=False``); :class:`PaperFusionHead` over both full logit vectors gives α;
    fusion in the paper's ``"logit"`` mode with the ``"zero"`` tail."""

    def __init__(self, s: Setup):
        self.s = s
        self.head = PaperFusionHead(s.v_slm, s.v_llm).to(s.device)
        self.prompt_len = None

    @torch.no_grad()
    def __call__(self, input_ids, scores):
        s = self.s
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        generated = input_ids[:, self.prompt_len:]
        if s.vmap is None:
            llm_ids = torch.cat([torch.tensor([s.public_ids] * input_ids.shape[0], device=s.device), generated], dim=1)
        else:  # cross-tokenizer: re-tokenize all the generated text with the LLM's tokenizer, every step
            texts = s.slm_tok.batch_decode(generated)
            llm_ids = torch.tensor([s.public_ids + s.llm_tok(t, add_special_tokens=False)["input_ids"] for t in texts],
                                   device=s.device)
        llm_logits = s.llm_model(input_ids=llm_ids, use_cache=False).logits[:, -1, :].float()
        alpha = self.head(scores, llm_logits, s.vmap_used).clamp(0, 1)
        return fuse(scores, llm_logits, alpha=alpha, vocab_map=s.vmap_used, mode="logit", tail="zero", validate=False)


def run_paper(s: Setup, new_tokens: int) -> dict[str, Any]:
    clock = StepClock(s.device)
    proc = PaperLoopProcessor(s)
    with torch.inference_mode():
        s.slm.generate(**s.private_batch(1), max_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([clock, proc]), pad_token_id=s.pad_slm)
    return step_figures(clock.stamps, 1)


def _weight_options(s: Setup, head_kind: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"head": FusionHead(s.v_slm, s.v_llm).to(s.device)} if head_kind == "head" else {"alpha": 0.5}
    if s.vmap is not None:
        kwargs.update(vocab_map=s.vmap, slm_tokenizer=s.slm_tok)
    return kwargs


def run_generate_loop(s: Setup, new_tokens: int, head_kind: str, llama: Any = None) -> dict[str, Any]:
    """Batch 1 through ``logitfuse.generate`` with overlap (the fastest exact configuration per step),
    the SLM in transformers or, with ``llama``, a :class:`~logitfuse.LlamaCppSLM` over its GGUF file;
    EOS off. tokens/s = (tokens - 1) / (time after the first token), prefill excluded as in the others."""
    import logitfuse

    started = common.now(s.device)
    out = logitfuse.generate(llama or s.slm, HFLLM(s.llm_model, s.llm_tok), [s.private_ids], s.public_ids,
                             max_new_tokens=new_tokens, overlap=True, eos_token_id=[], pad_token_id=s.pad_slm,
                             **_weight_options(s, head_kind))
    total = common.now(s.device) - started
    n = len(out.sequences[0])
    return {"tokens_per_s": (n - 1) / (total - out.first_token_seconds), "step_ms": (total - out.first_token_seconds)
            / max(n - 1, 1) * 1e3, "steps_timed": n - 1, "llm_calls": out.stats.llm_calls}


def _llama_slm(s: Setup, slm_name: str, new_tokens: int) -> Any:
    from logitfuse import zoo
    from logitfuse.decoding.llama_cpp import LlamaCppSLM

    return LlamaCppSLM(zoo.gguf_path(slm_name), tokenizer=s.slm_tok, n_ctx=len(s.private_ids) + new_tokens + 8,
                       n_threads=torch.get_num_threads())


def run(*, quick: bool, device: torch.device, tiny: bool = False, slm: str = "smollm2-135m", llm: str | None = None,
        batches=None, new_tokens: int | None = None, paper_tokens: int | None = None, head: str = "head",
        tiny_vocab: int = 512, slm_engine: str = "transformers", log=print) -> dict[str, Any]:
    llm = llm or (slm if quick else "qwen2.5-coder-0.5b")
    batches = batches or ([1, 8] if quick else [1, 8, 32])
    new_tokens = new_tokens or (16 if quick else 64)
    paper_tokens = paper_tokens if paper_tokens is not None else (64 if quick else 256)
    t0 = time.perf_counter()
    s = Setup(tiny=tiny, slm_name=slm, llm_name=llm, device=device, tiny_vocab=tiny_vocab)
    log(f"models {s.names} on {device}, V_S={s.v_slm}, V_L={s.v_llm}, map={'identity' if s.vmap is None else 'cross'}"
        f" (loaded in {time.perf_counter() - t0:.1f} s)")
    # warm-up, dropped: one short generation of each kind
    run_slm_alone(s, 1, 3)
    run_llm_alone(s, 1, 3)
    run_fused(s, 1, 3, head)
    rows = []
    for batch in batches:
        for name, fn in (("slm", lambda b=batch: run_slm_alone(s, b, new_tokens)),
                         ("llm", lambda b=batch: run_llm_alone(s, b, new_tokens)),
                         ("fused", lambda b=batch: run_fused(s, b, new_tokens, head))):
            row = {"config": name, "B": batch, "new_tokens": new_tokens, **fn()}
            rows.append(row)
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        slm_row, llm_row, fused_row = rows[-3:]
        fused_row["fused_over_slm_plus_llm"] = fused_row["step_ms"] / (slm_row["step_ms"] + llm_row["step_ms"])
    paper = None
    if paper_tokens:
        fused_long = {"config": "fused", "B": 1, "new_tokens": paper_tokens, **run_fused(s, 1, paper_tokens, head)}
        run_paper(s, 2)  # warm-up
        paper = {"config": "paper_loop", "B": 1, "new_tokens": paper_tokens, **run_paper(s, paper_tokens)}
        paper["fused_speedup"] = fused_long["tokens_per_s"] / paper["tokens_per_s"]
        # the fastest exact configurations: logitfuse.generate with overlap (and the SLM in llama.cpp)
        run_generate_loop(s, 3, head)  # warm-up
        loops = [{"config": "generate_overlap", "B": 1, "new_tokens": paper_tokens,
                  **run_generate_loop(s, paper_tokens, head)}]
        if slm_engine == "llama.cpp":
            with _llama_slm(s, slm, paper_tokens) as llama:
                run_generate_loop(s, 3, head, llama)  # warm-up
                loops.append({"config": "generate_overlap_llama_cpp", "B": 1, "new_tokens": paper_tokens,
                              **run_generate_loop(s, paper_tokens, head, llama)})
        for row in loops:
            row["speedup_vs_paper_loop"] = row["tokens_per_s"] / paper["tokens_per_s"]
        rows += [fused_long, *loops, paper]
        for row in rows[-2 - len(loops):]:
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    fastest = max((r for r in rows if "speedup_vs_paper_loop" in r), key=lambda r: r["tokens_per_s"], default=None)
    return {"fastest_exact_vs_paper": ({"config": fastest["config"], "speedup": fastest["speedup_vs_paper_loop"]}
                                       if fastest else None),
            "models": {"slm": s.names[0], "llm": s.names[1], "v_slm": s.v_slm, "v_llm": s.v_llm,
                       "vocab_map": "identity" if s.vmap is None else f"cross (coverage {s.vmap.coverage:.3f})",
                       "dtype": str(next(s.slm.parameters()).dtype), "tiny": tiny},
            "head": "FusionHead (untrained, ~3k params)" if head == "head" else "fixed alpha=0.5",
            "rows": rows, "paper_speedup": paper["fused_speedup"] if paper else None}


def plot(result: dict[str, Any], out_dir: str, stem: str):
    fig, axes = common.new_figure(ncols=2)
    if fig is None:
        return None
    rows = [r for r in result["rows"] if r["config"] in ("slm", "llm", "fused") and r["new_tokens"] == result["rows"][0]["new_tokens"]]
    batches = sorted({r["B"] for r in rows})
    width = 0.25
    for i, cfg in enumerate(("slm", "llm", "fused")):
        vals = [next((r["tokens_per_s"] for r in rows if r["config"] == cfg and r["B"] == b), 0) for b in batches]
        axes[0].bar([j + (i - 1) * width for j in range(len(batches))], vals, width, label=cfg)
    axes[0].set_xticks(range(len(batches)), [f"B={b}" for b in batches])
    axes[0].set_ylabel("tokens/s")
    axes[0].set_title("decoding throughput")
    axes[0].legend(fontsize=7)
    # the rows at --paper-tokens: fused (processor), logitfuse.generate and the paper loop at batch 1
    last = result["rows"][-1]
    long = [r for r in result["rows"] if r["B"] == 1 and r["new_tokens"] == last["new_tokens"]
            and r["config"] not in ("slm", "llm")][-4:] if last["config"] == "paper_loop" else []
    if long:
        axes[1].bar([r["config"].replace("generate_overlap", "generate") for r in long],
                    [r["tokens_per_s"] for r in long], color=["C2", "C4", "C5", "C3"][-len(long):])
        axes[1].tick_params(axis="x", labelsize=6)
        axes[1].set_ylabel("tokens/s (B=1)")
        axes[1].set_title(f"ours vs paper-shaped loop, {long[-1]['new_tokens']} tokens")
    m = result["models"]
    fig.suptitle(f"SLM {m['slm']} / LLM {m['llm']}", fontsize=8)
    return common.save_figure(fig, out_dir, stem)


TABLE_COLUMNS = [("config", "config"), ("B", "B"), ("new_tokens", "new tokens"), ("tokens_per_s", "tokens/s"),
                 ("step_ms", "step ms (median)"), ("fusion_overhead_ms_per_step", "fusion overhead ms/step"),
                 ("fusion_overhead_frac_in_loop", "overhead / (SLM+LLM), in loop"),
                 ("fused_over_slm_plus_llm", "fused step / (SLM step + LLM step)"), ("fused_speedup", "fused × paper loop"),
                 ("speedup_vs_paper_loop", "generate × paper loop")]


def add_args(parser: argparse.ArgumentParser) -> None:
    common.add_common_args(parser)
    parser.add_argument("--tiny", action="store_true", help="tiny random models built in-process (no zoo models needed)")
    parser.add_argument("--tiny-vocab", type=int, default=512, help="vocabulary size of the --tiny models (default 512)")
    parser.add_argument("--slm", default="smollm2-135m", help="zoo name of the SLM (default smollm2-135m)")
    parser.add_argument("--llm", default=None, help="zoo name of the LLM (default: the SLM with --quick, else qwen2.5-coder-0.5b)")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 1 8 with --quick, else 1 8 32)")
    parser.add_argument("--new-tokens", type=int, help="new tokens per configuration (default 16 with --quick, else 64)")
    parser.add_argument("--paper-tokens", type=int, help="new tokens for fused vs paper loop at batch 1 (0 = skip; default 64 quick, 256 full)")
    parser.add_argument("--head", choices=("head", "fixed"), default="head", help="FusionHead (default) or fixed alpha")
    parser.add_argument("--slm-engine", default="transformers", choices=["transformers", "llama.cpp"],
                        help="llama.cpp: the paper-loop comparison also runs logitfuse.generate with the SLM's GGUF "
                             "file in llama.cpp (needs llama-cpp-python and a zoo SLM)")


def execute(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.perf_counter()
    device = common.setup(args)
    info = common.machine_info(device)
    result = run(quick=args.quick, device=device, tiny=args.tiny, slm=args.slm, llm=args.llm, batches=args.batch,
                 new_tokens=args.new_tokens, paper_tokens=args.paper_tokens, head=args.head,
                 tiny_vocab=args.tiny_vocab, slm_engine=args.slm_engine)
    stem = f"decode_{device.type}" + ("_tiny" if args.tiny else "") + ("_quick" if args.quick else "")
    return common.report(args, "decode", argv, started, info, stem, result, plot, TABLE_COLUMNS)

