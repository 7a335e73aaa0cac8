"""The progress bar of a generation on the command line (:func:`generation_bar`), shared by demo and generate."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["PROGRESS_DELAY", "generation_bar"]

PROGRESS_DELAY = 2.0  # seconds before a generation's progress bar shows (a short run shows none)


@contextlib.contextmanager
def generation_bar(model: Any, total: int, desc: str) -> Iterator[None]:
    """A progress bar with an ETA on stderr (a terminal only) over ``total`` new tokens, ticked by each
    forward of ``model`` after its prefill (a torch module; anything else gets no bar); it shows once
    the run is longer than :data:`PROGRESS_DELAY` seconds and is gone when the run ends."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, disable=None, leave=False, delay=PROGRESS_DELAY)
    forwards = []

    def tick(module: Any, inputs: Any, output: Any) -> None:
        forwards.append(1)
        if len(forwards) > 1 and bar.n < total:  # the first forward is the prompt's prefill
            bar.update(1)

    hook = model.register_forward_hook(tick)
    try:
        yield
    finally:
        hook.remove()
        bar.close()
