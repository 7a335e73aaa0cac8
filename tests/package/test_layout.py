"""The package's shape: Python works from the repository root, the layers import only those below them,
and nothing under the CLI loads it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_python_from_the_repository_root_imports_transformers_and_logitfuse():
    """The top-level ``kernels/`` folder must not shadow the ``kernels`` package transformers imports."""
    out = run_python("import logitfuse.testing as t; t.tiny_llama; import transformers, logitfuse, logitfuse.kernels\n"
                     "import importlib.util, os\n"
                     "spec = importlib.util.find_spec('kernels')\n"
                     "print('logitfuse.kernels at', os.path.dirname(logitfuse.kernels.__file__))")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == f"logitfuse.kernels at {REPO / 'kernels'}"


def test_import_kernels_from_the_repository_root_is_never_ours():
    """``import kernels`` there gives the PyPI distribution where it is installed, else ModuleNotFoundError."""
    out = run_python("import os\ntry:\n    import kernels\nexcept ModuleNotFoundError:\n    print('none')\n"
                     "else:\n    print(os.path.dirname(os.path.abspath(kernels.__file__)))")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() != str(REPO / "kernels")


def test_python_m_pytest_from_the_repository_root_collects():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/package"], capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]


def test_the_zoo_and_train_fuser_do_not_load_the_cli():
    out = run_python("import sys, logitfuse.zoo, logitfuse.train_fuser.train, logitfuse.train_fuser.finetune, "
                     "logitfuse.train_fuser.served, logitfuse.bench.speculate\n"
                     "print(sorted(m for m in sys.modules if m == 'logitfuse.cli' or m.startswith('logitfuse.cli.')))",
                     cwd=REPO / "tests")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"


def test_no_import_cycles():
    """The project's own cycle finder (function-level imports counted), where the checkout has it."""
    tool = REPO.parent / "shared" / "tools" / "import_cycles.py"
    if not tool.is_file():
        import pytest

        pytest.skip(f"{tool} is not in this checkout")
    out = subprocess.run([sys.executable, str(tool)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
