"""Vocabulary maps: which LLM token stands for each SLM token."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from logitfuse.fileio import atomic_write

MAP_FORMAT = "logitfuse.VocabMap/1"
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """The GPT-2 byte-level alphabet, reversed: printable bytes stand for themselves, the other
    bytes are shifted to code points 256 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + shifted)] = byte
            shifted += 1
    return chars


def _backend(tokenizer: Any):
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer (or the object itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None and hasattr(tokenizer, "to_str") and hasattr(tokenizer, "get_vocab"):
        backend = tokenizer
    if backend is None:
        raise TypeError(
            f"VocabMap.from_tokenizers needs a fast (Rust-backed) tokenizer or a tokenizers.Tokenizer, "
            f"got {type(tokenizer).__name__}; load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    return backend


def _uses_byte_level(spec: dict) -> bool:
    """Whether a tokenizer.json spec encodes text with the byte-level alphabet (GPT-2 style)."""
    found = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel":
                found.append(True)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk({"decoder": spec.get("decoder"), "pre_tokenizer": spec.get("pre_tokenizer")})
    return bool(found)


def normalized_vocab(tokenizer: Any) -> dict[int, tuple[str, bytes | str]]:
    """Each token id's text in a tokenizer-independent form.

    Ordinary tokens become the bytes they decode to: byte-level ``Ġ``/``Ċ`` and the rest of the
    GPT-2 alphabet are undone, sentencepiece ``▁`` becomes a space and ``<0xNN>`` byte tokens become
    that byte. Added tokens (``<|im_end|>``, ``<eos>``...) keep their exact string and only ever
    match another tokenizer's added token of the same string.
    """
    backend = _backend(tokenizer)
    byte_level = _uses_byte_level(json.loads(backend.to_str()))
    added = {idx for idx in backend.get_added_tokens_decoder()}
    decoder = _byte_level_decoder()
    out: dict[int, tuple[str, bytes | str]] = {}
    for token, idx in backend.get_vocab(with_added_tokens=True).items():
        if idx in added:
            out[idx] = ("added", token)
        elif byte_level:
            if all(ch in decoder for ch in token):
                out[idx] = ("bytes", bytes(decoder[ch] for ch in token))
            else:  # a token outside the alphabet (rare): keep its UTF-8 text
                out[idx] = ("bytes", token.encode("utf-8"))
        elif match := _BYTE_TOKEN.match(token):
            out[idx] = ("byte", bytes([int(match.group(1), 16)]))
        else:
            out[idx] = ("bytes", token.replace("▁", " ").encode("utf-8"))
    return out


def content_hash(slm_to_llm: torch.Tensor, v_llm: int, llm_to_slm: torch.Tensor | None = None) -> str:
    digest = hashlib.sha256(MAP_FORMAT.encode())
    digest.update(f"{slm_to_llm.numel()}:{v_llm}:".encode())
    digest.update(slm_to_llm.numpy().astype("<i8").tobytes())
    if llm_to_slm is not None:
        digest.update(b"llm_to_slm:" + llm_to_slm.numpy().astype("<i8").tobytes())
    return digest.hexdigest()


def _check_one_to_one(slm_to_llm: torch.Tensor) -> None:
    """Refuse a ``slm_to_llm`` that uses an LLM id twice: the fusion would count that LLM token's
    probability once for each SLM token (at ``alpha = 0`` an LLM token of 0.987 became 0.498 + 0.498)."""
    order = torch.argsort(slm_to_llm, stable=True)  # equal LLM ids: lower SLM id first
    ids = slm_to_llm[order]
    repeated = ((ids[1:] == ids[:-1]) & (ids[1:] >= 0)).nonzero()
    if repeated.numel():
        k = int(repeated[0])
        raise ValueError(
            f"slm_to_llm maps SLM ids {int(order[k])} and {int(order[k + 1])} both to LLM id {int(ids[k])}: "
            "each LLM id may stand for one SLM token only, or the fusion counts its probability twice. Keep "
            "one (e.g. the lowest SLM id) and set the others to -1; many-to-one belongs in llm_to_slm, the "
            "hand-off of each LLM token's mass to one SLM token (VocabMap.from_tokenizers builds it)"
        )


class VocabMap:
    """A map from SLM token ids to LLM token ids, ``-1`` where the LLM has no such token.

    Parameters
    ----------
    slm_to_llm : torch.Tensor
        ``(v_slm,)`` integer tensor; entry ``i`` is the LLM id for SLM id ``i`` or ``-1``. One-to-one:
        no LLM id may appear twice (``ValueError``), since each mapped pair carries that LLM token's
        whole probability.
    v_llm : int
        The LLM's vocabulary size (the width of its logits).
    llm_to_slm : torch.Tensor, optional
        ``(v_llm,)``: for maps between two tokenizers, the SLM token each LLM token starts with
        (``-1``: none). The fusion then hands every LLM token's probability to that SLM token, so
        the mass of LLM tokens with no exact SLM counterpart (``"],\n\n"`` when the SLM has only
        ``"],"``) reaches the right SLM token instead of the tail. It must agree with
        ``slm_to_llm`` (``llm_to_slm[slm_to_llm[i]] == i``). ``from_tokenizers`` builds it.

    Example
    -------
    >>> from logitfuse import VocabMap
    >>> vmap = VocabMap.identity(5, 4)   # e.g. a padded SLM vocabulary
    >>> vmap.slm_to_llm.tolist(), vmap.coverage
    ([0, 1, 2, 3, -1], 0.8)
    """

    def __init__(self, slm_to_llm: torch.Tensor, v_llm: int, llm_to_slm: torch.Tensor | None = None):
        if not isinstance(slm_to_llm, torch.Tensor) or slm_to_llm.dim() != 1:
            raise TypeError("slm_to_llm must be a 1-D integer tensor of shape (v_slm,)")
        if slm_to_llm.dtype.is_floating_point or slm_to_llm.dtype == torch.bool:
            raise TypeError(f"slm_to_llm must hold integer ids, got dtype {slm_to_llm.dtype}")
        if int(v_llm) < 1 or slm_to_llm.numel() < 1:
            raise ValueError(f"both vocabularies need at least one token (v_slm={slm_to_llm.numel()}, v_llm={v_llm})")
        slm_to_llm = slm_to_llm.detach().to("cpu", torch.int64).contiguous()
        if slm_to_llm.numel() and (slm_to_llm.min() < -1 or slm_to_llm.max() >= v_llm):
            raise ValueError(
                f"slm_to_llm holds ids outside [-1, v_llm={v_llm}): "
                f"min {int(slm_to_llm.min())}, max {int(slm_to_llm.max())}"
            )
        _check_one_to_one(slm_to_llm)
        if llm_to_slm is not None:
            llm_to_slm = llm_to_slm.detach().to("cpu", torch.int64).contiguous()
            if llm_to_slm.shape != (int(v_llm),) or llm_to_slm.min() < -1 or llm_to_slm.max() >= slm_to_llm.numel():
                raise ValueError(f"llm_to_slm must have shape ({v_llm},) and hold ids in [-1, v_slm={slm_to_llm.numel()})")
            mapped = slm_to_llm >= 0
            if not torch.equal(llm_to_slm[slm_to_llm[mapped]], torch.arange(slm_to_llm.numel())[mapped]):
                raise ValueError("llm_to_slm disagrees with slm_to_llm: an exactly mapped pair must map back to itself")
        self.slm_to_llm = slm_to_llm
        self.llm_to_slm = llm_to_slm
        self.v_llm = int(v_llm)
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._hash: str | None = None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def identity(cls, v_slm: int, v_llm: int, *, n_shared: int | None = None) -> VocabMap:
        """Same tokenizer on both sides: id ``i`` maps to ``i``. Vocabulary sizes may differ by
        padding; ids at or beyond ``n_shared`` (default: the smaller size) are unmapped."""
        n_shared = min(v_slm, v_llm) if n_shared is None else n_shared
        if not 0 <= n_shared <= min(v_slm, v_llm):
            raise ValueError(f"n_shared={n_shared} must lie in [0, min(v_slm, v_llm)={min(v_slm, v_llm)}]")
        ids = torch.arange(v_slm)
        return cls(torch.where(ids < n_shared, ids, -1), v_llm)

    @classmethod
    def from_tokenizers(
        cls, slm_tokenizer: Any, llm_tokenizer: Any, *, v_slm: int | None = None, v_llm: int | None = None
    ) -> VocabMap:
        """Map tokens whose normalized text is identical (see :func:`normalized_vocab`), and every
        other LLM token to the longest SLM token its text starts with (``llm_to_slm``).

        ``v_slm`` / ``v_llm`` are the models' logit widths when larger than the tokenizers'
        vocabularies (embedding padding); the padded ids stay unmapped. When several tokens of one
        side share a normalized text, an ordinary token wins over a ``<0xNN>`` byte token, then the
        lowest id, and each LLM id is used once, so the map stays one-to-one: on the SLM side the
        winner keeps the exact mapping, the other SLM tokens of that text stay unmapped (``-1``,
        the tail rule covers them); on the LLM side the others hand their mass to the winner's SLM
        token through ``llm_to_slm``.
        """
        slm_norm, llm_norm = normalized_vocab(slm_tokenizer), normalized_vocab(llm_tokenizer)
        v_slm = max(v_slm or 0, max(slm_norm) + 1)
        v_llm = max(v_llm or 0, max(llm_norm) + 1)
        # on both sides ordinary tokens come first and byte-fallback tokens last, so that a real
        # token (e.g. sentencepiece's "▁") claims a text that a byte token (<0x20>) shares
        def ordered(norm):
            return sorted(norm, key=lambda i: (norm[i][0] == "byte", i))

        by_text: dict[tuple[str, bytes | str], int] = {}
        for idx in ordered(llm_norm):
            kind, text = llm_norm[idx]
            by_text.setdefault(("added" if kind == "added" else "text", text), idx)
        slm_to_llm = torch.full((v_slm,), -1, dtype=torch.int64)
        llm_to_slm = torch.full((v_llm,), -1, dtype=torch.int64)
        slm_by_text: dict[tuple[str, bytes | str], int] = {}
        for idx in ordered(slm_norm):
            kind, text = slm_norm[idx]
            key = ("added" if kind == "added" else "text", text)
            slm_by_text.setdefault(key, idx)
            target = by_text.get(key)
            if target is not None and llm_to_slm[target] < 0:
                slm_to_llm[idx] = target
                llm_to_slm[target] = idx
        # every other LLM token hands its mass to the longest SLM token its text starts with
        longest = max((len(text) for kind, text in slm_by_text if kind == "text"), default=0)
        for idx, (kind, text) in llm_norm.items():
            if llm_to_slm[idx] >= 0 or kind == "added":
                continue
            for size in range(min(len(text), longest), 0, -1):
                prefix = slm_by_text.get(("text", text[:size]))
                if prefix is not None:
                    llm_to_slm[idx] = prefix
                    break
        return cls(slm_to_llm, v_llm, llm_to_slm)

    # ------------------------------------------------------------------ properties
    @property
    def v_slm(self) -> int:
        return self.slm_to_llm.numel()

    @property
    def is_identity(self) -> bool:
        """Whether every SLM id maps to itself or to nothing (one tokenizer, maybe padded)."""
        ids = torch.arange(self.v_slm)
        return bool(((self.slm_to_llm == ids) | (self.slm_to_llm == -1)).all())

    @property
    def coverage(self) -> float:
        """Share of SLM tokens that have an LLM counterpart."""
        return (self.slm_to_llm >= 0).sum().item() / self.v_slm

    @property
    def hash(self) -> str:
        """A stable content hash (sha256 hex) of the sizes and the map."""
        if self._hash is None:
            self._hash = content_hash(self.slm_to_llm, self.v_llm, self.llm_to_slm)
        return self._hash

    def on(self, device: torch.device | str, which: str = "slm_to_llm") -> torch.Tensor:
        """``slm_to_llm`` (or ``which="llm_to_slm"``) as an int64 tensor on ``device``, cached."""
        key = (which, torch.device(device))
        if key not in self._on_device:
            self._on_device[key] = getattr(self, which).to(key[1])
        return self._on_device[key]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the map to a safetensors file (atomically)."""
        metadata = {"format": MAP_FORMAT, "v_llm": str(self.v_llm), "hash": self.hash}
        tensors = {"slm_to_llm": self.slm_to_llm}
        if self.llm_to_slm is not None:
            tensors["llm_to_slm"] = self.llm_to_slm
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> VocabMap:
        """Read a map written by :meth:`save`; a damaged file raises ``ValueError``."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(path))
        except FileNotFoundError:
            raise
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path} is not a readable VocabMap file ({err}); recreate it with VocabMap.save") from err
        if metadata.get("format") != MAP_FORMAT or "slm_to_llm" not in tensors or "v_llm" not in metadata:
            raise ValueError(f"{path} is a safetensors file but not a VocabMap (format {metadata.get('format')!r})")
        slm_to_llm, v_llm = tensors["slm_to_llm"].to(torch.int64), int(metadata["v_llm"])
        llm_to_slm = tensors["llm_to_slm"].to(torch.int64) if "llm_to_slm" in tensors else None
        if metadata.get("hash") != content_hash(slm_to_llm, v_llm, llm_to_slm):
            raise ValueError(f"{path} is corrupted: its content hash does not match the one stored with it")
        try:
            return cls(slm_to_llm, v_llm, llm_to_slm)
        except ValueError as err:
            raise ValueError(f"{path} holds an invalid VocabMap: {err}") from err

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VocabMap) and self.hash == other.hash

    def __hash__(self) -> int:
        return hash(self.hash)

    def __repr__(self) -> str:
        return f"VocabMap(v_slm={self.v_slm}, v_llm={self.v_llm}, coverage={self.coverage:.3f})"


@functools.lru_cache(maxsize=16)
def identity_map(v_slm: int, v_llm: int) -> VocabMap:
    """Cached :meth:`VocabMap.identity` for the default ``vocab_map=None``."""
    return VocabMap.identity(v_slm, v_llm)
