"""The CoGenesis context-aware data as (private prompt, public prompt, response) examples.

The split between what may leave the device and what may not is made here, once:

- the **public** prompt holds only the task title (the instruction before its first ``": "``; the
  rest of an instruction can mention private details);
- the **private** prompt holds the user's profile, writing history and the full instruction.

>>> from logitfuse.train_fuser.data import load_examples, bundled_split
>>> examples = load_examples(bundled_split("dev"))
>>> len(examples), examples[0].public_instruction in examples[0].instruction
(150, True)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"
SPLITS = {"dev": "context_aware_dev.json", "test": "context_aware_test.json",
          "train_wo_profile": "context_aware_train_wo_profile.json"}  # no profile/history: fine-tunes the SLM

PRIVATE_SYSTEM = (
    "You are a personal writing assistant. Write as the user described below would: use their "
    "profile and writing history, and match their style."
)
PUBLIC_SYSTEM = "You are a helpful writing assistant."


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
        return [{"role": "system", "content": PRIVATE_SYSTEM}, {"role": "user", "content": user}]

    def public_messages(self) -> list[dict[str, str]]:
        """Chat messages for the cloud model: the task title and nothing else."""
        return [{"role": "system", "content": PUBLIC_SYSTEM}, {"role": "user", "content": self.public_instruction}]


def public_instruction(instruction: str) -> str:
    """The part of an instruction that may leave the device: the text before its first ``": "``."""
    return instruction.split(": ", 1)[0].strip()


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


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` ready for the assistant's reply: the tokenizer's chat template when
    it has one, else the contents joined by blank lines."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = "\n\n".join(m["content"] for m in messages) + "\n\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]
