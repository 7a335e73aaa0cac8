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

- ``SLM alone``: ``logitfuse.generate(..., alpha=1)`` (the LLM never asked): the SLM's own rate.

With ``--slm-engine llama.cpp`` every ``logitfuse.generate`` path also runs with the SLM in
llama.cpp (the zoo's GGUF file, :class:`~logitfuse.LlamaCppSLM`, as many threads as torch), labelled
``[llama.cpp]``: the SLM engine of a laptop beside the transformers one, in one run. A pair with two
tokenizers (the demo's, ``--slm smollm2-135m --llm qwen2.5-coder-0.5b``) runs per-step fusion only
(speculation needs one tokenizer).

``--llm-latency S`` puts an **emulated** network round trip in front of the in-process LLM: every
request (prefill, step, draft scoring) sleeps S seconds first (:class:`EmulatedLatencyLLM`), the
device-to-cloud regime speculation exists for (0.15 s is about what llama.cpp's server took per call
in ``bench remote``). The rows say so (``llm_latency_s``).

``--served`` serves the LLM's zoo GGUF file with llama.cpp's server (``--logits_all true``) and talks
to it through :class:`~logitfuse.OpenAICompatibleLLM`: per-step requests, and drafts scored from the
prompt log-probabilities it returns (``echo`` + ``logprobs``).

Reported per path: tokens/s over all examples end to end, and **decode tokens/s** (the tokens after
the first over the time after it: the prefill of ~1000-token private prompts, the same for every
path, left out; ``prefill_s`` is its mean per example), LLM calls per generated token, the acceptance
rate (``draft_tokens_kept / draft_tokens_sent``), the speedup against per-step fusion with overlap
(K = 0, transformers SLM) in the same run, end to end and in decode, and whether every example's
tokens are identical to the same engine's per-step run (greedy: they must be; llama.cpp's quantized
SLM may differ from the transformers copy at near-ties, so engines are not compared token for token).

How it is measured (:func:`logitfuse.bench.common.measure`): one short generation of every path is
made and dropped first (thread pools, allocator, caches); then each path generates all examples
``--reps`` times, each repeat timed between two synchronized clock reads; the median is reported.

    logitfuse bench speculate --quick --threads 2
    logitfuse bench speculate --slm qwen2.5-coder-0.5b --llm qwen2.5-coder-1.5b --speculate 0 2 4 8
    logitfuse bench speculate --slm qwen2.5-coder-0.5b --llm qwen2.5-coder-1.5b --llm-latency 0.15
    logitfuse bench speculate --slm qwen2.5-coder-0.5b --llm qwen2.5-coder-1.5b --served
    logitfuse bench speculate --slm smollm2-135m --llm qwen2.5-coder-0.5b --slm-engine llama.cpp --speculate 0
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from transformers import LogitsProcessor

from logitfuse.backends import LLMBackend
from logitfuse.bench import common

DEFAULT_SLM, DEFAULT_LLM = "smollm2-135m-cogenesis", "smollm2-135m"
PER_STEP = "per-step, overlap"  # the reference path: K = 0
LLAMA = " [llama.cpp]"  # the label suffix of the paths with the SLM in llama.cpp


class EmulatedLatencyLLM(LLMBackend):
    """An in-process backend behind an **emulated** network round trip: each request (``start``,
    ``advance``, ``score``) sleeps ``latency`` seconds, then runs on ``inner``; the rest is forwarded.
    Not a network: no serialization, no top-k cut; only the waiting a remote LLM adds per call."""

    def __init__(self, inner: LLMBackend, latency: float):
        self.inner, self.latency = inner, float(latency)
        super().__init__()
        self.audit_log = inner.audit_log
        self.tokenizer, self.vocab_size, self.supports_score = inner.tokenizer, inner.vocab_size, inner.supports_score
        self.add_special_tokens = inner.add_special_tokens

    @property
    def output_kind(self) -> str:
        return self.inner.output_kind

    @property
    def batch_size(self) -> int:
        return self.inner.batch_size

    def _wait(self) -> None:
        time.sleep(self.latency)

    def start(self, public_prompts):
        self._wait()
        return self.inner.start(public_prompts)

    def advance(self, new_tokens, need=None):
        self._wait()
        return self.inner.advance(new_tokens, need)

    def score(self, new_tokens, need=None):
        self._wait()
        return self.inner.score(new_tokens, need)

    def rollback(self, n):
        return self.inner.rollback(n)

    def reset(self):
        return self.inner.reset()

    def encode_prompts(self, public_prompts):
        return self.inner.encode_prompts(public_prompts)


class Pair:
    """The two models (the LLM as a fresh :class:`~logitfuse.HFLLM` per call, behind ``latency`` seconds
    of emulated round trip when > 0), their tokenizers, vocabulary map and the prompts; ``llama``: the
    SLM in llama.cpp too (``--slm-engine llama.cpp``)."""

    def __init__(self, slm: Any, llm_model: Any, slm_tok: Any, llm_tok: Any, names: tuple[str, str]):
        self.slm, self.llm_model, self.slm_tok, self.llm_tok, self.names = slm, llm_model, slm_tok, llm_tok, names
        self.eos = slm_tok.eos_token_id
        self.pad = slm_tok.pad_token_id if slm_tok.pad_token_id is not None else (self.eos or 0)
        self.prompts: list[tuple[list[int], list[int]]] = []  # (private SLM ids, public LLM ids) per example
        self.max_prompt: int | None = None  # tiny models: keep the last this many private ids
        self.vocab_map: Any = None  # None: one tokenizer (identity); else the exact-text map
        self.latency = 0.0
        self.llama: Any = None
        self.served_url: str | None = None  # --served: the LLM is llama.cpp's server there (logits_all)

    def llm(self):
        from logitfuse.backends import HFLLM, OpenAICompatibleLLM

        if self.served_url is not None:  # scored through echo + logprobs (OpenAICompatibleLLM.score)
            return OpenAICompatibleLLM(self.served_url, "llm", top_k=20, tokenizer=self.llm_tok, timeout=120)
        backend = HFLLM(self.llm_model, self.llm_tok)
        return EmulatedLatencyLLM(backend, self.latency) if self.latency > 0 else backend

    def mapping(self) -> dict[str, Any]:
        """The session options of a two-tokenizer pair (none for one tokenizer)."""
        return {} if self.vocab_map is None else {"vocab_map": self.vocab_map, "slm_tokenizer": self.slm_tok}

    def add_examples(self, n: int, max_history: int) -> None:
        from logitfuse.prompts import bundled_split, load_examples, render_prompt

        for example in load_examples(bundled_split("test"), max_examples=n):
            private = render_prompt(self.slm_tok, example.private_messages(max_history))
            self.prompts.append((private[-self.max_prompt:] if self.max_prompt else private,
                                 render_prompt(self.llm_tok, example.public_messages())))

    def add_llama(self, slm_name: str, new_tokens: int) -> None:
        """The SLM's GGUF file in llama.cpp, with as many threads as torch (call after :meth:`add_examples`)."""
        from logitfuse import zoo
        from logitfuse.decoding.llama_cpp import LlamaCppSLM

        n_ctx = max(len(p) for p, _ in self.prompts) + new_tokens + 8
        self.llama = LlamaCppSLM(zoo.gguf_path(slm_name), tokenizer=self.slm_tok, n_ctx=n_ctx,
                                 n_threads=torch.get_num_threads())


def load_pair(slm: str, llm: str, device: torch.device, *, tiny: bool = False, cross: bool = False) -> Pair:
    """The zoo models ``slm`` and ``llm`` (float32 on CPU, bf16 on CUDA), or two tiny random models
    over one byte-level tokenizer (``tiny``: nothing loaded from disk). Two tokenizers only with
    ``cross`` (per-step fusion only)."""
    if tiny:
        from logitfuse.testing import byte_level_tokenizer, tiny_llama

        tok = byte_level_tokenizer()
        tok.pad_token = tok.pad_token or tok.eos_token
        pair = Pair(tiny_llama(len(tok), seed=0).to(device), tiny_llama(len(tok), seed=1).to(device), tok, tok,
                    ("tiny-llama(seed 0)", "tiny-llama(seed 1)"))
        pair.max_prompt = 256  # a byte-level tokenizer makes thousands of ids of a CoGenesis prompt
        return pair
    from logitfuse import zoo
    from logitfuse.vocab import VocabMap

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    slm_model, slm_tok, _ = zoo.load(slm, dtype=dtype, device=str(device), install=False, progress=False)
    llm_model, llm_tok, _ = zoo.load(llm, dtype=dtype, device=str(device), install=False, progress=False)
    pair = Pair(slm_model, llm_model, slm_tok, llm_tok, (slm, llm))
    if slm_tok.get_vocab() != llm_tok.get_vocab():
        if not cross:
            raise ValueError(f"--slm {slm} and --llm {llm} do not share a tokenizer; speculation needs one (e.g. "
                             f"--slm {DEFAULT_SLM} --llm {DEFAULT_LLM}, or qwen2.5-coder-0.5b with qwen2.5-coder-1.5b), "
                             "or pass --speculate 0 (per-step fusion only)")
        v_slm = int(slm_model.get_output_embeddings().weight.shape[0])
        v_llm = int(llm_model.get_output_embeddings().weight.shape[0])
        pair.vocab_map = VocabMap.from_tokenizers(slm_tok, llm_tok, v_slm=v_slm, v_llm=v_llm)
    return pair


# ------------------------------------------------------------------------------------ the paths
def _add_stats(totals: dict[str, int], stats: Any) -> None:
    for key, value in dict(stats).items():
        totals[key] = totals.get(key, 0) + value


def fused_generate(pair: Pair, weight: dict[str, Any], new_tokens: int, *, speculate: int = 0,
                   overlap: bool = True, engine: str = "transformers") -> tuple[list[list[int]], dict[str, int], list]:
    """Every example through ``logitfuse.generate``: its tokens, the statistics summed, and per
    example ``(seconds, seconds to the first token)``."""
    import logitfuse

    slm = pair.llama if engine == "llama.cpp" else pair.slm
    eos = sorted(pair.llama.eos_token_ids) if engine == "llama.cpp" else pair.eos
    outputs, totals, clocks = [], {}, []
    for private, public in pair.prompts:
        started = time.perf_counter()
        out = logitfuse.generate(slm, pair.llm(), [private], public, max_new_tokens=new_tokens,
                                 speculate=speculate, overlap=overlap, eos_token_id=eos,
                                 pad_token_id=pair.pad, **pair.mapping(), **weight)
        clocks.append((time.perf_counter() - started, out.first_token_seconds))
        outputs.append(out.sequences[0])
        _add_stats(totals, out.stats)
    return outputs, totals, clocks


class _FirstCall(LogitsProcessor):
    """Stamps the clock at its first call (after the fusion processor: the first token's scores)."""

    def __init__(self):
        self.at: float | None = None

    def __call__(self, input_ids, scores):
        self.at = self.at or time.perf_counter()
        return scores


def processor_generate(pair: Pair, weight: dict[str, Any], new_tokens: int) -> tuple[list[list[int]], dict[str, int], list]:
    """Every example through ``slm.generate`` with a :class:`~logitfuse.CoGenesisLogitsProcessor`."""
    from logitfuse.decoding.processor import CoGenesisLogitsProcessor

    device = next(pair.slm.parameters()).device
    outputs, totals, clocks = [], {}, []
    for private, public in pair.prompts:
        processor = CoGenesisLogitsProcessor(pair.llm(), public, eos_token_id=pair.eos, **pair.mapping(), **weight)
        first = _FirstCall()
        ids = torch.tensor([private], device=device)
        started = time.perf_counter()
        with torch.inference_mode():
            out = pair.slm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                    do_sample=False, repetition_penalty=1.0, eos_token_id=pair.eos,
                                    pad_token_id=pair.pad, logits_processor=[processor, first])
        clocks.append((time.perf_counter() - started, first.at - started))
        outputs.append(out[0, ids.shape[1]:].tolist())
        _add_stats(totals, processor.stats)
    return outputs, totals, clocks


def paths(speculate: list[int], *, llama: bool = False, one_tokenizer: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """``(name, how)`` of each path: ``how`` is ``{"processor": True}`` or ``logitfuse.generate``'s
    options (``"engine"``: the SLM's; ``"slm_alone"``: α = 1)."""
    ks = [k for k in speculate if k > 0] if one_tokenizer else []
    loops = [("per-step, no overlap", {"speculate": 0, "overlap": False}), (PER_STEP, {"speculate": 0, "overlap": True})]
    loops += [(f"speculate {k}", {"speculate": k}) for k in ks]
    named = [("SLM alone", {"slm_alone": True}), ("processor", {"processor": True}), *loops]
    if llama:
        named += [("SLM alone" + LLAMA, {"slm_alone": True, "engine": "llama.cpp"})]
        named += [(name + LLAMA, {**how, "engine": "llama.cpp"}) for name, how in loops]
    return named


def run_path(pair: Pair, weight: dict[str, Any], how: dict[str, Any], new_tokens: int):
    if how.get("processor"):
        return processor_generate(pair, weight, new_tokens)
    options = {k: v for k, v in how.items() if k != "slm_alone"}
    return fused_generate(pair, {"alpha": 1.0} if how.get("slm_alone") else weight, new_tokens, **options)


def time_path(pair: Pair, weight: dict[str, Any], how: dict[str, Any], new_tokens: int, reps: int,
              device: torch.device) -> dict[str, Any]:
    results: list[tuple[list[list[int]], dict[str, int], list]] = []
    timing = common.measure(lambda: results.append(run_path(pair, weight, how, new_tokens)), device, warmup=0,
                            repeat=reps)
    outputs, stats, clocks = results[-1]
    tokens = sum(len(o) for o in outputs)
    decode_tokens = sum(max(len(o) - 1, 0) for o in outputs)
    decode_s = sum(total - first for total, first in clocks)
    sent = stats.get("draft_tokens_sent", 0)
    return {"outputs": outputs, "tokens": tokens, "seconds_median": timing["median_s"], "reps": timing["n"],
            "tokens_per_s": tokens / timing["median_s"], "prefill_s": sum(first for _, first in clocks) / len(clocks),
            "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else None,
            "llm_calls": stats.get("llm_calls", 0), "llm_calls_per_token": stats.get("llm_calls", 0) / max(tokens, 1),
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
        vmap = pair.vocab_map or VocabMap.identity(v_slm, v_llm, n_shared=min(len(pair.slm_tok), v_slm, v_llm))
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
        llm_latency: float = 0.0, slm_engine: str = "transformers", served: bool = False, log=print) -> dict[str, Any]:
    if served:  # the LLM's GGUF in llama.cpp's server, started with logits_all (prompt scoring)
        from logitfuse import zoo
        from logitfuse.serve.engines import LlamaCppServer

        with LlamaCppServer(zoo.gguf_path(llm), alias="llm", n_ctx=4096, n_threads=torch.get_num_threads(),
                            logits_all=True) as server:
            return _run(slm=slm, llm=llm, device=device, examples=examples, new_tokens=new_tokens,
                        speculate=speculate, alpha=alpha, head=head, reps=reps, max_history=max_history, tiny=tiny,
                        llm_latency=llm_latency, slm_engine=slm_engine, served_url=server.url, log=log)
    return _run(slm=slm, llm=llm, device=device, examples=examples, new_tokens=new_tokens, speculate=speculate,
                alpha=alpha, head=head, reps=reps, max_history=max_history, tiny=tiny, llm_latency=llm_latency,
                slm_engine=slm_engine, log=log)


def _run(*, slm: str, llm: str, device: torch.device, examples: int, new_tokens: int, speculate: list[int],
         alpha: float | None, head: str, reps: int, max_history: int, tiny: bool, llm_latency: float,
         slm_engine: str, served_url: str | None = None, log=print) -> dict[str, Any]:
    t0 = time.perf_counter()
    pair = load_pair(slm, llm, device, tiny=tiny, cross=not any(k > 0 for k in speculate))
    pair.served_url = served_url
    pair.latency = llm_latency
    pair.add_examples(examples, max_history)
    if slm_engine == "llama.cpp":
        pair.add_llama(slm, new_tokens)
    chosen, note = weights(pair, alpha, head)
    if not chosen:
        raise ValueError(f"no weight to run: --head {head} found none ({note}) and --alpha is off; pass --alpha A")
    log(f"models {pair.names} on {device}, {len(pair.prompts)} examples, private prompts of "
        f"{[len(p) for p, _ in pair.prompts]} tokens (loaded in {time.perf_counter() - t0:.1f} s)"
        + (f"; EMULATED LLM round trip {llm_latency:g} s per call" if llm_latency else "")
        + (f"; {note}" if note else ""))
    named = paths(speculate, llama=pair.llama is not None, one_tokenizer=pair.vocab_map is None)
    rows = []
    for label, weight in chosen:
        for _, how in named:  # warm-up, dropped: one short generation of each path
            run_path(_first(pair), weight, how, 2)
        ours = []
        for name, how in named:
            ours.append({"weight": label, "path": name, "engine": how.get("engine", "transformers"),
                         "speculate": how.get("speculate"), "llm_latency_s": llm_latency,
                         **time_path(pair, weight, how, new_tokens, reps, device)})
        by_name = {row["path"]: row for row in ours}
        reference = by_name[PER_STEP]
        for row in ours:
            own = by_name[PER_STEP + (LLAMA if row["engine"] == "llama.cpp" else "")]
            row["speedup_vs_per_step"] = row["tokens_per_s"] / reference["tokens_per_s"]
            if row["decode_tokens_per_s"] and reference["decode_tokens_per_s"]:
                row["decode_speedup_vs_per_step"] = row["decode_tokens_per_s"] / reference["decode_tokens_per_s"]
            row["identical_to_per_step"] = None if row["path"].startswith("SLM alone") else row["outputs"] == own["outputs"]
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                         if k != "outputs"))
        rows += ours
    for row in rows:
        row["tokens_per_example"] = [len(o) for o in row.pop("outputs")]  # the JSON keeps lengths, not the text
    if pair.llama is not None:
        pair.llama.close()
    return {"models": {"slm": pair.names[0], "llm": pair.names[1], "tiny": tiny,
                       "dtype": str(next(pair.slm.parameters()).dtype),
                       "vocab_map": "identity" if pair.vocab_map is None else f"cross ({pair.vocab_map.coverage:.3f})",
                       "slm_engines": ["transformers"] + (["llama.cpp"] if pair.llama is not None else [])},
            "llm_served": "llama.cpp's server (logits_all), scored by echo + logprobs" if served_url else "in process",
            "llm_latency_s": llm_latency, "llm_latency_note": "emulated: a sleep per LLM request" if llm_latency else "",
            "examples": len(pair.prompts), "head_note": note, "rows": rows,
            "all_identical": all(r["identical_to_per_step"] is not False for r in rows)}


def _first(pair: Pair) -> Pair:
    """``pair`` with its first example only (for the warm-up)."""
    first = Pair(pair.slm, pair.llm_model, pair.slm_tok, pair.llm_tok, pair.names)
    first.prompts, first.max_prompt, first.vocab_map = pair.prompts[:1], pair.max_prompt, pair.vocab_map
    first.latency, first.llama, first.served_url = pair.latency, pair.llama, pair.served_url
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


TABLE_COLUMNS = [("weight", "weight"), ("path", "path"), ("llm_latency_s", "emulated LLM latency s"),
                 ("tokens", "tokens"), ("tokens_per_s", "tokens/s"), ("decode_tokens_per_s", "decode tokens/s"),
                 ("prefill_s", "prefill s / example"), ("llm_calls_per_token", "LLM calls / token"),
                 ("acceptance_rate", "acceptance"), ("speedup_vs_per_step", "× per-step (overlap)"),
                 ("decode_speedup_vs_per_step", "decode × per-step"), ("identical_to_per_step", "identical")]


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
    parser.add_argument("--llm-latency", type=float, default=0.0,
                        help="EMULATED network round trip: seconds slept before every LLM request (default 0; "
                             "0.15 is about a llama.cpp server call)")
    parser.add_argument("--slm-engine", default="transformers", choices=["transformers", "llama.cpp"],
                        help="llama.cpp: also run every logitfuse.generate path with the SLM's GGUF file in llama.cpp "
                             "(needs llama-cpp-python and a zoo SLM)")
    parser.add_argument("--served", action="store_true",
                        help="the LLM in llama.cpp's server (its zoo GGUF, started with logits_all) instead of "
                             "in process: drafts are scored through echo + logprobs (needs llama-cpp-python[server]; not with --tiny)")


def execute(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.perf_counter()
    device = common.setup(args)
    info = common.machine_info(device)
    examples = args.examples or (2 if args.quick else 8)
    new_tokens = args.new_tokens or (32 if args.quick else 64)
    reps = args.reps or 1
    result = run(slm=args.slm, llm=args.llm, device=device, examples=examples, new_tokens=new_tokens,
                 speculate=sorted(set(args.speculate)), alpha=parse_alpha(args.alpha), head=args.head,
                 reps=reps, max_history=args.max_history, tiny=args.tiny, llm_latency=args.llm_latency,
                 slm_engine=args.slm_engine, served=args.served)
    stem = ("speculate" + ("_tiny" if args.tiny else "") + ("_served" if args.served else "") + ("_llama" if args.slm_engine == "llama.cpp" else "")
            + (f"_latency{args.llm_latency:g}" if args.llm_latency else "") + ("_quick" if args.quick else ""))
    return common.report(args, "speculate", argv, started, info, stem, result, plot, TABLE_COLUMNS, batch=1,
                         greedy=True, new_tokens=new_tokens, reps=reps)
