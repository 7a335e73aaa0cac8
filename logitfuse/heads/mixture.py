"""A mixture head: the N weights of a mixture of N next-token distributions, predicted per row.

The mixture rule fuses N distributions on one pivot vocabulary as ``log Σ_i w_i p_i``; a fixed
weight vector is one choice, a :class:`MixtureHead` another: per row it reads a few scalars of each
distribution (:func:`mixture_features`: entropy, max log-probability, top-k log-probabilities, and
how each input agrees with the first), runs a small MLP and returns the weights after a softmax over
the N inputs. It is trained on cached per-position terms (``log p_i(y)`` and the features) by
``logitfuse train --rule mixture --inputs ...`` (:mod:`logitfuse.train_fuser.rules_eval`), so training
never runs a model.

>>> import torch
>>> head = MixtureHead(("slm", "llm", "small"), top_k=2, hidden=8)
>>> logprobs = torch.log_softmax(torch.randn(3, 5, 11), dim=-1)   # (N, B, V)
>>> weights = head(logprobs)
>>> weights.shape, bool(torch.allclose(weights.sum(-1), torch.ones(5)))
(torch.Size([5, 3]), True)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from logitfuse import reference
from logitfuse.fileio import atomic_write_folder
from logitfuse.heads.files import CONFIG_NAME, FORMAT, SHA256_KEY, WEIGHTS_NAME, file_sha256, non_finite_tensors
from logitfuse.heads.files import read_head_files

__all__ = ["MixtureHead", "load_mixture_head", "mixture_features", "num_mixture_features"]

Tensor = torch.Tensor
#: log-probabilities in the features are floored here, so that a masked token gives a finite feature
FLOOR = -50.0


def num_mixture_features(n_inputs: int, top_k: int) -> int:
    """Width of :func:`mixture_features`: ``2 + top_k`` per input, then 3 per input after the first."""
    return n_inputs * (2 + top_k) + 3 * (n_inputs - 1)


def mixture_features(logprobs: Tensor, top_k: int) -> Tensor:
    """Per-row features of N distributions on one vocabulary, ``(B, num_mixture_features(N, top_k))`` float32.

    ``logprobs`` is ``(N, B, V)`` (normalized log-probabilities). Per input: entropy, max
    log-probability, top-``top_k`` log-probabilities (the two-input :class:`~logitfuse.heads.FusionHead`'s
    features, from the same :func:`logitfuse.reference.row_stats_reference`). Then, for each input
    ``i > 0`` against input 0: whether the argmaxes agree, ``log p_i(argmax_0)`` and ``log p_0(argmax_i)``.

    >>> lp = torch.log_softmax(torch.randn(3, 4, 9), dim=-1)
    >>> mixture_features(lp, 2).shape == (4, num_mixture_features(3, 2))
    True
    """
    if logprobs.dim() != 3:
        raise ValueError(f"logprobs must be (N, B, V); got shape {tuple(logprobs.shape)}")
    logprobs = logprobs.float()
    stats = [reference.row_stats_reference(lp, top_k) for lp in logprobs]
    parts = []
    for side in stats:
        top = side.topk_logprobs.clamp(min=FLOOR)
        if top.shape[-1] < top_k:  # a vocabulary smaller than top_k: pad with the floor
            top = nn.functional.pad(top, (0, top_k - top.shape[-1]), value=FLOOR)
        parts += [side.entropy[:, None], side.max_logprob.clamp(min=FLOOR)[:, None], top]
    first = stats[0].topk_ids[:, :1]
    for lp, side in zip(logprobs[1:], stats[1:]):
        parts += [(first == side.topk_ids[:, :1]).float(), lp.gather(1, first).clamp(min=FLOOR),
                  logprobs[0].gather(1, side.topk_ids[:, :1]).clamp(min=FLOOR)]
    return torch.cat(parts, dim=-1)


class MixtureHead(nn.Module):
    """Per-row weights of an N-input mixture, ``(B, N)``, softmax over the inputs.

    Args:
        input_names (`tuple[str, ...]`): the inputs' names, in the order of the ``logprobs`` rows
            (at least 2, distinct); a rule checks them against its own inputs.
        top_k (`int`, defaults to 4): top-k log-probabilities per input among the features.
        hidden (`int`, defaults to 32): width of the MLP's hidden layer.

    Call it on ``logprobs (N, B, V)`` (:meth:`forward`) or on cached features ``(B, F)``
    (:meth:`weights_from_features`, what training uses). Initialized to equal weights.
    """

    head_class = "MixtureHead"

    def __init__(self, input_names: tuple[str, ...] | list[str], top_k: int = 4, hidden: int = 32):
        super().__init__()
        names = tuple(input_names)
        if len(names) < 2 or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"input_names must be 2 or more distinct non-empty names; got {names!r}")
        for name, value, low in (("top_k", top_k, 1), ("hidden", hidden, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
        self.input_names, self.top_k, self.hidden = names, top_k, hidden
        n_features = num_mixture_features(len(names), top_k)
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        self.mlp = nn.Sequential(nn.Linear(n_features, hidden), nn.GELU(), nn.Linear(hidden, len(names)))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    @property
    def n_inputs(self) -> int:
        return len(self.input_names)

    @property
    def config(self) -> dict[str, Any]:
        return {"format": FORMAT, "head_class": self.head_class, "input_names": list(self.input_names),
                "top_k": self.top_k, "hidden": self.hidden}

    def set_feature_scale(self, features: Tensor) -> None:
        """Standardize the features by their mean and standard deviation over ``features`` (the training rows)."""
        with torch.no_grad():
            self.feature_mean.copy_(features.float().mean(dim=0))
            self.feature_std.copy_(features.float().std(dim=0).clamp(min=1e-3))

    def weights_from_features(self, features: Tensor) -> Tensor:
        """``(B, N)`` weights from :func:`mixture_features` rows ``(B, F)``."""
        return torch.softmax(self.logits_from_features(features), dim=-1)

    def logits_from_features(self, features: Tensor) -> Tensor:
        """``(B, N)`` log-weights before the softmax (training takes ``log_softmax`` of them)."""
        return self.mlp((features.float() - self.feature_mean) / self.feature_std)

    def forward(self, logprobs: Tensor) -> Tensor:
        """``(B, N)`` weights for ``logprobs`` ``(N, B, V)``, normalized log-probabilities in ``input_names`` order."""
        if logprobs.dim() != 3 or logprobs.shape[0] != self.n_inputs:
            raise ValueError(f"logprobs must be (N={self.n_inputs}, B, V) for inputs {self.input_names}; "
                             f"got shape {tuple(logprobs.shape)}")
        return self.weights_from_features(mixture_features(logprobs, self.top_k))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` and ``config.json`` (with the weights' sha256) into ``directory``, as one
        (:func:`logitfuse.fileio.atomic_write_folder`). Refuses weights holding NaN or inf."""
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        non_finite = non_finite_tensors(tensors)
        if non_finite:
            raise ValueError(f"cannot save this MixtureHead: its weights hold NaN or inf ({'; '.join(non_finite)}); "
                             "re-train it with a lower learning rate")
        config = self.config

        def write(folder: Path) -> None:
            save_file(tensors, folder / WEIGHTS_NAME)
            hashed = {**config, SHA256_KEY: file_sha256((folder / WEIGHTS_NAME).read_bytes())}
            (folder / CONFIG_NAME).write_text(json.dumps(hashed, indent=2, sort_keys=True) + "\n", encoding="utf-8")

        return atomic_write_folder(directory, write, (CONFIG_NAME, WEIGHTS_NAME))


def load_mixture_head(path: str | os.PathLike) -> MixtureHead:
    """Load a :class:`MixtureHead` saved by :meth:`MixtureHead.save_pretrained` (a folder).

    Raises ``ValueError`` naming the fix where ``path`` holds another kind of head or a damaged file,
    ``FileNotFoundError`` where it is not a head folder.
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a folder; pass the folder MixtureHead.save_pretrained wrote "
                                "(`logitfuse train --rule mixture` writes RUN/heads/mixture)")
    try:
        config, tensors = read_head_files(directory, {MixtureHead.head_class})
    except ValueError as err:
        raise ValueError(f"{directory} is not a mixture head ({err}); pass the folder `logitfuse train --rule "
                         "mixture` wrote (RUN/heads/mixture), or train one") from None
    try:
        head = MixtureHead(tuple(config["input_names"]), top_k=config["top_k"], hidden=config["hidden"])
        head.load_state_dict(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{directory / CONFIG_NAME} does not describe these weights ({err}); save the head again") from None
    return head.eval()
