"""Models named by their Hugging Face Hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``).

Found as transformers finds them: downloaded (or brought up to date) where the network allows, from
the local hub cache otherwise (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``),
and only from there with ``HF_HUB_OFFLINE=1``. The environment is read at each call (huggingface_hub
reads it once, at import). Heads record the id itself as the model's name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from logitfuse.zoo.registry import ZooError

__all__ = ["cache_dir", "check_hub_model", "hub_snapshot", "is_hub_id", "is_offline"]

_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
#: the files of a transformers model folder fetched for a hub id (not the repository's other formats)
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def is_hub_id(value: str) -> bool:
    """``ORG/NAME`` that is not a path on this machine (nor a GGUF file): a Hugging Face Hub model id."""
    text = os.fspath(value)
    return bool(_ID.fullmatch(text)) and not text.lower().endswith(".gguf") and not Path(text).expanduser().exists()


def is_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the network (as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def cache_dir() -> Path:
    """The local hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def _missing(repo_id: str, why: str) -> ZooError:
    where = "HF_HUB_OFFLINE is set" if is_offline() else why
    return ZooError(f"{repo_id!r} is not in the local Hugging Face cache ({cache_dir()}) and {where}; download it "
                    "where the network allows (unset HF_HUB_OFFLINE), or pass a model folder")


def _not_found(repo_id: str, err: Exception) -> ZooError:
    return ZooError(f"{repo_id!r} is no model on the Hugging Face Hub that this machine may read "
                    f"({type(err).__name__}); check the id (ORG/NAME), or log in for a gated or private one (hf auth login)")


def check_hub_model(repo_id: str) -> None:
    """Before anything loads: ``repo_id``'s config.json is in the local cache, or (online) on the Hub
    (fetching only that file); a ``ZooError`` saying which is not."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if not is_offline():
        try:
            hf_hub_download(repo_id, "config.json", cache_dir=cache_dir())
            return
        except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as err:
            raise _not_found(repo_id, err) from None
        except Exception:  # noqa: BLE001 - no network: the local cache, as transformers falls back
            pass
    if not isinstance(try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir()), str):
        raise _missing(repo_id, "the Hub could not be reached")


def hub_snapshot(repo_id: str) -> Path:
    """The local folder of ``repo_id``'s model files: downloaded or updated where the network allows,
    else the cached snapshot of its main branch (``ZooError`` where there is none)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if not is_offline():
        try:
            return Path(snapshot_download(repo_id, cache_dir=cache_dir(), allow_patterns=MODEL_FILES))
        except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as err:
            raise _not_found(repo_id, err) from None
        except Exception:  # noqa: BLE001 - no network: the local cache
            pass
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir(), allow_patterns=MODEL_FILES, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - huggingface_hub's "not cached" errors vary by version
        raise _missing(repo_id, f"the Hub could not be reached ({type(err).__name__})") from None
