"""The kinds of failure the exit codes tell apart (README, "Exit status").

Every exception of the library that is the user's to fix derives from one class below, and
its ``exit_code`` is what the command line exits with (``cli/exits.py``). This module imports
nothing, so that the command line can tell them apart without importing the modules that
raise them (``--help`` stays cheap). Any other exception is a failure of ckpt-tools itself.
"""


class CkptToolsError(Exception):
    """A failure the user can act on: one line, naming the file and the cause."""

    exit_code = 1


class ProblemsError(CkptToolsError):
    """Something planned failed, and the run says so (exit 1)."""

    exit_code = 1


class UsageError(CkptToolsError):
    """A refusal: a bad path or option, a root that cannot be scanned, a ``--log`` or
    ``--lock`` that is not a regular file (exit 2)."""

    exit_code = 2


class TryAgain(CkptToolsError):
    """Another run holds what this one needs; nothing was done (exit 75, EX_TEMPFAIL)."""

    exit_code = 75
