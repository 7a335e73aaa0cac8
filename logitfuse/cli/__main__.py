"""``python -m logitfuse.cli``: the ``logitfuse`` command."""

import sys

from logitfuse.cli import main

sys.exit(main())
