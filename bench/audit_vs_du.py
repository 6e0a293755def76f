"""audit vs du -s, side by side in one run, on generated trees of N checkpoints.

For each size: generate the tree (bench/gen_tree.py), warm the cache with one untimed
pass of each command, then alternate `du -s TREE` and `ckpt-tools audit --json TREE`
REPS times, whole-process wall time each. Reports median, spread (min-max) and the ratio
of medians; writes bench/out/audit_vs_du.json and, when matplotlib is there, a PNG chart.

    python bench/audit_vs_du.py --sizes 1000 3000 10000 --reps 5

``--against DIR`` also times another checkout of ckpt-tools (DIR holds its ``ckpt_tools``
package; run with this venv's python) in the same alternation — du, this one, DIR's — so that
a before/after comparison shares the machine's state; CPU time (user + system) is reported too.

    git worktree add /tmp/before <commit>
    python bench/audit_vs_du.py --sizes 10000 --reps 5 --against /tmp/before

``--mix ordinary`` (or ``both``) generates ordinary Trainer runs (adapters, full models,
shards) instead of DyLoRA-MoE ones, as ``gen_tree.py --mix`` says.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gen_tree import generate  # noqa: E402


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], env: dict | None = None, cpu: list | None = None) -> float:
    c0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    elapsed = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    if cpu is not None:
        cpu.append(_children_cpu() - c0)
    return elapsed


def ckpt_tools_cmd() -> list[str]:
    exe = shutil.which("ckpt-tools", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "ckpt_tools.cli"]


def measure(tree: Path, reps: int, extra: list[str], against: Path | None = None) -> dict:
    du = ["du", "-s", str(tree)]
    audit_args = ["audit", "--json", "--no-progress", *extra, str(tree)]
    ours = ckpt_tools_cmd() + audit_args
    theirs = [sys.executable, "-m", "ckpt_tools.cli"] + audit_args
    their_env = dict(os.environ, PYTHONPATH=str(against)) if against else None
    timed(du), timed(ours)  # warm the page cache and the dentry cache for both
    if against:
        timed(theirs, their_env)
    t_du, t_ours, t_theirs, cpu_ours, cpu_theirs = [], [], [], [], []
    for _ in range(reps):
        t_du.append(timed(du))
        t_ours.append(timed(ours, cpu=cpu_ours))
        if against:
            t_theirs.append(timed(theirs, their_env, cpu=cpu_theirs))
    med_du, med_ours = statistics.median(t_du), statistics.median(t_ours)
    r = {"du_s": t_du, "audit_s": t_ours, "du_median": med_du, "audit_median": med_ours,
         "ratio": med_ours / med_du, "audit_cpu_median": statistics.median(cpu_ours)}
    if against:
        med_theirs = statistics.median(t_theirs)
        r.update(against=str(against), against_s=t_theirs, against_median=med_theirs,
                 against_ratio=med_theirs / med_du, against_cpu_median=statistics.median(cpu_theirs))
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=1, help="passed to audit --jobs")
    ap.add_argument("--mix", default="dylora", help="the tree's runs (gen_tree.py --mix): dylora, ordinary, both")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--against", type=Path, default=None,
                    help="another checkout (the directory holding its ckpt_tools package) timed alongside")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.workdir))
    extra = ["--jobs", str(args.jobs)] if args.jobs > 1 else []
    results = []
    try:
        for n in args.sizes:
            tree = work / f"tree-{n}"
            info = generate(tree, n, mix=args.mix)
            r = measure(tree, args.reps, extra, args.against)
            r.update(checkpoints=n, files=info["files"], mix=args.mix)
            results.append(r)
            print(f"{n:>6} checkpoints {info['files']:>7} files: du {r['du_median']:.3f} s "
                  f"[{min(r['du_s']):.3f}-{max(r['du_s']):.3f}], audit {r['audit_median']:.3f} s "
                  f"[{min(r['audit_s']):.3f}-{max(r['audit_s']):.3f}], ratio {r['ratio']:.2f}x, "
                  f"cpu {r['audit_cpu_median']:.3f} s", flush=True)
            if args.against:
                print(f"{'':>6} against {args.against}: audit {r['against_median']:.3f} s "
                      f"[{min(r['against_s']):.3f}-{max(r['against_s']):.3f}], "
                      f"ratio {r['against_ratio']:.2f}x, cpu {r['against_cpu_median']:.3f} s", flush=True)
            shutil.rmtree(tree)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname())},
           "command": " ".join([sys.executable] + sys.argv), "reps": args.reps, "results": results}
    stem = "audit_vs_du" if args.mix == "dylora" else f"audit_vs_du-{args.mix}"
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart", file=sys.stderr)
        return 0
    xs = [r["checkpoints"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["du_median"] for r in results], "o-", label="du -s")
    ax.plot(xs, [r["audit_median"] for r in results], "s-", label="ckpt-tools audit --json")
    ax.set_xlabel("checkpoints")
    ax.set_ylabel("wall time, median (s)")
    ax.set_title("audit vs du on the same tree (warm cache)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / f"{stem}.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
