"""The shared test case builders live in :mod:`logitfuse.testing.generation` (kept for old imports)."""

from logitfuse.testing.generation import *  # noqa: F401,F403
