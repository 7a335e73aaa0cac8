"""Crash-safe writes: write beside the target (a file, or a whole folder), then rename it into place.

Everything in the package that writes a file the user keeps (heads, vocabulary maps, zoo markers,
training records) goes through here, so that a crash leaves the old file or the new one, never half.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path


def ordinary_mode(base: int) -> int:
    """``base`` less the process umask: the mode a plain ``open`` (``0o666``) or ``mkdir`` (``0o777``)
    would have given; temporary files and folders are created private (``0o600``/``0o700``).

    >>> previous = os.umask(0o022)
    >>> oct(ordinary_mode(0o666)), oct(ordinary_mode(0o777))
    ('0o644', '0o755')
    >>> _ = os.umask(previous)
    """
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file in ``path``'s folder, then rename it to ``path``.

    A crash or an exception leaves either the old file or none, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, ordinary_mode(0o666))  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def _process_is_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this machine (``False`` where that cannot be told)."""
    if os.name != "posix":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists but belongs to someone else
        return False
    return False


def _leftovers(directory: Path, suffix: str) -> list[Path]:
    """Folders ``.<name>.<pid>-<random><suffix>`` beside ``directory`` that a save by a process no
    longer running left behind."""
    found = []
    for path in directory.parent.glob(f".{glob.escape(directory.name)}.*{suffix}"):
        pid = path.name[len(directory.name) + 2:].split("-", 1)[0]
        if pid.isdigit() and path.is_dir() and not path.is_symlink() and _process_is_gone(int(pid)):
            found.append(path)
    return found


def interrupted_folder_write(directory: str | os.PathLike) -> Path | None:
    """The previous contents of ``directory`` where a killed :func:`atomic_write_folder` left them
    beside it (it had moved them away and not yet moved the new folder in), else ``None``."""
    leftovers = _leftovers(Path(os.path.abspath(directory)), ".old")
    return max(leftovers, key=lambda path: path.stat().st_mtime) if leftovers else None


def atomic_write_folder(directory: str | os.PathLike, write: Callable[[Path], None], names: Sequence[str]) -> Path:
    """Write the files ``names`` of ``directory`` as one: ``write(tmp_dir)`` creates them in a temporary
    folder beside ``directory``, which then takes its place.

    Where ``directory`` holds nothing but ``names`` (or is new), the old folder is renamed away, the
    new one renamed in and the old one deleted, so a reader sees the old files or the new ones, never
    a mix; an exception puts the old folder back. A folder holding other files too (or the current
    folder, or a symlink) keeps them: the new files are then moved in one at a time, in the order of
    ``names`` (so the writer must be able to tell a mix, e.g. by a hash of one file kept in the
    other). Temporary folders of killed writes to ``directory`` (by processes no longer running) and
    hidden ``.<name>.*.tmp`` files of killed :func:`atomic_write` calls inside it are removed first.

    Raises
    ------
    NotADirectoryError
        ``directory`` is an existing file.
    """
    directory = Path(os.path.abspath(directory))
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file, not a folder; pass the path of a folder to write into")
    directory.mkdir(parents=True, exist_ok=True)
    for stale in _leftovers(directory, ".partial") + _leftovers(directory, ".old"):
        shutil.rmtree(stale, ignore_errors=True)
    for name in names:
        for stale in directory.glob(f".{glob.escape(name)}.*.tmp"):
            stale.unlink(missing_ok=True)
    prefix = f".{directory.name}.{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=directory.parent))
    try:
        write(tmp)
        written = sorted(path.name for path in tmp.iterdir())
        if written != sorted(names):
            raise RuntimeError(f"the writer created {written} in {tmp}, not the expected {sorted(names)}")
        os.chmod(tmp, ordinary_mode(0o777))  # mkdtemp makes 0700 (and some writers 0600): give the usual permissions
        for name in names:
            os.chmod(tmp / name, ordinary_mode(0o666))
        swappable = (not directory.is_symlink() and directory != Path.cwd()
                     and set(os.listdir(directory)) <= set(names))
        if not (swappable and _swap_in(tmp, directory, prefix)):
            for name in names:
                os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _swap_in(new: Path, directory: Path, prefix: str) -> bool:
    """Replace the folder ``directory`` by ``new``; ``False`` (nothing changed) where it cannot be
    renamed away (a mount point, say)."""
    old = directory.parent / f"{prefix}{secrets.token_hex(4)}.old"
    try:
        os.rename(directory, old)
    except OSError:
        return False
    try:
        os.rename(new, directory)
    except BaseException:
        os.rename(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return True
