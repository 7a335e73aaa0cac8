"""`logitfuse finetune`: LoRA on a tiny in-process model (no downloads), its adapter, resume, the tuned zoo entry."""

from __future__ import annotations

import json

import pytest
import torch
from logitfuse.testing import CORPUS, byte_level_tokenizer, tiny_llama

pytest.importorskip("peft")

from logitfuse import zoo  # noqa: E402
from logitfuse.cli import main  # noqa: E402
from logitfuse.train_fuser.data import bundled_split, load_examples, render_prompt  # noqa: E402
from logitfuse.train_fuser.finetune import IGNORE, FinetuneConfig, encode_example, finetune  # noqa: E402

N_EXAMPLES = 8


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a transformers folder."""
    folder = tmp_path_factory.mktemp("tiny-base")
    tokenizer = byte_level_tokenizer()
    model = tiny_llama(len(tokenizer), seed=3)
    model.lm_head.weight.data.mul_(20)  # logits a hidden-state change can move (random init keeps them near 0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """No-profile records, as in the training split: tid and conversations only."""
    records = [{"tid": f"1_{i}_0", "conversations": [
        {"from": "user", "value": f"Write a note: about the park and dinner {i}"},
        {"from": "assistant", "value": " ".join(CORPUS[i % 6 : i % 6 + 2])}]} for i in range(N_EXAMPLES + 2)]
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def config(base_dir, data_file, out, **overrides) -> FinetuneConfig:
    settings = dict(slm=str(base_dir), out=out, data=data_file, max_examples=N_EXAMPLES, eval_examples=2, rank=4,
                    lr=3e-2, warmup_steps=0, epochs=2, eval_every=4, max_length=300, adapter_dtype="float32",
                    progress=False)
    settings.update(overrides)
    return FinetuneConfig(**settings)


@pytest.fixture(scope="module")
def trained(base_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return finetune(config(base_dir, data_file, out)), out


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_the_no_profile_training_split_is_bundled_and_loads_with_an_empty_context():
    examples = load_examples(bundled_split("train_wo_profile"))
    assert len(examples) == 1346
    assert all(e.profile == () and e.additional_profile == "" for e in examples)
    assert examples[0].public_instruction in examples[0].instruction


def test_the_loss_mask_covers_the_response_and_end_of_turn_only(data_file):
    tokenizer = byte_level_tokenizer()
    example = load_examples(data_file)[0]
    ids, labels = encode_example(tokenizer, example)
    prompt = render_prompt(tokenizer, example.private_messages())  # the run-time private prompt, exactly
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids == prompt + response
    assert labels == [IGNORE] * len(prompt) + response


def test_the_held_out_loss_falls_and_the_record_says_what_was_done(trained, data_file):
    result, out = trained
    history = [loss for _, loss in result.eval_history]
    assert result.steps == 2 * N_EXAMPLES and len(history) == 5  # step 0, then every 4 steps
    assert result.best_eval_loss < history[0] - 1.0
    assert result.train_loss[-1] < result.train_loss[0]
    record = json.loads((out / "logitfuse-finetune.json").read_text())
    assert record["best_eval_loss"] == result.best_eval_loss and record["steps"] == result.steps
    assert record["tokens"] == result.tokens > 0 and record["finished"]
    assert record["data_sha256"] == zoo.sha256_file(data_file)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_the_adapter_round_trips(trained, base_dir, data_file):
    result, out = trained
    model, tokenizer, name = zoo.load(base_dir, adapter=out)
    assert name == f"{base_dir.name}+{out.name}"
    base, _, _ = zoo.load(base_dir)
    ids, _ = encode_example(tokenizer, load_examples(data_file)[N_EXAMPLES])  # a held-out example
    tuned_logits = logits_of(model, ids)
    assert not torch.allclose(tuned_logits, logits_of(base, ids), atol=1e-3)
    # the saved best adapter scores the held-out examples as training measured them
    from logitfuse.train_fuser.finetune import held_out_loss

    held_out = [encode_example(tokenizer, e, max_length=300) for e in load_examples(data_file)[N_EXAMPLES:]]
    assert held_out_loss(model, held_out, "cpu") == pytest.approx(result.best_eval_loss, abs=1e-4)
    # merged into a transformers folder: the same logits
    merged = zoo.merge_adapter(base_dir, out, out.parent / "merged")
    from transformers import AutoModelForCausalLM

    torch.testing.assert_close(logits_of(AutoModelForCausalLM.from_pretrained(merged), ids), tuned_logits)


def test_resume_reaches_the_same_adapter_as_one_run(trained, base_dir, data_file, tmp_path):
    _, out = trained
    first = finetune(config(base_dir, data_file, tmp_path, max_steps=6))  # interrupted between evaluations
    assert first.steps == 6
    second = finetune(config(base_dir, data_file, tmp_path, resume=True))
    assert second.steps == 2 * N_EXAMPLES
    assert second.eval_history[: len(first.eval_history)] == first.eval_history
    from safetensors.torch import load_file

    one_run, resumed = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "adapter_model.safetensors")
    assert one_run.keys() == resumed.keys()
    for key in one_run:
        torch.testing.assert_close(resumed[key], one_run[key], rtol=0, atol=0)


def test_bf16_adapter_is_small_and_loads(base_dir, data_file, tmp_path):
    finetune(config(base_dir, data_file, tmp_path, epochs=1, adapter_dtype="bfloat16", max_steps=2))
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(tmp_path / "adapter_model.safetensors").values()} == {torch.bfloat16}
    model, _, _ = zoo.load(base_dir, adapter=tmp_path)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("flags,message", [
    (["--slm", "no-such-model"], "--slm 'no-such-model' is neither a zoo model"),
    (["--data", "/nonexistent/train.json"], "--data '/nonexistent/train.json' is not a file"),
    (["--rank", "0"], "--rank 0 must be an integer >= 1"),
    (["--lr", "0"], "--lr 0.0 must be a finite number > 0"),
    (["--lr=-1e-4"], "--lr -0.0001 must be a finite number > 0"),
    (["--max-examples", "9"], "has 10 examples: too few for max_examples=9 plus eval_examples=2"),
    (["--lora-alpha", "nan"], "--lora-alpha nan must be a finite number > 0"),
    (["--lora-alpha", "0"], "--lora-alpha 0.0 must be a finite number > 0"),
    (["--dropout", "nan"], "--dropout nan must lie in [0, 1)"),
])
def test_bad_arguments_are_one_line_errors_before_any_model_loads(flags, message, base_dir, data_file, tmp_path,
                                                                  capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(zoo, "load", no_loading)
    argv = ["finetune", "--slm", str(base_dir), "--out", str(tmp_path / "o"), "--data", str(data_file), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("logitfuse finetune: error: ") and message in err and "\n" not in err


def test_an_earlier_checkpoint_needs_resume(trained, base_dir, data_file, capsys):
    _, out = trained
    with pytest.raises(ValueError, match="holds a checkpoint of an earlier run; pass resume=True"):
        config(base_dir, data_file, out).validate()


def test_a_tuned_zoo_entry_merges_once_into_the_cache(trained, base_dir, data_file, tmp_path, monkeypatch):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(trained[1], adapter)
    base_spec = zoo.ModelSpec(name="tiny-base", model="tiny", role="test", packages=(), parts=(), n_parts=0,
                              gguf_name="tiny.gguf", sha256="0" * 64, size_mb=1, vocab_size=400)
    monkeypatch.setitem(zoo.REGISTRY, "tiny-base", base_spec)
    monkeypatch.setitem(zoo.TUNED, "tiny-tuned", zoo.TunedSpec("tiny-tuned", "tiny-base", str(adapter), "tiny+lora", "test"))
    installed_base = tmp_path / "models" / "tiny-base"
    shutil.copytree(base_dir, installed_base)
    (installed_base / zoo.MARKER).write_text(json.dumps({"format": "logitfuse.zoo/1", "sha256": "0" * 64}))

    assert not zoo.is_tuned_installed("tiny-tuned", tmp_path)
    with pytest.raises(zoo.NotInstalledError, match="logitfuse models install tiny-tuned"):
        zoo.resolve("tiny-tuned", home=tmp_path)
    folder = zoo.resolve("tiny-tuned", install=True, home=tmp_path, progress=False)
    assert folder == tmp_path / "models" / "tiny-tuned" and zoo.is_tuned_installed("tiny-tuned", tmp_path)
    marker = json.loads((folder / zoo.MARKER).read_text())
    assert marker["adapter_sha256"] == zoo.adapter_sha256(adapter)

    model, tokenizer, name = zoo.load("tiny-tuned", home=tmp_path, install=False)
    expected, _, _ = zoo.load(base_dir, adapter=adapter)
    ids, _ = encode_example(tokenizer, load_examples(data_file)[0])
    assert name == "tiny-tuned"
    torch.testing.assert_close(logits_of(model, ids), logits_of(expected, ids))

    stamp = (folder / "config.json").stat().st_mtime_ns
    assert zoo.install("tiny-tuned", home=tmp_path, progress=False) == folder  # merged once
    assert (folder / "config.json").stat().st_mtime_ns == stamp
    # a changed adapter is a different model: the merge is redone, never trusted
    (adapter / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text() + "\n")
    assert not zoo.is_tuned_installed("tiny-tuned", tmp_path)


@pytest.mark.parametrize("command", [
    ["eval", "--slm", "smollm2-135m", "--llm", "qwen2.5-coder-0.5b", "--head", "."],
    ["train", "--slm", "smollm2-135m", "--llm", "qwen2.5-coder-0.5b", "--out", "."],
    ["generate", "--slm", "smollm2-135m", "--llm", "qwen2.5-coder-0.5b", "--instruction", "Write a note: about Tom"],
])
def test_an_adapter_flag_without_an_adapter_is_a_one_line_error(command, tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(zoo, "load", no_loading)
    assert main([*command, "--adapter", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"error: --adapter '{tmp_path}'" in err and "has no adapter_config.json" in err and "\n" not in err


def test_tuned_names_are_zoo_names():
    assert "smollm2-135m-cogenesis" in zoo.known_names() and zoo.TUNED["smollm2-135m-cogenesis"].base in zoo.REGISTRY


# ------------------------------------------------------------------------------------ issue 23
def no_model_loads(monkeypatch):
    def tripwire(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(zoo, "load", tripwire)
    monkeypatch.setattr(zoo.loader, "merge_adapter", tripwire)


def test_merge_out_never_replaces_a_folder_that_is_not_a_merge_output(base_dir, data_file, tmp_path, capsys,
                                                                       monkeypatch):
    no_model_loads(monkeypatch)
    mine = tmp_path / "my-documents"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    out = tmp_path / "o"
    argv = ["finetune", "--slm", str(base_dir), "--out", str(out), "--data", str(data_file)]
    for merge_out, message in [(mine, "does not hold a merged model"), (out, "would replace the adapter"),
                               (tmp_path, "would replace the adapter")]:
        assert main([*argv, "--merge-out", str(merge_out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("logitfuse finetune: error: --merge-out ") and message in err and "\n" not in err
    assert (mine / "thesis.txt").read_text() == "years of work" and not out.exists()
    with pytest.raises(zoo.ZooError, match="does not hold a merged model"):
        zoo.loader.check_merge_target(mine)


def test_a_merge_output_is_marked_and_may_be_merged_into_again(trained, base_dir, tmp_path):
    _, adapter = trained
    merged = zoo.merge_adapter(base_dir, adapter, tmp_path / "merged")
    assert (merged / zoo.loader.MERGE_MARKER).is_file()
    zoo.loader.check_merge_target(merged)  # a previous merge output: may be replaced
    assert zoo.merge_adapter(base_dir, adapter, merged) == merged and (merged / "config.json").is_file()
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(zoo.ZooError, match="does not hold a merged model"):
        zoo.merge_adapter(base_dir, adapter, user)
    assert [p.name for p in user.iterdir()] == ["notes.txt"]
    zoo_base = tmp_path / "zoo-base"  # a zoo base model's folder is not a merge output either
    zoo_base.mkdir()
    (zoo_base / zoo.MARKER).write_text(json.dumps({"format": "logitfuse.zoo/1", "sha256": "0" * 64}))
    with pytest.raises(zoo.ZooError, match="does not hold a merged model"):
        zoo.loader.check_merge_target(zoo_base)


def test_a_damaged_checkpoint_is_a_one_line_error_before_loading(base_dir, data_file, tmp_path, capsys, monkeypatch):
    no_model_loads(monkeypatch)
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    argv = ["finetune", "--slm", str(base_dir), "--out", str(tmp_path), "--data", str(data_file), "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("logitfuse finetune: error: ") and "checkpoint" in err and "damaged" in err
    assert "\n" not in err and "Traceback" not in err


def test_a_diverging_run_stops_with_one_line_and_saves_no_adapter(base_dir, data_file, tmp_path, capsys):
    argv = ["finetune", "--slm", str(base_dir), "--out", str(tmp_path), "--data", str(data_file), "--lr", "1e38",
            "--max-examples", "8", "--eval-examples", "2", "--rank", "4", "--max-length", "300", "--max-steps", "4"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("logitfuse finetune: error: ") and "diverged" in err
    assert not (tmp_path / "adapter_model.safetensors").exists() and not (tmp_path / "adapter_config.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def damaged_copy(adapter, tmp_path, change):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file(change(tensors), folder / "adapter_model.safetensors")
    return folder


def with_nan(tensors):
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    return tensors


@pytest.mark.parametrize("change, message", [
    (with_nan, "NaN or infinite weights"),
    (lambda tensors: {f"other.{key}": value for key, value in tensors.items()}, "are unused"),  # matches nothing
    (lambda tensors: dict(sorted(tensors.items())[1:]), "expected ones are missing"),
    (lambda tensors: {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in tensors.items()}, "does not fit"),
])
def test_an_adapter_that_would_load_wrong_is_refused(trained, base_dir, tmp_path, change, message):
    folder = damaged_copy(trained[1], tmp_path, change)
    with pytest.raises(zoo.ZooError, match=message):
        zoo.load(base_dir, adapter=folder)
    with pytest.raises(zoo.ZooError, match=message):
        zoo.merge_adapter(base_dir, folder, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_an_adapter_of_another_zoo_model_is_refused(trained, base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = damaged_copy(trained[1], tmp_path, lambda tensors: tensors)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "smollm2-135m"}))
    with pytest.raises(zoo.ZooError, match="trained on smollm2-135m, not gemma3-270m"):
        zoo.apply_adapter(AutoModelForCausalLM.from_pretrained(base_dir), folder, base_name="gemma3-270m")
    zoo.apply_adapter(AutoModelForCausalLM.from_pretrained(base_dir), folder, base_name=base_dir.name)  # a folder: fine


@pytest.mark.parametrize("command", ["generate", "judge"])
def test_a_damaged_adapter_config_is_a_one_line_error(command, trained, base_dir, tmp_path, capsys, monkeypatch):
    no_model_loads(monkeypatch)
    folder = damaged_copy(trained[1], tmp_path, lambda tensors: tensors)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    argv = {"generate": ["generate", "--instruction", "Write a note: about Tom", "--alpha", "1"],
            "judge": ["judge", "--out", str(tmp_path / "out"), "--systems", "slm"]}[command]
    assert main([*argv, "--slm", str(base_dir), "--llm", str(base_dir), "--adapter", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"logitfuse {command}: error: --adapter ") and "is not valid JSON" in err
    assert "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["generate", "judge"])
def test_a_nan_adapter_stops_the_command_with_one_line(command, trained, base_dir, tmp_path, capsys):
    folder = damaged_copy(trained[1], tmp_path, with_nan)
    argv = {"generate": ["generate", "--instruction", "Write a note: about Tom", "--alpha", "1"],
            "judge": ["judge", "--out", str(tmp_path / "out"), "--systems", "slm", "--max-examples", "1"]}[command]
    assert main([*argv, "--slm", str(base_dir), "--llm", str(base_dir), "--adapter", str(folder)]) == 1  # run time
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"logitfuse {command}: error: ") and "NaN or infinite weights" in err[-1]
    assert not any("Traceback" in line for line in err)
