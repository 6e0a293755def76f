"""The former home of prune's execution, kept because the README and docs/prune.md name
``ckpt_tools.prune_exec``: the same names as ``ckpt_tools.prune.execute``."""

from .prune.execute import *  # noqa: F401,F403
from .prune.execute import __all__  # noqa: F401
