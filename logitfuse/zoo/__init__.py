"""The model zoo, moving into a package: ``zoo.py`` is ``installer.py`` unchanged (the next commit splits it)."""

from logitfuse.zoo.installer import *  # noqa: F403
from logitfuse.zoo.installer import __all__, _bar, _installed_version, _natural_key, load  # noqa: F401
