"""Fusion heads against bad files and bad arguments: damaged weights, NaN, broken configs, crashed saves."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import logitfuse
import logitfuse.fileio as file_io
from logitfuse import FusionHead, PaperFusionHead, VocabMap
from logitfuse.heads import SHA256_KEY

#: the heads shipped for SmolLM2-135M + Qwen2.5-Coder-0.5B until issue 16, kept as a format fixture
OLD_HEADS = Path(__file__).parents[1] / "data" / "heads-v1"


def _trained_like(head, seed=0):
    """``head`` with weights moved off their initial values, so that a wrong one gives another α."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return head


def _inputs(v=6, rows=3):
    gen = torch.Generator().manual_seed(5)
    return torch.randn(rows, v, generator=gen) * 2, torch.randn(rows, v, generator=gen) * 2


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is _DELETE:
            del config[key]
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


_DELETE = object()


def _hidden_entries(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- integrity of the weights


def test_save_records_the_sha256_of_the_weights_file(tmp_path):
    import hashlib

    _trained_like(FusionHead(6, 6)).save_pretrained(tmp_path / "head")
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config[SHA256_KEY] == hashlib.sha256((tmp_path / "head" / "model.safetensors").read_bytes()).hexdigest()


def test_every_bit_flip_in_the_tensor_data_is_refused(tmp_path):
    """Single bit flips spread over the tensor bytes: each one is caught by the hash (before: about half
    of them loaded and changed α)."""
    folder = tmp_path / "head"
    _trained_like(FusionHead(6, 6)).save_pretrained(folder)
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    data_start = 8 + int.from_bytes(original[:8], "little")
    positions = torch.linspace(data_start, len(original) - 1, 30).long().tolist()
    for position in positions:
        flipped = bytearray(original)
        flipped[position] ^= 1 << (position % 8)
        weights.write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match="head weights do not match the sha256 in config.json: the file is corrupted"):
            logitfuse.load_head(folder)
    weights.write_bytes(original)
    logitfuse.load_head(folder)


def test_weights_of_another_head_are_refused(tmp_path):
    _trained_like(FusionHead(6, 6), seed=1).save_pretrained(tmp_path / "a")
    _trained_like(FusionHead(6, 6), seed=2).save_pretrained(tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="belongs to another head; re-save or re-train it"):
        FusionHead.from_pretrained(tmp_path / "a")


@pytest.mark.parametrize("keep", [0, 7, 8, 100, -1])
def test_truncated_weights_are_refused(tmp_path, keep):
    FusionHead(6, 6).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: keep if keep >= 0 else len(data) + keep])
    with pytest.raises(ValueError, match="not a readable safetensors file|do not match the sha256"):
        FusionHead.from_pretrained(tmp_path)


@pytest.mark.parametrize("text", ["", '{"format": "logitfuse.head/1"', "\xff\xfe", "[1, 2]", "null"])
def test_damaged_config_is_refused(tmp_path, text):
    FusionHead(6, 6).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match="config.json"):
        FusionHead.from_pretrained(tmp_path)


def test_a_head_saved_before_the_hash_still_loads(tmp_path):
    head = _trained_like(FusionHead(6, 6))
    head.save_pretrained(tmp_path)
    _edit_config(tmp_path, **{SHA256_KEY: _DELETE})
    loaded = FusionHead.from_pretrained(tmp_path)
    slm, llm = _inputs()
    assert torch.equal(loaded(slm, llm), head(slm, llm))


def test_old_heads_load_with_their_alpha_unchanged():
    """Re-saving the first shipped heads with a hash kept their numbers: α on fixed features as before."""
    recorded = {"dense": [0.8504789471626282, 0.6888675689697266, 0.5526857376098633],
                "top20-slm": [0.8915595412254333, 0.7124826908111572, 0.5804563760757446]}
    features = torch.linspace(-8, 3, 3 * 15).reshape(3, 15)
    features[:, 12] = torch.tensor([0.0, 1.0, 0.0])  # the argmax-agreement column
    for variant, alpha in recorded.items():
        head = logitfuse.load_head(OLD_HEADS / variant)
        config = json.loads((OLD_HEADS / variant / "config.json").read_text())
        assert len(config[SHA256_KEY]) == 64
        with torch.no_grad():
            torch.testing.assert_close(head.alpha_from_features(features), torch.tensor(alpha), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- non-finite weights and α


def _with_nan_weight(head):
    with torch.no_grad():
        head.mlp[0].weight[0, 0] = float("nan")
    return head


@pytest.mark.parametrize("head_class", [FusionHead, PaperFusionHead])
def test_saving_nan_weights_is_refused_and_writes_nothing(tmp_path, head_class):
    with pytest.raises(ValueError, match=r"weights hold NaN or inf \(mlp.0.weight: 1 of"):
        _with_nan_weight(head_class(6, 6, hidden=8)).save_pretrained(tmp_path / "head")
    assert not (tmp_path / "head" / "config.json").exists() and _hidden_entries(tmp_path) == []


@pytest.mark.parametrize("hashed", [True, False])
def test_loading_nan_weights_is_refused(tmp_path, hashed):
    """A file holding NaN (written by another tool, with or without a matching hash) does not load."""
    import hashlib

    from safetensors.torch import save_file

    FusionHead(6, 6).save_pretrained(tmp_path)
    tensors = {k: v.clone() for k, v in _with_nan_weight(FusionHead(6, 6)).state_dict().items()}
    save_file(tensors, tmp_path / "model.safetensors")
    digest = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    _edit_config(tmp_path, **{SHA256_KEY: digest if hashed else _DELETE})
    with pytest.raises(ValueError, match=r"holds NaN or inf weights \(mlp.0.weight: 1 of 480\)"):
        logitfuse.load_head(tmp_path)


def test_nan_alpha_names_the_head_and_the_non_finite_features():
    head = FusionHead(6, 6)
    slm, llm = _inputs()
    slm[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"α is NaN: this FusionHead gave a non-finite α for rows \[1\]; "
                                         r"its inputs hold non-finite values \(slm max log-probability, slm top-1"):
        head(slm, llm)
    with pytest.raises(ValueError, match="α is NaN"):  # the processor's path: no argument checks
        logitfuse.fuse_with_head(slm, llm, head, validate=False)


@pytest.mark.parametrize("head_class", [FusionHead, PaperFusionHead])
def test_nan_weights_in_memory_give_an_error_not_a_nan_alpha(head_class):
    head = _with_nan_weight(head_class(6, 6, hidden=8))
    slm, llm = _inputs()
    with pytest.raises(ValueError, match=r"α is NaN.*the head holds non-finite weights \(mlp.0.weight: 1 of"):
        head(slm, llm)
    with pytest.raises(ValueError, match="α is NaN"):
        logitfuse.fuse_with_head(slm, llm, head, validate=False)


def test_paper_head_names_the_non_finite_side():
    slm, llm = _inputs()
    llm[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"rows \[0\]; its inputs hold non-finite values \(llm"):
        PaperFusionHead(6, 6, hidden=8)(slm, llm)
    slm[:, 0] = float("-inf")  # a masked SLM token is fine
    assert torch.isfinite(PaperFusionHead(6, 6, hidden=8)(slm, _inputs()[1])).all()


# ---------------------------------------------------------------- config validation at load


@pytest.mark.parametrize("key", ["v_slm", "v_llm", "mode", "tail", "slm_name", "llm_name", "vocab_map_hash",
                                 "top_k", "hidden", "slm_hidden_size", "init_alpha"])
def test_a_config_missing_a_key_names_it(tmp_path, key):
    FusionHead(6, 6).save_pretrained(tmp_path)
    _edit_config(tmp_path, **{key: _DELETE})
    with pytest.raises(ValueError, match=rf"config.json lacks '{key}'.*save the head again"):
        logitfuse.load_head(tmp_path)


@pytest.mark.parametrize(("key", "value", "error", "message"), [
    ("top_k", 1e9, TypeError, r"top_k must be an int, got 1000000000.0 \(float\)"),
    ("top_k", 10**9, ValueError, r"top_k=1000000000 is out of range: it must lie in \[1, 6\]"),
    ("top_k", 0, ValueError, "top_k=0 is out of range"),
    ("v_slm", 6.0, TypeError, r"v_slm must be an int, got 6.0 \(float\)"),
    ("v_llm", 6.9, TypeError, "v_llm must be an int, got 6.9"),
    ("v_llm", 10**12, ValueError, "v_llm=1000000000000 is out of range"),
    ("hidden", True, TypeError, r"hidden must be an int, got True \(bool\)"),
    ("hidden", "32", TypeError, "hidden must be an int, got '32'"),
    ("hidden", 10**9, ValueError, "hidden=1000000000 is out of range"),
    ("hidden", 40000, ValueError, "does not fit its config.json"),  # huge, and not what the file holds: nothing allocated
    ("slm_hidden_size", -1, ValueError, "slm_hidden_size=-1 is out of range"),
    ("init_alpha", "0.5", TypeError, "init_alpha must be a float"),
    ("init_alpha", 1.5, ValueError, r"init_alpha must lie in \(0, 1\)"),
    ("mode", 3, ValueError, "mode=3 is not one of"),
    ("tail", None, ValueError, "tail=None is not one of"),
    ("slm_name", 5, TypeError, "slm_name must be a string or None"),
    ("vocab_map_hash", ["x"], TypeError, "vocab_map_hash must be a string or None"),
    ("llm_top_k", 0, ValueError, "llm_top_k=0 is out of range"),
    ("llm_top_k", 7, ValueError, r"llm_top_k=7 is out of range: it must lie in \[1, 6\]"),
    ("llm_top_k", 2.0, TypeError, "llm_top_k must be an int"),
    (SHA256_KEY, "abc", ValueError, "weights_sha256='abc' is not a sha256"),
    (SHA256_KEY, 5, ValueError, "weights_sha256=5 is not a sha256"),
])
def test_a_config_with_a_bad_value_names_the_key_and_the_file(tmp_path, key, value, error, message):
    FusionHead(6, 6).save_pretrained(tmp_path)
    _edit_config(tmp_path, **{key: value})
    with pytest.raises(error, match=message) as caught:
        logitfuse.load_head(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_a_paper_head_config_with_a_huge_hidden_size_allocates_nothing(tmp_path):
    PaperFusionHead(6, 6, hidden=8).save_pretrained(tmp_path)
    _edit_config(tmp_path, hidden=60000, v_slm=10**6, v_llm=10**6)  # 120 billion parameters if built
    with pytest.raises(ValueError, match="does not fit its config.json"):
        logitfuse.load_head(tmp_path)


# ---------------------------------------------------------------- constructor arguments


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    (dict(v_slm=6.0), TypeError, "v_slm must be an int, got 6.0"),
    (dict(v_slm=0), ValueError, r"v_slm=0 is out of range: it must lie in \[1, 16777216\]"),
    (dict(v_llm=False), TypeError, "v_llm must be an int, got False"),
    (dict(top_k=7), ValueError, r"top_k=7 is out of range: it must lie in \[1, 6\]"),
    (dict(top_k=2.5), TypeError, "top_k must be an int, got 2.5"),
    (dict(hidden=None), TypeError, "hidden must be an int, got None"),
    (dict(slm_hidden_size=3.0), TypeError, "slm_hidden_size must be an int"),
    (dict(init_alpha=True), TypeError, "init_alpha must be a float, got True"),
    (dict(init_alpha=float("nan")), ValueError, r"init_alpha must lie in \(0, 1\)"),
    (dict(llm_top_k=-3), ValueError, "llm_top_k=-3 is out of range"),
    (dict(llm_name=b"x"), TypeError, "llm_name must be a string or None"),
    (dict(hidden=2000), ValueError, r"FusionHead\(top_k=4, hidden=2000, slm_hidden_size=0\) would have 4,036,001 "
                                    "parameters, more than the 1,000,000.*pass allow_large=True"),
    (dict(slm_hidden_size=100_000), ValueError, "would have 1,"),
])
def test_fusion_head_arguments_are_checked_up_front(kwargs, error, message):
    arguments = dict(v_slm=6, v_llm=6) | kwargs
    with pytest.raises(error, match=message):
        FusionHead(**arguments)


def test_the_size_check_counts_parameters_exactly():
    for kwargs in (dict(), dict(slm_hidden_size=8), dict(top_k=5, hidden=40, slm_hidden_size=3)):
        head = FusionHead(6, 9, **kwargs)
        limit = sum(p.numel() for p in head.parameters())
        head.MAX_PARAMETERS = limit
        head.check_size(limit, False, "")
        with pytest.raises(ValueError, match="would have"):
            head.check_size(limit + 1, False, "")
    paper = PaperFusionHead(6, 9, hidden=10)
    assert sum(p.numel() for p in paper.parameters()) == 2 * 6 * 10 + 17 * 10 + 33


def test_a_large_head_needs_allow_large():
    assert sum(p.numel() for p in FusionHead(6, 6, hidden=1100, allow_large=True).parameters()) > 1_000_000
    with pytest.raises(ValueError, match=r"PaperFusionHead\(v_slm=300000, hidden=1024\) would have 614,"):
        PaperFusionHead(300_000, 300_000, hidden=1024)
    with pytest.raises(TypeError, match="hidden must be an int, got 2.5"):
        PaperFusionHead(6, 6, hidden=2.5)


def test_a_large_head_saved_with_allow_large_loads(tmp_path):
    head = _trained_like(FusionHead(6, 6, hidden=1100, allow_large=True))
    head.save_pretrained(tmp_path)
    slm, llm = _inputs()
    assert torch.equal(FusionHead.from_pretrained(tmp_path)(slm, llm), head(slm, llm))


# ---------------------------------------------------------------- folder-atomic saves


def _save_two_heads(folder):
    """``folder`` holding head 1; returns both heads (head 2 not saved yet)."""
    first, second = _trained_like(FusionHead(6, 6), seed=1), _trained_like(FusionHead(6, 6), seed=2)
    first.save_pretrained(folder)
    return first, second


def _assert_holds(folder, head):
    slm, llm = _inputs()
    assert torch.equal(logitfuse.load_head(folder)(slm, llm), head(slm, llm))


def test_a_crash_between_the_renames_keeps_the_old_head(tmp_path, monkeypatch):
    first, second = _save_two_heads(tmp_path / "head")
    real_rename, calls = os.rename, []

    def crashing_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old folder moved away; the new one not yet in
            raise OSError("simulated crash")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crashing_rename)
    with pytest.raises(OSError, match="simulated crash"):
        second.save_pretrained(tmp_path / "head")
    monkeypatch.undo()
    _assert_holds(tmp_path / "head", first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == ["config.json", "model.safetensors"]
    second.save_pretrained(tmp_path / "head")
    _assert_holds(tmp_path / "head", second)


def test_a_crash_while_writing_keeps_the_old_head(tmp_path, monkeypatch):
    import logitfuse.heads as heads

    first, second = _save_two_heads(tmp_path / "head")

    def broken_save(tensors, path, metadata=None):
        Path(path).write_bytes(b"x" * 5000)
        raise OSError("disk full")

    monkeypatch.setattr(heads, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        second.save_pretrained(tmp_path / "head")
    _assert_holds(tmp_path / "head", first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]


def test_a_folder_holding_other_files_keeps_them_and_a_torn_save_is_refused(tmp_path, monkeypatch):
    """Where the folder is not the head's alone, the files go in one at a time (config first): a crash
    in between leaves a config whose hash refuses the old weights, never a silently wrong pair."""
    _, second = _save_two_heads(tmp_path / "head")
    (tmp_path / "head" / "notes.txt").write_text("mine")
    third = _trained_like(FusionHead(6, 6), seed=3)
    third.save_pretrained(tmp_path / "head")
    _assert_holds(tmp_path / "head", third)
    assert (tmp_path / "head" / "notes.txt").read_text() == "mine"

    real_replace = os.replace

    def crashing_replace(src, dst):
        if str(dst).endswith("model.safetensors"):
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        second.save_pretrained(tmp_path / "head")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="do not match the sha256 in config.json"):
        logitfuse.load_head(tmp_path / "head")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]
    assert _hidden_entries(tmp_path / "head") == []


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    folder = tmp_path / "head"
    _, second = _save_two_heads(folder)
    pid = _dead_pid()
    partial = tmp_path / f".head.{pid}-abc.partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"x" * 10_000)
    (tmp_path / f".head.{pid}-def.old").mkdir()
    (folder / ".model.safetensors.k2j3.tmp").write_bytes(b"x" * 10_000)  # what the old per-file save left
    running = tmp_path / f".head.{os.getpid()}-ghi.partial"  # a save still running: not touched
    running.mkdir()
    other = tmp_path / f".head2.{pid}-jkl.partial"  # another folder's: not touched
    other.mkdir()
    second.save_pretrained(folder)
    _assert_holds(folder, second)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["head", running.name, other.name])
    assert _hidden_entries(folder) == []


def test_saving_onto_a_file_is_refused(tmp_path):
    (tmp_path / "head").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        FusionHead(6, 6).save_pretrained(tmp_path / "head")


_KILLED_SAVE = textwrap.dedent("""
    import os, sys, torch
    import logitfuse.heads as heads
    from logitfuse import FusionHead

    point = sys.argv[2]
    real_rename = os.rename
    def killed_rename(src, dst):
        if str(dst).endswith(".old"):
            real_rename(src, dst)
            if point == "between-renames":
                os._exit(9)
        else:
            real_rename(src, dst)
    def killed_save(tensors, path, metadata=None):
        open(path, "wb").write(b"x" * 50_000)
        os._exit(9)
    os.rename = killed_rename
    if point == "while-writing":
        heads.save_file = killed_save
    FusionHead(6, 6, hidden=16).save_pretrained(sys.argv[1])
""")


@pytest.mark.parametrize("point", ["while-writing", "between-renames"])
def test_a_killed_save_never_leaves_a_mixed_folder(tmp_path, point):
    """A process killed mid-save: the folder holds the old head, or is absent and loading says where
    the old one is; no temporary file inside it; the next save cleans up."""
    folder = tmp_path / "head"
    first, second = _save_two_heads(folder)
    result = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(folder), point], capture_output=True)
    assert result.returncode == 9, result.stderr.decode()
    if point == "while-writing":
        _assert_holds(folder, first)
        assert _hidden_entries(folder) == []
    else:
        with pytest.raises(FileNotFoundError, match=r"an interrupted save_pretrained left the previous head in .*\.old"):
            logitfuse.load_head(folder)
        leftover = file_io.interrupted_folder_write(folder)
        _assert_holds(leftover, first)
    second.save_pretrained(folder)
    _assert_holds(folder, second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]
    assert _hidden_entries(folder) == []


def test_a_head_saved_under_a_vocab_map_still_checks_compatibility(tmp_path):
    vmap = VocabMap.identity(6, 8)
    FusionHead(6, 8, vocab_map_hash=vmap.hash).save_pretrained(tmp_path)
    logitfuse.load_head(tmp_path, vocab_map=vmap)
    with pytest.raises(ValueError, match="v_llm: head has 8, setting has 9"):
        logitfuse.load_head(tmp_path, vocab_map=VocabMap.identity(6, 9))
