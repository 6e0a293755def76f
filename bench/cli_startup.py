"""Start-up cost of the command line against a bare interpreter.

Runs ``python -c pass``, ``ckpt-tools --help`` and ``ckpt-tools audit EMPTY_DIR`` (the venv's
console script, else ``PY -m ckpt_tools.cli``) interleaved, ``--repeat`` times each, and prints
the median wall time of each and its ratio to ``python -c pass`` of the same interpreter
(issue 14: at most 3x). Interleaving puts every command under the same load, so the ratios
hold on a busy machine where the absolute times do not. ``--python`` may be given several
times (two checkouts' venvs: before and after) to measure them in the same run.

``--against DIR`` also runs another checkout (DIR holds its ``ckpt_tools`` package) with the
same interpreter and console script, ``PYTHONPATH=DIR``: before and after in one run.

    python bench/cli_startup.py [--python .venv/bin/python ...] [--against DIR] [--repeat 41] [--json]
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
    ap.add_argument("--python", action="append",
                    help="the interpreter of an environment ckpt-tools is installed in "
                         "(default: this checkout's .venv); repeat to compare several")
    ap.add_argument("--against", default=None,
                    help="another checkout's directory, run with the first interpreter")
    ap.add_argument("--repeat", type=int, default=41)
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = ap.parse_args()
    pythons = args.python or [os.path.join(here, ".venv", "bin", "python")]
    with tempfile.TemporaryDirectory(prefix="ckpt-startup-") as empty, \
            tempfile.TemporaryDirectory(prefix="ckpt-startup-pyc-") as pycache:
        # as an installed tool runs: from compiled bytecode (kept out of the source trees),
        # whatever PYTHONDONTWRITEBYTECODE this shell has
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = pycache
        cases = {}
        setups = [(py, py, env) for py in pythons]
        if args.against:
            setups.append((f"{pythons[0]} with PYTHONPATH={args.against}", pythons[0],
                           dict(env, PYTHONPATH=args.against)))
        for label, py, case_env in setups:
            cli = [py, "-m", "ckpt_tools.cli"]
            script = os.path.join(os.path.dirname(py), "ckpt-tools")
            if os.path.exists(script):   # what an operator runs; the same interpreter
                cli = [script]
            cases[(label, "python -c pass")] = ([py, "-c", "pass"], case_env)
            cases[(label, "ckpt-tools --help")] = ([*cli, "--help"], case_env)
            cases[(label, "ckpt-tools audit EMPTY")] = ([*cli, "audit", empty], case_env)
        pythons = [label for label, _, _ in setups]
        for argv, case_env in cases.values():   # warm the page cache, write the bytecode
            _time(argv, case_env)
            _time(argv, case_env)
        times: dict[tuple, list[float]] = {key: [] for key in cases}
        for _ in range(args.repeat):
            for key, (argv, case_env) in cases.items():
                times[key].append(_time(argv, case_env))
    report = {}
    for py in pythons:
        base = statistics.median(times[(py, "python -c pass")])
        report[py] = {name: {"median_ms": round(statistics.median(t) * 1000, 1),
                             "ratio": round(statistics.median(t) / base, 2)}
                      for (p, name), t in times.items() if p == py}
    if args.json:
        print(json.dumps({"repeat": args.repeat, "pythons": report}, indent=1))
    else:
        print(f"{args.repeat} interleaved runs of each, medians")
        for py, rows in report.items():
            print(py)
            for name, r in rows.items():
                print(f"  {name:<24} {r['median_ms']:>7.1f} ms  {r['ratio']:>5.2f}x")
    worst = max(r["ratio"] for rows in report.values() for name, r in rows.items()
                if name != "python -c pass")
    return 0 if worst <= 3.0 else 1


if __name__ == "__main__":
    sys.exit(main())
