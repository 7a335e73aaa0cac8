"""What users hand the command line: data files, context files, model names, Ctrl-C (issue 23)."""

from __future__ import annotations

import json
import shutil

import pytest

from logitfuse.cli import main
from logitfuse.prompts import bundled_split

pytestmark = pytest.mark.usefixtures("empty_home")


@pytest.fixture
def folders(tmp_path):
    """Folders that pass as model folders (a config.json; never loaded here) and a trained-heads folder."""
    for name in ("slm", "llm", "run/heads/dense"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "config.json").write_text("{}")
    return tmp_path


def _bad_data(tmp_path, broken: str, how: str):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("dev", "test"):
        shutil.copy(bundled_split(split), data / bundled_split(split).name)
    target = data / f"context_aware_{broken}.json"
    if how == "truncated":
        target.write_bytes(target.read_bytes()[:5000])
    else:  # a record without its conversations
        records = json.loads(target.read_text(encoding="utf-8"))
        del records[1]["conversations"]
        target.write_text(json.dumps(records), encoding="utf-8")
    return data


@pytest.mark.parametrize("how", ["truncated", "missing field"])
@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_broken_data_file_is_a_usage_error_before_loading(command, how, folders, tmp_path, no_loading, capsys,
                                                            assert_usage_error):
    data = _bad_data(tmp_path, "dev" if command == "train" else "test", how)
    target = ["--out", str(tmp_path / "out")] if command == "train" else ["--head", str(folders / "run")]
    code = main([command, "--slm", str(folders / "slm"), "--llm", str(folders / "llm"), "--data", str(data),
                 *target, "--max-examples", "2"])
    fragments = ["not usable CoGenesis data"] + (["not valid JSON"] if how == "truncated" else ["conversations"])
    assert_usage_error(code, capsys.readouterr().err, command, *fragments)
