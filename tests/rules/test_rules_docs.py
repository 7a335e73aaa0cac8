"""Every Python example of docs/rules.md runs as written (tiny random models, nothing downloaded)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[2] / "docs" / "rules.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)


def test_the_page_has_an_example_per_rule():
    text = "\n".join(BLOCKS)
    assert len(BLOCKS) >= 4
    for name in ("Mixture", "arithmetic(", "steer(", "Contrastive", "CoGenesisLogitsProcessor"):
        assert name in text


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_each_example_runs(block):
    exec(compile(block, str(PAGE), "exec"), {"__name__": "docs_example"})
