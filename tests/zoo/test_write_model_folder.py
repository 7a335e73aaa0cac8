"""write_model_folder replaces a model folder without a moment where neither the old nor the new one exists."""

import os

import pytest

from logitfuse.zoo import installer


def save_marker(text):
    def save(folder):
        (folder / "config.json").write_text(text)
    return save


def test_replaces_an_existing_folder_and_leaves_no_temporaries(tmp_path):
    out = tmp_path / "model"
    installer.write_model_folder(out, save_marker("old"))
    installer.write_model_folder(out, save_marker("new"))
    assert (out / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_final_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    out = tmp_path / "model"
    installer.write_model_folder(out, save_marker("old"))
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst) == str(out) and (installer.Path(src) / "config.json").read_text() == "new":
            raise OSError("disk full")  # the new folder cannot be renamed into place
        return real_replace(src, dst)

    monkeypatch.setattr(installer.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        installer.write_model_folder(out, save_marker("new"))
    monkeypatch.undo()
    assert (out / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
