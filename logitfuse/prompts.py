"""Prompts: what the on-device SLM and the cloud LLM are asked, and how a chat becomes token ids.

The split between what may leave the device and what may not is made here, once:

- the **public** prompt holds only the task title (the instruction before its first ``": "``; the
  rest of an instruction can mention private details);
- the **private** prompt holds the user's context (profile, writing history) and the full instruction.

:func:`render_prompt` is the one chat rendering of the project: the session's ``apply_chat_template``,
the sketch variant, the demo, training and scoring all use it, so a prompt is the same ids wherever
it is built (the shipped heads were trained on exactly these ids).

The CoGenesis context-aware data ships as package data of ``logitfuse.train_fuser``; this module
reads it without importing any of train_fuser's code (the runtime never does).

>>> from logitfuse.prompts import bundled_split, load_examples
>>> examples = load_examples(bundled_split("dev"))
>>> len(examples), examples[0].public_instruction in examples[0].instruction
(150, True)
>>> from logitfuse.testing import byte_level_tokenizer
>>> tok = byte_level_tokenizer()
>>> tok.decode(render_prompt(tok, public_messages("Write a toast")))
'<|im_start|>system\\nYou are a helpful writing assistant.<|im_end|>\\n<|im_start|>user\\nWrite a toast<|im_end|>\\n<|im_start|>assistant\\n'
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DATA_DIR", "PRIVATE_SYSTEM", "PUBLIC_SYSTEM", "SPLITS", "Example", "bundled_split", "has_chat_template",
           "load_examples", "private_messages", "public_instruction", "public_messages", "render_prompt",
           "shipped_path"]

PRIVATE_SYSTEM = (
    "You are a personal writing assistant. Write as the user described below would: use their "
    "profile and writing history, and match their style."
)
PUBLIC_SYSTEM = "You are a helpful writing assistant."

SPLITS = {"dev": "context_aware_dev.json", "test": "context_aware_test.json",
          "train_wo_profile": "context_aware_train_wo_profile.json"}  # no profile/history: fine-tunes the SLM


def shipped_path(*parts: str) -> Path:
    """A path inside the files shipped with ``logitfuse.train_fuser`` (``"data"``: the data sets,
    ``"heads"``: the trained heads), found without running any of train_fuser's code."""
    spec = importlib.util.find_spec("logitfuse.train_fuser")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("logitfuse.train_fuser is missing from this installation; reinstall logitfuse")
    return Path(list(spec.submodule_search_locations)[0], *parts)


DATA_DIR = shipped_path("data")


# ------------------------------------------------------------------------------------ rendering
def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` ready for the assistant's reply.

    With a chat template: the template's text (generation prompt added), tokenized without adding
    special tokens; the same ids as ``apply_chat_template(..., tokenize=True)``, which transformers 5
    returns as a ``BatchEncoding`` and 4.x as a list. Without one: the contents joined by blank lines.
    """
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = "\n\n".join(m["content"] for m in messages) + "\n\n"
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def public_instruction(instruction: str) -> str:
    """The part of an instruction that may leave the device: the text before its first ``": "``."""
    return instruction.split(": ", 1)[0].strip()


def _chat(system: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def private_messages(instruction: str, context: str = "") -> list[dict[str, str]]:
    """Chat messages for the on-device model: a free-text private ``context`` and the full instruction
    (what ``logitfuse generate`` sends to the SLM)."""
    return _chat(PRIVATE_SYSTEM, f"## Context\n{context}\n\n## Task\n{instruction}")


def public_messages(public: str) -> list[dict[str, str]]:
    """Chat messages for the cloud model: the public task and nothing else."""
    return _chat(PUBLIC_SYSTEM, public)


# ------------------------------------------------------------------------------------ the data
@dataclass(frozen=True)
class Example:
    """One user and one writing task. Everything but ``public_instruction`` and ``response`` is private."""

    tid: str
    instruction: str
    response: str
    profile: tuple[tuple[str, str], ...]  # writing history: (title, text)
    additional_profile: str

    @property
    def public_instruction(self) -> str:
        """The task title: the instruction before its first ``": "``."""
        return public_instruction(self.instruction)

    def private_messages(self, max_history: int | None = None) -> list[dict[str, str]]:
        """Chat messages for the on-device model: profile, history (the first ``max_history``
        items, default all) and the full task."""
        items = self.profile if max_history is None else self.profile[:max_history]
        history = "\n\n".join(f"Task: {title}\nContent: {text}" for title, text in items)
        user = f"## User Profile\n{self.additional_profile}\n\n## User Writing History\n{history}\n\n## Task\n{self.instruction}"
        return _chat(PRIVATE_SYSTEM, user)

    def public_messages(self) -> list[dict[str, str]]:
        """Chat messages for the cloud model: the task title and nothing else."""
        return public_messages(self.public_instruction)


def bundled_split(split: str) -> Path:
    """Path of a split shipped with the package (``"dev"``, ``"test"`` or ``"train_wo_profile"``)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {sorted(SPLITS)}")
    return DATA_DIR / SPLITS[split]


def _field(record: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"{where}: missing field {key!r}")
    if not isinstance(record[key], kind):
        raise ValueError(f"{where}: field {key!r} should be a {kind.__name__}, got {type(record[key]).__name__}")
    return record[key]


def load_examples(path: str | os.PathLike, *, max_examples: int | None = None) -> list[Example]:
    """Read a CoGenesis JSON file (a list of samples) into :class:`Example` s.

    A malformed file raises ``ValueError`` naming the file, the record index and what is missing.
    """
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of samples, got {type(records).__name__}")
    examples = []
    for index, record in enumerate(records[:max_examples] if max_examples else records):
        where = f"{path}, record {index}"
        tid = _field(record, "tid", str, where)
        where = f"{path}, record {index} (tid {tid})"
        turns = _field(record, "conversations", list, where)
        roles = [turn.get("from") if isinstance(turn, dict) else None for turn in turns]
        if "user" not in roles or "assistant" not in roles:
            raise ValueError(f"{where}: 'conversations' needs a 'user' and an 'assistant' turn, got roles {roles}")
        instruction = _field(turns[roles.index("user")], "value", str, f"{where}, user turn")
        response = _field(turns[roles.index("assistant")], "value", str, f"{where}, assistant turn")
        history = []
        # the no-profile training split has neither field: an empty history and profile
        for item_index, item in enumerate(_field(record, "profile", list, where) if "profile" in record else []):
            item_where = f"{where}, profile item {item_index}"
            history.append((_field(item, "title", str, item_where), _field(item, "text", str, item_where)))
        additional = _field(record, "additional_profile", str, where) if "additional_profile" in record else ""
        if not instruction.strip() or not response.strip():
            raise ValueError(f"{where}: empty instruction or response")
        examples.append(Example(tid, instruction, response, tuple(history), additional))
    return examples
