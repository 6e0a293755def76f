"""The ``ckpt-tools`` command line: a thin layer that renders records and plans.

``group`` holds the group, its lazily imported commands and ``main``; each command lives in a
module of its own (``audit``, ``validate``, ``prune``, ``migrate``); ``output`` is the one
sink they write through and ``exits`` the one place where a failure becomes an exit code.
"""

from .group import CliContext, cli, main

__all__ = ["CliContext", "cli", "main"]
