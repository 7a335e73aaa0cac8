"""Fusion heads: predict the per-row weight α of the SLM from the two next-token distributions."""

from __future__ import annotations

import json
import math
import numbers
import operator
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from logitfuse import reference
from logitfuse.fileio import atomic_write_folder
from logitfuse.heads.files import CONFIG_NAME, FORMAT, SHA256_KEY, WEIGHTS_NAME, file_sha256, read_head_files
from logitfuse.heads.files import non_finite_tensors
from logitfuse.functional import align, fusion_feature_stats
from logitfuse.heads.protocol import FusionHeadProtocol
from logitfuse.heads.slm_side import CallGate, SLMSideEncoder, check_feature_groups, slm_distribution_features
from logitfuse.types import MODES, TAILS, Aligned, FeatureStats, TopK
from logitfuse.vocab import VocabMap

__all__ = ["CONFIG_NAME", "SHA256_KEY", "WEIGHTS_NAME", "BaseFusionHead", "FusionHead", "FusionHeadProtocol",
           "PaperFusionHead", "load_head"]
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
    #: architecture arguments added later: heads saved before them lack the key, and load with the
    #: value given here (the one that rebuilds them as they were)
    _later_arch_keys: dict[str, Any] = {}
    #: state-dict names of heads saved before a module moved: old prefix -> new prefix
    _moved_tensors: dict[str, str] = {}
    #: whether the head's input is the whole ``(batch_size, v_slm)`` pulled-back view (the paper's
    #: head) rather than per-row statistics, which the CUDA kernels compute without that tensor
    needs_aligned_view: bool = True
    #: SLM-side feature groups read (:mod:`logitfuse.heads.slm_side`); none by default
    slm_features: Sequence[str] = ()
    #: whether α needs SLM-side inputs / the SLM's last hidden state (see :class:`FusionHeadProtocol`)
    reads_slm_side: bool = False
    needs_slm_hidden: bool = False
    slm_hidden_size: int = 0
    #: with ``needs_aligned_view`` False: the k of the per-row statistics it reads (:meth:`alpha_from_stats`)
    stats_top_k: int | None = None

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
        self.gate: nn.Module | None = None  # a call gate (FusionHead with gate_hidden > 0)

    def call_gain(self, slm_logits: Tensor, slm_hidden: Tensor | None = None, **slm_side: Any) -> Tensor:
        """What an LLM call is predicted to gain; only heads with a call gate (:attr:`gate`) say."""
        raise ValueError(f"this {type(self).__name__} has no call gate; train a FusionHead with one (logitfuse train "
                         "--gate-hidden 32) or use another schedule (entropy_gate, periodic)")

    #: most parameters a head of this class may have without ``allow_large=True``
    MAX_PARAMETERS = 1_000_000

    def check_size(self, n_parameters: int, allow_large: bool, arguments: str) -> None:
        """Refuse (before allocating) a head larger than the class means to be, unless ``allow_large``."""
        if not allow_large and n_parameters > self.MAX_PARAMETERS:
            raise ValueError(
                f"{type(self).__name__}({arguments}) would have {n_parameters:,} parameters, more than the "
                f"{self.MAX_PARAMETERS:,} it is meant to stay under; use smaller sizes, or pass allow_large=True"
            )

    def _checked_alpha(self, alpha: Tensor, non_finite_inputs: Callable[[Tensor], list[str]],
                       check_finite: bool = True) -> Tensor:
        """``alpha`` if every entry is finite, else a ``ValueError`` naming the head, the rows and what is
        not finite: ``non_finite_inputs(rows)`` names the inputs holding NaN/inf in those rows. Without
        ``check_finite``, ``alpha`` as it is (the check reads the device; a decode loop that folds it into
        the ids it reads anyway passes False)."""
        if not check_finite:
            return alpha
        bad = ~torch.isfinite(alpha)
        if not bool(bad.any()):
            return alpha
        rows = bad.nonzero().flatten().tolist()
        inputs = non_finite_inputs(bad)
        weights = non_finite_tensors(dict(self.named_parameters()))
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
            format=FORMAT, head_class=type(self).__name__, v_slm=self.v_slm, v_llm=self.v_llm,
            mode=self.mode, tail=self.tail, slm_name=self.slm_name, llm_name=self.llm_name,
            vocab_map_hash=self.vocab_map_hash, llm_top_k=self.llm_top_k,
        )
        return {**setting, **{key: getattr(self, key) for key in (*self._arch_keys, *self._later_arch_keys)}}

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

    def alpha_from_aligned(self, aligned: Aligned, *, check_finite: bool = True) -> Tensor:
        """α ``(batch_size,)`` in ``(0, 1)`` from an aligned view (``ValueError`` where it would be NaN,
        unless not ``check_finite``), so that a caller who aligned the step already
        (:func:`logitfuse.fuse_with_head`) need not again. The view should be the head's own
        (:meth:`aligned`: temperature 1, the head's tail)."""
        raise NotImplementedError

    def alpha_from_stats(self, stats: FeatureStats, slm_hidden: Tensor | None = None, *, check_finite: bool = True,
                         **slm_side: Any) -> Tensor:
        """α from per-row statistics of the step (``fusion_feature_stats`` with :attr:`stats_top_k` and the
        head's tail), what :func:`logitfuse.fuse_with_head` computes once on the kernel path; only heads
        that do not need the aligned view implement it."""
        raise NotImplementedError(f"{type(self).__name__} reads the aligned view (needs_aligned_view), not statistics")

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
        non_finite = non_finite_tensors(tensors)
        if non_finite:
            raise ValueError(
                f"cannot save this {type(self).__name__}: its weights hold NaN or inf ({'; '.join(non_finite)}), "
                "so its α would be NaN; re-train it (a lower learning rate or gradient clipping helps)"
            )
        metadata = {"config": json.dumps(config, sort_keys=True)}

        def write(folder: Path) -> None:
            save_file(tensors, folder / WEIGHTS_NAME, metadata=metadata)
            hashed = {**config, SHA256_KEY: file_sha256((folder / WEIGHTS_NAME).read_bytes())}
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
        config, tensors = read_head_files(directory, _HEAD_CLASSES)
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
        kwargs.update({key: config.get(key, legacy) for key, legacy in head_cls._later_arch_keys.items()})
        for old, new in head_cls._moved_tensors.items():
            tensors = {(new + name[len(old):] if name.startswith(old) else name): t for name, t in tensors.items()}
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
        non_finite = non_finite_tensors(tensors)
        if non_finite:
            raise ValueError(f"{directory / WEIGHTS_NAME} holds NaN or inf weights ({'; '.join(non_finite)}): the head "
                             "diverged in training or the file is corrupted; re-train it or restore a good copy")
        head = head_cls(**kwargs, allow_large=True)
        head.load_state_dict(tensors)
        head.check_compatible(**expected)
        return head.to(map_location).eval()


class FusionHead(BaseFusionHead):
    """A small MLP from distribution features to the SLM weight α (a few thousand parameters).

    Features, computed on both models' distributions over the SLM vocabulary (the LLM's pulled
    back through the vocabulary map with the tail rule): entropy, max log-probability and top-k
    log-probabilities of each, argmax agreement, and the cross-probabilities ``p_L(argmax_S)``,
    ``p_S(argmax_L)``. Optionally SLM-side groups (``slm_features``, see :mod:`logitfuse.heads.slm_side`):
    ``"hidden"`` (the SLM's last hidden state projected to ``hidden_projection`` dims; needs
    ``slm_hidden_size``), ``"token"`` (the last generated token, hashed into ``token_buckets`` rows)
    and ``"position"``. The head then needs ``slm_hidden``, ``last_tokens`` and ``positions`` (the
    groups it reads); :class:`logitfuse.FusionSession` passes them.

    ``gate_hidden > 0`` adds a call gate (:class:`~logitfuse.heads.slm_side.CallGate`): from SLM-side
    signals alone (the SLM's entropy and top-k log-probabilities, and the same groups) it predicts
    what an LLM call gains at a position (:meth:`call_gain`); the schedule ``"head_gate(tau)"``
    calls the LLM only where that is at least ``tau`` nats.

    Example
    -------
    >>> import torch, logitfuse
    >>> head = logitfuse.FusionHead(v_slm=10, v_llm=10)
    >>> alpha = head(torch.randn(3, 10), torch.randn(3, 10))
    >>> alpha.shape, bool(((alpha > 0) & (alpha < 1)).all())
    (torch.Size([3]), True)
    """

    _arch_keys = ("top_k", "hidden", "slm_hidden_size", "init_alpha")
    # heads saved before SLM-side groups: slm_features from slm_hidden_size, a 16-wide projection, no gate
    _later_arch_keys = {"slm_features": None, "hidden_projection": 16, "token_buckets": 4096, "gate_hidden": 0}
    _moved_tensors = {"project_hidden.": "slm_encoder.project_hidden."}
    needs_aligned_view = False  # per-row statistics: computed by a kernel on CUDA

    def __init__(self, v_slm: int, v_llm: int, *, mode: str = "linear", tail: str = "slm", top_k: int = 4,
                 hidden: int = 32, slm_hidden_size: int = 0, init_alpha: float = 0.5,
                 slm_features: Any = None, hidden_projection: int = 16, token_buckets: int = 4096,
                 gate_hidden: int = 0, slm_name: str | None = None, llm_name: str | None = None,
                 vocab_map_hash: str | None = None, llm_top_k: int | None = None, allow_large: bool = False):
        super().__init__(v_slm, v_llm, mode=mode, tail=tail, slm_name=slm_name, llm_name=llm_name,
                         vocab_map_hash=vocab_map_hash, llm_top_k=llm_top_k)
        self.top_k = _int_argument("top_k", top_k, 1, min(self.v_slm, MAX_FEATURE_TOP_K),
                                   f"it is how many top log-probabilities of each model the head reads (4 by default), "
                                   f"at most v_slm and {MAX_FEATURE_TOP_K}")
        self.hidden = _int_argument("hidden", hidden, 1, 1 << 16, "it is the MLP's width (32 by default)")
        self.slm_hidden_size = _int_argument("slm_hidden_size", slm_hidden_size, 0, 1 << 20,
                                             "pass the SLM's hidden size (config.hidden_size), or 0 to not use it")
        # None: what heads saved before the groups existed meant (the hidden state when its size is given)
        groups = check_feature_groups(("hidden",) if slm_features is None and self.slm_hidden_size else slm_features,
                                      slm_hidden_size=self.slm_hidden_size)
        self.slm_features = list(groups)
        self.hidden_projection = _int_argument("hidden_projection", hidden_projection, 1, 1 << 12,
                                               "it is the width the SLM's hidden state is projected to (16 by default)")
        self.token_buckets = _int_argument("token_buckets", token_buckets, 2, 1 << 20,
                                           "it is the rows of the hashed token table (4096 by default)")
        self.gate_hidden = _int_argument("gate_hidden", gate_hidden, 0, 1 << 12,
                                         "it is the call gate's MLP width (0: no gate)")
        if isinstance(init_alpha, bool) or not isinstance(init_alpha, numbers.Real):
            raise TypeError(f"init_alpha must be a float, got {init_alpha!r} ({type(init_alpha).__name__})")
        if not 0.0 < init_alpha < 1.0:
            raise ValueError(f"init_alpha must lie in (0, 1), got {init_alpha}")
        self.init_alpha = float(init_alpha)
        top_k, hidden, slm_hidden_size = self.top_k, self.hidden, self.slm_hidden_size
        sizes = dict(slm_hidden_size=slm_hidden_size, projection=self.hidden_projection, token_buckets=self.token_buckets)
        width = reference.num_fusion_features(top_k) + SLMSideEncoder.output_width(groups, self.hidden_projection)
        n_parameters = SLMSideEncoder.n_parameters(groups, **sizes) + width * hidden + hidden * hidden + 3 * hidden + 1
        n_parameters += CallGate.n_parameters(groups, top_k=top_k, width=self.gate_hidden, **sizes) if self.gate_hidden else 0
        extra = f", slm_features={list(groups)}, gate_hidden={self.gate_hidden}" if groups or self.gate_hidden else ""
        self.check_size(n_parameters, allow_large, f"top_k={top_k}, hidden={hidden}, slm_hidden_size={slm_hidden_size}{extra}")
        self.slm_encoder = SLMSideEncoder(groups, **sizes) if groups else None
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, 1),
        )
        # start at alpha = init_alpha whatever the features
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.constant_(self.mlp[-1].bias, math.log(init_alpha / (1 - init_alpha)))
        self.gate = CallGate(groups, top_k=top_k, width=self.gate_hidden, **sizes) if self.gate_hidden else None

    @property
    def reads_slm_side(self) -> bool:
        """Whether α needs SLM-side inputs (``slm_hidden``, ``last_tokens``, ``positions``)."""
        return bool(self.slm_features)

    @property
    def needs_slm_hidden(self) -> bool:
        """Whether the head (or its gate) reads the SLM's last hidden state."""
        return "hidden" in self.slm_features

    def features(self, slm_logits: Tensor, llm: Tensor | TopK, vocab_map: VocabMap | None = None) -> Tensor:
        """``(batch_size, n_features)`` float32 inputs of the MLP (see the class docstring). On CUDA
        their statistics come from a kernel that never makes the pulled-back LLM tensor."""
        self._check_inputs(slm_logits, llm, vocab_map)
        stats = fusion_feature_stats(slm_logits, llm, vocab_map=vocab_map, tail=self.tail, k=self.top_k, validate=False)
        return reference.features_from_stats(stats, self.top_k)

    @property
    def stats_top_k(self) -> int:
        return self.top_k

    def alpha_from_stats(self, stats: FeatureStats, slm_hidden: Tensor | None = None, *, check_finite: bool = True,
                         **slm_side: Any) -> Tensor:
        """As the base class: :meth:`alpha_from_features` of ``stats``' features (``ValueError`` where α is
        not finite, unless not ``check_finite``)."""
        return self._checked_features_alpha(reference.features_from_stats(stats, self.top_k), slm_hidden,
                                            check_finite=check_finite, **slm_side)

    def features_from_aligned(self, aligned: Aligned) -> Tensor:
        """:meth:`features` from an aligned view (the reference path of :func:`logitfuse.fuse_with_head`)."""
        return reference.fusion_features(aligned.slm_logprobs, aligned.llm_logprobs, self.top_k)

    def feature_names(self) -> list[str]:
        """What each column of :meth:`features` is (the SLM-side groups come after them)."""
        names = []
        for model in ("slm", "llm"):
            names += [f"{model} entropy", f"{model} max log-probability"]
            names += [f"{model} top-{rank} log-probability" for rank in range(1, self.top_k + 1)]
        return names + ["argmax agreement", "log p_llm(slm argmax)", "log p_slm(llm argmax)"]

    def alpha_from_features(self, features: Tensor, slm_hidden: Tensor | None = None, *,
                            last_tokens: Any = None, positions: Any = None) -> Tensor:
        """α ``(batch_size,)`` from precomputed features (what training on cached features uses), and
        the SLM-side inputs the head reads: ``slm_hidden`` ``(batch_size, slm_hidden_size)``,
        ``last_tokens`` (the SLM token before each position, -1 at the first) and ``positions``
        ``(batch_size,)`` integers.

        Unlike :meth:`forward` and :meth:`alpha_from_aligned`, it does not check that α is finite
        (that costs a host sync per training step)."""
        x = features.float() / 10.0  # entropies and log-probs are O(10): bring them to O(1)
        if self.slm_encoder is not None:
            side = self.slm_encoder(x.shape[0], x.device, slm_hidden=slm_hidden, last_tokens=last_tokens,
                                    positions=positions)
            x = torch.cat([x, side], dim=-1)
        return torch.sigmoid(self.mlp(x)).squeeze(-1)

    def alpha_from_aligned(self, aligned: Aligned, slm_hidden: Tensor | None = None, *, last_tokens: Any = None,
                           positions: Any = None, check_finite: bool = True) -> Tensor:
        """As the base class; the SLM-side inputs are as for :meth:`forward`."""
        if self.reads_slm_side and slm_hidden is None and last_tokens is None and positions is None:
            raise ValueError(f"this head reads SLM-side features {self.slm_features}, which an aligned view lacks; pass "
                             "slm_hidden=..., last_tokens=..., positions=... (to fuse_with_head too)")
        return self._checked_features_alpha(self.features_from_aligned(aligned), slm_hidden, last_tokens=last_tokens,
                                            positions=positions, check_finite=check_finite)

    def forward(self, slm_logits: Tensor, llm: Tensor | TopK, vocab_map: VocabMap | None = None,
                slm_hidden: Tensor | None = None, *, last_tokens: Any = None, positions: Any = None,
                check_finite: bool = True) -> Tensor:
        """α ``(batch_size,)`` in ``(0, 1)`` for each row; ``ValueError`` where it would be NaN. The
        SLM-side inputs are as for :meth:`alpha_from_features` (needed only for the groups the head reads)."""
        return self._checked_features_alpha(self.features(slm_logits, llm, vocab_map), slm_hidden,
                                            last_tokens=last_tokens, positions=positions, check_finite=check_finite)

    def _checked_features_alpha(self, features: Tensor, slm_hidden: Tensor | None = None, *, check_finite: bool = True,
                                **slm_side: Any) -> Tensor:
        def non_finite_inputs(rows: Tensor) -> list[str]:
            bad = ~torch.isfinite(features[rows]).all(dim=0)
            names = [name for name, is_bad in zip(self.feature_names(), bad.tolist()) if is_bad]
            if slm_hidden is not None and not bool(torch.isfinite(slm_hidden[rows]).all()):
                names.append("slm_hidden")
            return names

        return self._checked_alpha(self.alpha_from_features(features, slm_hidden, **slm_side), non_finite_inputs,
                                   check_finite)

    # ---------------------------------------------------------------- the call gate
    def _require_gate(self) -> CallGate:
        if self.gate is None:
            raise ValueError("this head has no call gate (gate_hidden=0); train one with it (logitfuse train "
                             "--gate-hidden 32) or use another schedule (entropy_gate, periodic)")
        return self.gate

    def gain_from_slm_features(self, slm_features: Tensor, slm_hidden: Tensor | None = None, *,
                               last_tokens: Any = None, positions: Any = None) -> Tensor:
        """The gate's predicted gain ``(batch_size,)`` (nats) from the SLM's distribution features
        ``(batch_size, 2 + top_k)`` (the first ``2 + top_k`` columns of :meth:`features`, what a
        scoring cache holds) and the SLM-side inputs the head reads."""
        return self._require_gate()(slm_features, slm_hidden=slm_hidden, last_tokens=last_tokens, positions=positions)

    def call_gain(self, slm_logits: Tensor, slm_hidden: Tensor | None = None, *, last_tokens: Any = None,
                  positions: Any = None) -> Tensor:
        """What an LLM call is predicted to gain at this position, ``(batch_size,)`` nats of NLL, from
        the SLM's logits ``(batch_size, v_slm)`` and the SLM-side inputs alone (nothing from the LLM)."""
        gate = self._require_gate()
        return self.gain_from_slm_features(slm_distribution_features(slm_logits, gate.top_k), slm_hidden,
                                           last_tokens=last_tokens, positions=positions)


class PaperFusionHead(BaseFusionHead):
    """The CoGenesis paper's head: an MLP over the two full-vocabulary logit vectors
    (``2·v_slm -> 512 -> 16 -> 1``, sigmoid). About ``1024·v_slm`` parameters: 155M at a 152k
    vocabulary. Kept for faithful comparison with :class:`FusionHead`.

    The LLM vector is its logits pulled back onto the SLM vocabulary (tail rule for the rest).
    """

    _arch_keys = ("hidden",)

    MAX_PARAMETERS = 500_000_000  # 155M at a 152k vocabulary; 2 GB of float32 weights

    def __init__(self, v_slm: int, v_llm: int, *, mode: str = "logit", tail: str = "zero", hidden: int = 512,
                 slm_name: str | None = None, llm_name: str | None = None, vocab_map_hash: str | None = None,
                 llm_top_k: int | None = None, allow_large: bool = False):
        super().__init__(v_slm, v_llm, mode=mode, tail=tail, slm_name=slm_name, llm_name=llm_name,
                         vocab_map_hash=vocab_map_hash, llm_top_k=llm_top_k)
        self.hidden = hidden = _int_argument("hidden", hidden, 1, 1 << 16, "it is the first layer's width (512 in the paper)")
        self.check_size(2 * self.v_slm * hidden + 17 * hidden + 33, allow_large, f"v_slm={self.v_slm}, hidden={hidden}")
        self.mlp = nn.Sequential(nn.Linear(2 * self.v_slm, hidden), nn.ReLU(), nn.Linear(hidden, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, slm_logits: Tensor, llm: Tensor | TopK, vocab_map: VocabMap | None = None,
                slm_hidden: Tensor | None = None, *, check_finite: bool = True) -> Tensor:
        """α ``(batch_size,)`` in ``(0, 1)`` for each row; ``ValueError`` where it would be NaN."""
        return self.alpha_from_aligned(self.aligned(slm_logits, llm, vocab_map), check_finite=check_finite)

    def alpha_from_aligned(self, aligned: Aligned, *, check_finite: bool = True) -> Tensor:
        # raw logit scales: the SLM's logits as given, the LLM's pulled-back log-probabilities + its lse
        llm_raw = (aligned.llm_logprobs + aligned.llm_lse[:, None]).clamp(min=-1e4)  # -inf would poison the matmul
        slm_raw = aligned.slm_logits.float().clamp(min=-1e4)
        x = torch.cat([slm_raw, llm_raw], dim=-1)

        def non_finite_inputs(rows: Tensor) -> list[str]:
            sides = {"slm_logits": slm_raw, "llm (pulled back onto the SLM vocabulary)": llm_raw}
            return [name for name, values in sides.items() if not bool(torch.isfinite(values[rows]).all())]

        return self._checked_alpha(torch.sigmoid(self.mlp(x)).squeeze(-1), non_finite_inputs, check_finite)


_HEAD_CLASSES: dict[str, type[BaseFusionHead]] = {"FusionHead": FusionHead, "PaperFusionHead": PaperFusionHead}


def load_head(directory: str | os.PathLike, **expected: Any) -> FusionHead | PaperFusionHead:
    """Load whichever head class ``directory`` holds; see :meth:`FusionHead.from_pretrained`."""
    return BaseFusionHead.from_pretrained(directory, **expected)
