"""A fusion head's folder on disk: file names, the config's format and the checked read of both files
(:func:`logitfuse.heads.BaseFusionHead.from_pretrained` builds the head from what this returns)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from logitfuse.fileio import interrupted_folder_write

FORMAT = "logitfuse.head/1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
#: ``config.json`` key holding the sha256 (hex) of ``model.safetensors``; heads saved before it existed lack it
SHA256_KEY = "weights_sha256"
Tensor = torch.Tensor


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def non_finite_tensors(tensors: dict[str, Tensor]) -> list[str]:
    """``"name: n of size"`` for each tensor holding NaN or inf values."""
    counts = {name: int((~torch.isfinite(t)).sum()) for name, t in tensors.items() if t.is_floating_point()}
    return [f"{name}: {count} of {tensors[name].numel()}" for name, count in counts.items() if count]


def read_head_files(directory: Path, head_classes: Collection[str]) -> tuple[dict, dict[str, Tensor]]:
    """The config (checked for format and a class among ``head_classes``) and the tensors (checked
    against the config's sha256)."""
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
    if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("head_class") not in head_classes:
        raise ValueError(f"{config_path} is not a logitfuse head config (format {FORMAT}, a known head_class)")
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
    if recorded is not None and file_sha256(data) != recorded:
        raise ValueError(f"{weights_path}: head weights do not match the sha256 in config.json: the file is corrupted "
                         "or belongs to another head; re-save or re-train it")
    return config, tensors
