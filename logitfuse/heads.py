"""Fusion heads: predict the per-row weight α of the SLM from the two next-token distributions."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from logitfuse import reference
from logitfuse._io import atomic_write, atomic_write_text
from logitfuse.functional import _prepare
from logitfuse.types import MODES, TAILS, TopK
from logitfuse.vocab import VocabMap

_FORMAT = "logitfuse.head/1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
Tensor = torch.Tensor


class _Head(nn.Module):
    """What both heads share: the setting they were trained for, compatibility checks, persistence."""

    #: constructor arguments that describe the architecture (saved in the config)
    _arch_keys: tuple[str, ...] = ()

    def __init__(self, v_slm: int, v_llm: int, *, mode: str, tail: str, slm_name: str | None,
                 llm_name: str | None, vocab_map_hash: str | None, llm_top_k: int | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}")
        if tail not in TAILS:
            raise ValueError(f"tail={tail!r} is not one of {TAILS}")
        if int(v_slm) < 1 or int(v_llm) < 1:
            raise ValueError(f"v_slm and v_llm must be positive, got {v_slm} and {v_llm}")
        self.v_slm, self.v_llm = int(v_slm), int(v_llm)
        self.mode, self.tail = mode, tail
        self.slm_name, self.llm_name = slm_name, llm_name
        self.vocab_map_hash = vocab_map_hash
        self.llm_top_k = llm_top_k  # the LLM's input: None = dense logits, K = its top-K logprobs

    # ---------------------------------------------------------------- config and checks
    @property
    def config(self) -> dict[str, Any]:
        setting = dict(
            format=_FORMAT, head_class=type(self).__name__, v_slm=self.v_slm, v_llm=self.v_llm,
            mode=self.mode, tail=self.tail, slm_name=self.slm_name, llm_name=self.llm_name,
            vocab_map_hash=self.vocab_map_hash, llm_top_k=self.llm_top_k,
        )
        return {**setting, **{key: getattr(self, key) for key in self._arch_keys}}

    def check_compatible(self, *, v_slm: int | None = None, v_llm: int | None = None,
                         vocab_map: VocabMap | None = None, slm_name: str | None = None,
                         llm_name: str | None = None, mode: str | None = None, tail: str | None = None,
                         llm_top_k: int | None = None) -> None:
        """Raise ``ValueError`` listing every way the given setting differs from the head's own.

        Arguments left ``None`` are not checked; a model name or map hash the head did not record
        is not checked either.
        """
        if vocab_map is not None:
            v_slm = vocab_map.v_slm if v_slm is None else v_slm
            v_llm = vocab_map.v_llm if v_llm is None else v_llm
        given = dict(v_slm=v_slm, v_llm=v_llm, mode=mode, tail=tail, slm_name=slm_name, llm_name=llm_name,
                     vocab_map_hash=vocab_map.hash if vocab_map is not None else None, llm_top_k=llm_top_k)
        problems = [
            f"{key}: head has {getattr(self, key)!r}, setting has {value!r}"
            for key, value in given.items()
            if value is not None and getattr(self, key) is not None and getattr(self, key) != value
        ]
        if problems:
            raise ValueError(
                f"this {type(self).__name__} was trained for another setting; "
                + "; ".join(problems)
                + ". Train a head for this model pair (logitfuse train) or use a fixed alpha"
            )

    def _prepared(self, slm_logits: Tensor, llm: Tensor | TopK, vocab_map: VocabMap | None) -> dict:
        args = _prepare(slm_logits, llm, vocab_map, 1.0, self.mode, self.tail, 1.0, 1.0, validate=False)
        if args["slm_logits"].shape[1] != self.v_slm or args["v_llm"] != self.v_llm:
            raise ValueError(
                f"this head was trained for v_slm={self.v_slm}, v_llm={self.v_llm}; "
                f"got v_slm={args['slm_logits'].shape[1]}, v_llm={args['v_llm']}"
            )
        return args

    def _aligned(self, slm_logits: Tensor, llm: Tensor | TopK, vocab_map: VocabMap | None):
        """``(lp_slm, lp_llm, llm_shift)`` over the SLM vocabulary, as the fusion sees them."""
        args = self._prepared(slm_logits, llm, vocab_map)
        lp_slm = reference.slm_logprobs(args["slm_logits"], args["slm_temperature"])
        lp_llm, shift = reference.llm_logprobs_on_slm_vocab(
            lp_slm, args["llm"], args["slm_to_llm"], v_llm=args["v_llm"], tail=self.tail,
            llm_temperature=args["llm_temperature"], llm_to_slm=args.get("llm_to_slm"),
        )
        return lp_slm, lp_llm, shift

    def alpha_from_aligned(self, lp_slm: Tensor, lp_llm: Tensor, llm_shift: Tensor, slm_logits: Tensor) -> Tensor:
        """α ``(batch_size,)`` from what :meth:`_aligned` returns (and the raw SLM logits), so that a
        caller who already pulled the LLM side back (``logitfuse.fuse_with_head``) need not do it twice."""
        raise NotImplementedError

    # ---------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` (each atomically)."""
        directory = Path(directory)
        config = self.config
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        metadata = {"config": json.dumps(config, sort_keys=True)}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, map_location: str | torch.device = "cpu",
                        **expected: Any) -> "_Head":
        """Load a head saved by :meth:`save_pretrained`.

        Keyword arguments (``vocab_map``, ``v_slm``, ``v_llm``, ``slm_name``, ``llm_name``,
        ``mode``, ``tail``, ``llm_top_k``) describe the setting it will be used in; any mismatch raises a
        ``ValueError`` that names it.
        """
        config, tensors = _read_head_files(Path(directory))
        if cls is not _Head and config["head_class"] != cls.__name__:
            raise ValueError(
                f"{directory} holds a {config['head_class']}, not a {cls.__name__}; "
                f"use logitfuse.load_head or {config['head_class']}.from_pretrained"
            )
        head_cls = _HEAD_CLASSES[config["head_class"]]
        setting = ("mode", "tail", "slm_name", "llm_name", "vocab_map_hash", *head_cls._arch_keys)
        kwargs = {key: config[key] for key in setting}
        kwargs["llm_top_k"] = config.get("llm_top_k")
        head = head_cls(config["v_slm"], config["v_llm"], **kwargs)
        try:
            head.load_state_dict(tensors)
        except RuntimeError as err:
            raise ValueError(f"{directory}/{WEIGHTS_NAME} does not fit its config.json: {err}") from err
        head.check_compatible(**expected)
        return head.to(map_location).eval()


def _read_head_files(directory: Path) -> tuple[dict, dict[str, Tensor]]:
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; a head folder holds {CONFIG_NAME} and {WEIGHTS_NAME} (save_pretrained)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}); save the head again") from err
    if not isinstance(config, dict) or config.get("format") != _FORMAT or config.get("head_class") not in _HEAD_CLASSES:
        raise ValueError(f"{config_path} is not a logitfuse head config (format {_FORMAT}, a known head_class)")
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights_path} is not a readable safetensors file ({err}); save the head again") from err
    return config, tensors


class FusionHead(_Head):
    """A small MLP from distribution features to the SLM weight α (a few thousand parameters).

    Features, computed on both models' distributions over the SLM vocabulary (the LLM's pulled
    back through the vocabulary map with the tail rule): entropy, max log-probability and top-k
    log-probabilities of each, argmax agreement, and the cross-probabilities ``p_L(argmax_S)``,
    ``p_S(argmax_L)``; optionally a projection of the SLM's last hidden state.

    Example
    -------
    >>> import torch, logitfuse
    >>> head = logitfuse.FusionHead(v_slm=10, v_llm=10)
    >>> alpha = head(torch.randn(3, 10), torch.randn(3, 10))
    >>> alpha.shape, bool(((alpha > 0) & (alpha < 1)).all())
    (torch.Size([3]), True)
    """

    _arch_keys = ("top_k", "hidden", "slm_hidden_size", "init_alpha")

    def __init__(self, v_slm: int, v_llm: int, *, mode: str = "linear", tail: str = "slm", top_k: int = 4,
                 hidden: int = 32, slm_hidden_size: int = 0, init_alpha: float = 0.5,
                 slm_name: str | None = None, llm_name: str | None = None, vocab_map_hash: str | None = None,
                 llm_top_k: int | None = None):
        super().__init__(v_slm, v_llm, mode=mode, tail=tail, slm_name=slm_name, llm_name=llm_name,
                         vocab_map_hash=vocab_map_hash, llm_top_k=llm_top_k)
        if not 0.0 < init_alpha < 1.0:
            raise ValueError(f"init_alpha must lie in (0, 1), got {init_alpha}")
        self.top_k, self.hidden, self.slm_hidden_size, self.init_alpha = int(top_k), int(hidden), int(slm_hidden_size), float(init_alpha)
        width = reference.num_fusion_features(self.top_k)
        self.project_hidden = nn.Linear(slm_hidden_size, 16) if slm_hidden_size else None
        self.mlp = nn.Sequential(
            nn.Linear(width + (16 if slm_hidden_size else 0), hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, 1),
        )
        # start at alpha = init_alpha whatever the features
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.constant_(self.mlp[-1].bias, math.log(init_alpha / (1 - init_alpha)))

    def features(self, slm_logits: Tensor, llm: Tensor | TopK, vocab_map: VocabMap | None = None) -> Tensor:
        """``(batch_size, n_features)`` float32 inputs of the MLP (see the class docstring)."""
        lp_slm, lp_llm, _ = self._aligned(slm_logits, llm, vocab_map)
        return reference.fusion_features(lp_slm, lp_llm, self.top_k)

    def alpha_from_features(self, features: Tensor, slm_hidden: Tensor | None = None) -> Tensor:
        """α ``(batch_size,)`` from precomputed features (what training on cached features uses)."""
        x = features.float() / 10.0  # entropies and log-probs are O(10): bring them to O(1)
        if self.project_hidden is not None:
            if slm_hidden is None:
                raise ValueError(f"this head was built with slm_hidden_size={self.slm_hidden_size}; pass slm_hidden")
            x = torch.cat([x, self.project_hidden(slm_hidden.float())], dim=-1)
        return torch.sigmoid(self.mlp(x)).squeeze(-1)

    def alpha_from_aligned(self, lp_slm: Tensor, lp_llm: Tensor, llm_shift: Tensor, slm_logits: Tensor) -> Tensor:
        return self.alpha_from_features(reference.fusion_features(lp_slm, lp_llm, self.top_k))

    def forward(self, slm_logits: Tensor, llm: Tensor | TopK, vocab_map: VocabMap | None = None,
                slm_hidden: Tensor | None = None) -> Tensor:
        """α ``(batch_size,)`` in ``(0, 1)`` for each row."""
        return self.alpha_from_features(self.features(slm_logits, llm, vocab_map), slm_hidden)


class PaperFusionHead(_Head):
    """The CoGenesis paper's head: an MLP over the two full-vocabulary logit vectors
    (``2·v_slm -> 512 -> 16 -> 1``, sigmoid). About ``1024·v_slm`` parameters: 155M at a 152k
    vocabulary. Kept for faithful comparison with :class:`FusionHead`.

    The LLM vector is its logits pulled back onto the SLM vocabulary (tail rule for the rest).
    """

    _arch_keys = ("hidden",)

    def __init__(self, v_slm: int, v_llm: int, *, mode: str = "logit", tail: str = "zero", hidden: int = 512,
                 slm_name: str | None = None, llm_name: str | None = None, vocab_map_hash: str | None = None,
                 llm_top_k: int | None = None):
        super().__init__(v_slm, v_llm, mode=mode, tail=tail, slm_name=slm_name, llm_name=llm_name,
                         vocab_map_hash=vocab_map_hash, llm_top_k=llm_top_k)
        self.hidden = int(hidden)
        self.mlp = nn.Sequential(nn.Linear(2 * self.v_slm, hidden), nn.ReLU(), nn.Linear(hidden, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, slm_logits: Tensor, llm: Tensor | TopK, vocab_map: VocabMap | None = None,
                slm_hidden: Tensor | None = None) -> Tensor:
        """α ``(batch_size,)`` in ``(0, 1)`` for each row."""
        return self.alpha_from_aligned(*self._aligned(slm_logits, llm, vocab_map), slm_logits)

    def alpha_from_aligned(self, lp_slm: Tensor, lp_llm: Tensor, llm_shift: Tensor, slm_logits: Tensor) -> Tensor:
        llm_raw = (lp_llm + llm_shift[:, None]).clamp(min=-1e4)  # raw logit scale; -inf would poison the matmul
        x = torch.cat([slm_logits.float().clamp(min=-1e4), llm_raw], dim=-1)
        return torch.sigmoid(self.mlp(x)).squeeze(-1)


_HEAD_CLASSES: dict[str, type[_Head]] = {"FusionHead": FusionHead, "PaperFusionHead": PaperFusionHead}


def load_head(directory: str | os.PathLike, **expected: Any) -> FusionHead | PaperFusionHead:
    """Load whichever head class ``directory`` holds; see :meth:`FusionHead.from_pretrained`."""
    return _Head.from_pretrained(directory, **expected)
