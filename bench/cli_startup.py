"""Start-up cost of the command line against a bare interpreter.

Runs ``python -c pass``, ``ckpt-tools --help`` and ``ckpt-tools audit EMPTY_DIR`` (the venv's
console script, or ``--python PY -m ckpt_tools.cli``) interleaved, ``--repeat`` times each,
and prints the median wall time of each and its ratio to ``python -c pass`` (issue 14: at
most 3x). Interleaving puts every command under the same load, so the ratios hold on a busy
machine where the absolute times do not.

    python bench/cli_startup.py [--python .venv/bin/python] [--repeat 41] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _time(argv: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, env=env)
    return time.perf_counter() - t


def main() -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=os.path.join(here, ".venv", "bin", "python"),
                    help="the interpreter of the environment ckpt-tools is installed in")
    ap.add_argument("--repeat", type=int, default=41)
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = ap.parse_args()
    py = args.python
    cli = [py, "-m", "ckpt_tools.cli"]
    script = os.path.join(os.path.dirname(py), "ckpt-tools")
    if os.path.exists(script):   # what an operator runs; the same interpreter
        cli = [script]
    with tempfile.TemporaryDirectory(prefix="ckpt-startup-") as empty, \
            tempfile.TemporaryDirectory(prefix="ckpt-startup-pyc-") as pycache:
        # as an installed tool runs: from compiled bytecode (kept out of the source tree),
        # whatever PYTHONDONTWRITEBYTECODE this shell has
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = pycache
        cases = {"python -c pass": [py, "-c", "pass"],
                 "ckpt-tools --help": [*cli, "--help"],
                 "ckpt-tools audit EMPTY": [*cli, "audit", empty]}
        for argv in cases.values():   # warm the page cache, write the bytecode
            _time(argv, env)
            _time(argv, env)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeat):
            for name, argv in cases.items():
                times[name].append(_time(argv, env))
    base = statistics.median(times["python -c pass"])
    rows = {name: {"median_ms": round(statistics.median(t) * 1000, 1),
                   "ratio": round(statistics.median(t) / base, 2)} for name, t in times.items()}
    if args.json:
        print(json.dumps({"python": py, "repeat": args.repeat, "cases": rows}, indent=1))
    else:
        print(f"{args.repeat} interleaved runs each, {py}")
        for name, r in rows.items():
            print(f"  {name:<24} {r['median_ms']:>7.1f} ms  {r['ratio']:>5.2f}x")
    worst = max(r["ratio"] for name, r in rows.items() if name != "python -c pass")
    return 0 if worst <= 3.0 else 1


if __name__ == "__main__":
    sys.exit(main())
