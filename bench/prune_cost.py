"""prune's cost against audit's and against rm, side by side in one run.

On a generated tree (bench/gen_tree.py; a third of the checkpoints redundant, each with a
merged model.safetensors whose LoRA and router tensors are byte for byte its PEFT tree's:
real, distinct, non-zero values, so prune's content proof reads and compares every one of
them), each repetition times, alternating the order:

- ``ckpt-tools audit --json TREE`` (the plan's anchor: a plan should cost what an audit costs;
  audit only reads headers, the plan also proves each redundant checkpoint by content);
- ``ckpt-tools prune --dry-run --json --min-age 0 TREE``;
- ``ckpt-tools prune --yes --json --min-age 0 COPY`` on a fresh copy of the tree;
- ``rm -f`` of exactly the files that prune deleted, on another fresh copy (execution's
  anchor: what the unlinks alone cost);
- ``ckpt-tools audit --json`` of the redundant checkpoints alone, named one by one (what
  validating them once costs: the safety rule has prune validate each one again right
  before its unlinks).

prune --yes runs with ``--log``; its execution phase is read from the log's timestamps
(last ``plan`` line to last ``delete`` line) and set against rm's time, and against rm + that
audit: the unlinks plus the one re-validation the safety rule requires.
The fresh trees are generated again between timings (``cp -a`` would read the merged files'
holes, a hundred GB of zeros, for minutes) and dropped afterwards. Writes
bench/out/prune_cost.{json,md}. ``--plan-only`` times audit and the dry run alone (no fresh
trees, no execution).

    python bench/prune_cost.py --checkpoints 10000 --reps 3 [--jobs 1] [--plan-only]
"""

from __future__ import annotations

import argparse
import datetime
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
from audit_vs_du import ckpt_tools_cmd  # noqa: E402
from gen_tree import generate  # noqa: E402


# CPU seconds (user + system) of each timed command, its worker processes included: on a
# shared machine wall times swing with the load, the work a command does much less.
CPU: dict[str, list[float]] = {}


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed(cmd: list[str], ok=(0,), what: str | None = None) -> tuple[float, bytes]:
    c0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t0
    if proc.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()[-800:]}")
    if what is not None:
        CPU.setdefault(what, []).append(_children_cpu() - c0)
    return elapsed, proc.stdout


def fresh_copy(checkpoints: int, dest: Path) -> Path:
    """The same tree as the master, in new files (generated again: same paths and sizes)."""
    if dest.exists():
        shutil.rmtree(dest)
    generate(dest, checkpoints)
    subprocess.run(["sync"], check=False)
    return dest


def execution_from_log(log: Path) -> float:
    """Seconds from the last ``plan`` line of a --log to its last ``delete`` line: the
    execution phase as the process itself lived it (re-validations and unlinks; the plan's
    rendering included), whatever its scan cost."""
    stamps: dict[str, list[float]] = {"plan": [], "delete": []}
    for line in log.read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        if item["action"] in stamps:
            when = datetime.datetime.fromisoformat(item["time"].replace("Z", "+00:00"))
            stamps[item["action"]].append(when.timestamp())
    return max(stamps["delete"]) - max(stamps["plan"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, default=10000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=0,
                    help="prune's --jobs (default 0: one worker per CPU; 1: one process)")
    ap.add_argument("--plan-only", action="store_true",
                    help="time audit and prune --dry-run only (no execution, no fresh trees)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "out")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-prune-", dir=args.workdir))
    ck = ckpt_tools_cmd()
    times: dict[str, list[float]] = {"audit": [], "dry-run": [], "prune --yes": [], "rm": [],
                                     "audit of the redundant": []}
    execution: list[float] = []
    facts: dict = {}
    try:
        master = work / "tree"
        info = generate(master, args.checkpoints)
        audit_cmd = ck + ["audit", "--json", "--no-progress", str(master)]
        dry_cmd = ck + ["prune", "--dry-run", "--json", "--no-progress", "--min-age", "0",
                        "--jobs", str(args.jobs), str(master)]
        timed(audit_cmd, ok=(0, 1))                       # warm the caches, untimed
        _, out = timed(dry_cmd, ok=(0, 1))
        plan = json.loads(out)
        rels = [item["path"] for item in plan["deleted"]]   # relative to the root
        redundant = sorted({str(master / r.rsplit("/", 1)[0]) for r in rels})
        facts.update(planned_files=len(rels), planned_bytes=plan["freed_bytes"],
                     redundant_checkpoints=len(redundant))
        revalidate_cmd = ck + ["audit", "--json", "--no-progress", "--min-age", "0", *redundant]
        if args.plan_only:
            times = {"audit": [], "dry-run": []}
        for rep in range(args.reps):
            order = list(times)
            for what in (order if rep % 2 == 0 else list(reversed(order))):
                if what == "audit":
                    t, _ = timed(audit_cmd, ok=(0, 1), what="audit")
                elif what == "audit of the redundant":
                    t, _ = timed(revalidate_cmd, ok=(0, 1))
                elif what == "dry-run":
                    t, _ = timed(dry_cmd, ok=(0, 1), what="dry-run")
                elif what == "prune --yes":
                    copy = fresh_copy(args.checkpoints, work / "copy")
                    log = work / "prune.jsonl"
                    log.unlink(missing_ok=True)
                    t, out = timed(ck + ["prune", "--yes", "--json", "--no-progress", "--min-age",
                                         "0", "--jobs", str(args.jobs), "--log", str(log),
                                         str(copy)], ok=(0, 1))
                    execution.append(execution_from_log(log))
                    print(f"rep {rep} execution (from its --log): {execution[-1]:.3f} s",
                          file=sys.stderr, flush=True)
                    done = json.loads(out)
                    facts["freed_bytes"] = done["freed_bytes"]
                    facts["deleted_files"] = len(done["deleted"])
                    shutil.rmtree(copy)
                else:
                    copy = fresh_copy(args.checkpoints, work / "copy")
                    t, _ = timed(["sh", "-c", 'cd "$1" && shift && exec rm -f -- "$@"', "sh",
                                  str(copy), *rels])
                    shutil.rmtree(copy)
                times[what].append(t)
                print(f"rep {rep} {what}: {t:.3f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    # per repetition: the dry run over the audit timed next to it
    pairs = [d / a for a, d in zip(times["audit"], times["dry-run"])]
    cpu_med = {k: statistics.median(v) for k, v in CPU.items()}
    doc = {"machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname()),
                       "load_average_after": os.getloadavg()},
           "command": " ".join([sys.executable] + (argv if argv is not None else sys.argv)),
           "checkpoints": args.checkpoints, "files": info["files"], "reps": args.reps,
           "prune_jobs": args.jobs,
           "times": times, "median": med, **facts,
           "plan_over_audit": med["dry-run"] / med["audit"],
           "plan_over_audit_per_rep": pairs,
           "cpu_s": CPU, "cpu_median_s": cpu_med,
           "plan_over_audit_cpu": cpu_med["dry-run"] / cpu_med["audit"]}
    if not args.plan_only:
        doc |= {"execution_s": execution, "execution_median_s": statistics.median(execution),
                "execution_over_rm": statistics.median(execution) / med["rm"],
                "execution_over_rm_and_revalidation": statistics.median(execution)
                / (med["rm"] + med["audit of the redundant"])}
    suffix = ("" if args.jobs == 0 else f"-jobs{args.jobs}") + ("-plan" if args.plan_only else "")
    suffix += f"-{args.checkpoints}"
    (args.out / f"prune_cost{suffix}.json").write_text(json.dumps(doc, indent=2))
    lines = [f"# prune cost ({args.checkpoints:,} checkpoints, {info['files']:,} files, "
             f"{facts['planned_files']:,} merged files planned; prune --jobs {args.jobs})", "",
             "| command | wall time, median [min–max] |", "|---|---:|"]
    for k, v in times.items():
        lines.append(f"| {k} | {med[k]:.2f} s [{min(v):.2f}–{max(v):.2f}] |")
    lines += ["", f"Plan / audit: {doc['plan_over_audit']:.2f} (wall-time medians); per repetition "
              f"{', '.join(f'{r:.2f}' for r in pairs)}. CPU time (user + system, workers "
              f"included), median: audit {cpu_med['audit']:.2f} s, dry run {cpu_med['dry-run']:.2f} s: "
              f"{doc['plan_over_audit_cpu']:.2f}. Load average after the run: "
              f"{', '.join(f'{x:.1f}' for x in doc['machine']['load_average_after'])}."]
    if args.plan_only:
        md = "\n".join(lines) + "\n"
        (args.out / f"prune_cost{suffix}.md").write_text(md)
        print(md)
        return 0
    lines += ["", f"Execution (prune --yes, from its "
              f"--log: last plan line to last delete): {doc['execution_median_s']:.2f} s "
              f"[{min(execution):.2f}–{max(execution):.2f}], against {med['rm']:.2f} s for rm of the same files "
              f"({doc['execution_over_rm']:.1f}×) and {med['rm'] + med['audit of the redundant']:.2f} s "
              f"for rm plus one audit of the {facts['redundant_checkpoints']:,} redundant checkpoints "
              f"({doc['execution_over_rm_and_revalidation']:.2f}×). Promised "
              f"{facts['planned_bytes']:,} bytes; freed {facts.get('freed_bytes', 0):,}."]
    md = "\n".join(lines) + "\n"
    (args.out / f"prune_cost{suffix}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
