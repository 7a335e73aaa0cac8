"""The SLM in llama.cpp: a GGUF file run through llama-cpp-python, fused by :func:`logitfuse.generate`.

On a laptop or phone the on-device model runs in llama.cpp from a quantized GGUF file, not in
transformers. :class:`LlamaCppSLM` holds the model; :func:`logitfuse.generate` drives it through its
SLM runner (:class:`LlamaCppRunner`, batch size 1: prefill the private prompt into llama.cpp's KV cache,
append one token, drop rejected drafts), the same loop as for a transformers SLM::

    slm = LlamaCppSLM(zoo.gguf_path("smollm2-135m"), tokenizer=hf_tokenizer)
    out = logitfuse.generate(slm, llm, [slm.tokenize(private_messages)], public_ids, alpha=0.5)
    alone = logitfuse.generate(slm, None, [slm.tokenize(private_messages)], alpha=1.0)  # the SLM alone

It uses llama-cpp-python's low-level C API (``llama_decode`` and ``llama_get_logits_ith``) rather
than its ``Llama`` class, for two reasons: the loop needs the raw logits of the last position only
(``Llama`` keeps logits in an ``n_ctx x n_vocab`` array when asked for them), and the model has to be
loaded with llama.cpp's extra weight buffers switchable (``extra_buffers``): on CPUs that announce
Intel AMX inside virtual machines that do not let a process use it, llama.cpp's AMX matrix product
dies with a general protection fault at the first ``llama_decode`` (seen on this project's
Firecracker build machine with llama-cpp-python 0.3.36), and ``Llama`` offers no way to turn it off.

``import logitfuse`` does not import llama-cpp-python; constructing a :class:`LlamaCppSLM` does
(``pip install "llama-cpp-python[server]==0.3.36"``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import warnings
from typing import Any
from collections.abc import Sequence

import numpy as np
import torch

from logitfuse.config import SamplingConfig, check_int
from logitfuse.decoding.engine import generate as fused_generate
from logitfuse.decoding.sampling import FusedGeneration
from logitfuse.decoding.session import FusionSession
from logitfuse.heads.protocol import check_slm_side_inputs

Tensor = torch.Tensor

__all__ = ["LlamaCppCache", "LlamaCppRunner", "LlamaCppSLM", "SLMGeneration", "generate_fused_llama_cpp",
           "llama_cpp_python_missing"]

#: the one result type of :func:`logitfuse.generate`, under the name this module used to give its own
SLMGeneration = FusedGeneration

INSTALL_HINT = 'pip install "llama-cpp-python[server]==0.3.36"'


def llama_cpp_python_missing() -> str | None:
    """Why llama-cpp-python cannot be imported here (``None`` when it can)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return f"needs llama-cpp-python: {INSTALL_HINT}"
    return None


_BACKEND_READY = False


def _llama_cpp(verbose: bool) -> Any:
    """The ``llama_cpp`` module, its backend initialized once per process."""
    global _BACKEND_READY
    missing = llama_cpp_python_missing()
    if missing:
        raise ImportError(f"LlamaCppSLM {missing}")
    import llama_cpp

    # llama-cpp-python routes llama.cpp's log lines to this logger (what Llama(verbose=False) does)
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
    if not _BACKEND_READY:
        llama_cpp.llama_backend_init()
        _BACKEND_READY = True
    return llama_cpp


class LlamaCppSLM:
    r"""An on-device SLM in llama.cpp (a GGUF file): pass it to :func:`logitfuse.generate` as ``slm`` (it makes
    its own SLM runner, :meth:`open_runner`; its :attr:`eos_token_ids` and ``tokenizer`` are the defaults
    there).

    Args:
        model_path (`str` or `os.PathLike`): the GGUF file (e.g. ``logitfuse.zoo.gguf_path("smollm2-135m")``).
        n_ctx (`int`, defaults to 2048): context length: the private prompt plus the generated tokens.
        n_threads (`int`, *optional*): CPU threads; default half the CPUs (at least 1).
        seed (`int`, defaults to 0): the sampling seed of the deprecated :meth:`generate` when it gets
            neither ``seed`` nor ``generator``.
        tokenizer (*optional*): the same model's transformers tokenizer. It renders chat messages in
            :meth:`tokenize`, and is what a cross-tokenizer session needs as ``slm_tokenizer``; it must
            tokenize like the GGUF's own tokenizer (checked on a probe text).
        extra_buffers (`bool`, defaults to `False`): let llama.cpp use its extra CPU weight buffers
            (repacked weights, Intel AMX tiles). Off by default: where a virtual machine announces AMX
            but does not allow it, the first evaluation crashes the process (see the module docstring).
            Turn it on where they work; the outputs agree up to rounding.
        verbose (`bool`, defaults to `False`): llama.cpp's log lines on stderr.

    Batch size 1: one prompt, one row. The model's logits come back as float32 tensors ``(1, n_vocab)``.

    Attributes:
        vocab_size (`int`): the model's vocabulary size (the width of its logits).
        eos_token_ids (`frozenset[int]`): the ids llama.cpp marks as ending generation (EOS, EOT...).
    """

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int = 2048, n_threads: int | None = None,
                 seed: int = 0, tokenizer: Any = None, extra_buffers: bool = False, verbose: bool = False):
        path = os.fspath(model_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model_path={path!r} is not a file; pass a GGUF file (e.g. "
                                    "logitfuse.zoo.gguf_path('smollm2-135m') after `logitfuse models install smollm2-135m`)")
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 2:
            raise ValueError(f"n_ctx={n_ctx!r} must be an int >= 2 (prompt plus generated tokens)")
        if n_threads is None:
            n_threads = max(1, (os.cpu_count() or 2) // 2)
        if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
            raise ValueError(f"n_threads={n_threads!r} must be an int >= 1 (or None for half the CPUs)")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} must be an int >= 0")
        self._lib = lib = _llama_cpp(verbose)
        self._model = self._ctx = self._batch = None
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        model_params.use_extra_bufts = bool(extra_buffers)
        self._model = lib.llama_model_load_from_file(path.encode("utf-8"), model_params)
        if not self._model:
            raise ValueError(f"llama.cpp could not load model_path={path!r}; is it a GGUF file of a model "
                             "this llama-cpp-python supports? (verbose=True shows llama.cpp's reason)")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.n_batch = min(512, n_ctx)
        context_params = lib.llama_context_default_params()
        context_params.n_ctx = n_ctx
        context_params.n_batch = context_params.n_ubatch = self.n_batch
        context_params.n_threads = context_params.n_threads_batch = n_threads
        context_params.no_perf = True
        self._ctx = lib.llama_init_from_model(self._model, context_params)
        if not self._ctx:
            self.close()
            raise ValueError(f"llama.cpp could not create a context of n_ctx={n_ctx} for {path!r}; try a smaller n_ctx")
        self._batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self.model_path, self.n_ctx, self.n_threads, self.seed = path, int(lib.llama_n_ctx(self._ctx)), n_threads, seed
        self.vocab_size = int(lib.llama_vocab_n_tokens(self._vocab))
        self.eos_token_ids = frozenset(i for i in range(self.vocab_size) if lib.llama_vocab_is_eog(self._vocab, i))
        self.n_past = 0  # positions held in the KV cache
        self.tokenizer = None
        if tokenizer is not None:
            self._check_tokenizer(tokenizer)
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ resources
    def close(self) -> None:
        """Free llama.cpp's context and model (also on garbage collection)."""
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        if getattr(self, "_batch", None) is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> LlamaCppSLM:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LlamaCppSLM({os.path.basename(self.model_path)!r}, vocab_size={self.vocab_size}, n_ctx={self.n_ctx})"

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: str | Sequence[dict], *, add_special: bool = True) -> list[int]:
        """Token ids of ``text`` (special tokens such as ``<|im_start|>`` in it are parsed), or of a chat
        (a list of ``{"role", "content"}`` messages) rendered with the transformers ``tokenizer``'s
        chat template, generation prompt added. ``add_special`` adds the BOS token where the GGUF says so."""
        if isinstance(text, (list, tuple)):
            if self.tokenizer is None:
                raise ValueError("tokenize got chat messages but this LlamaCppSLM has no tokenizer to render them; "
                                 "pass tokenizer= (the same model's transformers tokenizer) or give text")
            text = self.tokenizer.apply_chat_template(list(text), add_generation_prompt=True, tokenize=False)
            add_special = False
        if not isinstance(text, str):
            raise TypeError(f"tokenize takes a str or a list of chat messages, got {type(text).__name__}")
        data = text.encode("utf-8")
        size = len(data) + 8
        buffer = (self._lib.llama_token * size)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), buffer, size, add_special, True)
        if n < 0:  # more tokens than bytes (cannot happen with BPE, but the API allows it)
            size = -n
            buffer = (self._lib.llama_token * size)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buffer, size, add_special, True)
        return list(buffer[:n])

    def token_bytes(self, token_id: int, *, special: bool = False) -> bytes:
        """The bytes of one token (empty for special tokens unless ``special``)."""
        buffer = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self._vocab, int(token_id), buffer, len(buffer), 0, special)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, int(token_id), buffer, len(buffer), 0, special)
        return buffer.raw[:n]

    def detokenize(self, token_ids: Sequence[int], *, special: bool = False) -> str:
        """The text of ``token_ids`` (special tokens left out unless ``special``; invalid UTF-8 replaced)."""
        return b"".join(self.token_bytes(t, special=special) for t in token_ids).decode("utf-8", "replace")

    def _check_tokenizer(self, tokenizer: Any) -> None:
        if not hasattr(tokenizer, "encode"):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        probe = "Dear Martin, the café opens at 9:30.\n\tdef f(x): return x ** 2  # naïve résumé 日本"
        ours, theirs = self.tokenize(probe, add_special=False), tokenizer.encode(probe, add_special_tokens=False)
        if len(tokenizer) > self.vocab_size or ours != theirs:
            raise ValueError(f"tokenizer does not tokenize like {os.path.basename(self.model_path)!r} (a probe text gave "
                             f"different ids, or it has {len(tokenizer)} > {self.vocab_size} tokens); pass the "
                             "transformers tokenizer of the same model")

    def _check_ids(self, ids: Any, name: str) -> list[int]:
        if isinstance(ids, Tensor):
            ids = ids.reshape(-1).tolist()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) \
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise TypeError(f"{name} must be a list of token ids (slm.tokenize(text) gives them), got {type(ids).__name__}")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{name} holds ids outside [0, {self.vocab_size}): {bad[:5]}")
        return list(ids)

    # ------------------------------------------------------------------ evaluation
    def reset(self) -> None:
        """Empty the KV cache (:meth:`generate` does it before each prompt)."""
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)
        self.n_past = 0

    def truncate(self, n_past: int) -> None:
        """Drop the KV cache's positions from ``n_past`` on (to re-evaluate from there)."""
        if not 0 <= n_past <= self.n_past:
            raise ValueError(f"n_past={n_past!r} must be in [0, {self.n_past}] (the positions held)")
        self._lib.llama_memory_seq_rm(self._lib.llama_get_memory(self._ctx), 0, n_past, -1)
        self.n_past = n_past

    def _logits_row(self, i: int) -> Tensor:
        row = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self._ctx, i), shape=(self.vocab_size,))
        return torch.from_numpy(row.copy())  # llama.cpp reuses its buffer at the next decode

    def eval(self, token_ids: Sequence[int], *, all_logits: bool = False) -> Tensor:
        """Append ``token_ids`` after the :attr:`n_past` cached positions; return the logits for the
        next position, float32 ``(1, vocab_size)``, or with ``all_logits`` those after every given token
        ``(len(token_ids), vocab_size)``."""
        ids = self._check_ids(token_ids, "token_ids")
        if not ids:
            raise ValueError("token_ids is empty; evaluate at least one token")
        if self.n_past + len(ids) > self.n_ctx:
            raise ValueError(f"{self.n_past} cached + {len(ids)} new tokens exceed n_ctx={self.n_ctx}; "
                             "build the LlamaCppSLM with a larger n_ctx")
        batch, rows = self._batch, []
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start:start + self.n_batch]
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i], batch.pos[i] = token, self.n_past + i
                batch.n_seq_id[i], batch.seq_id[i][0] = 1, 0
                batch.logits[i] = all_logits or (start + i == len(ids) - 1)
            status = self._lib.llama_decode(self._ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode failed with status {status} at position {self.n_past}")
            self.n_past += len(chunk)
            if all_logits:
                rows += [self._logits_row(i) for i in range(len(chunk))]
        return torch.stack(rows) if all_logits else self._logits_row(-1)[None]

    def open_runner(self, private_input_ids: Any, *, attention_mask: Any = None, max_new_tokens: int,
                    pad_token_id: int | None = None) -> LlamaCppRunner:
        """The SLM runner :func:`logitfuse.generate` drives (prefill, append, drop) over one private prompt:
        ``private_input_ids`` as a list of ids, a list of one list, or a ``(1, L)`` / ``(L,)`` tensor
        (batch size 1: a ``ValueError`` names the fix for more rows)."""
        return LlamaCppRunner(self, private_input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
                              pad_token_id=pad_token_id)

    # ------------------------------------------------------------------ generation (deprecated)
    def generate(self, prompt_ids: Sequence[int], *, session: FusionSession | None = None, public_prompt: Any = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, seed: int | None = None, generator: torch.Generator | None = None,
                 stop_ids: Sequence[int] = ()) -> FusedGeneration:
        """Deprecated: use :func:`logitfuse.generate` (``logitfuse.generate(slm, None, [prompt_ids], alpha=1.0)``
        for the SLM alone). A thin wrapper over it: the SLM alone, or fused with ``session``'s LLM and
        settings; ``stop_ids`` end generation like :attr:`eos_token_ids`; without ``seed`` nor ``generator``
        the draws come from a generator seeded with the constructor's ``seed``."""
        warnings.warn("LlamaCppSLM.generate is deprecated; use logitfuse.generate(slm, llm, [prompt_ids], ...)",
                      DeprecationWarning, stacklevel=2)
        if session is not None and not isinstance(session, FusionSession):
            raise TypeError(f"session must be a logitfuse.FusionSession or None, got {type(session).__name__}")
        if (session is None) != (public_prompt is None):
            raise ValueError("pass session= and public_prompt= together (fused), or neither (the SLM alone)")
        if generator is None:
            generator = torch.Generator().manual_seed(self.seed if seed is None else check_int("seed", seed, 0))
        eos = sorted(self.eos_token_ids | frozenset(self._check_ids(list(stop_ids), "stop_ids")))
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty, generator=generator, eos_token_id=eos)
        if session is None:
            return fused_generate(self, None, [prompt_ids], None, None, sampling, alpha=1.0)
        return fused_generate(self, session.llm, [prompt_ids], public_prompt, session.config, sampling,
                              slm_tokenizer=session.slm_tokenizer)


class LlamaCppRunner:
    """A :class:`LlamaCppSLM`'s KV cache as the SLM runner of :func:`logitfuse.generate`
    (:class:`logitfuse.decoding.runners.SLMRunner`): :meth:`prefill` the private prompt, :meth:`append` one
    token, :meth:`drop` rejected drafts (``llama_memory_seq_rm``). One row, logits on the CPU; no hidden
    state (llama.cpp does not expose it). Nothing here is sent anywhere.
    """

    batch_size = 1
    device = torch.device("cpu")
    name = "the llama.cpp SLM"
    supports_hidden = False
    last_hidden = None

    def __init__(self, slm: LlamaCppSLM, prompt_ids: Any, *, max_new_tokens: int, attention_mask: Any = None,
                 pad_token_id: int | None = None):
        rows = prompt_ids.tolist() if isinstance(prompt_ids, Tensor) and prompt_ids.dim() == 2 else None
        if rows is None and isinstance(prompt_ids, Sequence) and prompt_ids and all(
                isinstance(row, (Sequence, Tensor)) and not isinstance(row, str) for row in prompt_ids):
            rows = list(prompt_ids)
        if rows is not None:
            if len(rows) != 1:
                raise ValueError(f"private_input_ids holds {len(rows)} rows but a LlamaCppSLM runs one (batch size 1); "
                                 "call logitfuse.generate once per prompt, or use a transformers SLM for batches")
            prompt_ids = rows[0]
        if attention_mask is not None and not bool((torch.as_tensor(attention_mask) == 1).all()):
            raise ValueError("attention_mask must be all ones with a LlamaCppSLM (one row, no padding); leave it out")
        ids = slm._check_ids(prompt_ids, "private_input_ids")
        if not ids:
            raise ValueError("private_input_ids is empty; pass the private prompt's token ids (slm.tokenize(...))")
        check_int("max_new_tokens", max_new_tokens, 1, fix="tokens to generate per row")
        if len(ids) + max_new_tokens > slm.n_ctx:
            raise ValueError(f"the prompt's {len(ids)} tokens + max_new_tokens={max_new_tokens} exceed n_ctx={slm.n_ctx}; "
                             "build the LlamaCppSLM with a larger n_ctx or generate fewer tokens")
        self.slm, self.ids = slm, torch.tensor([ids])
        self.mask = torch.ones_like(self.ids)
        self.vocab_size, self.tokenizer, self.eos_token_ids = slm.vocab_size, slm.tokenizer, slm.eos_token_ids
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id

    def prefill(self) -> Tensor:
        """Empty the KV cache and evaluate the prompt: the logits ``(1, V)`` for the first new position."""
        self.slm.reset()
        return self.slm.eval(self.ids[0].tolist())

    def append(self, tokens: Tensor) -> Tensor:
        """Evaluate one token ``(1,)``: the logits ``(1, V)`` for the position after it."""
        return self.slm.eval([int(tokens.reshape(-1)[0])])

    def drop(self, n: Sequence[int]) -> None:
        """Forget the last ``n[0]`` tokens (rejected drafts)."""
        if n[0]:
            self.slm.truncate(self.slm.n_past - int(n[0]))

    def watch_hidden(self, head: Any) -> None:
        raise ValueError("the llama.cpp SLM does not expose its hidden state")

    def decode(self, ids: Sequence[int]) -> str:
        """llama.cpp's own detokenizer (special tokens left out)."""
        return self.slm.detokenize(ids)

    def close(self) -> None:
        """Nothing to release (the model stays loaded in the :class:`LlamaCppSLM`)."""


#: the name this runner had before the runner interface
LlamaCppCache = LlamaCppRunner


def generate_fused_llama_cpp(slm: LlamaCppSLM, llm: Any, private_ids: Sequence[int], public_prompt: Any, *,
                             max_new_tokens: int, head: Any = None, alpha: float | None = None, vocab_map: Any = None,
                             mode: str | None = None, tail: str | None = None, schedule: Any = "always",
                             **sampling: Any) -> FusedGeneration:
    """Deprecated: use :func:`logitfuse.generate` (the same settings as keywords). A thin wrapper that
    fuses through it, with :meth:`LlamaCppSLM.generate`'s sampling keywords (``temperature``, ``top_k``,
    ``top_p``, ``repetition_penalty``, ``seed``, ``stop_ids``)."""
    warnings.warn("generate_fused_llama_cpp is deprecated; use logitfuse.generate(slm, llm, [private_ids], "
                  "public_prompt, ...)", DeprecationWarning, stacklevel=2)
    session = FusionSession(llm, head=head, alpha=alpha, vocab_map=vocab_map, mode=mode, tail=tail, schedule=schedule,
                            slm_tokenizer=None if slm is None else slm.tokenizer)
    if slm is None or head is not None and head.needs_slm_hidden:
        check_slm_side_inputs(head, hidden=False, side=True, where="the llama.cpp SLM",
                              fix="use a head without the 'hidden' group (logitfuse train --slm-features token,position)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return slm.generate(private_ids, session=session, public_prompt=public_prompt, max_new_tokens=max_new_tokens,
                            **sampling)
