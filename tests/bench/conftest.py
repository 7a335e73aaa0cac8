"""The benchmarks' shared fixture: arguments are checked before anything loads."""

import pytest


@pytest.fixture
def nothing_loads(monkeypatch, tmp_path):
    """An empty model home, and any model load or server start fails the test; returns the tripwire, for
    a module that has more loaders to guard."""
    from logitfuse import zoo
    from logitfuse.serve import engines

    def tripwire(*args, **kwargs):
        raise AssertionError(f"something was loaded before the arguments were checked: {args!r}")

    monkeypatch.setenv("LOGITFUSE_HOME", str(tmp_path / "zoo-home"))
    monkeypatch.setattr(zoo, "load", tripwire)
    monkeypatch.setattr(engines.LlamaCppServer, "__init__", tripwire)
    return tripwire
