"""audit --jobs N vs du -s on latency-bound storage, side by side in one run.

A network filesystem makes every open, stat, directory listing and small read a round trip;
the local disk of this machine does not. ``bench/slowfs/slowfs.c`` (an LD_PRELOAD shim,
compiled here with the system's C compiler) gives both commands the same injected latency:
every open/opendir/stat-family call on the tree, and every read of a file opened in it,
sleeps ``--delay-us`` microseconds first. Both ``du -s`` and ``ckpt-tools audit`` run under
it, alternating, REPS times; the shim also counts the delayed calls of each command (forked
workers included). Writes bench/out/audit_slow_storage.{json,md} and, when matplotlib is
there, a PNG of wall time against --jobs with du's as a line.

    python bench/audit_slow_storage.py --checkpoints 1000 --delay-us 100 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from audit_vs_du import ckpt_tools_cmd  # noqa: E402
from gen_tree import generate  # noqa: E402

SHIM_SRC = HERE / "slowfs" / "slowfs.c"


def build_shim(dest: Path) -> Path:
    so = dest / "slowfs.so"
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-Wall", "-shared", "-fPIC", "-o", str(so), str(SHIM_SRC), "-ldl"],
                   check=True)
    return so


def run(cmd: list[str], env: dict, counter: Path) -> tuple[float, int]:
    counter.write_bytes(b"\0" * 8)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    return elapsed, struct.unpack("<q", counter.read_bytes()[:8])[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, default=1000)
    ap.add_argument("--delay-us", type=int, default=100, help="injected latency per call")
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "out")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-slow-", dir=args.workdir))
    try:
        so = build_shim(work)
        tree = work / "tree"
        info = generate(tree, args.checkpoints)
        counter = work / "counter"
        env = dict(os.environ, LD_PRELOAD=str(so), SLOWFS_MATCH=str(tree),
                   SLOWFS_DELAY_US=str(args.delay_us), SLOWFS_COUNTER=str(counter))
        commands = {"du": ["du", "-s", str(tree)]}
        for j in args.jobs:
            commands[f"audit -j {j}"] = ckpt_tools_cmd() + ["audit", "--json", "--no-progress",
                                                            "--jobs", str(j), str(tree)]
        # untimed pass: page and dentry caches warm, so only the injected latency is slow
        calls = {name: run(cmd, env, counter)[1] for name, cmd in commands.items()}
        times: dict[str, list[float]] = {name: [] for name in commands}
        names = list(commands)
        for rep in range(args.reps):
            for name in (names if rep % 2 == 0 else list(reversed(names))):
                t, _ = run(commands[name], env, counter)
                times[name].append(t)
                print(f"rep {rep} {name}: {t:.2f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    du_med = med["du"]
    rows = [{"command": k, "seconds": v, "median_s": med[k], "delayed_calls": calls[k],
             "ratio_to_du": med[k] / du_med} for k, v in times.items()]
    doc = {"machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname())},
           "command": " ".join([sys.executable] + (argv if argv is not None else sys.argv)),
           "checkpoints": args.checkpoints, "files": info["files"], "delay_us": args.delay_us,
           "reps": args.reps, "latency_per_call_us_in_du": du_med / calls["du"] * 1e6,
           "rows": rows}
    (args.out / "audit_slow_storage.json").write_text(json.dumps(doc, indent=2))
    lines = [f"# audit --jobs vs du on latency-bound storage ({args.checkpoints:,} checkpoints, "
             f"{info['files']:,} files)", "",
             f"Injected latency {args.delay_us} µs per call (effective "
             f"{doc['latency_per_call_us_in_du']:.0f} µs per delayed call in du's run, sleep "
             f"overshoot included); {args.reps} alternating runs; {os.cpu_count()} CPUs.", "",
             "| command | delayed calls | wall time, median [min–max] | ratio to du |",
             "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['command']}` | {r['delayed_calls']:,} | {r['median_s']:.2f} s "
                     f"[{min(r['seconds']):.2f}–{max(r['seconds']):.2f}] | "
                     f"{r['ratio_to_du']:.2f}× |")
    md = "\n".join(lines) + "\n"
    (args.out / "audit_slow_storage.md").write_text(md)
    print(md)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart", file=sys.stderr)
        return 0
    jobs = args.jobs
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ys = [med[f"audit -j {j}"] for j in jobs]
    ax.plot(jobs, ys, "o-", color="tab:green", label="ckpt-tools audit --jobs N")
    ax.axhline(du_med, color="tab:gray", ls="--", label="du -s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(jobs, [str(j) for j in jobs])
    ax.set_xlabel("--jobs")
    ax.set_ylabel("wall time (s), median")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{args.checkpoints:,} checkpoints, {args.delay_us} µs injected per call")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "audit_slow_storage.png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
