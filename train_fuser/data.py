"""The CoGenesis context-aware data as (private prompt, public prompt, response) examples.

The data, the public/private split and the chat rendering live in :mod:`logitfuse.prompts` (the
runtime uses them without importing train_fuser); this module keeps their names for the training,
scoring and evaluation code.

>>> from logitfuse.train_fuser.data import load_examples, bundled_split
>>> examples = load_examples(bundled_split("dev"))
>>> len(examples), examples[0].public_instruction in examples[0].instruction
(150, True)
"""

from logitfuse.prompts import (
    DATA_DIR,
    PRIVATE_SYSTEM,
    PUBLIC_SYSTEM,
    SPLITS,
    Example,
    bundled_split,
    load_examples,
    public_instruction,
    render_prompt,
)

__all__ = ["DATA_DIR", "PRIVATE_SYSTEM", "PUBLIC_SYSTEM", "SPLITS", "Example", "bundled_split", "load_examples",
           "public_instruction", "render_prompt"]
