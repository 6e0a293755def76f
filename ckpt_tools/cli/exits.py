"""The one place where a failure becomes a line on stderr and an exit code.

The codes mean the same for every command (README, "Exit status"):

* 0   done, or healthy;
* 1   problems found, or something planned failed (the run went on over the others);
* 2   usage error or refusal: a bad option or path, a root that cannot be scanned, a
      ``--log`` or ``--lock`` that is not a regular file, no ``--yes`` and no terminal;
* 75  the lock is held by another run (sysexits' EX_TEMPFAIL: try again later);
* 130 interrupted;
* 141 stdout was closed (``| head``): what was under way finished, nothing else was started
      (128 + SIGPIPE, what a shell reports for a program the signal ended).

Commands return 0 or 1 themselves; everything else reaches ``handle`` as an exception.
The library's exceptions that are the user's to fix derive from the kinds in
``ckpt_tools.errors``, which carry their code; that module imports nothing, so this one
imports none of the modules that raise them (a command's failure must not make ``--help``
slower). Any other exception is a failure of ckpt-tools itself (exit 1, with -v's traceback).
"""

from __future__ import annotations

import enum

import click

from ..errors import CkptToolsError, ProblemsError, TryAgain, UsageError, message_of, spelled
from ..names import shown
from .output import PROGRAM, Output


# The flag of each argument that the library's messages name (``errors.Wording``): a Python
# caller reads "give rank or energy", the command line's user "give --rank N or --energy F".
FLAGS = {"base_model": "--base-model", "rank": "--rank", "energy": "--energy",
         "max_error": "--max-error", "lora_alpha": "--lora-alpha", "verify": "--verify",
         "keep_last": "--keep-last", "keep_best": "--keep-best", "keep_every": "--keep-every",
         "keep_within": "--keep-within", "keep_steps": "--keep-step", "keep_*": "--keep-*",
         "strip": "--strip", "delete": "--delete"}


def in_flags(message: str) -> str:
    """``message`` in the command line's words: each argument it names as its flag."""
    return spelled(message, FLAGS)


class ExitCode(enum.IntEnum):
    OK = 0
    PROBLEMS = ProblemsError.exit_code
    USAGE = UsageError.exit_code
    LOCKED = TryAgain.exit_code
    INTERRUPTED = 130
    STDOUT_CLOSED = 141


def _show_click_error(exc: click.ClickException) -> None:
    """click's failure in the program's one voice: ``ckpt-tools: error: …``, then, for a usage
    error, where to look (``Try 'ckpt-tools prune --help' for help.``)."""
    if isinstance(exc, click.FileError):
        exc.ui_filename = shown(exc.ui_filename)
    click.echo(f"{PROGRAM}: error: {shown(exc.format_message())}", err=True)
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        click.echo(f"Try '{ctx.command_path} --help' for help.", err=True)


def exit_code_of(exc: BaseException) -> int:
    """The code ``handle`` returns for ``exc``, saying nothing (for ``prune --log``'s end record)."""
    if isinstance(exc, click.exceptions.Exit):
        return exc.exit_code
    if isinstance(exc, (click.exceptions.Abort, KeyboardInterrupt)):
        return ExitCode.INTERRUPTED
    if isinstance(exc, click.ClickException):
        return ExitCode.USAGE
    if isinstance(exc, BrokenPipeError):
        return ExitCode.STDOUT_CLOSED
    if isinstance(exc, CkptToolsError):
        return ExitCode(exc.exit_code)
    return ExitCode.PROBLEMS


def handle(exc: BaseException, out: Output | None = None) -> int:
    """Say ``exc`` in one line on stderr (``-v``: its traceback first) and return its exit code.

    ``click.exceptions.Exit`` is no failure: its code is returned as it is."""
    out = out or Output()
    if isinstance(exc, click.exceptions.Exit):
        return exc.exit_code
    if isinstance(exc, (click.exceptions.Abort, KeyboardInterrupt)):
        click.echo(f"{PROGRAM}: interrupted", err=True)
        return ExitCode.INTERRUPTED
    if isinstance(exc, click.ClickException):   # a usage error, or a refusal worded by click
        _show_click_error(exc)
        return ExitCode.USAGE
    if isinstance(exc, BrokenPipeError):        # the reader went away: nothing left to say there
        return ExitCode.STDOUT_CLOSED
    if isinstance(exc, TryAgain):
        out.say(f"{PROGRAM}: {exc}; nothing done. Try again later or raise --lock-timeout.")
        return ExitCode(exc.exit_code)
    if isinstance(exc, CkptToolsError):
        out.error(in_flags(message_of(exc)))
        return ExitCode(exc.exit_code)
    if out.verbose:
        out.traceback(exc)
    out.say(f"{PROGRAM}: error: {type(exc).__name__}: {exc}"
            + ("" if out.verbose else " (run with -v for the traceback)"))
    return ExitCode.PROBLEMS
