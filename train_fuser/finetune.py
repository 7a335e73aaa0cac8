"""`logitfuse finetune`: LoRA-tune the on-device model on context-aware writing, as the paper does.

    logitfuse finetune --slm smollm2-135m --out runs/smollm2-lora --max-examples 400

The SLM learns to write the reference response from the exact private prompt it sees at run time
(:meth:`Example.private_messages` rendered by :func:`render_prompt`, as scoring and generation do);
the loss covers the response tokens and the end-of-turn token only. Data: by default the bundled
no-profile training split (1,346 examples of 260 users, none of them in the test split). The dev
split is left for the fusion heads: a head must learn from positions the SLM did not see.

The first ``max_examples`` train; the ``eval_examples`` after them (other users, mostly) are held out:
their response loss is measured every ``eval_every`` steps and the adapter with the lowest one is
kept. A checkpoint (adapter, optimizer, step, RNG state, best adapter) is written atomically at every
evaluation; ``--resume`` continues from it and reaches the same adapter as an uninterrupted run.

The output folder holds the adapter as peft writes it (``adapter_config.json``,
``adapter_model.safetensors``, in ``adapter_dtype``) and ``logitfuse-finetune.json`` (base model,
command, data sha256, steps, tokens, losses, cost). Load it with ``--adapter DIR`` in generate, demo,
train and eval, or merge it into a transformers folder with ``--merge-out``.

Hyperparameters are checked before anything loads (:meth:`FinetuneConfig.validate`: finite, in
range; ``--merge-out`` a new folder or a previous merge output, never ``--out``; a checkpoint to
resume readable). A loss that turns NaN or infinite stops the run with :class:`FinetuneError`, and no
adapter is written (the last checkpoint, from before, is kept).

An adapter trained on a user's own private data is private like that data: it stays on the device.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from logitfuse.fileio import atomic_write, atomic_write_text
from logitfuse.train_fuser.data import Example, bundled_split, load_examples, render_prompt

__all__ = ["FinetuneConfig", "FinetuneError", "FinetuneResult", "encode_example", "finetune", "held_out_loss"]

RECORD = "logitfuse-finetune.json"
CHECKPOINT = "checkpoint.pt"
IGNORE = -100  # label of a token the loss skips


class FinetuneError(RuntimeError):
    """The run failed after it started (a loss that is not finite); no adapter was written."""


@dataclass
class FinetuneConfig:
    """Settings of one LoRA fine-tuning run (see the module docstring)."""

    slm: str  # zoo name or transformers folder
    out: str | os.PathLike
    data: str | os.PathLike | None = None  # a CoGenesis JSON file; default: the bundled no-profile training split
    max_examples: int | None = 400  # train on the first N examples (None: all but the held-out slice)
    eval_examples: int = 20  # held out: the examples after the training ones
    max_history: int | None = None  # writing-history items in the private prompt (the no-profile split has none)
    rank: int = 8
    lora_alpha: float | None = None  # default 2 * rank
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    lr: float = 2e-4
    warmup_steps: int = 10
    epochs: int = 1
    max_length: int = 1024  # prompt + response tokens; longer responses are cut
    eval_every: int = 100
    patience: int | None = None  # stop after this many evaluations without a new best
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps in total; resume goes on
    seed: int = 0
    dtype: str = "float32"  # training dtype of the base weights
    adapter_dtype: str = "bfloat16"  # dtype of the saved adapter (bf16 halves its size)
    device: str = "cpu"
    resume: bool = False
    merge_out: str | os.PathLike | None = None
    progress: bool = True
    command: str | None = None  # recorded in the output JSON (the CLI passes its argv)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the setting and the fix; loads nothing."""
        from logitfuse import zoo

        if not (self.slm in zoo.known_names() or (Path(self.slm).expanduser() / "config.json").is_file()
                or zoo.is_hub_id(self.slm)):
            raise ValueError(f"slm={self.slm!r} is neither a zoo model ({', '.join(zoo.known_names())}), a "
                             "transformers model folder (with config.json) nor a Hugging Face Hub id (ORG/NAME)")
        data = self.data_path
        if not data.is_file():
            raise ValueError(f"data={str(data)!r} is not a file; pass a CoGenesis JSON file (a list of samples)")
        positive = {"rank": self.rank, "epochs": self.epochs, "eval_examples": self.eval_examples,
                    "eval_every": self.eval_every, "max_length": self.max_length}
        for name, value in [*positive.items(), ("max_examples", self.max_examples), ("max_steps", self.max_steps),
                            ("patience", self.patience)]:
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr!r} must be a finite number > 0 (LoRA usually wants 1e-4 to 5e-4)")
        if self.lora_alpha is not None and (isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float))
                                            or not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0)):
            raise ValueError(f"lora_alpha={self.lora_alpha!r} must be a finite number > 0 (or left out: 2 * rank)")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout={self.dropout!r} must lie in [0, 1)")
        for name in ("warmup_steps", "max_history"):
            value = getattr(self, name)
            if (value is not None or name != "max_history") and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}={value!r} must be an integer >= 0")
        for name in ("dtype", "adapter_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of 'float32', 'bfloat16', 'float16'")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"out={str(out)!r} is a file; pass a folder")
        if (out / CHECKPOINT).exists() and not self.resume:
            raise ValueError(f"out={str(out)!r} holds a checkpoint of an earlier run; pass resume=True (--resume) "
                             "to continue it, or another folder")
        self._check_merge_out(out)
        if self.resume and (out / CHECKPOINT).exists():
            _read_checkpoint(out / CHECKPOINT)
        if importlib.util.find_spec("peft") is None:
            raise ValueError('fine-tuning needs peft: pip install "logitfuse[finetune]" (or pip install peft)')
        _split(self)  # the data file is readable and holds enough examples

    def _check_merge_out(self, out: Path) -> None:
        if self.merge_out is None:
            return
        from logitfuse.zoo.loader import check_merge_target
        from logitfuse.zoo.registry import ZooError

        merge, adapter = Path(self.merge_out).expanduser().resolve(), out.expanduser().resolve()
        if merge == adapter or merge in adapter.parents or adapter in merge.parents:
            raise ValueError(f"merge_out={str(self.merge_out)!r} is, holds or lies in out={str(self.out)!r}: the merge "
                             "would replace the adapter; pass a folder of its own")
        try:
            check_merge_target(merge)
        except ZooError as err:
            raise ValueError(f"merge_out={str(self.merge_out)!r}: {err}") from None

    @property
    def data_path(self) -> Path:
        return bundled_split("train_wo_profile") if self.data is None else Path(self.data).expanduser()


@dataclass
class FinetuneResult:
    """What a run did; also written to ``<out>/logitfuse-finetune.json``."""

    out: Path
    steps: int
    tokens: int
    best_eval_loss: float
    best_step: int
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)  # per step
    seconds: float = 0.0


def encode_example(tokenizer: Any, example: Example, *, max_history: int | None = None,
                   max_length: int = 1024) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for one example: the private prompt exactly as the SLM sees it at run
    time, then the response and the end-of-turn token; ``labels`` is ``-100`` on the prompt."""
    prompt = render_prompt(tokenizer, example.private_messages(max_history))
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    ids = (prompt + response)[:max_length]
    labels = ([IGNORE] * len(prompt) + response)[:max_length]
    return ids, labels


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _split(config: FinetuneConfig) -> tuple[list[Example], list[Example]]:
    examples = load_examples(config.data_path)
    n_train = len(examples) - config.eval_examples if config.max_examples is None else config.max_examples
    if n_train < 1 or n_train + config.eval_examples > len(examples):
        raise ValueError(f"{config.data_path} has {len(examples)} examples: too few for max_examples="
                         f"{config.max_examples} plus eval_examples={config.eval_examples} held out after them")
    return examples[:n_train], examples[n_train : n_train + config.eval_examples]


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``; ``ValueError`` naming it when it cannot be read."""
    import pickle

    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or not {"lora", "optimizer", "rng", "best", "state", "order_seed"} <= set(saved):
            raise ValueError("keys missing")
        json.loads(saved["state"])
    except (OSError, RuntimeError, ValueError, TypeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"resume: the checkpoint {str(path)!r} is damaged ({type(err).__name__}); delete it to "
                         "start over, or pass another out folder") from None
    return saved


def _order(n: int, epochs: int, seed: int) -> list[int]:
    """The training examples' order: a seeded shuffle per epoch."""
    import torch

    order = []
    for epoch in range(epochs):
        order += torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return order


def _lr_at(step: int, config: FinetuneConfig, total: int) -> float:
    """Linear warm-up, then linear decay to a tenth of ``lr`` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay = (step - config.warmup_steps) / max(total - config.warmup_steps, 1)
    return config.lr * (1 - 0.9 * decay)


def _response_loss(model: Any, ids: list[int], labels: list[int], device: str):
    """``(summed NLL over labelled tokens, number of them)``."""
    import torch

    input_ids = torch.tensor([ids], device=device)
    logits = model(input_ids=input_ids).logits[0, :-1].float()
    targets = torch.tensor(labels[1:], device=device)
    loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


def held_out_loss(model: Any, encoded: list[tuple[list[int], list[int]]], device: str) -> float:
    """Mean NLL in nats per response token of ``model`` over ``encoded`` (:func:`encode_example`'s
    ``(ids, labels)`` pairs): the held-out loss that picks the best adapter."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in encoded:
            loss, n = _response_loss(model, ids, labels, device)
            total, count = total + loss.item(), count + n
    model.train()
    return total / max(count, 1)


def _lora_state(model: Any) -> dict[str, Any]:
    from peft import get_peft_model_state_dict

    return {key: value.detach().clone() for key, value in get_peft_model_state_dict(model).items()}


def _save_adapter(model: Any, state: dict[str, Any], out: Path, config: FinetuneConfig, base_name: str) -> None:
    """The adapter as peft reads it: ``adapter_config.json`` and ``adapter_model.safetensors`` (atomic)."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, config.adapter_dtype)
    tensors = {key: value.to(dtype).contiguous() for key, value in state.items()}
    atomic_write(out / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    peft_config = model.peft_config["default"]
    peft_config.base_model_name_or_path = base_name
    atomic_write_text(out / "adapter_config.json", json.dumps(peft_config.to_dict(), indent=2, sort_keys=True,
                                                              default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def finetune(config: FinetuneConfig) -> FinetuneResult:
    """LoRA-tune ``config.slm``; write the best adapter (by held-out loss) and its record to ``config.out``.

    Raises ``ValueError`` for a bad setting before any model loads (see :meth:`FinetuneConfig.validate`).
    """
    config.validate()
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from tqdm.auto import tqdm

    from logitfuse import zoo

    out = Path(config.out)
    train_examples, eval_examples = _split(config)
    torch.manual_seed(config.seed)
    base, tokenizer, base_name = zoo.load(config.slm, dtype=config.dtype, device=config.device,
                                          progress=config.progress)
    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha or 2 * config.rank, lora_dropout=config.dropout,
                      target_modules=config.target_modules, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    encode = lambda e: encode_example(tokenizer, e, max_history=config.max_history, max_length=config.max_length)  # noqa: E731
    held_out = [encode(e) for e in eval_examples]
    order = _order(len(train_examples), config.epochs, config.seed)
    total = len(order)

    state = {"step": 0, "tokens": 0, "seconds": 0.0, "eval_history": [], "train_loss": [], "best_eval_loss": math.inf,
             "best_step": 0, "since_best": 0}
    best = _lora_state(model)
    checkpoint = out / CHECKPOINT
    if config.resume and checkpoint.exists():
        saved = _read_checkpoint(checkpoint)
        if saved["order_seed"] != [config.seed, config.epochs, len(train_examples), config.slm]:
            raise ValueError(f"{checkpoint} was written by a run with other data, seed or model; start in another folder")
        set_peft_model_state_dict(model, saved["lora"])
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        best, state = saved["best"], json.loads(saved["state"])
        if config.progress:
            print(f"[logitfuse] resuming at step {state['step']} of {total}", file=sys.stderr)

    def save_checkpoint() -> None:
        payload = {"lora": _lora_state(model), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                   "best": best, "state": json.dumps(state),
                   "order_seed": [config.seed, config.epochs, len(train_examples), config.slm]}
        atomic_write(checkpoint, lambda tmp: torch.save(payload, tmp))

    def evaluate() -> bool:
        nonlocal best
        loss = held_out_loss(model, held_out, config.device)
        if not math.isfinite(loss):
            raise FinetuneError(f"the held-out loss is {loss} at step {state['step']}: training diverged; nothing was "
                                "saved (try a lower --lr or --lora-alpha)")
        state["eval_history"].append([state["step"], loss])
        if loss < state["best_eval_loss"]:
            state.update(best_eval_loss=loss, best_step=state["step"], since_best=0)
            best = _lora_state(model)
            return False
        state["since_best"] += 1
        return config.patience is not None and state["since_best"] >= config.patience

    if not state["eval_history"]:
        evaluate()  # the base model's held-out loss (step 0)
    stop_at = total if config.max_steps is None else min(total, config.max_steps)
    bar = tqdm(total=total, initial=state["step"], desc="finetune", unit="step", disable=not config.progress)
    stopped_early = False
    while state["step"] < stop_at and not stopped_early:
        started = time.perf_counter()
        ids, labels = encode(train_examples[order[state["step"]]])
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(state["step"], config, total)
        loss_sum, n = _response_loss(model, ids, labels, config.device)
        if not math.isfinite(loss_sum.item()):
            bar.close()
            raise FinetuneError(f"the training loss is {loss_sum.item()} at step {state['step'] + 1}: training "
                                "diverged; no adapter was saved (try a lower --lr or --lora-alpha)")
        (loss_sum / max(n, 1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["tokens"] += len(ids)
        state["seconds"] += time.perf_counter() - started
        state["train_loss"].append(loss_sum.item() / max(n, 1))
        bar.update(1)
        bar.set_postfix(loss=f"{state['train_loss'][-1]:.3f}", tok_s=f"{state['tokens'] / state['seconds']:.0f}",
                        best_eval=f"{state['best_eval_loss']:.3f}")
        if state["step"] % config.eval_every == 0 or state["step"] == total:
            stopped_early = evaluate()
            save_checkpoint()
    bar.close()
    if state["step"] % config.eval_every and state["step"] < total:  # stopped by max_steps between evaluations
        save_checkpoint()

    _save_adapter(model, best, out, config, base_name)
    result = FinetuneResult(out, state["step"], state["tokens"], state["best_eval_loss"], state["best_step"],
                            [tuple(e) for e in state["eval_history"]], state["train_loss"], round(state["seconds"], 1))
    record = {
        "format": "logitfuse.finetune/1",
        "base_model": base_name,
        "base_sha256": zoo.get_spec(base_name).sha256 if base_name in zoo.REGISTRY else None,
        "command": config.command or f"finetune({config!r})",
        "data": config.data_path.name,
        "data_sha256": _sha256(config.data_path),
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "finished": state["step"] >= total or stopped_early,
        "steps": state["step"],
        "planned_steps": total,
        "tokens": state["tokens"],
        "train_seconds": result.seconds,
        "tokens_per_second": round(state["tokens"] / max(state["seconds"], 1e-9), 1),
        "best_eval_loss": state["best_eval_loss"],
        "best_step": state["best_step"],
        "eval_history": state["eval_history"],
        "config": {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in asdict(config).items()
                   if k not in ("command", "progress")},
        "versions": {name: zoo.installed_version(name) for name in ("torch", "transformers", "peft")},
    }
    atomic_write_text(out / RECORD, json.dumps(record, indent=2) + "\n")
    if config.merge_out is not None:
        zoo.merge_adapter(zoo.resolve(config.slm), out, config.merge_out)
    return result
