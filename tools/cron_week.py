"""Play a week of nightly ``ckpt-tools prune`` runs on a temporary tree and print the log.

    .venv/bin/python tools/cron_week.py          # the log as docs/prune.md shows it
    .venv/bin/python tools/cron_week.py --raw    # exactly as written, temporary paths and all

The week is ``fixtures.cron_week.WEEK`` (the one tests/test_prune_log_week.py reads back), run
with the venv's console script. The nights of the play take seconds, not days, and live in a
temporary directory, so by default the printout rewrites, and only these: each run id to a
stable hex id, each time to its night at 03:17 (keeping the milliseconds between a run's
lines), the tree to /shared/results, the log to /var/log/ckpt-tools/prune.jsonl and the
console script to /opt/ckpt-tools/.venv/bin/ckpt-tools. Everything else is as written.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository's fixtures/


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/cron_week.py", description=__doc__.split("\n")[0])
    parser.add_argument("--raw", action="store_true", help="print the log exactly as written")
    args = parser.parse_args(argv)
    exe = shutil.which("ckpt-tools", path=str(Path(sys.executable).parent))
    if exe is None:
        print("tools/cron_week.py: no ckpt-tools console script beside this python; "
              "run it with the venv's (make venv)", file=sys.stderr)
        return 2
    from fixtures.cron_week import play_week, shown
    with tempfile.TemporaryDirectory(prefix="cron-week-") as base:
        week = play_week(Path(base), exe)
        lines = week.log.read_text(encoding="utf-8").splitlines()
        if not args.raw:
            lines = shown(lines, week)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
