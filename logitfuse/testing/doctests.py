"""A pytest plugin that runs every docstring example of the installed package, under the names the
package installs them as.

The repository keeps ``kernels/``, ``train_fuser/`` and ``benchmarks/`` at its top but installs them
as ``logitfuse.kernels``, ``logitfuse.train_fuser`` and ``logitfuse.bench`` (setup.py's
``package_dir``). pytest's own ``--doctest-modules`` would import ``kernels/mix.py`` as a top-level
``kernels`` module (or put the repository root on ``sys.path``); this plugin maps each source file to
its installed module name instead and imports that. Enabled in pyproject.toml
(``-p logitfuse.testing.doctests``); the folders to collect are ``testpaths``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from _pytest.doctest import DoctestModule

# source folder (relative to the repository root) -> installed package name
PACKAGE_DIRS = {"logitfuse": "logitfuse", "kernels": "logitfuse.kernels", "train_fuser": "logitfuse.train_fuser",
                "benchmarks": "logitfuse.bench"}


def installed_name(path: Path, root: Path) -> str | None:
    """``kernels/mix.py`` -> ``logitfuse.kernels.mix`` (``None`` outside the package folders)."""
    try:
        parts = list(path.relative_to(root).with_suffix("").parts)
    except ValueError:
        return None
    if not parts or parts[0] not in PACKAGE_DIRS or parts[-1] == "__main__":
        return None
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE_DIRS[parts[0]], *parts[1:]])


class InstalledDoctestModule(DoctestModule):
    """A module's docstring examples, imported by its installed name."""

    module_name: str

    def _getobj(self):
        return importlib.import_module(self.module_name)


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if file_path.suffix != ".py":
        return None
    name = installed_name(file_path, Path(str(parent.config.rootpath)))
    if name is None:
        return None
    module = InstalledDoctestModule.from_parent(parent, path=file_path)
    module.module_name = name
    return module
