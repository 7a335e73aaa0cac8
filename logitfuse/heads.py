"""Fusion heads: predict the per-row weight α of the SLM from the two next-token distributions."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import operator
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from logitfuse import reference
from logitfuse.fileio import atomic_write_folder, interrupted_folder_write
from logitfuse.functional import align, fusion_feature_stats
from logitfuse.types import MODES, TAILS, Aligned, TopK
from logitfuse.vocab import VocabMap

_FORMAT = "logitfuse.head/1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
#: ``config.json`` key holding the sha256 (hex) of ``model.safetensors``; heads saved before it existed lack it
SHA256_KEY = "weights_sha256"
MAX_VOCAB_SIZE = 1 << 24
MAX_FEATURE_TOP_K = 1024
Tensor = torch.Tensor


def _int_argument(name: str, value: Any, low: int, high: int, fix: str) -> int:
    """``value`` as an ``int`` in ``[low, high]``; ``TypeError`` for a float, bool or anything else."""
    try:
        if isinstance(value, bool):
            raise TypeError
        whole = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}); {fix}") from None
    if not low <= whole <= high:
        raise ValueError(f"{name}={whole} is out of range: it must lie in [{low}, {high}]; {fix}")
    return whole


def _optional_str_argument(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a string or None, got {value!r} ({type(value).__name__})")
    return value


def _non_finite_tensors(tensors: dict[str, Tensor]) -> list[str]:
    """``"name: n of size"`` for each tensor holding NaN or inf values."""
    counts = {name: int((~torch.isfinite(t)).sum()) for name, t in tensors.items() if t.is_floating_point()}
    return [f"{name}: {count} of {tensors[name].numel()}" for name, count in counts.items() if count]


def _file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BaseFusionHead(nn.Module):
    """What both heads share: the setting they were trained for, compatibility checks, persistence.

    A head maps one step's two distributions to the SLM weight α ``(batch_size,)``. It reads them at
    temperature 1 with its own :attr:`tail` rule, either from an :class:`~logitfuse.types.Aligned`
    view (:meth:`alpha_from_aligned`; :func:`logitfuse.fuse_with_head` passes the view it mixes) or
    from the logits (``head(slm_logits, llm, vocab_map)``). Subclasses set
    :attr:`needs_aligned_view` and implement :meth:`alpha_from_aligned` and ``forward``.
    """

    #: constructor arguments that describe the architecture (saved in the config)
    _arch_keys: tuple[str, ...] = ()
    #: whether the head's input is the whole ``(batch_size, v_slm)`` pulled-back view (the paper's
    #: head) rather than per-row statistics, which the CUDA kernels compute without that tensor
    needs_aligned_view: bool = True

    def __init__(self, v_slm: int, v_llm: int, *, mode: str, tail: str, slm_name: str | None,
                 llm_name: str | None, vocab_map_hash: str | None, llm_top_k: int | None = None):
        super().__init__()
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}")
        if not isinstance(tail, str) or tail not in TAILS:
            raise ValueError(f"tail={tail!r} is not one of {TAILS}")
        self.v_slm = _int_argument("v_slm", v_slm, 1, MAX_VOCAB_SIZE, "pass the SLM's vocabulary size (VocabMap.v_slm)")
        self.v_llm = _int_argument("v_llm", v_llm, 1, MAX_VOCAB_SIZE, "pass the LLM's vocabulary size (VocabMap.v_llm)")
        self.mode, self.tail = mode, tail
        self.slm_name = _optional_str_argument("slm_name", slm_name)
        self.llm_name = _optional_str_argument("llm_name", llm_name)
        self.vocab_map_hash = _optional_str_argument("vocab_map_hash", vocab_map_hash)
        # the LLM's input: None = dense logits, K = its top-K logprobs
        self.llm_top_k = None if llm_top_k is None else _int_argument(
            "llm_top_k", llm_top_k, 1, self.v_llm, "pass how many top log-probabilities the LLM gives, or None for dense logits")

    #: most parameters a head of this class may have without ``allow_large=True``
    _max_parameters = 1_000_000

    def _check_size(self, n_parameters: int, allow_large: bool, arguments: str) -> None:
        """Refuse (before allocating) a head larger than the class means to be, unless ``allow_large``."""
        if not allow_large and n_parameters > self._max_parameters:
            raise ValueError(
                f"{type(self).__name__}({arguments}) would have {n_parameters:,} parameters, more than the "
                f"{self._max_parameters:,} it is meant to stay under; use smaller sizes, or pass allow_large=True"
            )

    def _checked_alpha(self, alpha: Tensor, non_finite_inputs: Callable[[Tensor], list[str]]) -> Tensor:
        """``alpha`` if every entry is finite, else a ``ValueError`` naming the head, the rows and what is
        not finite: ``non_finite_inputs(rows)`` names the inputs holding NaN/inf in those rows."""
        bad = ~torch.isfinite(alpha)
        if not bool(bad.any()):
            return alpha
        rows = bad.nonzero().flatten().tolist()
        inputs = non_finite_inputs(bad)
        weights = _non_finite_tensors(dict(self.named_parameters()))
        causes = ([f"its inputs hold non-finite values ({', '.join(inputs)})"] if inputs else []) + (
            [f"the head holds non-finite weights ({'; '.join(weights)}): load or re-train it"] if weights else [])
        raise ValueError(
            f"α is NaN: this {type(self).__name__} gave a non-finite α for rows {rows[:10]}"
            f"{' and more' if len(rows) > 10 else ''}; "
            + ("; ".join(causes) if causes else "the head or its inputs hold non-finite values")
        )

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

    def check_vocab_sizes(self, v_slm: int, v_llm: int) -> None:
        """``ValueError`` unless the head was trained for these vocabulary sizes."""
        if v_slm != self.v_slm or v_llm != self.v_llm:
            raise ValueError(
                f"this head was trained for v_slm={self.v_slm}, v_llm={self.v_llm}; got v_slm={v_slm}, v_llm={v_llm}"
            )

    def _check_inputs(self, slm_logits: Tensor, llm: Tensor | TopK, vocab_map: VocabMap | None) -> None:
        """The vocabulary sizes these inputs imply (``vocab_map``'s, or the default identity's) are the head's."""
        if vocab_map is not None:
            self.check_vocab_sizes(vocab_map.v_slm, vocab_map.v_llm)
        elif isinstance(slm_logits, Tensor) and slm_logits.dim() == 2:
            v_llm = llm.shape[1] if isinstance(llm, Tensor) and llm.dim() == 2 else slm_logits.shape[1]
            self.check_vocab_sizes(slm_logits.shape[1], v_llm)

    def aligned(self, slm_logits: Tensor, llm: Tensor | TopK, vocab_map: VocabMap | None = None) -> Aligned:
        """The step as this head reads it: :func:`logitfuse.align` at temperature 1 with the head's tail."""
        self._check_inputs(slm_logits, llm, vocab_map)
        return align(slm_logits, llm, vocab_map=vocab_map, tail=self.tail, validate=False)

    def alpha_from_aligned(self, aligned: Aligned) -> Tensor:
        """α ``(batch_size,)`` in ``(0, 1)`` from an aligned view (``ValueError`` where it would be NaN),
        so that a caller who aligned the step already (:func:`logitfuse.fuse_with_head`) need not again.
        The view should be the head's own (:meth:`aligned`: temperature 1, the head's tail)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` and ``config.json`` (with the weights file's sha256) into ``directory``.

        The pair is written as one: both files go to a temporary folder beside ``directory`` that then
        replaces it (see :func:`logitfuse.fileio.atomic_write_folder`), so an interrupted save leaves the
        previous head or the new one, never one head's config with another's weights. Refuses weights
        holding NaN or inf (``ValueError``).
        """
        config = self.config
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        non_finite = _non_finite_tensors(tensors)
        if non_finite:
            raise ValueError(
                f"cannot save this {type(self).__name__}: its weights hold NaN or inf ({'; '.join(non_finite)}), "
                "so its α would be NaN; re-train it (a lower learning rate or gradient clipping helps)"
            )
        metadata = {"config": json.dumps(config, sort_keys=True)}

        def write(folder: Path) -> None:
            save_file(tensors, folder / WEIGHTS_NAME, metadata=metadata)
            hashed = {**config, SHA256_KEY: _file_sha256((folder / WEIGHTS_NAME).read_bytes())}
            (folder / CONFIG_NAME).write_text(json.dumps(hashed, indent=2, sort_keys=True) + "\n", encoding="utf-8")

        # config first: a folder that takes the files one at a time is never left with a config
        # whose hash matches another head's weights
        return atomic_write_folder(directory, write, (CONFIG_NAME, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, map_location: str | torch.device = "cpu",
                        **expected: Any) -> BaseFusionHead:
        """Load a head saved by :meth:`save_pretrained`.

        Keyword arguments (``vocab_map``, ``v_slm``, ``v_llm``, ``slm_name``, ``llm_name``,
        ``mode``, ``tail``, ``llm_top_k``) describe the setting it will be used in; any mismatch raises a
        ``ValueError`` that names it. The files are checked first: ``config.json`` must hold every key
        with a value of the right type and size, ``model.safetensors`` must match the sha256 recorded
        in ``config.json`` (heads saved before the hash existed are loaded without that check), fit
        the config and hold only finite numbers.
        """
        directory = Path(directory)
        config, tensors = _read_head_files(directory)
        if cls is not BaseFusionHead and config["head_class"] != cls.__name__:
            raise ValueError(
                f"{directory} holds a {config['head_class']}, not a {cls.__name__}; "
                f"use logitfuse.load_head or {config['head_class']}.from_pretrained"
            )
        head_cls = _HEAD_CLASSES[config["head_class"]]
        config_path = directory / CONFIG_NAME
        setting = ("v_slm", "v_llm", "mode", "tail", "slm_name", "llm_name", "vocab_map_hash", *head_cls._arch_keys)
        missing = [key for key in setting if key not in config]
        if missing:
            raise ValueError(
                f"{config_path} lacks {', '.join(map(repr, missing))} (a {head_cls.__name__} config holds "
                f"{', '.join(setting)}); the file is damaged or was not written by save_pretrained: save the head again"
            )
        kwargs = {key: config[key] for key in setting}
        kwargs["llm_top_k"] = config.get("llm_top_k")
        try:
            with torch.device("meta"):  # checks every value, allocates nothing
                skeleton = head_cls(**kwargs, allow_large=True)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{config_path}: {err} (fix it in the file, or save the head again)") from err
        shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
        found = {name: tuple(t.shape) for name, t in tensors.items()}
        if found != shapes or not all(t.is_floating_point() for t in tensors.values()):
            raise ValueError(f"{directory / WEIGHTS_NAME} does not fit its config.json: the config asks for tensors "
                             f"{shapes}, the file holds {found} (floating point only); save the head again")
        non_finite = _non_finite_tensors(tensors)
        if non_finite:
            raise ValueError(f"{directory / WEIGHTS_NAME} holds NaN or inf weights ({'; '.join(non_finite)}): the head "
                             "diverged in training or the file is corrupted; re-train it or restore a good copy")
        head = head_cls(**kwargs, allow_large=True)
        head.load_state_dict(tensors)
        head.check_compatible(**expected)
        return head.to(map_location).eval()


def _read_head_files(directory: Path) -> tuple[dict, dict[str, Tensor]]:
    """The config (checked for format and class) and the tensors (checked against the config's sha256)."""
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            leftover = None if directory.is_dir() else interrupted_folder_write(directory)
            hint = (f"; an interrupted save_pretrained left the previous head in {leftover}: rename that folder to "
                    f"{directory.name}, or save the head again" if leftover else "")
            raise FileNotFoundError(f"{path} is missing; a head folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                                    f"(save_pretrained){hint}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}); save the head again") from err
    if not isinstance(config, dict) or config.get("format") != _FORMAT or config.get("head_class") not in _HEAD_CLASSES:
        raise ValueError(f"{config_path} is not a logitfuse head config (format {_FORMAT}, a known head_class)")
    recorded = config.get(SHA256_KEY)
    if recorded is not None and (not isinstance(recorded, str) or len(recorded) != 64
                                 or any(c not in "0123456789abcdef" for c in recorded)):
        raise ValueError(f"{config_path}: {SHA256_KEY}={recorded!r} is not a sha256 (64 lowercase hex digits); "
                         "save the head again")
    data = weights_path.read_bytes()  # hashed and parsed from the same bytes
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as err:
        raise ValueError(f"{weights_path} is not a readable safetensors file ({err}); save the head again") from err
    if recorded is not None and _file_sha256(data) != recorded:
        raise ValueError(f"{weights_path}: head weights do not match the sha256 in config.json: the file is corrupted "
                         "or belongs to another head; re-save or re-train it")
    return config, tensors


class FusionHead(BaseFusionHead):
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
    needs_aligned_view = False  # per-row statistics: computed by a kernel on CUDA

    def __init__(self, v_slm: int, v_llm: int, *, mode: str = "linear", tail: str = "slm", top_k: int = 4,
                 hidden: int = 32, slm_hidden_size: int = 0, init_alpha: float = 0.5,
                 slm_name: str | None = None, llm_name: str | None = None, vocab_map_hash: str | None = None,
                 llm_top_k: int | None = None, allow_large: bool = False):
        super().__init__(v_slm, v_llm, mode=mode, tail=tail, slm_name=slm_name, llm_name=llm_name,
                         vocab_map_hash=vocab_map_hash, llm_top_k=llm_top_k)
        self.top_k = _int_argument("top_k", top_k, 1, min(self.v_slm, MAX_FEATURE_TOP_K),
                                   f"it is how many top log-probabilities of each model the head reads (4 by default), "
                                   f"at most v_slm and {MAX_FEATURE_TOP_K}")
        self.hidden = _int_argument("hidden", hidden, 1, 1 << 16, "it is the MLP's width (32 by default)")
        self.slm_hidden_size = _int_argument("slm_hidden_size", slm_hidden_size, 0, 1 << 20,
                                             "pass the SLM's hidden size (config.hidden_size), or 0 to not use it")
        if isinstance(init_alpha, bool) or not isinstance(init_alpha, numbers.Real):
            raise TypeError(f"init_alpha must be a float, got {init_alpha!r} ({type(init_alpha).__name__})")
        if not 0.0 < init_alpha < 1.0:
            raise ValueError(f"init_alpha must lie in (0, 1), got {init_alpha}")
        self.init_alpha = float(init_alpha)
        top_k, hidden, slm_hidden_size = self.top_k, self.hidden, self.slm_hidden_size
        width = reference.num_fusion_features(top_k) + (16 if slm_hidden_size else 0)
        n_parameters = (16 * slm_hidden_size + 16 if slm_hidden_size else 0) + width * hidden + hidden * hidden + 3 * hidden + 1
        self._check_size(n_parameters, allow_large, f"top_k={top_k}, hidden={hidden}, slm_hidden_size={slm_hidden_size}")
        self.project_hidden = nn.Linear(slm_hidden_size, 16) if slm_hidden_size else None
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, 1),
        )
        # start at alpha = init_alpha whatever the features
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.constant_(self.mlp[-1].bias, math.log(init_alpha / (1 - init_alpha)))

    def features(self, slm_logits: Tensor, llm: Tensor | TopK, vocab_map: VocabMap | None = None) -> Tensor:
        """``(batch_size, n_features)`` float32 inputs of the MLP (see the class docstring). On CUDA
        their statistics come from a kernel that never makes the pulled-back LLM tensor."""
        self._check_inputs(slm_logits, llm, vocab_map)
        stats = fusion_feature_stats(slm_logits, llm, vocab_map=vocab_map, tail=self.tail, k=self.top_k, validate=False)
        return reference.features_from_stats(stats, self.top_k)

    def features_from_aligned(self, aligned: Aligned) -> Tensor:
        """:meth:`features` from an aligned view (the reference path of :func:`logitfuse.fuse_with_head`)."""
        return reference.fusion_features(aligned.slm_logprobs, aligned.llm_logprobs, self.top_k)

    def feature_names(self) -> list[str]:
        """What each column of :meth:`features` is."""
        names = []
        for model in ("slm", "llm"):
            names += [f"{model} entropy", f"{model} max log-probability"]
            names += [f"{model} top-{rank} log-probability" for rank in range(1, self.top_k + 1)]
        return names + ["argmax agreement", "log p_llm(slm argmax)", "log p_slm(llm argmax)"]

    def alpha_from_features(self, features: Tensor, slm_hidden: Tensor | None = None) -> Tensor:
        """α ``(batch_size,)`` from precomputed features (what training on cached features uses).

        Unlike :meth:`forward` and :meth:`alpha_from_aligned`, it does not check that α is finite
        (that costs a host sync per training step)."""
        x = features.float() / 10.0  # entropies and log-probs are O(10): bring them to O(1)
        if self.project_hidden is not None:
            if slm_hidden is None:
                raise ValueError(f"this head was built with slm_hidden_size={self.slm_hidden_size}; pass slm_hidden")
            x = torch.cat([x, self.project_hidden(slm_hidden.float())], dim=-1)
        return torch.sigmoid(self.mlp(x)).squeeze(-1)

    def alpha_from_aligned(self, aligned: Aligned) -> Tensor:
        return self._checked_features_alpha(self.features_from_aligned(aligned))

    def forward(self, slm_logits: Tensor, llm: Tensor | TopK, vocab_map: VocabMap | None = None,
                slm_hidden: Tensor | None = None) -> Tensor:
        """α ``(batch_size,)`` in ``(0, 1)`` for each row; ``ValueError`` where it would be NaN."""
        return self._checked_features_alpha(self.features(slm_logits, llm, vocab_map), slm_hidden)

    def _checked_features_alpha(self, features: Tensor, slm_hidden: Tensor | None = None) -> Tensor:
        def non_finite_inputs(rows: Tensor) -> list[str]:
            bad = ~torch.isfinite(features[rows]).all(dim=0)
            names = [name for name, is_bad in zip(self.feature_names(), bad.tolist()) if is_bad]
            if slm_hidden is not None and not bool(torch.isfinite(slm_hidden[rows]).all()):
                names.append("slm_hidden")
            return names

        return self._checked_alpha(self.alpha_from_features(features, slm_hidden), non_finite_inputs)


class PaperFusionHead(BaseFusionHead):
    """The CoGenesis paper's head: an MLP over the two full-vocabulary logit vectors
    (``2·v_slm -> 512 -> 16 -> 1``, sigmoid). About ``1024·v_slm`` parameters: 155M at a 152k
    vocabulary. Kept for faithful comparison with :class:`FusionHead`.

    The LLM vector is its logits pulled back onto the SLM vocabulary (tail rule for the rest).
    """

    _arch_keys = ("hidden",)

    _max_parameters = 500_000_000  # 155M at a 152k vocabulary; 2 GB of float32 weights

    def __init__(self, v_slm: int, v_llm: int, *, mode: str = "logit", tail: str = "zero", hidden: int = 512,
                 slm_name: str | None = None, llm_name: str | None = None, vocab_map_hash: str | None = None,
                 llm_top_k: int | None = None, allow_large: bool = False):
        super().__init__(v_slm, v_llm, mode=mode, tail=tail, slm_name=slm_name, llm_name=llm_name,
                         vocab_map_hash=vocab_map_hash, llm_top_k=llm_top_k)
        self.hidden = hidden = _int_argument("hidden", hidden, 1, 1 << 16, "it is the first layer's width (512 in the paper)")
        self._check_size(2 * self.v_slm * hidden + 17 * hidden + 33, allow_large, f"v_slm={self.v_slm}, hidden={hidden}")
        self.mlp = nn.Sequential(nn.Linear(2 * self.v_slm, hidden), nn.ReLU(), nn.Linear(hidden, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, slm_logits: Tensor, llm: Tensor | TopK, vocab_map: VocabMap | None = None,
                slm_hidden: Tensor | None = None) -> Tensor:
        """α ``(batch_size,)`` in ``(0, 1)`` for each row; ``ValueError`` where it would be NaN."""
        return self.alpha_from_aligned(self.aligned(slm_logits, llm, vocab_map))

    def alpha_from_aligned(self, aligned: Aligned) -> Tensor:
        # raw logit scales: the SLM's logits as given, the LLM's pulled-back log-probabilities + its lse
        llm_raw = (aligned.llm_logprobs + aligned.llm_lse[:, None]).clamp(min=-1e4)  # -inf would poison the matmul
        slm_raw = aligned.slm_logits.float().clamp(min=-1e4)
        x = torch.cat([slm_raw, llm_raw], dim=-1)

        def non_finite_inputs(rows: Tensor) -> list[str]:
            sides = {"slm_logits": slm_raw, "llm (pulled back onto the SLM vocabulary)": llm_raw}
            return [name for name, values in sides.items() if not bool(torch.isfinite(values[rows]).all())]

        return self._checked_alpha(torch.sigmoid(self.mlp(x)).squeeze(-1), non_finite_inputs)


_HEAD_CLASSES: dict[str, type[BaseFusionHead]] = {"FusionHead": FusionHead, "PaperFusionHead": PaperFusionHead}


def load_head(directory: str | os.PathLike, **expected: Any) -> FusionHead | PaperFusionHead:
    """Load whichever head class ``directory`` holds; see :meth:`FusionHead.from_pretrained`."""
    return BaseFusionHead.from_pretrained(directory, **expected)
