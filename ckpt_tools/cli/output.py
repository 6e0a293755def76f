"""The one output sink of the command line: every command writes through an ``Output``.

Three modes, chosen once from the global options: text (a report for people on stdout),
json (one JSON document on stdout and nothing else there) and quiet (only the summary and
errors; the renderers decide what the summary is). Lines for people on stderr (errors,
skipped and failed files, a held lock) go out in every mode: cron mails them.

Names are data (see ``names``): every line leaves through ``shown``/``shown_lines`` here,
and every document through ``report.dumps``, so no name can drive a terminal, whichever
command printed it. Renderers escape a name before measuring a column's width (so tables
stay aligned); escaping is idempotent, so the sink's pass changes nothing there.
"""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

import click

from ..names import shown, shown_lines

PROGRAM = "ckpt-tools"


@dataclass
class Output:
    json: bool = False
    quiet: bool = False
    verbose: bool = False
    progress: bool = True
    color: bool = False   # styles in the report on stdout: see ``wants_color``
    # stdout's reader went away (``| head``): set by the first write that failed, or by
    # ``stdout_closed``'s probe; what is still to say on stdout is dropped from then on
    stdout_lost: bool = field(default=False, compare=False)

    def merged(self, *, as_json: bool = False, quiet: bool = False, verbose: bool = False,
               no_progress: bool = False, no_color: bool = False) -> Output:
        """These options given after the command name as well as before it."""
        return Output(json=self.json or as_json, quiet=self.quiet or quiet,
                      verbose=self.verbose or verbose, progress=self.progress and not no_progress,
                      color=self.color and not no_color, stdout_lost=self.stdout_lost)

    # --- stdout ---------------------------------------------------------------------

    def report(self, lines: Iterable[str], *, err: bool = False) -> None:
        """A rendered report for people, one line per item of ``lines``; nothing in json
        mode, unless ``err`` sends it to stderr (a plan shown before a question)."""
        if self.json and not err:
            return
        lines = list(lines)
        text = shown_lines(lines)
        if self.color:   # only then may a renderer have styled a line (``report.Styled``)
            from ..report import Styled
            if any(isinstance(line, Styled) for line in lines):
                # a styled line was escaped cell by cell before its escape codes went in
                text = "\n".join(line if isinstance(line, Styled) else shown(line) for line in lines)
        if err:
            click.echo(text, err=True)
        else:
            self._to_stdout(lambda: click.echo(text))

    def document(self, doc) -> None:
        """``--json``'s one document on stdout, in UTF-8 whatever the locale (RFC 8259)."""
        from ..report import dumps
        text = dumps(doc)
        buffer = getattr(sys.stdout, "buffer", None)
        if buffer is None:   # a text-only stand-in for stdout (an in-process caller's)
            self._to_stdout(lambda: click.echo(text))
            return

        def write() -> None:
            sys.stdout.flush()
            buffer.write(text.encode("utf-8") + b"\n")
            buffer.flush()
        self._to_stdout(write)

    def stdout_closed(self) -> bool:
        """Whether stdout's reader has gone: a write failed, or (probed without writing) the
        pipe has no reader left. A long run asks between two units of work, so that it stops
        at a boundary rather than at whichever write would have failed."""
        if not self.stdout_lost and _reader_gone(sys.stdout):
            self._lose_stdout()
        return self.stdout_lost

    def flush_stdout(self) -> None:
        """Whatever is still buffered for stdout, out now (a closed pipe is remembered)."""
        self._to_stdout(sys.stdout.flush)

    def _to_stdout(self, write) -> None:
        """``write`` to stdout, unless its reader is gone; a closed pipe is remembered, never
        raised: it must not interrupt whatever the run is doing between two lines."""
        if self.stdout_lost:
            return
        try:
            write()
        except BrokenPipeError:
            self._lose_stdout()

    def _lose_stdout(self) -> None:
        self.stdout_lost = True
        # what is still buffered would fail again at every flush, the interpreter's last one
        # included: it goes to /dev/null instead
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, sys.stdout.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError):   # no real file descriptor (a test's stand-in)
            pass

    # --- stderr ---------------------------------------------------------------------

    def say(self, text: str) -> None:
        """One line on stderr in every mode: what cron must mail (a skip, a failure)."""
        click.echo(shown(text), err=True)

    def error(self, text: str) -> None:
        """``ckpt-tools: error: TEXT`` on stderr, in every mode."""
        self.say(f"{PROGRAM}: error: {text}")

    def note(self, text: str) -> None:
        """A line for people on stderr, left out by ``--quiet``."""
        if not self.quiet:
            self.say(text)

    def ask(self, question: str) -> bool:
        """A yes/no question on stderr (a terminal is there: the caller checked)."""
        return click.confirm(shown(question), default=False, err=True)

    def bar(self, total: int, desc: str, unit: str):
        """A tqdm bar on stderr counting ``total`` things of ``unit`` (``file``, ``checkpoint``:
        what the caller counts, shown as ``file/s``), only on a terminal and when wanted;
        else None."""
        if not self.progress or self.quiet or not sys.stderr.isatty() or total < 2:
            return None
        from tqdm import tqdm
        try:
            size = os.get_terminal_size(sys.stderr.fileno())
        except OSError:
            size = os.terminal_size((0, 0))
        # a terminal that reports no size (a bare pty) would get a hidden, zero-width bar
        return tqdm(total=total, desc=shown(desc), unit=unit, file=sys.stderr, leave=False,
                    ncols=None if size.columns else 80, nrows=None if size.lines else 24)

    def traceback(self, exc: BaseException) -> None:
        """``-v``'s traceback on stderr, with control characters in its texts made visible."""
        import traceback
        for chunk in traceback.TracebackException.from_exception(exc).format():
            if chunk.startswith("  File "):   # a frame: its lines, from the source files
                text = shown_lines(chunk.rstrip("\n").split("\n"))
            else:                             # a heading, or an exception's text: may quote a name
                text = ("\n" if chunk.startswith("\n") else "") + shown(chunk.strip("\n"))
            click.echo(text, err=True)


def wants_color(no_color: bool) -> bool:
    """Colour on stdout only where it is a terminal (as click sees it: its test runner's
    ``color=True`` is one) and neither ``--no-color`` nor a non-empty ``NO_COLOR``
    (no-color.org) says no."""
    if no_color or os.environ.get("NO_COLOR"):
        return False
    return not click.utils.should_strip_ansi(sys.stdout)


def _reader_gone(stream) -> bool:
    """True when ``stream`` is a pipe or socket whose other end has closed (POLLERR/POLLHUP,
    which poll reports whatever events are asked for); never for a file or a live terminal."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return False
    poller = select.poll()
    poller.register(fd, 0)
    try:
        ready = poller.poll(0)
    except OSError:
        return False
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in ready)


def speak_any_locale() -> None:
    """Text that a locale's encoding cannot say (a name in Japanese under latin-1) is written
    as a backslash escape, not turned into a UnicodeEncodeError. Control characters and bytes
    that are not UTF-8 never get here: ``shown`` made them visible escapes already."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):   # not a TextIOWrapper; or already closed
            pass
