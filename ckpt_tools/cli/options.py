"""Option types and the output options every command accepts."""

from __future__ import annotations

import functools
import math

import click

from .. import durations
from .output import Output


def output_options(f):
    """--json, -q, -v, --no-progress and --no-color, accepted after the command name as well as
    before it."""
    f = click.option("--no-color", is_flag=True,
                     help="No colour, even on a terminal (so does a non-empty NO_COLOR).")(f)
    f = click.option("--no-progress", is_flag=True, help="No progress bar.")(f)
    f = click.option("-v", "--verbose", is_flag=True, help="Warnings, details, and tracebacks on failure.")(f)
    f = click.option("-q", "--quiet", is_flag=True, help="Only the summary and errors.")(f)
    f = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")(f)
    return f


def walk_options(f):
    """--one-file-system and --exclude GLOB (repeatable), handed to the command as one
    ``walk`` argument, a ``scanner.WalkOptions`` (built when the command runs: --help imports
    no scanner)."""
    @functools.wraps(f)
    def command(*args, one_file_system, exclude, **kwargs):
        from ..scanner import WalkOptions
        return f(*args, walk=WalkOptions(one_file_system, tuple(exclude)), **kwargs)

    command = click.option(
        "--exclude", metavar="GLOB", multiple=True,
        help="Leave out every directory whose name or path relative to its root matches GLOB "
             "(repeatable): nothing under it is read or touched.")(command)
    return click.option(
        "--one-file-system", "-x", is_flag=True,
        help="Do not enter directories on other file systems (mount points), as du -x.")(command)


def storage_options(f):
    """--storage-option KEY=VALUE (repeatable), handed to the command as one ``storage_options``
    dict: the fsspec file system's options for roots given as URLs (``endpoint_url=...``,
    ``anon=true``, ``client_kwargs.region_name=...``)."""
    @functools.wraps(f)
    def command(*args, storage_option, **kwargs):
        from ..storage import parse_storage_options
        try:
            options = parse_storage_options(storage_option)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--storage-option'") from None
        return f(*args, storage_options=options, **kwargs)

    return click.option(
        "--storage-option", metavar="KEY=VALUE", multiple=True,
        help="For roots given as URLs (s3://, gs://, memory://...): an option of the fsspec "
             "file system, e.g. endpoint_url=http://127.0.0.1:9000 or anon=true (repeatable). "
             "Credentials come from the environment and profiles, as boto's do.")(command)


def command_output(ctx: click.Context, **opts) -> Output:
    """The sink of this run: the group's output options merged with the command's own, kept on
    the context object so that the exit-code handler knows about ``-v`` too."""
    obj = ctx.find_root().obj
    obj.output = obj.output.merged(**opts)
    return obj.output


def parse_duration(text: str) -> float:
    """``durations.parse_duration`` for options: a bad value is click's usage error."""
    try:
        return durations.parse_duration(text)
    except durations.BadDuration as exc:
        raise click.BadParameter(str(exc)) from None


def _finite_seconds(value: float, shown) -> float:
    try:
        return durations.finite_seconds(value, shown)
    except durations.BadDuration as exc:
        raise click.BadParameter(str(exc)) from None


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


def finite(ctx, param, value):
    """A callback for float options: FloatRange lets nan and inf through; a bound must be a number."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value
