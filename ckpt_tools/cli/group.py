"""The ``ckpt-tools`` group: the global options, the run's context object, and commands that are
imported only when named (click's lazy-group recipe), so that ``--help`` and a command's
start pay for no other command's imports."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field

import click

from .. import __version__
from . import exits
from .options import output_options
from .output import Output, wants_color

# name → (the command, as "module:attribute"; its summary, for --help). The summary is the
# first paragraph of the command's docstring, kept here so that listing the commands imports
# none of them (tests/test_cli_package.py checks that the two agree).
COMMANDS: dict[str, tuple[str, str]] = {
    "audit": ("ckpt_tools.cli.audit:audit",
              "Find every checkpoint under ROOTS, classify it, and show what prune could reclaim."),
    "validate": ("ckpt_tools.cli.validate:validate",
                 "Validate the named checkpoints (or every checkpoint under a named directory)."),
    "prune": ("ckpt_tools.cli.prune:prune",
              "Delete the merged weights of redundant checkpoints under ROOTS."),
    "migrate": ("ckpt_tools.cli.migrate:migrate",
                "Convert every non-canonical checkpoint under SRC into the canonical layout "
                "under DST."),
    "restore": ("ckpt_tools.cli.restore:restore",
                "Move checkpoints that prune --delete put in a run's trash back to their names."),
}


@dataclass
class CliContext:
    """What one run of the command line shares with its command (click's ``ctx.obj``).

    ``fs`` is the file-operations seam handed to the commands that modify files (prune,
    migrate); None means the local file system. A test entry point passes its own object
    (``cli.main(args, obj=CliContext(fs=...), standalone_mode=False)``); otherwise the group
    makes one. ``program`` is true only when this process is the ``ckpt-tools`` command
    itself: a command may then end the process as soon as all is said (see ``finish``)."""

    fs: object | None = None
    program: bool = False
    output: Output = field(default_factory=Output)

    def finish(self, code: int) -> int:
        """End a command with ``code``. As the program, the process ends here without the
        interpreter's teardown: freeing a large scan's records one by one, after everything
        was written, costs a tenth of a second on 10,000 checkpoints and does nothing."""
        if self.program:
            import os
            import sys
            self.output.flush_stdout()
            sys.stderr.flush()
            os._exit(_closed_stdout_says(self.output, code))
        return code


def closest_commands(name: str, commands: list[str]) -> list[str]:
    """The commands a mistyped ``name`` most likely meant: those it begins (``val``), else the
    closest by difflib's ratio (``prun``, ``adit``, ``migrat``), without the distant runners-up
    (``valdiate`` means validate, not audit); none when nothing is close."""
    import difflib   # only on this error: --help and every command start without it
    typed = name.lower()
    begun = [c for c in commands if typed and c.startswith(typed)]
    if begun:
        return begun
    ratios = {c: difflib.SequenceMatcher(None, typed, c).ratio() for c in commands}
    best = max(ratios.values(), default=0.0)
    return sorted((c for c, r in ratios.items() if r >= max(0.6, best - 0.1)),
                  key=lambda c: -ratios[c])


class LazyGroup(click.Group):
    """A group whose commands are imported on first use, and whose failures all end in
    ``exits.handle``: the same exit codes for every command, whoever invokes the group."""

    def __init__(self, *args, lazy_commands: dict[str, tuple[str, str]], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_commands))

    def get_command(self, ctx: click.Context, name: str):
        if name in self.lazy_commands and name not in self.commands:
            module, attribute = self.lazy_commands[name][0].split(":")
            command = getattr(importlib.import_module(module), attribute)
            self.add_command(command, name)
        return super().get_command(ctx, name)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        """click's, but an unknown command is compared with every command in the table, not
        only with those already imported (none, in a fresh process: ``prun`` got no hint)."""
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError:
            name = click.utils.make_str(args[0])
            if name.startswith("-") or self.get_command(ctx, name) is not None:
                raise   # an option's error, or one inside a command: not a missing command
            meant = closest_commands(name, self.list_commands(ctx))
            hint = ("" if not meant else f" Did you mean {meant[0]!r}?" if len(meant) == 1
                    else f" Did you mean one of: {', '.join(map(repr, meant))}?")
            raise click.UsageError(f"No such command {name!r}.{hint}", ctx) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The commands and their summaries, from the table: none is imported."""
        names = [n for n in self.list_commands(ctx) if n in self.lazy_commands]
        if not names:
            return
        limit = formatter.width - 6 - max(map(len, names))
        rows = [(n, click.Command(n, help=inspect.cleandoc(self.lazy_commands[n][1]))
                 .get_short_help_str(limit)) for n in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, KeyboardInterrupt, EOFError):
            raise   # click turns an interrupt into Abort (closing the terminal's ^C line)
        except Exception as exc:   # noqa: BLE001 - the single top-level handler
            obj = ctx.find_object(CliContext)
            ctx.exit(exits.handle(exc, obj.output if obj else None))


EXAMPLES = """Examples:

\b
  ckpt-tools audit results/             # what is there; what prune frees
  ckpt-tools validate results/run_trainer/checkpoint-4
  ckpt-tools prune --dry-run results/   # what a real run would delete
  ckpt-tools migrate --dry-run results/ results-peft/
  ckpt-tools prune --help               # each command: its options, examples
"""


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, epilog=EXAMPLES,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckpt-tools")
@output_options
@click.pass_context
def cli(ctx, as_json, quiet, verbose, no_progress, no_color):
    """Audit, validate, prune and migrate PEFT/LoRA mixture-of-experts checkpoints."""
    if ctx.obj is None:
        ctx.obj = CliContext()
    ctx.obj.output = Output(json=as_json, quiet=quiet, verbose=verbose, progress=not no_progress,
                            color=wants_color(no_color))


def main(argv=None, *, obj: CliContext | None = None) -> int:
    """Entry point: one clear line and an exit code for every failure, never a traceback.

    Without ``argv`` it is the program itself, reading ``sys.argv`` (see ``CliContext``)."""
    program = argv is None
    if program:
        from .output import speak_any_locale
        speak_any_locale()
    obj = obj or CliContext(program=program)
    try:
        rv = cli.main(args=argv, prog_name="ckpt-tools", standalone_mode=False, obj=obj)
        code = int(rv) if isinstance(rv, int) else exits.ExitCode.OK.value
    except (Exception, KeyboardInterrupt) as exc:   # noqa: BLE001 - parsing errors, ^C
        code = int(exits.handle(exc, obj.output))
    if program:   # said now, while a closed pipe can still change the exit code
        obj.output.flush_stdout()
    return _closed_stdout_says(obj.output, code)


def _closed_stdout_says(output: Output, code: int) -> int:
    """A run whose stdout's reader went away did not say all it had to: that is the exit
    code, unless the run has a worse one of its own (a usage error, a lock, a failure)."""
    if output.stdout_lost and code == exits.ExitCode.OK:
        return exits.ExitCode.STDOUT_CLOSED
    return code
