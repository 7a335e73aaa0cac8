"""`logitfuse finetune`: LoRA-tune the on-device model on context-aware writing, as the paper does (needs peft).

    logitfuse finetune --slm smollm2-135m --out runs/smollm2-lora --max-examples 400

The SLM learns to write the reference response from the exact private prompt it sees at run time; the
loss covers the response tokens and the end-of-turn token only. Data: by default the bundled
no-profile training split (none of its users in the test split). The examples after the training
ones are held out for early stopping; a checkpoint is written at every evaluation and --resume
continues from it. The output folder holds the adapter as peft writes it and logitfuse-finetune.json;
load it with --adapter DIR in generate, demo, judge, train and eval, or merge it with --merge-out.
An adapter trained on a user's own private data is private like that data: it stays on the device.
See logitfuse.train_fuser.finetune.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from logitfuse.errors import UsageError
from logitfuse.zoo import check_model
from logitfuse.train_fuser.finetune import FinetuneConfig, FinetuneError, finetune

__all__ = ["HELP", "add_arguments", "run", "validate"]

HELP = "LoRA-tune the on-device model on context-aware writing (needs peft)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = FinetuneConfig(slm="", out="")
    parser.add_argument("--slm", required=True, help="on-device model to tune: zoo name or transformers folder")
    parser.add_argument("--out", required=True, help="output folder: the adapter, its record, the checkpoint")
    parser.add_argument("--data", default=None, help="a CoGenesis JSON file (default: the bundled no-profile training split)")
    parser.add_argument("--max-examples", type=int, default=defaults.max_examples, help="train on the first N examples")
    parser.add_argument("--eval-examples", type=int, default=defaults.eval_examples,
                        help="held-out examples (those after the training ones) for early stopping")
    parser.add_argument("--max-history", type=int, default=None, help="writing-history items in the private prompt")
    parser.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank (all linear layers)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * rank)")
    parser.add_argument("--dropout", type=float, default=defaults.dropout)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="prompt + response tokens kept")
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every, help="steps between held-out evaluations")
    parser.add_argument("--patience", type=int, default=None, help="stop after N evaluations without a new best")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after N steps in total (--resume goes on)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--adapter-dtype", default=defaults.adapter_dtype, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--merge-out", default=None, help="also save base + adapter merged as a transformers folder "
                        "here: a new folder, or one an earlier --merge-out wrote (it is replaced); never --out")


def validate(args: argparse.Namespace) -> None:
    """The run's :class:`~logitfuse.train_fuser.finetune.FinetuneConfig`, checked (``UsageError``), in ``args.config``."""
    check_model("--slm", args.slm)  # a zoo name, a model folder or a Hub id (in the local cache when offline)
    config = FinetuneConfig(
        slm=args.slm, out=args.out, data=args.data, max_examples=args.max_examples, eval_examples=args.eval_examples,
        max_history=args.max_history, rank=args.rank, lora_alpha=args.lora_alpha, dropout=args.dropout, lr=args.lr,
        epochs=args.epochs, max_length=args.max_length, eval_every=args.eval_every, patience=args.patience,
        max_steps=args.max_steps, seed=args.seed, dtype=args.dtype, adapter_dtype=args.adapter_dtype,
        device=args.device, resume=args.resume, merge_out=args.merge_out,
        command="logitfuse " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["finetune"] else None,
    )
    try:
        config.validate()
    except ValueError as err:  # "name=value ..." becomes "--name value ..."
        message = str(err)
        name, sep, rest = message.partition("=")
        if sep and name.isidentifier():
            message = f"--{name.replace('_', '-')} {rest}"
        raise UsageError(message) from None
    args.config = config


def run(args: argparse.Namespace) -> int:
    from logitfuse.zoo import ZooError

    try:
        result = finetune(args.config)
    except (FinetuneError, ZooError, OSError) as err:  # a diverged run, a model or adapter that does not load
        print(f"logitfuse finetune: error: {err}", file=sys.stderr)
        return 1
    print(f"adapter saved to {result.out} (best held-out loss {result.best_eval_loss:.4f} nats/token at step "
          f"{result.best_step}; {result.steps} steps, {result.tokens} tokens in {result.seconds:.0f} s)")
    return 0
