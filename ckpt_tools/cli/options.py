"""Option types and the output options every command accepts."""

from __future__ import annotations

import math

import click

from .output import Output


def output_options(f):
    """--json, -q, -v and --no-progress, accepted after the command name as well as before it."""
    f = click.option("--no-progress", is_flag=True, help="No progress bar.")(f)
    f = click.option("-v", "--verbose", is_flag=True, help="Warnings, details, and tracebacks on failure.")(f)
    f = click.option("-q", "--quiet", is_flag=True, help="Only the summary and errors.")(f)
    f = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")(f)
    return f


def command_output(ctx: click.Context, **opts) -> Output:
    """The sink of this run: the group's output options merged with the command's own, kept on
    the context object so that the exit-code handler knows about ``-v`` too."""
    obj = ctx.find_root().obj
    obj.output = obj.output.merged(**opts)
    return obj.output


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


def finite(ctx, param, value):
    """A callback for float options: FloatRange lets nan and inf through; a bound must be a number."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value
