"""Run the real ``ckpt-tools`` on a pseudo-terminal, as a user at a terminal would.

The program gets a new session whose controlling terminal is the pty (``pty.fork``): its
stdin, stdout and stderr are the terminal, Ctrl-C typed there is SIGINT, and what it shows
(colours, questions, progress bars) is read back from the master side until EOF.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COLUMNS, LINES = 120, 40
CTRL_C = b"\x03"
# CPython loses a SIGINT that lands between input()'s prompt and its read(): the read then
# blocks as if nothing had been typed. A user presses Ctrl-C again; so does the runner, when
# the screen has shown nothing new for this long after one.
CTRL_C_AGAIN_AFTER = 3.0


@dataclass
class Seen:
    """What the terminal showed (stdout and stderr together, as a user sees them) and the exit code."""

    returncode: int
    screen: str


def terminal_env(**changes: str | None) -> dict[str, str]:
    """The test's environment as a terminal session would have it: a TERM, no NO_COLOR
    (unless asked), nothing online; ``None`` removes a variable."""
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env |= {"TERM": "xterm-256color", "HF_HUB_OFFLINE": "1"}
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_in_terminal(*args, answers: tuple[tuple[str, bytes], ...] = (),
                    env: dict[str, str] | None = None, timeout: float = 120.0) -> Seen:
    """``ckpt-tools ARGS`` on a new pty. ``answers``: (text, keys) in order: once the screen
    shows ``text`` (a question), ``keys`` are typed. Reads until EOF; fails after ``timeout``."""
    env = terminal_env() if env is None else env
    argv = [sys.executable, "-m", "ckpt_tools.cli", *map(str, args)]
    pid, master = pty.fork()
    if pid == 0:   # the child: stdin/stdout/stderr are the pty's slave, its controlling terminal
        try:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
            os.chdir(REPO)
            os.execve(sys.executable, argv, env)
        finally:
            os._exit(127)
    out = bytearray()
    pending = list(answers)
    asked_from = 0   # where to look for the next question: past the one answered last
    ctrl_c: tuple[float, int] | None = None   # when Ctrl-C was typed last, the screen's length then
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, 9)
                raise TimeoutError(f"no EOF after {timeout} s; the screen so far:\n{out.decode(errors='replace')}")
            ready, _, _ = select.select([master], [], [], min(left, 0.5))
            if not ready:
                if ctrl_c and time.monotonic() - ctrl_c[0] > CTRL_C_AGAIN_AFTER \
                        and len(out) <= ctrl_c[1] + len("^C"):   # only its echo since: lost
                    os.write(master, CTRL_C)
                    ctrl_c = (time.monotonic(), len(out))
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:   # EIO: every slave descriptor is closed, the program has gone
                break
            if not chunk:
                break
            out += chunk
            while pending and (at := out.find(pending[0][0].encode(), asked_from)) >= 0:
                asked_from = at + len(pending[0][0])
                keys = pending.pop(0)[1]
                os.write(master, keys)
                ctrl_c = (time.monotonic(), len(out)) if keys == CTRL_C else None
    finally:
        os.close(master)
        _, status = os.waitpid(pid, 0)
    return Seen(os.waitstatus_to_exitcode(status), out.decode("utf-8", errors="replace"))
