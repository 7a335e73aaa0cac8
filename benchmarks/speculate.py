"""Speculative-fusion benchmark: ``logitfuse.generate(..., speculate=K)`` against per-step fusion, in one run.

On a same-tokenizer pair (``--slm``, ``--llm``: zoo names; both in-process, the LLM an
:class:`~logitfuse.HFLLM`), greedy, ``--examples`` examples of the bundled CoGenesis test split (the
private prompt, with the user's profile and history, to the SLM; the public task title to the LLM,
as :mod:`logitfuse.prompts` renders them), at most ``--new-tokens`` per example (EOS ends one, as
in use), batch 1, one example after the other. For each weight (a fixed ``--alpha`` and/or the head
of ``--head``) and each path:

- ``processor``: ``slm.generate(..., logits_processor=[CoGenesisLogitsProcessor(...)])``;
- ``per-step, no overlap`` / ``per-step, overlap``: ``logitfuse.generate`` with ``speculate=0``,
  the LLM's request run one after the SLM's forward or in a thread beside it;
- ``speculate K``: ``logitfuse.generate(..., speculate=K)`` for each K > 0 of ``--speculate``.

Reported per path: tokens/s over all examples, LLM calls per generated token, the acceptance rate
(``draft_tokens_kept / draft_tokens_sent``), the speedup against per-step fusion with overlap (K = 0)
in the same run, and whether every example's tokens are identical to it (greedy: they must be).

How it is measured (:func:`logitfuse.bench.common.measure`): one short generation of every path is
made and dropped first (thread pools, allocator, caches); then each path generates all examples
``--reps`` times, each repeat timed between two synchronized clock reads; the median is reported.

    logitfuse bench speculate --quick --threads 2
    logitfuse bench speculate --slm qwen2.5-coder-0.5b --llm qwen2.5-coder-1.5b --speculate 0 2 4 8
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from logitfuse.bench import common

DEFAULT_SLM, DEFAULT_LLM = "smollm2-135m-cogenesis", "smollm2-135m"
PER_STEP = "per-step, overlap"  # the reference path: K = 0


class Pair:
    """The two models (the LLM as a fresh :class:`~logitfuse.HFLLM` per call), their tokenizer and the prompts."""

    def __init__(self, slm: Any, llm_model: Any, slm_tok: Any, llm_tok: Any, names: tuple[str, str]):
        self.slm, self.llm_model, self.slm_tok, self.llm_tok, self.names = slm, llm_model, slm_tok, llm_tok, names
        self.eos = slm_tok.eos_token_id
        self.pad = slm_tok.pad_token_id if slm_tok.pad_token_id is not None else (self.eos or 0)
        self.prompts: list[tuple[list[int], list[int]]] = []  # (private SLM ids, public LLM ids) per example
        self.max_prompt: int | None = None  # tiny models: keep the last this many private ids

    def llm(self):
        from logitfuse.backends import HFLLM

        return HFLLM(self.llm_model, self.llm_tok)

    def add_examples(self, n: int, max_history: int) -> None:
        from logitfuse.prompts import bundled_split, load_examples, render_prompt

        for example in load_examples(bundled_split("test"), max_examples=n):
            private = render_prompt(self.slm_tok, example.private_messages(max_history))
            self.prompts.append((private[-self.max_prompt:] if self.max_prompt else private,
                                 render_prompt(self.llm_tok, example.public_messages())))


def load_pair(slm: str, llm: str, device: torch.device, *, tiny: bool = False) -> Pair:
    """The zoo models ``slm`` and ``llm`` (float32 on CPU, bf16 on CUDA), or two tiny random models
    over one byte-level tokenizer (``tiny``: nothing loaded from disk)."""
    if tiny:
        from logitfuse.testing import byte_level_tokenizer, tiny_llama

        tok = byte_level_tokenizer()
        tok.pad_token = tok.pad_token or tok.eos_token
        pair = Pair(tiny_llama(len(tok), seed=0).to(device), tiny_llama(len(tok), seed=1).to(device), tok, tok,
                    ("tiny-llama(seed 0)", "tiny-llama(seed 1)"))
        pair.max_prompt = 256  # a byte-level tokenizer makes thousands of ids of a CoGenesis prompt
        return pair
    from logitfuse import zoo

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    slm_model, slm_tok, _ = zoo.load(slm, dtype=dtype, device=str(device), install=False, progress=False)
    llm_model, llm_tok, _ = zoo.load(llm, dtype=dtype, device=str(device), install=False, progress=False)
    if slm_tok.get_vocab() != llm_tok.get_vocab():
        raise ValueError(f"--slm {slm} and --llm {llm} do not share a tokenizer; speculation needs one (e.g. "
                         f"--slm {DEFAULT_SLM} --llm {DEFAULT_LLM}, or qwen2.5-coder-0.5b with qwen2.5-coder-1.5b)")
    return Pair(slm_model, llm_model, slm_tok, llm_tok, (slm, llm))


# ------------------------------------------------------------------------------------ the paths
def fused_generate(pair: Pair, weight: dict[str, Any], new_tokens: int, *, speculate: int = 0,
                   overlap: bool = True) -> tuple[list[list[int]], dict[str, int]]:
    """Every example through ``logitfuse.generate``: its tokens, and the statistics summed."""
    import logitfuse

    outputs, totals = [], {}
    for private, public in pair.prompts:
        out = logitfuse.generate(pair.slm, pair.llm(), [private], public, max_new_tokens=new_tokens,
                                 speculate=speculate, overlap=overlap, eos_token_id=pair.eos,
                                 pad_token_id=pair.pad, **weight)
        outputs.append(out.sequences[0])
        for key, value in dict(out.stats).items():
            totals[key] = totals.get(key, 0) + value
    return outputs, totals


def processor_generate(pair: Pair, weight: dict[str, Any], new_tokens: int) -> tuple[list[list[int]], dict[str, int]]:
    """Every example through ``slm.generate`` with a :class:`~logitfuse.CoGenesisLogitsProcessor`."""
    from logitfuse.processor import CoGenesisLogitsProcessor

    device = next(pair.slm.parameters()).device
    outputs, totals = [], {}
    for private, public in pair.prompts:
        processor = CoGenesisLogitsProcessor(pair.llm(), public, eos_token_id=pair.eos, **weight)
        ids = torch.tensor([private], device=device)
        with torch.inference_mode():
            out = pair.slm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                    do_sample=False, repetition_penalty=1.0, eos_token_id=pair.eos,
                                    pad_token_id=pair.pad, logits_processor=[processor])
        outputs.append(out[0, ids.shape[1]:].tolist())
        for key, value in dict(processor.stats).items():
            totals[key] = totals.get(key, 0) + value
    return outputs, totals


def paths(speculate: list[int]) -> list[tuple[str, dict[str, Any]]]:
    """``(name, how)`` of each path: ``how`` is ``{"processor": True}`` or ``logitfuse.generate``'s options."""
    named = [("processor", {"processor": True}), ("per-step, no overlap", {"speculate": 0, "overlap": False}),
             (PER_STEP, {"speculate": 0, "overlap": True})]
    return named + [(f"speculate {k}", {"speculate": k}) for k in speculate if k > 0]


def run_path(pair: Pair, weight: dict[str, Any], how: dict[str, Any], new_tokens: int):
    if how.get("processor"):
        return processor_generate(pair, weight, new_tokens)
    return fused_generate(pair, weight, new_tokens, **how)


def time_path(pair: Pair, weight: dict[str, Any], how: dict[str, Any], new_tokens: int, reps: int,
              device: torch.device) -> dict[str, Any]:
    results: list[tuple[list[list[int]], dict[str, int]]] = []
    timing = common.measure(lambda: results.append(run_path(pair, weight, how, new_tokens)), device, warmup=0,
                            repeat=reps)
    outputs, stats = results[-1]
    tokens = sum(len(o) for o in outputs)
    sent = stats.get("draft_tokens_sent", 0)
    return {"outputs": outputs, "tokens": tokens, "seconds_median": timing["median_s"], "reps": timing["n"],
            "tokens_per_s": tokens / timing["median_s"], "llm_calls": stats.get("llm_calls", 0),
            "llm_calls_per_token": stats.get("llm_calls", 0) / max(tokens, 1),
            "draft_tokens_sent": sent, "draft_tokens_kept": stats.get("draft_tokens_kept", 0),
            "acceptance_rate": stats.get("draft_tokens_kept", 0) / sent if sent else None}


# ------------------------------------------------------------------------------------ weights
def shipped_head(slm: str, llm: str) -> Any:
    """The dense head shipped for the pair (``train_fuser/heads/SLM__LLM/dense``), ``None`` when there is none."""
    from logitfuse.prompts import shipped_path

    folder = shipped_path("heads", f"{slm}__{llm}", "dense")
    return folder if (folder / "config.json").is_file() else None


def weights(pair: Pair, alpha: float | None, head: str) -> tuple[list[tuple[str, dict[str, Any]]], str]:
    """``([(label, {"alpha": a} or {"head": head})], note)``: the fixed α and the head asked for.

    ``head``: a folder, ``"auto"`` (the head shipped for the pair, when there is one and it fits) or
    ``"none"``. The note says why ``"auto"`` found none.
    """
    from logitfuse.heads import load_head
    from logitfuse.vocab import VocabMap

    chosen = [(f"alpha={alpha:g}", {"alpha": alpha})] if alpha is not None else []
    note = ""
    folder = None
    if head == "auto":
        folder = shipped_head(*pair.names)
        note = "" if folder else f"no head is shipped for {pair.names[0]} + {pair.names[1]}"
    elif head != "none":
        folder = head
    if folder is not None:
        v_slm = int(pair.slm.get_output_embeddings().weight.shape[0])
        v_llm = int(pair.llm_model.get_output_embeddings().weight.shape[0])
        vmap = VocabMap.identity(v_slm, v_llm, n_shared=min(len(pair.slm_tok), v_slm, v_llm))
        try:
            chosen.append((f"head {folder}", {"head": load_head(folder, vocab_map=vmap)}))
        except ValueError as err:
            if head != "auto":
                raise
            note = f"the shipped head does not fit these models ({err})"
    return chosen, note


# ------------------------------------------------------------------------------------ the run
def run(*, slm: str = DEFAULT_SLM, llm: str = DEFAULT_LLM, device: torch.device, examples: int, new_tokens: int,
        speculate: list[int], alpha: float | None, head: str, reps: int = 1, max_history: int = 2, tiny: bool = False,
        log=print) -> dict[str, Any]:
    t0 = time.perf_counter()
    pair = load_pair(slm, llm, device, tiny=tiny)
    pair.add_examples(examples, max_history)
    chosen, note = weights(pair, alpha, head)
    if not chosen:
        raise ValueError(f"no weight to run: --head {head} found none ({note}) and --alpha is off; pass --alpha A")
    log(f"models {pair.names} on {device}, {len(pair.prompts)} examples, private prompts of "
        f"{[len(p) for p, _ in pair.prompts]} tokens (loaded in {time.perf_counter() - t0:.1f} s)"
        + (f"; {note}" if note else ""))
    rows = []
    for label, weight in chosen:
        for _, how in paths(speculate):  # warm-up, dropped: one short generation of each path
            run_path(_first(pair), weight, how, 2)
        reference = None
        for name, how in paths(speculate):
            row = {"weight": label, "path": name, "speculate": how.get("speculate"),
                   **time_path(pair, weight, how, new_tokens, reps, device)}
            if name == PER_STEP:
                reference = row
            rows.append(row)
        for row in rows[-len(paths(speculate)):]:
            row["speedup_vs_per_step"] = row["tokens_per_s"] / reference["tokens_per_s"]
            row["identical_to_per_step"] = row["outputs"] == reference["outputs"]
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                         if k != "outputs"))
    for row in rows:
        row["tokens_per_example"] = [len(o) for o in row.pop("outputs")]  # the JSON keeps lengths, not the text
    return {"models": {"slm": pair.names[0], "llm": pair.names[1], "tiny": tiny,
                       "dtype": str(next(pair.slm.parameters()).dtype)},
            "examples": len(pair.prompts), "head_note": note, "rows": rows,
            "all_identical": all(r["identical_to_per_step"] for r in rows)}


def _first(pair: Pair) -> Pair:
    """``pair`` with its first example only (for the warm-up)."""
    first = Pair(pair.slm, pair.llm_model, pair.slm_tok, pair.llm_tok, pair.names)
    first.prompts, first.max_prompt = pair.prompts[:1], pair.max_prompt
    return first


def plot(result: dict[str, Any], out_dir: str, stem: str):
    fig, axes = common.new_figure(ncols=2)
    if fig is None:
        return None
    rows = result["rows"]
    labels = sorted({r["weight"] for r in rows}, key=[r["weight"] for r in rows].index)
    names = list(dict.fromkeys(r["path"] for r in rows))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        ours = {r["path"]: r for r in rows if r["weight"] == label}
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(names))]
        axes[0].bar(xs, [ours[n]["tokens_per_s"] if n in ours else 0 for n in names], width, label=label)
        axes[1].bar(xs, [ours[n]["llm_calls_per_token"] if n in ours else 0 for n in names], width, label=label)
    for ax, title in ((axes[0], "tokens/s (B=1, greedy)"), (axes[1], "LLM calls per generated token")):
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(title)
        ax.legend(fontsize=7)
    m = result["models"]
    fig.suptitle(f"SLM {m['slm']} / LLM {m['llm']}, {result['examples']} examples", fontsize=8)
    return common.save_figure(fig, out_dir, stem)


TABLE_COLUMNS = [("weight", "weight"), ("path", "path"), ("tokens", "tokens"), ("tokens_per_s", "tokens/s"),
                 ("llm_calls_per_token", "LLM calls / token"), ("acceptance_rate", "acceptance"),
                 ("speedup_vs_per_step", "× per-step (overlap)"), ("identical_to_per_step", "identical")]


def parse_alpha(value: str) -> float | None:
    """``--alpha``: ``None`` for ``"none"``, else the number (``ValueError`` when it is neither)."""
    return None if value == "none" else float(value)


def add_args(parser: argparse.ArgumentParser) -> None:
    common.add_common_args(parser, device="cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny random models over one tokenizer (no zoo models)")
    parser.add_argument("--slm", default=DEFAULT_SLM, help=f"zoo name of the SLM (default {DEFAULT_SLM})")
    parser.add_argument("--llm", default=DEFAULT_LLM,
                        help=f"zoo name of the LLM, the SLM's tokenizer (default {DEFAULT_LLM}; or qwen2.5-coder-0.5b "
                             "as SLM with qwen2.5-coder-1.5b)")
    parser.add_argument("--examples", type=int, help="examples of the test split (default 2 with --quick, else 8)")
    parser.add_argument("--new-tokens", type=int, help="new tokens at most per example (default 32 with --quick, else 64)")
    parser.add_argument("--speculate", type=int, nargs="+", default=[0, 2, 4, 8],
                        help="draft lengths K (default 0 2 4 8; per-step fusion, K = 0, always runs)")
    parser.add_argument("--alpha", default="0.5",
                        help="fixed fusion weight of the SLM in [0, 1), or 'none' for the head only (default 0.5)")
    parser.add_argument("--head", default="auto",
                        help="a head folder, 'auto' (the head shipped for the pair, when one fits; default) or 'none'")
    parser.add_argument("--reps", type=int, help="timed repeats of each path, after one dropped warm-up (default 1)")
    parser.add_argument("--max-history", type=int, default=2, help="writing-history items in the private prompt (default 2)")


def execute(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.perf_counter()
    device = common.setup(args)
    info = common.machine_info(device)
    examples = args.examples or (2 if args.quick else 8)
    new_tokens = args.new_tokens or (32 if args.quick else 64)
    reps = args.reps or 1
    result = run(slm=args.slm, llm=args.llm, device=device, examples=examples, new_tokens=new_tokens,
                 speculate=sorted(set(args.speculate)), alpha=parse_alpha(args.alpha), head=args.head,
                 reps=reps, max_history=args.max_history, tiny=args.tiny)
    stem = "speculate" + ("_tiny" if args.tiny else "") + ("_quick" if args.quick else "")
    return common.report(args, "speculate", argv, started, info, stem, result, plot, TABLE_COLUMNS, batch=1,
                         greedy=True, new_tokens=new_tokens, reps=reps)
