"""The install lock: what `make test` installs, and the check that it installed exactly that.

    python tools/lock.py check requirements.lock   # every installed package is in the lock, at its version
    python tools/lock.py write requirements.lock   # the running environment becomes the lock

torch is left out on purpose: its build (CPU or CUDA) is the Makefile's ``TORCH`` choice, and
the two builds come from different indexes. The project itself (an editable install) is left
out too. Run with the interpreter of the environment in question.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

UNLOCKED = {"torch", "ckpt-tools"}
HEADER = """\
# Exact versions of every package `make test` installs, the ones the suite last passed with.
# torch is not here: its build is the Makefile's TORCH choice (CPU wheel by default).
# Refresh: `make lock` (runs the suite on the newest releases and, when it passes, rewrites this file).
"""


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def installed() -> dict[str, str]:
    out = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and _norm(name) not in UNLOCKED:
            out[_norm(name)] = dist.version
    return out


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version:
            raise SystemExit(f"{path}:{n}: not an exact pin (NAME==VERSION): {line!r}")
        pins[_norm(name)] = version.strip()
    return pins


def check(path: Path) -> int:
    pins, have = read_lock(path), installed()
    wrong = [f"  {name}: installed {v}, lock says {pins[name]}" for name, v in sorted(have.items())
             if name in pins and pins[name] != v]
    extra = [f"  {name}=={v}: installed but not in the lock" for name, v in sorted(have.items())
             if name not in pins]
    missing = [f"  {name}=={v}: in the lock but not installed" for name, v in sorted(pins.items())
               if name not in have]
    if wrong or extra or missing:
        print(f"{path}: the environment differs from the lock:", *wrong, *extra, *missing,
              "Refresh the lock with `make lock`, or rebuild the environment with `make clean test`.",
              sep="\n", file=sys.stderr)
        return 1
    print(f"{path}: {len(pins)} packages installed exactly as locked")
    return 0


def write(path: Path) -> int:
    lines = [f"{name}=={v}" for name, v in sorted(installed().items())]
    path.write_text(HEADER + "\n".join(lines) + "\n")
    print(f"{path}: {len(lines)} packages locked")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("check", "write"):
        print(__doc__, file=sys.stderr)
        return 2
    return (check if argv[0] == "check" else write)(Path(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
