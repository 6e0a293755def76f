"""The ``ckpt-tools`` command line: a thin layer that renders records and plans.

Exit codes: 0 done / healthy, 1 problems found or actions failed, 2 usage error or a
root that cannot be scanned, 75 a lock is held by another run, 130 interrupted.
"""

from __future__ import annotations

import gc
import math
import os
import sys
from dataclasses import dataclass

import click

from . import __version__
from .names import shown, shown_lines

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 75, 130


@dataclass
class Output:
    json: bool = False
    quiet: bool = False
    verbose: bool = False
    progress: bool = True

    def echo(self, text: str = "") -> None:
        if not self.json:
            click.echo(text)

    def note(self, text: str) -> None:
        """A line for people on stderr (never mixed into --json output)."""
        if not self.quiet:
            click.echo(shown(text), err=True)

    def document(self, doc) -> None:
        """``--json``'s one document on stdout, in UTF-8 whatever the locale (RFC 8259)."""
        from .report import dumps
        text = dumps(doc)
        buffer = getattr(sys.stdout, "buffer", None)
        if buffer is None:   # a text-only stand-in for stdout (an in-process caller's)
            click.echo(text)
            return
        sys.stdout.flush()
        buffer.write(text.encode("utf-8") + b"\n")
        buffer.flush()

    def bar(self, total: int, desc: str):
        """A tqdm bar on stderr, only on a terminal and when wanted; else None."""
        if not self.progress or self.quiet or not sys.stderr.isatty() or total < 2:
            return None
        from tqdm import tqdm
        try:
            size = os.get_terminal_size(sys.stderr.fileno())
        except OSError:
            size = os.terminal_size((0, 0))
        # a terminal that reports no size (a bare pty) would get a hidden, zero-width bar
        return tqdm(total=total, desc=shown(desc), unit="ckpt", file=sys.stderr, leave=False,
                    ncols=None if size.columns else 80, nrows=None if size.lines else 24)


def _merge(ctx: click.Context, **local) -> Output:
    base: Output = ctx.find_object(Output) or Output()
    return Output(json=base.json or local.get("as_json", False),
                  quiet=base.quiet or local.get("quiet", False),
                  verbose=base.verbose or local.get("verbose", False),
                  progress=base.progress and not local.get("no_progress", False))


def output_options(f):
    """--json, -q, -v and --no-progress, accepted after the subcommand as well as before it."""
    f = click.option("--no-progress", is_flag=True, help="No progress bar.")(f)
    f = click.option("-v", "--verbose", is_flag=True, help="Warnings, details, and tracebacks on failure.")(f)
    f = click.option("-q", "--quiet", is_flag=True, help="Only the summary and errors.")(f)
    f = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")(f)
    return f


def parse_duration(text: str) -> float:
    """'90s', '15m', '1h', '2d', '1w' or plain seconds → seconds: finite and not negative.

    NaN would compare false with every age and timeout (turning ``--min-age`` off, making a
    lock wait forever), and an infinite or overflowing value is no time anyone means."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            value = float(t[:-1]) * units[t[-1]]
        else:
            value = float(t)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a duration like 30m, 1h or 2d") from None
    return _finite_seconds(value, text)


def _finite_seconds(value: float, shown) -> float:
    if not math.isfinite(value):
        raise click.BadParameter(f"{shown!r} is not a finite duration")
    if value < 0:
        raise click.BadParameter(f"{shown!r}: a duration cannot be negative")
    return value


class Duration(click.ParamType):
    """A duration option (``--min-age``, ``--lock-timeout``): ``parse_duration``, so that
    every command refuses the same values the same way (exit 2, naming the option)."""

    name = "DURATION"

    def convert(self, value, param, ctx):
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return _finite_seconds(float(value), value)
            return parse_duration(value)
        except click.BadParameter as exc:
            self.fail(exc.message, param, ctx)


class PathArgument(click.Path):
    """A path argument that may not be empty: ``''`` would name the current directory, which
    nobody means when a variable in a cron line came out empty."""

    def convert(self, value, param, ctx):
        if isinstance(value, (str, bytes)) and not value:
            self.fail("an empty path names no directory", param, ctx)
        return super().convert(value, param, ctx)


class _Group(click.Group):
    """The command group. prune and migrate live in their own modules, which add their
    command to the group (``register``) when it is first asked for: starting ``audit``
    does not import them. A module that fails to import fails that command, loudly."""

    _MODULES = {"prune": "cli_prune", "migrate": "cli_migrate"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._MODULES))

    def get_command(self, ctx: click.Context, name: str):
        if name in self._MODULES and name not in self.commands:
            import importlib
            importlib.import_module(f"{__package__}.{self._MODULES[name]}").register(self)
        return super().get_command(ctx, name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckpt-tools")
@output_options
@click.pass_context
def cli(ctx, as_json, quiet, verbose, no_progress):
    """Audit, validate, prune and migrate PEFT/LoRA mixture-of-experts checkpoints."""
    ctx.obj = Output(json=as_json, quiet=quiet, verbose=verbose, progress=not no_progress)


def _scan(out: Output, roots, **kwargs):
    from .api import scan
    bar = None
    state = {}

    def progress(i, total):
        if "bar" not in state:
            state["bar"] = out.bar(total, "validating")
        b = state["bar"]
        if b is not None:
            b.update(1)

    try:
        return scan(*roots, progress=progress, **kwargs)
    finally:
        bar = state.get("bar")
        if bar is not None:
            bar.close()


@cli.command()
@click.argument("roots", nargs=-1, required=True, type=PathArgument())
@click.option("--min-age", type=Duration(), default="1h", show_default=True,
              help="A checkpoint whose newest file is younger is in progress.")
@click.option("--strict", is_flag=True, help="Also exit 1 when any checkpoint is legacy or redundant.")
@click.option("--jobs", "-j", type=click.IntRange(0, 256), default=0, show_default=True,
              help="Worker processes validating in parallel; 0: one per CPU (at most 8).")
@output_options
@click.pass_context
def audit(ctx, roots, min_age, strict, jobs, **opts):
    """Find every checkpoint under ROOTS, classify it, and show what prune could reclaim."""
    from .records import BROKEN, LEGACY, REDUNDANT
    from .report import render_audit
    out = _merge(ctx, **opts)
    if _as_program:
        # The scan's records live until the process ends and hold no cycles: the cyclic
        # collector would only walk them again and again while the report is built. (An
        # in-process caller keeps its collector.)
        gc.disable()
    result = _scan(out, roots, min_age_s=min_age, jobs=jobs)
    if out.json:
        out.document(result.to_dict())
    else:
        click.echo(render_audit(result, verbose=out.verbose, quiet=out.quiet))
    counts = result.by_status()
    code = EXIT_OK
    if counts[BROKEN] or any(p.is_error for p in result.problems):
        code = EXIT_PROBLEMS
    if strict and (counts[LEGACY] or counts[REDUNDANT]):
        code = EXIT_PROBLEMS
    if _as_program:
        # All is said: freeing the records one by one and the interpreter's teardown would
        # take a tenth of a second on a large tree, and an audit leaves nothing to clean up.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    ctx.exit(code)


@cli.command()
@click.argument("checkpoints", nargs=-1, required=True, type=PathArgument())
@click.option("--deep", is_flag=True, help="Read every tensor: NaN/Inf and a content hash per file.")
@click.option("--min-age", type=Duration(), default="1h", show_default=True,
              help="A checkpoint whose newest file is younger is reported in progress.")
@output_options
@click.pass_context
def validate(ctx, checkpoints, deep, min_age, **opts):
    """Validate the named checkpoints (or every checkpoint under a named directory)."""
    from .report import render_validate, validate_doc
    from .validator import DEEP, FULL
    out = _merge(ctx, **opts)
    result = _scan(out, checkpoints, level=DEEP if deep else FULL, min_age_s=min_age)
    if not result.checkpoints:
        raise click.ClickException(f"no checkpoint found under {', '.join(checkpoints)}")
    if out.json:
        out.document(validate_doc(result))
    else:
        text = render_validate(result, verbose=out.verbose, quiet=out.quiet)
        if text:
            click.echo(text)
    bad = any(c.errors for c in result.checkpoints) or any(p.is_error for p in result.problems)
    ctx.exit(EXIT_PROBLEMS if bad else EXIT_OK)


def _print_traceback(exc: BaseException) -> None:
    """``-v``'s traceback on stderr, with control characters in its texts made visible."""
    import traceback
    for chunk in traceback.TracebackException.from_exception(exc).format():
        if chunk.startswith("  File "):   # a frame: its lines, from the source files
            text = shown_lines(chunk.rstrip("\n").split("\n"))
        else:                             # a heading, or an exception's text: may quote a name
            text = ("\n" if chunk.startswith("\n") else "") + shown(chunk.strip("\n"))
        click.echo(text, err=True)


def _speak_any_locale() -> None:
    """Text that a locale's encoding cannot say (a name in Japanese under latin-1) is written
    as a backslash escape, not turned into a UnicodeEncodeError. Control characters and bytes
    that are not UTF-8 never get here: ``shown`` made them visible escapes already."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):   # not a TextIOWrapper; or already closed
            pass


# main() was called without argv: this process is the ckpt-tools command (see audit)
_as_program = False


def main(argv=None) -> int:
    """Entry point: one clear line and an exit code for every failure, never a traceback.

    Without ``argv`` it is the program itself, reading ``sys.argv``: then ``audit`` ends the
    process as soon as its report is written."""
    global _as_program
    _as_program = argv is None
    if _as_program:
        _speak_any_locale()
    from .scanner import ScanError
    verbose = "-v" in (argv or sys.argv[1:]) or "--verbose" in (argv or sys.argv[1:])
    try:
        rv = cli.main(args=argv, prog_name="ckpt-tools", standalone_mode=False)
        return rv if isinstance(rv, int) else EXIT_OK
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.message = shown(exc.message)   # it may quote an argument: a name
        if isinstance(exc, click.FileError):
            exc.ui_filename = shown(exc.ui_filename)
        exc.show()
        return EXIT_USAGE if isinstance(exc, click.UsageError) else exc.exit_code if exc.exit_code != 1 else EXIT_USAGE
    except click.exceptions.Abort:
        click.echo("ckpt-tools: interrupted", err=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        click.echo("ckpt-tools: interrupted", err=True)
        return EXIT_INTERRUPTED
    except ScanError as exc:
        click.echo(shown(f"ckpt-tools: error: {exc}"), err=True)
        return EXIT_USAGE
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - the single top-level handler
        if verbose:
            _print_traceback(exc)
        click.echo(shown(f"ckpt-tools: error: {type(exc).__name__}: {exc}")
                   + ("" if verbose else " (run with -v for the traceback)"), err=True)
        return EXIT_PROBLEMS


if __name__ == "__main__":
    sys.exit(main())
