"""Fixtures shared by the command-line tests: an empty zoo home, tripwires on every way to load a
model, and the check that a mistake is one line on stderr with exit status 2."""

from __future__ import annotations

import pytest

from logitfuse import zoo
from logitfuse.zoo import installer, loader


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    """``LOGITFUSE_HOME`` at an empty temporary folder (not created): no installed model is touched."""
    home = tmp_path / "zoo-home"
    monkeypatch.setenv("LOGITFUSE_HOME", str(home))
    return home


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load, install or network lookup fails the test: the mistake must be caught first."""
    import urllib.request

    import transformers

    def tripwire(*args, **kwargs):
        raise AssertionError(f"something was loaded before the arguments were checked: {args!r}")

    monkeypatch.setattr(zoo, "load", tripwire)  # the commands call zoo.load
    monkeypatch.setattr(installer, "pip_install", tripwire)  # where the install looks them up
    monkeypatch.setattr(installer, "convert_gguf", tripwire)
    monkeypatch.setattr(loader, "merge_adapter", tripwire)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", tripwire)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tripwire)
    monkeypatch.setattr(urllib.request, "urlopen", tripwire)


def _assert_usage_error(code: int, err: str, command: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"logitfuse {command}: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def assert_usage_error():
    """``assert_usage_error(code, stderr, command, *fragments)``: exit status 2 and one line,
    ``logitfuse <command>: error: ...``, holding every fragment."""
    return _assert_usage_error


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    """No test reaches the Hugging Face Hub: a hub id is looked up in the local cache only."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
