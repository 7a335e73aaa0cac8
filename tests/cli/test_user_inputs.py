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


# ------------------------------------------------------------------------------------ Ctrl-C
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A byte-level SLM and a sentencepiece LLM (two tokenizers), as transformers folders."""
    from logitfuse.testing import byte_level_tokenizer, sentencepiece_tokenizer, tiny_llama

    root = tmp_path_factory.mktemp("models")
    for name, tok, seed in (("slm", byte_level_tokenizer(), 0), ("llm", sentencepiece_tokenizer(), 1),
                            ("llm-same", byte_level_tokenizer(), 1)):  # llm-same: the SLM's tokenizer
        tiny_llama(len(tok), seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


# The real command line in a subprocess that sends itself SIGINT (what Ctrl-C sends) from inside the
# SLM's 8th forward: mid-generation, wherever the machine is slow or fast.
_SIGINT_AT_STEP = """
import os, signal, sys
import transformers
forward, calls = transformers.LlamaForCausalLM.forward, []
def counting(self, *args, **kwargs):
    if self.config.vocab_size == int(os.environ["SLM_VOCAB"]):
        calls.append(1)
        if len(calls) == 8:
            os.kill(os.getpid(), signal.SIGINT)
    return forward(self, *args, **kwargs)
transformers.LlamaForCausalLM.forward = counting
from logitfuse.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _interrupted(model_dirs, *argv):
    import os
    import subprocess
    import sys

    from logitfuse.testing import byte_level_tokenizer

    env = dict(os.environ, SLM_VOCAB=str(len(byte_level_tokenizer())), NO_COLOR="1")
    return subprocess.run([sys.executable, "-c", _SIGINT_AT_STEP, *argv], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize("alpha", ["1", "0.5"])
def test_ctrl_c_in_generate_keeps_the_text_so_far(model_dirs, alpha):
    done = _interrupted(model_dirs, "generate", "--slm", str(model_dirs / "slm"), "--llm", str(model_dirs / "llm"),
                        "--instruction", "Write a note: to Ann", "--alpha", alpha, "--max-new-tokens", "200")
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr
    assert done.stdout.rstrip("\n"), "the text generated before Ctrl-C is printed"
    summary = done.stderr.strip().splitlines()[-1]
    assert summary.startswith("[") and "interrupted (Ctrl-C)" in summary, done.stderr
    assert int(summary[1:].split()[0]) > 0, summary  # tokens/steps generated before Ctrl-C


def test_ctrl_c_in_demo_keeps_the_text_so_far(model_dirs):
    done = _interrupted(model_dirs, "demo", "--slm", str(model_dirs / "slm"), "--llm", str(model_dirs / "llm"),
                        "--head", "none", "--max-new-tokens", "200")
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr
    assert "SLM alone, with the private context" in done.stdout and "interrupted by Ctrl-C" in done.stdout, done.stdout
    assert "interrupted (Ctrl-C)" in done.stdout.strip().splitlines()[-1], done.stdout


def test_ctrl_c_hands_logitfuse_generate_s_tokens_so_far_with_the_interrupt():
    """The engine's hook: the KeyboardInterrupt carries the partial FusedGeneration."""
    import logitfuse
    from logitfuse.testing import byte_level_tokenizer, tiny_llama

    tok = byte_level_tokenizer()
    slm, calls = tiny_llama(len(tok), seed=0), []

    def interrupt_at_the_6th_forward(module, inputs, output):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt

    slm.register_forward_hook(interrupt_at_the_6th_forward)
    ids = tok(["Martin sells houses."])["input_ids"]
    with pytest.raises(KeyboardInterrupt) as caught:
        logitfuse.generate(slm, None, ids, alpha=1.0, max_new_tokens=50, eos_token_id=[10**6])
    partial = caught.value.partial
    assert isinstance(partial, logitfuse.FusedGeneration)
    assert len(partial.sequences[0]) == 5 and partial.stopped == [None]



def test_a_served_llm_that_stops_mid_generation_is_one_line_with_the_text_so_far(model_dirs, capsys):
    """--on-failure raise: the server answers its first requests, then is gone (`logitfuse serve` with
    max_requests shuts itself down): the text so far on stdout, one error line, exit status 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitfuse.serve.server import serve_in_thread

    folder = model_dirs / "llm-same"
    server, url = serve_in_thread(AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder),
                                  model_name="tiny", max_requests=8)  # the server check's probes, then a few steps
    try:
        code = main(["generate", "--slm", str(model_dirs / "slm"), "--llm", url, "--llm-tokenizer", str(folder),
                     "--served-model", "tiny", "--instruction", "Write a note: to Ann", "--alpha", "0.5",
                     "--max-new-tokens", "60", "--on-failure", "raise", "--color", "never"])
    finally:
        server.server_close()
    out, err = capsys.readouterr()
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("logitfuse generate: error: ") and url in last and "Traceback" not in err, err
    assert out.strip(), "the text fused before the server went away is printed"


def test_a_raising_backend_hands_logitfuse_generate_s_tokens_so_far_with_its_error():
    """The engine's hook: an LLMBackendError (on_failure="raise") carries the partial FusedGeneration."""
    import logitfuse
    from logitfuse.backends import LLMBackendError
    from logitfuse.testing import byte_level_tokenizer, tiny_llama

    tok = byte_level_tokenizer()

    class FailsAtTheFifthCall(logitfuse.HFLLM):
        calls = 0

        def advance(self, new_tokens, need=None):
            type(self).calls += 1
            if type(self).calls == 5:
                raise LLMBackendError("http://127.0.0.1:9/v1/completions: connection failed")
            return super().advance(new_tokens, need)

    llm = FailsAtTheFifthCall(tiny_llama(len(tok), seed=1), tok)
    ids = tok(["Martin sells houses."])["input_ids"]
    with pytest.raises(LLMBackendError) as caught:
        logitfuse.generate(tiny_llama(len(tok), seed=0), llm, ids, "Write:", alpha=0.5, max_new_tokens=50,
                           eos_token_id=[10**6], overlap=False)
    partial = caught.value.partial
    assert isinstance(partial, logitfuse.FusedGeneration) and len(partial.sequences[0]) == 4

# ------------------------------------------------------------------------------------ --context
@pytest.mark.parametrize("content", ["", " \n\n"])
def test_an_empty_context_file_is_a_one_line_warning(content, folders, tmp_path, monkeypatch, capsys):
    from logitfuse.cli import generate

    monkeypatch.setattr(generate, "run", lambda args: 0)  # the warning comes from the checks, before loading
    (tmp_path / "context.txt").write_text(content)
    code = main(["generate", "--slm", str(folders / "slm"), "--llm", str(folders / "llm"), "--alpha", "0.5",
                 "--context", str(tmp_path / "context.txt"), "--instruction", "Write a note: to Ann"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0 and len(err) == 1, err
    assert err[0].startswith("logitfuse generate: warning: --context") and "is empty" in err[0], err


def test_a_context_file_with_text_gets_no_warning(folders, tmp_path, monkeypatch, capsys):
    from logitfuse.cli import generate

    monkeypatch.setattr(generate, "run", lambda args: 0)
    (tmp_path / "context.txt").write_text("Ann likes sailing.")
    main(["generate", "--slm", str(folders / "slm"), "--llm", str(folders / "llm"), "--alpha", "0.5",
          "--context", str(tmp_path / "context.txt"), "--instruction", "Write a note: to Ann"])
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------ generate --speculate
def test_generate_speculates_with_the_tokens_of_per_step_fusion(model_dirs, capsys):
    def run(*extra):
        code = main(["generate", "--slm", str(model_dirs / "slm"), "--llm", str(model_dirs / "llm-same"), "--alpha",
                     "0.5", "--instruction", "Write a note: to Ann", "--max-new-tokens", "12", "--color", "never",
                     *extra])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out, err.strip().splitlines()[-1]

    per_step, summary = run()
    drafted, speculated = run("--speculate", "3")
    assert drafted == per_step  # greedy: speculation is exact
    assert "speculate 3" in speculated and "draft tokens sent" in speculated, speculated
    assert "speculate" not in summary


def test_generate_says_why_it_does_not_speculate(model_dirs, capsys):
    code = main(["generate", "--slm", str(model_dirs / "slm"), "--llm", str(model_dirs / "llm"), "--alpha", "0.5",
                 "--instruction", "Write a note: to Ann", "--max-new-tokens", "3", "--speculate", "2"])
    err = capsys.readouterr().err
    assert code == 0 and "speculation off: the two tokenizers differ" in err, err


def test_generate_speculate_must_not_be_negative(folders, no_loading, capsys, assert_usage_error):
    code = main(["generate", "--slm", str(folders / "slm"), "--llm", str(folders / "llm"), "--instruction", "a: b",
                 "--speculate", "-1"])
    assert_usage_error(code, capsys.readouterr().err, "generate", "--speculate -1 must be >= 0")


# ------------------------------------------------------------------------------------ models list
def test_models_list_shows_the_tuned_entries_and_their_base(capsys):
    from logitfuse import zoo

    assert main(["models", "list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert zoo.TUNED, "the zoo ships a tuned entry"
    for name, spec in zoo.TUNED.items():
        assert name in rows, rows
        assert f"tuned from {spec.base}" in rows[name] and " no " in rows[name], rows[name]  # empty home: not installed
    for spec in zoo.list_models():
        assert spec.name in rows


# ------------------------------------------------------------------------------------ LOGITFUSE_HOME a file
HOME_CASES = [
    (["generate", "--slm", "smollm2-135m", "--llm", "qwen2.5-coder-0.5b", "--instruction", "a: b"], "generate"),
    (["demo"], "demo"),
    (["train", "--slm", "smollm2-135m", "--llm", "qwen2.5-coder-0.5b", "--out", "{tmp}/run"], "train"),
    (["models", "list"], "models"),
    (["models", "install", "smollm2-135m"], "models"),
]


@pytest.mark.parametrize("case", HOME_CASES, ids=lambda case: " ".join(case[0][:2]))
def test_logitfuse_home_at_a_file_says_what_to_do_for_the_command(case, tmp_path, monkeypatch, no_loading, capsys,
                                                                  assert_usage_error):
    argv, command = case
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("LOGITFUSE_HOME", str(tmp_path / "a-file"))
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert_usage_error(code, err, command, "LOGITFUSE_HOME", "is a file", "point LOGITFUSE_HOME at a folder")
    assert ("--home DIR" in err) == (command == "models"), err  # only `logitfuse models` has --home


# ------------------------------------------------------------------------------------ --head RUN or RUN/heads/dense
def _trained_run(tmp_path, slm_dir, llm_dir):
    """A `logitfuse train` --out folder for the tiny pair: RUN/heads/{dense,top20-slm}."""
    from transformers import AutoTokenizer

    from logitfuse import FusionHead
    from logitfuse.cli.common import vocab_map_for
    from logitfuse.testing import tiny_llama

    slm_tok, llm_tok = AutoTokenizer.from_pretrained(slm_dir), AutoTokenizer.from_pretrained(llm_dir)
    vmap = vocab_map_for(tiny_llama(len(slm_tok)), slm_tok, len(llm_tok), llm_tok)
    for variant, top_k in (("dense", None), ("top20-slm", 20)):
        FusionHead(vmap.v_slm, vmap.v_llm, slm_name="slm", llm_name="llm", vocab_map_hash=vmap.hash,
                   llm_top_k=top_k).save_pretrained(tmp_path / "run" / "heads" / variant)
    return tmp_path / "run"


@pytest.mark.parametrize("given", ["run", "run/heads", "run/heads/dense"])
def test_generate_takes_a_train_run_or_its_head_folder(given, model_dirs, tmp_path, capsys):
    run = _trained_run(tmp_path, model_dirs / "slm", model_dirs / "llm")
    code = main(["generate", "--slm", str(model_dirs / "slm"), "--llm", str(model_dirs / "llm"), "--head",
                 str(tmp_path / given), "--instruction", "Write a note: to Ann", "--max-new-tokens", "3"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "trained head heads/dense" in err.strip().splitlines()[-1], err
    assert run.is_dir()


@pytest.mark.parametrize("given", ["run", "run/heads", "run/heads/dense"])
def test_eval_takes_a_train_run_or_a_head_folder_in_it(given, folders, tmp_path, monkeypatch, no_loading):
    from logitfuse.cli import evaluate

    seen = {}
    monkeypatch.setattr(evaluate, "run", lambda args: seen.setdefault("root", args.heads_root) and 0)
    (folders / "run" / "heads" / "dense" / "config.json").parent.mkdir(parents=True, exist_ok=True)
    (folders / "run" / "heads" / "dense" / "config.json").write_text("{}")
    code = main(["eval", "--slm", str(folders / "slm"), "--llm", str(folders / "llm"), "--head",
                 str(folders / given), "--max-examples", "1"])
    assert code == 0 and seen["root"] == folders / "run" / "heads"


# ------------------------------------------------------------------------------------ eval without matplotlib
def test_eval_says_it_skips_its_plots_without_matplotlib(model_dirs, tmp_path, monkeypatch, capsys):
    import sys

    run = _trained_run(tmp_path, model_dirs / "slm", model_dirs / "llm")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code = main(["eval", "--slm", str(model_dirs / "slm"), "--llm", str(model_dirs / "llm"), "--head", str(run),
                 "--max-examples", "1", "--max-history", "0", "--no-llm-context", "--out", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "no α-trace plot" in err and "matplotlib is not installed" in err, err
    assert not (tmp_path / "results" / "alpha_trace.png").exists()


@pytest.mark.parametrize("command", ["generate", "demo"])
def test_schedule_help_names_every_schedule(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for schedule in ("always", "periodic(P, K, T)", "entropy_gate(h)", "head_gate(tau)"):
        assert schedule in text, schedule


# ------------------------------------------------------------------------------------ progress bars
class _Terminal:
    """A stderr that says it is a terminal (tqdm shows its bar only there), keeping what is written."""

    def __init__(self):
        self.text = []

    def write(self, text):
        self.text.append(text)

    def flush(self):
        pass

    def isatty(self):
        return True


@pytest.mark.parametrize("alpha", ["1", "0.5"])
def test_generate_shows_a_progress_bar_with_an_eta_on_a_terminal(alpha, model_dirs, monkeypatch):
    import sys

    from logitfuse.cli import progress

    monkeypatch.setattr(progress, "PROGRESS_DELAY", 0)  # tiny models are done before the usual delay
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    code = main(["generate", "--slm", str(model_dirs / "slm"), "--llm", str(model_dirs / "llm"), "--alpha", alpha,
                 "--instruction", "Write a note: to Ann", "--max-new-tokens", "20", "--color", "never"])
    err = "".join(terminal.text)
    assert code == 0, err
    assert ("generating" if alpha == "1" else "fusing") in err and "tok" in err and "<" in err, err  # elapsed<ETA


def test_scoring_shows_one_bar_over_the_whole_split(model_dirs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitfuse.cli.train import score_split
    from logitfuse.train_fuser.data import load_examples
    from logitfuse.train_fuser.scoring import Pair, default_variants

    models = [(AutoModelForCausalLM.from_pretrained(model_dirs / n), AutoTokenizer.from_pretrained(model_dirs / n))
              for n in ("slm", "llm")]
    pair = Pair.build(*models[0], *models[1], "slm", "llm")
    examples = load_examples(bundled_split("dev"), max_examples=3)
    score_split(pair, examples, tmp_path / "cache-dev", default_variants(20)[:1], feature_k=2, llm_with_context=False,
                max_history=0, shard_size=2)
    err = capsys.readouterr().err
    assert "scoring cache-dev" in err and "3/3" in err, err  # one bar over both shards, not one per shard


# ------------------------------------------------------------------------------------ Hugging Face Hub ids
def _hub_cache(tmp_path, model_dirs, monkeypatch):
    """``ORG/tiny-slm`` and ``ORG/tiny-llm`` in a hub cache of the test's own (the layout huggingface_hub
    writes: models--ORG--NAME/snapshots/<rev>/ and refs/main), with ``HF_HUB_CACHE`` at it, offline."""
    cache, revision = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    for name in ("slm", "llm"):
        repo = cache / f"models--tiny-org--tiny-{name}"
        shutil.copytree(model_dirs / name, repo / "snapshots" / revision)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_generate_takes_hugging_face_hub_ids_from_the_local_cache(model_dirs, tmp_path, monkeypatch, capsys):
    _hub_cache(tmp_path, model_dirs, monkeypatch)
    code = main(["generate", "--slm", "tiny-org/tiny-slm", "--llm", "tiny-org/tiny-llm", "--alpha", "0.5",
                 "--instruction", "Write a note: to Ann", "--max-new-tokens", "3", "--color", "never"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "fixed α 0.5" in err.strip().splitlines()[-1], err


def test_train_records_the_hub_ids_in_its_heads(model_dirs, tmp_path, monkeypatch, capsys):
    _hub_cache(tmp_path, model_dirs, monkeypatch)
    out = tmp_path / "run"
    code = main(["train", "--slm", "tiny-org/tiny-slm", "--llm", "tiny-org/tiny-llm", "--out", str(out),
                 "--max-examples", "2", "--max-history", "0", "--max-epochs", "1", "--llm-top-k", "4"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "heads" / "dense" / "config.json").read_text())
    assert (config["slm_name"], config["llm_name"]) == ("tiny-org/tiny-slm", "tiny-org/tiny-llm")
    # and generate takes that head for the same ids
    code = main(["generate", "--slm", "tiny-org/tiny-slm", "--llm", "tiny-org/tiny-llm", "--head", str(out),
                 "--instruction", "Write a note: to Ann", "--max-new-tokens", "2"])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "demo", "train", "eval"])
def test_a_hub_id_missing_offline_is_a_usage_error_before_loading(command, model_dirs, folders, tmp_path, monkeypatch,
                                                                  no_loading, capsys, assert_usage_error):
    _hub_cache(tmp_path, model_dirs, monkeypatch)
    extra = {"generate": ["--instruction", "a: b"], "demo": [], "train": ["--out", str(tmp_path / "run")],
             "eval": ["--head", str(folders / "run")]}[command]
    code = main([command, "--slm", "tiny-org/no-such-model", "--llm", str(folders / "llm"), *extra])
    assert_usage_error(code, capsys.readouterr().err, command, "--slm 'tiny-org/no-such-model' is not in the local "
                       "Hugging Face cache", "HF_HUB_OFFLINE is set")


def test_finetune_takes_a_hub_id_and_refuses_a_missing_one_before_loading(model_dirs, tmp_path, monkeypatch, no_loading,
                                                                          capsys, assert_usage_error):
    _hub_cache(tmp_path, model_dirs, monkeypatch)
    code = main(["finetune", "--slm", "tiny-org/no-such-model", "--out", str(tmp_path / "run")])
    assert_usage_error(code, capsys.readouterr().err, "finetune", "--slm 'tiny-org/no-such-model' is not in the local "
                       "Hugging Face cache")
    from logitfuse.cli import build_parser, finetune

    args = build_parser().parse_args(["finetune", "--slm", "tiny-org/tiny-slm", "--out", str(tmp_path / "run")])
    finetune.validate(args)  # the cached id passes the check, and the run's config keeps it
    assert args.config.slm == "tiny-org/tiny-slm"


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_threads_must_be_a_positive_count_or_auto(value, model_dirs, no_loading, capsys, assert_usage_error):
    code = main(["generate", "--slm", str(model_dirs / "slm"), "--llm", str(model_dirs / "llm"), "--instruction",
                 "a: b", "--threads", value])
    assert_usage_error(code, capsys.readouterr().err, "generate", f"--threads {value!r}", "or auto")


@pytest.mark.parametrize("threads, free, expected", [("1", 2.0, 1), ("3", 0.0, 3), ("auto", 1.8, 2), ("auto", 1.2, 1),
                                                     ("auto", 0.1, 1)])
def test_threads_sets_torch_threads(threads, free, expected, model_dirs, monkeypatch, capsys):
    """auto: the cores other processes leave free now (at least one); a number is taken as it is."""
    import torch

    from logitfuse.cli import common

    monkeypatch.setattr(common, "free_cores", lambda interval=0.2: free)
    before = torch.get_num_threads()
    try:
        code = main(["generate", "--slm", str(model_dirs / "slm"), "--llm", str(model_dirs / "llm"), "--alpha", "0.5",
                     "--instruction", "Write a note: to Ann", "--max-new-tokens", "2", "--threads", threads])
        assert code == 0, capsys.readouterr().err
        assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)


def test_free_cores_is_between_zero_and_the_cores_we_may_use():
    import os

    from logitfuse.cli.common import free_cores

    assert 0.0 <= free_cores(0.05) <= len(os.sched_getaffinity(0))
