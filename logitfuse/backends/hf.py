"""HFLLM: a local transformers causal LM as the LLM side, with its own KV cache."""

from __future__ import annotations

import inspect
from typing import Any
from collections.abc import Sequence

import torch

from logitfuse.backends.base import LLMBackend, LLMOutput

Tensor = torch.Tensor

__all__ = ["HFLLM", "KVCacheDriver"]


class HFLLM(LLMBackend):
    """A local transformers causal LM as the LLM side, with its own KV cache.

    The public prompts are prefilled once (left padded); each :meth:`advance` feeds only the new
    tokens (any number per row, in one forward) and never re-reads the prefix. Variable counts are
    left-aligned inside the chunk with masked padding in front, so every row's last token sits in
    the last column; :meth:`rollback` masks the dropped positions out (and crops the cache where
    all rows end in dropped positions). Positions come from the attention mask, so a row's logits
    equal those of a plain forward over its unpadded tokens.

    Args:
        model: a ``transformers`` causal LM (``AutoModelForCausalLM``), in eval mode.
        tokenizer (optional): its tokenizer; needed for text prompts and cross-tokenizer decoding.
        add_special_tokens (`bool`, defaults to `True`): passed to the tokenizer for text prompts
            (set False for text that already went through a chat template).

    Example:

    >>> from logitfuse.testing import byte_level_tokenizer, tiny_llama
    >>> import logitfuse
    >>> tok = byte_level_tokenizer(); llm = logitfuse.HFLLM(tiny_llama(len(tok), seed=1), tok)
    >>> llm.start(["Write a short invitation.", "Dear friends,"])
    >>> out = llm.advance([[72], [72, 295]])
    >>> out.next.shape, out.ok.tolist()
    (torch.Size([2, 400]), [True, True])
    """

    output_kind = "dense"

    def __init__(self, model: Any, tokenizer: Any = None, *, add_special_tokens: bool = True):
        super().__init__()
        if not callable(model) or not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers causal LM (AutoModelForCausalLM), got {type(model).__name__}")
        self.model, self.tokenizer, self.add_special_tokens = model, tokenizer, add_special_tokens
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.vocab_size = int(out_emb.weight.shape[0]) if out_emb is not None else int(model.config.vocab_size)
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self._pad_id = int(pad) if pad is not None and 0 <= pad < self.vocab_size else 0
        self.reset()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def batch_size(self) -> int:
        return 0 if self.kv is None or self.kv.mask is None else int(self.kv.mask.shape[0])

    @property
    def next_logits(self) -> Tensor | None:
        """The next-token logits ``(B, V)`` of every row (``None`` before :meth:`start`)."""
        return self._last

    def reset(self) -> None:
        """Drop the sequences and the KV cache (the audit log is kept)."""
        self.kv: KVCacheDriver | None = None  # the model's KV cache and attention mask
        self._lengths: list[int] = []  # real tokens per row
        self._last: Tensor | None = None  # (B, V) next-token logits
        self._stale: list[bool] = []

    def _forward(self, ids: Tensor, chunk_mask: Tensor, positions: Tensor, live: list[int], *,
                 every_position: bool = False) -> Tensor:
        return self.kv.forward(ids, chunk_mask, positions, live=live, every_position=every_position)

    def start(self, public_prompts: list[str] | list[list[int]]) -> None:
        """Prefill the public prompts (one per row), left padded."""
        rows = self.encode_prompts(public_prompts)
        self.reset()
        self.audit_log.append({"op": "start", "token_ids": [list(r) for r in rows]})
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        device = self.device
        self.kv = KVCacheDriver(self.model)
        self._last = self._forward(ids.to(device), mask.to(device), positions.to(device), [len(r) for r in rows])
        self._lengths = [len(r) for r in rows]
        self._stale = [False] * len(rows)

    def _chunk(self, rows: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]:
        """``(ids, mask, positions)`` ``(B, W)`` for appending ``rows``: right-aligned, masked padding in front."""
        width, batch = max(len(r) for r in rows), len(rows)
        ids = torch.full((batch, width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        positions = torch.zeros((batch, width), dtype=torch.long)
        for r, row in enumerate(rows):
            if row:
                ids[r, width - len(row):] = torch.tensor(row)
                mask[r, width - len(row):] = 1
                positions[r, width - len(row):] = torch.arange(self._lengths[r], self._lengths[r] + len(row))
            positions[r, : width - len(row)] = self._lengths[r]
        device = self.device
        return ids.to(device), mask.to(device), positions.to(device)

    def _appended(self, counts: list[int]) -> None:
        for r, c in enumerate(counts):
            self._lengths[r] += c
            if c:
                self._stale[r] = False

    def advance(self, new_tokens: list[list[int]], need: list[bool] | None = None) -> LLMOutput:
        """Append each row's new tokens in one forward; returns dense logits for every row."""
        rows, need = self.check_new_tokens(new_tokens, need)
        counts = [len(r) for r in rows]
        if any(self._stale[r] and counts[r] == 0 and need[r] for r in range(len(rows))):
            raise RuntimeError("HFLLM: a rolled-back row needs at least one new token before its logits are read")
        if max(counts) > 0:
            self.audit_log.append({"op": "advance", "token_ids": [list(r) for r in rows]})
            logits = self._forward(*self._chunk(rows), counts)
            fed = torch.tensor([c > 0 for c in counts], device=logits.device)
            self._last = torch.where(fed[:, None], logits, self._last)
            self._appended(counts)
        ok_rows = [not s for s in self._stale]
        return LLMOutput(self._last.clone(), torch.tensor(ok_rows, device=self._last.device), ok_rows)

    supports_score = True

    def score(self, new_tokens: list[list[int]], need: list[bool] | None = None) -> LLMOutput:
        """Append each row's new tokens in one forward and return the logits at every appended
        position: ``next`` is ``(B, 1 + W, V)`` with ``W`` the most new tokens of a row; row ``r``'s
        are right-aligned, ``next[r, W - n_r + i]`` the logits after its first ``i`` new tokens
        (``i = 0``: before any, what :meth:`advance` would have returned; not meaningful for a row
        rolled back since its last new token)."""
        rows, need = self.check_new_tokens(new_tokens, need)
        counts = [len(r) for r in rows]
        if any(self._stale[r] and counts[r] == 0 and need[r] for r in range(len(rows))):
            raise RuntimeError("HFLLM: a rolled-back row needs at least one new token before its logits are read")
        width = max(counts)
        if width == 0:
            return LLMOutput(self._last.clone()[:, None], torch.ones(len(rows), dtype=torch.bool))
        self.audit_log.append({"op": "score", "token_ids": [list(r) for r in rows]})
        logits = torch.cat([self._last[:, None], self._forward(*self._chunk(rows), counts, every_position=True)], dim=1)
        for r, c in enumerate(counts):
            logits[r, width - c] = self._last[r]  # the position before the row's first new token
        fed = torch.tensor([c > 0 for c in counts], device=logits.device)
        self._last = torch.where(fed[:, None], logits[:, -1], self._last)
        self._appended(counts)
        return LLMOutput(logits, torch.ones(len(rows), dtype=torch.bool, device=logits.device), [True] * len(rows))

    def reorder(self, order: list[int]) -> None:
        """Row ``r`` becomes former row ``order[r]`` (cache, mask and logits follow the beams)."""
        if len(order) != self.batch_size or any(not 0 <= s < self.batch_size for s in order):
            raise ValueError(f"reorder needs {self.batch_size} row indices in [0, {self.batch_size})")
        self.audit_log.append({"op": "reorder", "rows": [int(s) for s in order]})
        index = torch.tensor(order, device=self.kv.mask.device)
        self.kv.reorder(index, order)
        self._last = self._last.index_select(0, index.to(self._last.device))
        self._lengths = [self._lengths[s] for s in order]
        self._stale = [self._stale[s] for s in order]

    def rollback(self, n: list[int]) -> None:
        """Drop the last ``n[r]`` tokens of each row (masked out; trailing dead columns cropped)."""
        if len(n) != self.batch_size:
            raise ValueError(f"rollback needs one count per row ({self.batch_size})")
        if not any(n):
            return
        for r, count in enumerate(n):
            if count < 0 or count > self._lengths[r]:
                raise ValueError(f"rollback: row {r} has {self._lengths[r]} tokens, cannot drop {count}")
        self.audit_log.append({"op": "rollback", "n": [int(x) for x in n]})
        for r, count in enumerate(n):
            if count:
                self._lengths[r] -= count
                self._stale[r] = True
        self.kv.drop(n, who="HFLLM")


class KVCacheDriver:
    """One transformers causal LM's KV cache over left-padded rows: the driver both :class:`HFLLM` and the
    transformers SLM runner of :func:`logitfuse.generate` use. :meth:`forward` appends a chunk of columns
    (with its attention mask and position ids) and returns the logits; :meth:`drop` masks out each row's
    last positions (cropping columns dead in every row); :meth:`reorder` follows beams. Which columns of
    each row are live is also kept on the host, so dropping reads nothing back from the device.

    Attributes:
        model: the model. cache: its ``DynamicCache``. mask: ``(B, columns)`` 1 = a live position, 0 =
            padding or dropped (``None`` before the first forward).
    """

    def __init__(self, model: Any):
        from transformers import DynamicCache

        self.model = model
        params = inspect.signature(model.forward).parameters
        # transformers >= 5.2x calls the cache `cache`; earlier 5.x `past_key_values`
        self.cache_keyword = "cache" if "cache" in params else "past_key_values"
        self.keeps_logits = "logits_to_keep" in params
        try:
            self.cache = DynamicCache(config=model.config)
        except TypeError:  # older signatures
            self.cache = DynamicCache()
        self.mask: Tensor | None = None
        self._live: list[list[int]] = []  # per row, its live columns (host)

    @torch.inference_mode()
    def forward(self, ids: Tensor, chunk_mask: Tensor, positions: Tensor, *, live: Sequence[int] | None = None,
                every_position: bool = False) -> Tensor:
        """Append the chunk ``ids`` ``(B, W)`` whose ``live[r]`` last columns are row ``r``'s tokens (the rest
        masked padding in front; ``None``: read from ``chunk_mask``, e.g. once for a prompt); float32
        logits after its last column ``(B, V)``, or after every column ``(B, W, V)``."""
        columns, width = (0 if self.mask is None else self.mask.shape[1]), ids.shape[1]
        if live is None:
            live = chunk_mask.sum(dim=1).tolist()
        if not self._live:
            self._live = [[] for _ in range(ids.shape[0])]
        for cols, count in zip(self._live, live):
            cols.extend(range(columns + width - count, columns + width))
        mask = chunk_mask if self.mask is None else torch.cat([self.mask, chunk_mask], dim=1)
        kwargs = {self.cache_keyword: self.cache, "use_cache": True}
        if self.keeps_logits and not every_position:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        self.mask = mask
        return out.logits.float() if every_position else out.logits[:, -1, :].float()

    def drop(self, n: Sequence[int], *, who: str) -> None:
        """Forget the last ``n[r]`` live positions of each row (masked out; columns dead in every row at the
        end cropped from the cache). ``who`` names the caller in errors."""
        if not any(n):
            return
        rows, cols = [], []
        for r, count in enumerate(n):
            if count:
                rows += [r] * count
                cols += self._live[r][-count:]
                del self._live[r][-count:]
        mask = self.mask.clone()
        mask[torch.tensor(rows, device=mask.device), torch.tensor(cols, device=mask.device)] = 0
        keep = max((live[-1] + 1 for live in self._live if live), default=0)
        drop = mask.shape[1] - keep
        if drop > 0:
            before = self.cache.get_seq_length()
            self.cache.crop(-drop)  # a negative argument removes tokens in every transformers 5.x
            if self.cache.get_seq_length() != before - drop:
                raise RuntimeError(f"{who}: cropping the KV cache by {drop} left {self.cache.get_seq_length()} of "
                                   f"{before} positions")
            mask = mask[:, :keep]
        self.mask = mask

    def reorder(self, index: Tensor, order: Sequence[int]) -> None:
        """Row ``r`` becomes former row ``order[r]`` (``index``: the same on the mask's device)."""
        self.cache.reorder_cache(index)
        self.mask = self.mask.index_select(0, index)
        self._live = [list(self._live[s]) for s in order]
