"""Errors and argument checks shared by every command-line subcommand, kept below everything else.

:class:`UsageError` is what a subcommand (or anything it calls: the zoo, ``train_fuser``, the benchmarks)
raises for a mistake on the command line; :func:`logitfuse.cli.main` prints it as one line and returns
exit status 2. Importing this module loads nothing else of logitfuse, so the layers below the CLI can
raise it without loading the CLI.
"""

from __future__ import annotations

__all__ = ["UsageError", "check_device", "check_out_dir", "check_range"]


class UsageError(ValueError):
    """A mistake on the command line (a bad value, a missing file, an unknown model name).

    Raise it from a subcommand before loading anything: :func:`main` prints it as one line,
    ``logitfuse <command>: error: <message>``, and returns exit status 2 (no traceback). The message
    names the argument and the fix.
    """


# ------------------------------------------------------------------- argument checks, shared
# Subcommands call these before loading anything; each raises UsageError naming the flag and the fix.
def check_range(flag: str, value: float | None, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, meaning: str = "") -> None:
    """``value`` is finite and within ``[low, high]`` (``(low, high]`` with ``low_open``); ``None`` passes."""
    if value is None:
        return
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or value <= high
    if value != value or value in (float("inf"), float("-inf")) or not (above and below):
        if low is not None and high is not None:
            bounds = f"lie in {'(' if low_open else '['}{low:g}, {high:g}]"
        elif low is not None:
            bounds = f"be {'>' if low_open else '>='} {low:g}"
        else:
            bounds = f"be <= {high:g}"
        raise UsageError(f"{flag} {value:g} must {bounds}" + (f" ({meaning})" if meaning else ""))


def check_device(flag: str, value: str, *, allow_auto: bool = False) -> None:
    """``value`` names a torch device that exists here (``cpu``, ``cuda``, ``cuda:N``, ``mps`` ...)."""
    if allow_auto and value == "auto":
        return
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {value!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    if device.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    if backend is None or not hasattr(backend, "is_available"):
        raise UsageError(f"{flag} {value!r}: this torch has no {device.type} backend; use cpu or cuda[:N]")
    if not backend.is_available():
        raise UsageError(f"{flag} {value} but no {device.type} device is available here (no GPU, or a torch build "
                         f"without {device.type} support); use {flag} cpu")
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise UsageError(f"{flag} {value}: this machine has {count()} {device.type} device(s), numbered from 0")


def check_out_dir(flag: str, value: str, *, writable: bool = True) -> None:
    """``value`` is a folder, or can be made one (it is not a file, nor under one); with ``writable``,
    one this user may write in."""
    import os
    from pathlib import Path

    folder = Path(value).expanduser()
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise UsageError(f"{flag} {value!r}: {str(path)!r} is a file, not a folder; pick another folder")
            if writable and not os.access(path, os.W_OK | os.X_OK):
                raise UsageError(f"{flag} {value!r}: {str(path)!r} is not writable by you; pick another folder")
            return
