"""Run the ckpt-tools CLI with a faulty file-operations seam: the crash and fault tests' entry.

    python tests/fault_entry.py SPEC ckpt-tools-arguments...

SPEC is a ``tests/faulty_fs.py`` spec (``after_write:3``, ``enospc@write:2,eio@remove:1``);
an empty SPEC runs the CLI with the local file operations. The exit status is the CLI's.
"""

from __future__ import annotations

import sys

from pathlib import Path

from faulty_fs import FaultyFileOps     # beside this file: on sys.path when run as a script


def run(spec: str | None, argv: list[str]) -> int:
    """``ckpt_tools.cli.main(argv)`` with the file operations that ``spec`` describes."""
    from ckpt_tools import cli
    obj = cli.CliContext(fs=FaultyFileOps(spec)) if spec else None
    return cli.main(argv, obj=obj)


def command(spec: str | None) -> list[str]:
    """The command line prefix that runs the CLI under ``spec`` (then the CLI's arguments)."""
    return [sys.executable, str(Path(__file__).resolve()), spec or ""]


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(run(sys.argv[1], sys.argv[2:]))
