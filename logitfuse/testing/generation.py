"""Test case builders for fused generation with tiny models: chat prompts, left padding, a greedy
``generate`` wrapper, and readers of what a backend received (its audit log).

>>> from logitfuse.testing import byte_level_tokenizer
>>> from logitfuse.testing.generation import left_pad, contains_subsequence
>>> left_pad([[5, 6, 7], [8]])["attention_mask"].tolist()
[[1, 1, 1], [0, 0, 1]]
>>> contains_subsequence([1, 2, 3, 4], [2, 3])
True
"""

from __future__ import annotations

import json

import torch


__all__ = ["PRIVATE", "PUBLIC", "chat_ids", "contains_subsequence", "generate", "hf_streams", "left_pad",
           "private_prompt_ids", "remote_prompts"]

PUBLIC = "Write a short invitation for the charity event on Saturday."
PRIVATE = "My name is Martin and I sell houses on Maple Drive."


def chat_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def private_prompt_ids(tokenizer, private: str, public: str) -> list[int]:
    return chat_ids(tokenizer, f"Context: {private}\n\nTask: {public}")


def left_pad(rows: list[list[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def generate(model, inputs: dict, max_new_tokens: int, processor=None, **kwargs) -> torch.Tensor:
    """New tokens only, ``(batch, max_new_tokens)``; greedy unless told otherwise."""
    kwargs.setdefault("do_sample", False)
    kwargs.setdefault("pad_token_id", 0)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens,
                             logits_processor=[processor] if processor is not None else None, **kwargs)
    return out[:, inputs["input_ids"].shape[1]:]


def hf_streams(audit_log: list) -> list[list[int]]:
    """Each row's token stream as an HFLLM received it (start, advances, rollbacks replayed)."""
    rows: list[list[int]] = []
    for entry in audit_log:
        if entry["op"] == "start":
            rows = [list(r) for r in entry["token_ids"]]
        elif entry["op"] in ("advance", "score"):
            for row, new in zip(rows, entry["token_ids"]):
                row.extend(new)
        elif entry["op"] == "reorder":
            rows = [list(rows[s]) for s in entry["rows"]]
        elif entry["op"] == "rollback":
            for row, n in zip(rows, entry["n"]):
                if n:
                    del row[-n:]
    return rows


def remote_prompts(audit_log: list[str]) -> list[list[int]]:
    """The token-id prompts of an OpenAICompatibleLLM's audited request bodies."""
    return [json.loads(body)["prompt"] for body in audit_log]


def contains_subsequence(haystack: list[int], needle: list[int]) -> bool:
    if not needle:
        return False
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))
