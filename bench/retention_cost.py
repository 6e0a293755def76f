"""Retention's cost: its plan against an audit, and ``--delete`` against ``rm -rf``, side by side.

**The plan** (issue 16: within 1.2x an audit). On a generated tree (bench/gen_tree.py
``--evals``: every checkpoint carries the trainer_state.json the Trainer would have written at
its step, so ``--keep-best`` ranks by a real eval_loss history and the run's
best_model_checkpoint is pinned), each repetition times, alternating the order:

- ``ckpt-tools audit --json TREE`` (the anchor);
- ``ckpt-tools prune --dry-run --json TREE``: prune's plan without a policy (on the DyLoRA-MoE
  mix it proves every redundant checkpoint by content, which audit does not);
- ``ckpt-tools prune --dry-run --json --keep-last 2 --keep-best 1 --keep-every 1000 --delete
  TREE``: the retention plan (a checkpoint the policy deletes whole is not proven: its merged
  weights go with it).

Whole-process wall time and CPU time (user + system, workers included), medians, min-max,
the ratio of medians and the ratio of each repetition's pair. Then, in this process and on the
same tree, the library calls alone: ``api.scan``, ``plan_retention`` and ``plan_prune`` of what
the policy keeps (what the retention adds to a scan), and with ``--profile`` a cProfile of
them (one process: ``jobs=1``) written to bench/out/.

**--delete** (issue 16: against rm -rf of the same directories). On fresh trees of
``--delete-checkpoints`` checkpoints (generated again for every timing: same paths, same
bytes), alternating:

- ``ckpt-tools prune --yes --json --keep-last 1 --delete --purge-now --log F COPY``: the whole
  cost (scan, plan, re-validation, move into the trash, purge);
- ``rm -rf`` of exactly what that run removed (the checkpoint directories it trashed, and the
  merged-weight files it deleted from the checkpoints it kept);
- ``ckpt-tools prune --yes --json --keep-last 1 --delete COPY``: the move alone (the trash is
  kept for --purge-after);
- ``mv -t`` of the same directories into a directory of their run (what the move costs a tool
  that neither checks nor records anything).

Every prune run is checked: it trashed (and purged) exactly the directories of the first run.
Writes bench/out/retention_cost-<mix>.{json,md}. Runs its timed parts when the 1-minute load
average is below ``--max-load`` (waiting up to ``--wait`` seconds before each part) and records
the load at each timing.

    python bench/retention_cost.py --checkpoints 10000 --reps 5 --mix dylora ordinary
    python bench/retention_cost.py --plan-only --profile --checkpoints 10000 --mix dylora

``--against DIR`` also times the retention plan of another checkout (DIR holds its
``ckpt_tools`` package; run with this venv's python) in the same alternation:

    mkdir /tmp/before && git archive <commit> ckpt_tools | tar -x -C /tmp/before
    python bench/retention_cost.py --plan-only --mix dylora --against /tmp/before
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import pstats
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
from gen_tree import MIXES, generate  # noqa: E402

POLICY = ["--keep-last", "2", "--keep-best", "1", "--keep-every", "1000", "--delete"]
DELETE_POLICY = ["--keep-last", "1", "--delete"]


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed(cmd: list[str], ok=(0,)) -> tuple[float, float, bytes]:
    """Wall seconds, CPU seconds (user + system of the process and its workers), stdout."""
    c0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    if proc.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}): "
                         f"{proc.stderr.decode()[-800:]}")
    return wall, _children_cpu() - c0, proc.stdout


def wait_for_quiet(max_load: float, wait_s: float) -> float:
    """Wait until the 1-minute load average is below ``max_load`` (at most ``wait_s``); the
    load at which the timing then starts."""
    deadline = time.monotonic() + wait_s
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(10)
    return os.getloadavg()[0]


def summary(walls: list[float], cpus: list[float]) -> dict:
    return {"wall_s": walls, "cpu_s": cpus, "wall_median_s": statistics.median(walls),
            "wall_min_s": min(walls), "wall_max_s": max(walls),
            "cpu_median_s": statistics.median(cpus)}


def alternate(commands: dict[str, list[str]], reps: int, ok=(0, 1)) -> dict[str, dict]:
    """Each command once untimed (caches warm), then ``reps`` rounds, forward then backward."""
    for cmd in commands.values():
        timed(cmd, ok)
    walls: dict[str, list[float]] = {k: [] for k in commands}
    cpus: dict[str, list[float]] = {k: [] for k in commands}
    names = list(commands)
    for rep in range(reps):
        for what in (names if rep % 2 == 0 else names[::-1]):
            wall, cpu, _ = timed(commands[what], ok)
            walls[what].append(wall)
            cpus[what].append(cpu)
            print(f"rep {rep} {what}: {wall:.3f} s (cpu {cpu:.3f} s)", file=sys.stderr, flush=True)
    return {k: summary(walls[k], cpus[k]) for k in commands}


def ratios(times: dict[str, dict], num: str, den: str) -> dict:
    a, b = times[num], times[den]
    return {"wall": a["wall_median_s"] / b["wall_median_s"],
            "wall_per_rep": [x / y for x, y in zip(a["wall_s"], b["wall_s"])],
            "cpu": a["cpu_median_s"] / b["cpu_median_s"]}


# ---------------------------------------------------------------------------------- the plan

def in_process(tree: Path, reps: int, out: Path, mix: str, profile: bool) -> dict:
    """The library calls of the retention dry run, timed alone in this process: the scan, the
    retention plan, prune's plan of what the policy keeps. With ``profile``, a cProfile of them
    in one process (jobs=1), its top functions printed and the stats written to ``out``."""
    from ckpt_tools import api
    from ckpt_tools.prune.plan import plan_prune
    from ckpt_tools.retention.plan import plan_retention
    from ckpt_tools.retention.rules import Policy, Rules
    from ckpt_tools.retention.trash import DEFAULT_PURGE_AFTER_S

    policy = Policy.from_flags(Rules(keep_last=2, keep_best=1, keep_every=1000), "delete")  # = POLICY

    def retention(scan):
        kept = plan_retention(scan, policy, now=time.time(), min_age_s=3600,
                              purge_after_s=DEFAULT_PURGE_AFTER_S)
        deleting = {(i.checkpoint.dir.root, i.checkpoint.path) for i in kept.acting
                    if i.decision.action.value == "delete"}
        return kept, [c for c in scan.checkpoints if (c.dir.root, c.path) not in deleting]

    scan_s, plan_s, prune_all_s, prune_kept_s = [], [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        scan = api.scan(str(tree), jobs=0)
        t1 = time.perf_counter()
        kept, left = retention(scan)
        t2 = time.perf_counter()
        plan_prune(left, jobs=api.default_jobs())
        t3 = time.perf_counter()
        plan_prune(scan.checkpoints, jobs=api.default_jobs())
        t4 = time.perf_counter()
        scan_s.append(t1 - t0), plan_s.append(t2 - t1), prune_kept_s.append(t3 - t2)
        prune_all_s.append(t4 - t3)
    doc = {"scan_s": scan_s, "plan_retention_s": plan_s, "plan_prune_of_kept_s": prune_kept_s,
           "plan_prune_of_all_s": prune_all_s, "counts": kept.counts(),
           "decided": len(kept.items)}
    for k in list(doc):
        if k.endswith("_s"):
            doc[k.replace("_s", "_median_s")] = statistics.median(doc[k])
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        scan = api.scan(str(tree), jobs=1)
        kept, left = retention(scan)
        plan_prune(left, jobs=1)
        prof.disable()
        path = out / f"retention_cost-{mix}.prof"
        prof.dump_stats(str(path))
        stats = pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative")
        stats.print_stats(30)
        stats.print_stats("retention", 25)   # what the policy adds to the scan
        doc["profile"] = str(path)
    return doc


def plan_bench(ck: list[str], mix: str, n: int, reps: int, work: Path, out: Path, args) -> dict:
    tree = work / f"tree-{mix}"
    info = generate(tree, n, mix=mix, evals=True)
    subprocess.run(["sync"], check=False)
    commands = {
        "audit": ck + ["audit", "--json", "--no-progress", str(tree)],
        "prune plan": ck + ["prune", "--dry-run", "--json", "--no-progress", str(tree)],
        "retention plan": ck + ["prune", "--dry-run", "--json", "--no-progress", *POLICY, str(tree)],
    }
    if args.against:   # another checkout's retention plan, in the same alternation
        commands["retention plan, against"] = [
            "env", f"PYTHONPATH={args.against}", sys.executable, "-m", "ckpt_tools.cli", "prune",
            "--dry-run", "--json", "--no-progress", *POLICY, str(tree)]
    _, _, raw = timed(commands["retention plan"], (0, 1))
    plan = json.loads(raw)
    load_before = wait_for_quiet(args.max_load, args.wait)
    times = alternate(commands, reps)
    load_after = os.getloadavg()[0]
    doc = {"mix": mix, "checkpoints": n, "files": info["files"], "reps": reps,
           "commands": {k: " ".join(v) for k, v in commands.items()}, "times": times,
           "retention_over_audit": ratios(times, "retention plan", "audit"),
           "prune_plan_over_audit": ratios(times, "prune plan", "audit"),
           "retention_over_prune_plan": ratios(times, "retention plan", "prune plan"),
           **({"against": str(args.against),
               "against_over_audit": ratios(times, "retention plan, against", "audit")}
              if args.against else {}),
           "plan": {"counts": plan["retention"]["counts"],
                    "frees_bytes_when_purged": plan["retention"]["frees_bytes_when_purged"],
                    "merged_files_planned": len(plan["deleted"])},
           "load_1min_before": load_before, "load_1min_after": load_after}
    doc["in_process"] = in_process(tree, args.reps_in_process, out, mix, args.profile)
    shutil.rmtree(tree)
    return doc


# ------------------------------------------------------------------------------ --delete

def fresh_tree(n: int, mix: str, dest: Path) -> Path:
    """The same tree again, in new files (generated: cp -a would read the sparse holes)."""
    if dest.exists():
        shutil.rmtree(dest)
    generate(dest, n, mix=mix, evals=True)
    subprocess.run(["sync"], check=False)
    return dest


def removed_by(done: dict) -> tuple[list[str], list[str]]:
    """(checkpoint directories trashed, merged files deleted), relative to the root."""
    return ([r["path"] for r in done["retention"]["trashed"]], [d["path"] for d in done["deleted"]])


def phases_from_log(log: Path) -> dict:
    """From a --log: seconds from the first move into the trash to the last, and from the last
    move to the last purge (None where there was none)."""
    stamps: dict[str, list[float]] = {"trash": [], "purge": []}
    for line in log.read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        if item["action"] in stamps:
            when = datetime.datetime.fromisoformat(item["time"].replace("Z", "+00:00"))
            stamps[item["action"]].append(when.timestamp())
    moves = max(stamps["trash"]) - min(stamps["trash"]) if stamps["trash"] else None
    purge = max(stamps["purge"]) - max(stamps["trash"]) if stamps["purge"] and stamps["trash"] else None
    return {"moves_s": moves, "purge_s": purge, "moved": len(stamps["trash"]),
            "purged": len(stamps["purge"])}


def mv_script(dirs: list[str]) -> str:
    """One ``mkdir`` and one ``mv -t`` per run: every directory into a directory of its run."""
    by_run: dict[str, list[str]] = {}
    for d in dirs:
        by_run.setdefault(os.path.dirname(d) or ".", []).append(d)
    parts = []
    for run, ds in by_run.items():
        trash = f"{run}/.bench-trash"
        parts.append(f"mkdir {trash} && mv -t {trash} -- {' '.join(ds)}")
    return " && ".join(parts)


def delete_bench(ck: list[str], mix: str, n: int, reps: int, work: Path, args) -> dict:
    copy = work / "copy"
    log = work / "prune.jsonl"
    purge_cmd = ck + ["prune", "--yes", "--json", "--no-progress", *DELETE_POLICY, "--purge-now",
                      "--log", str(log), str(copy)]
    move_cmd = ck + ["prune", "--yes", "--json", "--no-progress", *DELETE_POLICY, str(copy)]
    # untimed: what prune removes from this tree, which every timed run must remove again
    fresh_tree(n, mix, copy)
    _, _, raw = timed(purge_cmd)
    dirs, files = removed_by(json.loads(raw))
    expected = (sorted(dirs), sorted(files))
    if not dirs:
        raise SystemExit("prune --delete trashed nothing: the benchmark would measure nothing")
    rm_cmd = ["sh", "-c", 'cd "$1" && shift && exec rm -rf -- "$@"', "sh", str(copy), *dirs, *files]
    mv_cmd = ["sh", "-c", 'cd "$1" && eval "$2"', "sh", str(copy), mv_script(dirs)]
    names = ["prune --delete --purge-now", "rm -rf", "prune --delete (move only)", "mv -t"]
    walls: dict[str, list[float]] = {k: [] for k in names}
    cpus: dict[str, list[float]] = {k: [] for k in names}
    phases, loads, freed = [], [], {}
    load_before = wait_for_quiet(args.max_load, args.wait)
    for rep in range(reps):
        for what in (names if rep % 2 == 0 else names[::-1]):
            fresh_tree(n, mix, copy)
            log.unlink(missing_ok=True)
            loads.append(os.getloadavg()[0])
            cmd = {"prune --delete --purge-now": purge_cmd, "rm -rf": rm_cmd,
                   "prune --delete (move only)": move_cmd, "mv -t": mv_cmd}[what]
            wall, cpu, raw = timed(cmd)
            if what.startswith("prune"):
                done = json.loads(raw)
                got = removed_by(done)
                if (sorted(got[0]), sorted(got[1])) != expected:
                    raise SystemExit(f"{what} removed other checkpoints than the first run")
                r = done["retention"]
                freed[what] = {"freed_bytes_now": r["freed_bytes_now"] + done["freed_bytes"],
                               "freed_bytes_when_purged": r["freed_bytes_when_purged"]}
                if "purge-now" in what:
                    phases.append(phases_from_log(log))
                    left = [d for d in dirs if (copy / d).exists()]
                    if left or len(r["purged"]) != len(dirs):
                        raise SystemExit(f"{what}: {len(left)} directories left, "
                                         f"{len(r['purged'])} purged of {len(dirs)}")
            walls[what].append(wall)
            cpus[what].append(cpu)
            print(f"rep {rep} {what}: {wall:.3f} s (cpu {cpu:.3f} s)", file=sys.stderr, flush=True)
    shutil.rmtree(copy, ignore_errors=True)
    times = {k: summary(walls[k], cpus[k]) for k in names}
    return {"mix": mix, "checkpoints": n, "reps": reps,
            "directories_removed": len(dirs), "merged_files_removed": len(files),
            "commands": {"prune --delete --purge-now": " ".join(purge_cmd),
                         "prune --delete (move only)": " ".join(move_cmd),
                         "rm -rf": f"rm -rf -- <the {len(dirs)} directories and {len(files)} files>",
                         "mv -t": "mkdir RUN/.bench-trash && mv -t RUN/.bench-trash -- <its directories>, per run"},
           "times": times, "freed": freed,
           "phases_from_log": phases,
           "moves_median_s": statistics.median(p["moves_s"] for p in phases),
           "purge_median_s": statistics.median(p["purge_s"] for p in phases),
           "delete_purge_over_rm": ratios(times, "prune --delete --purge-now", "rm -rf"),
           "move_over_rm": ratios(times, "prune --delete (move only)", "rm -rf"),
           "move_over_mv": ratios(times, "prune --delete (move only)", "mv -t"),
           "load_1min_before": load_before, "load_1min_at_start_of_each": loads,
           "load_1min_after": os.getloadavg()[0]}


# --------------------------------------------------------------------------------- report

def _row(name: str, t: dict) -> str:
    return (f"| {name} | {t['wall_median_s']:.3f} s [{t['wall_min_s']:.3f}–{t['wall_max_s']:.3f}] "
            f"| {t['cpu_median_s']:.3f} s |")


def markdown(doc: dict) -> str:
    lines = []
    p = doc.get("plan")
    if p:
        r = p["retention_over_audit"]
        lines += [f"# retention plan vs audit ({p['mix']}, {p['checkpoints']:,} checkpoints, "
                  f"{p['files']:,} files; load {p['load_1min_before']:.1f} → {p['load_1min_after']:.1f})",
                  "", "| command | wall, median [min–max] | CPU, median |", "|---|---:|---:|"]
        lines += [_row(k, t) for k, t in p["times"].items()]
        ip = p["in_process"]
        lines += ["", f"Retention plan / audit: **{r['wall']:.2f}×** wall (per repetition "
                  f"{', '.join(f'{x:.2f}' for x in r['wall_per_rep'])}), {r['cpu']:.2f}× CPU. "
                  f"prune's plan without a policy / audit: {p['prune_plan_over_audit']['wall']:.2f}×. "
                  f"Decisions: {p['plan']['counts']}."
                  + (f" {p['against']}'s retention plan / audit: {p['against_over_audit']['wall']:.2f}× "
                     f"wall (per repetition {', '.join(f'{x:.2f}' for x in p['against_over_audit']['wall_per_rep'])}), "
                     f"{p['against_over_audit']['cpu']:.2f}× CPU." if p.get("against") else ""),
                  "", f"In this process (medians of {len(ip['scan_s'])}): api.scan {ip['scan_median_s']:.3f} s, "
                  f"plan_retention {ip['plan_retention_median_s']:.3f} s, plan_prune of the kept "
                  f"{ip['plan_prune_of_kept_median_s']:.3f} s (of every checkpoint "
                  f"{ip['plan_prune_of_all_median_s']:.3f} s)."]
    d = doc.get("delete")
    if d:
        lines += ["", f"# --delete vs rm -rf ({d['mix']}, {d['checkpoints']:,} checkpoints: "
                  f"{d['directories_removed']} directories, {d['merged_files_removed']} merged files removed; "
                  f"load {d['load_1min_before']:.1f} → {d['load_1min_after']:.1f})",
                  "", "| command | wall, median [min–max] | CPU, median |", "|---|---:|---:|"]
        lines += [_row(k, t) for k, t in d["times"].items()]
        lines += ["", f"prune --delete --purge-now / rm -rf: **{d['delete_purge_over_rm']['wall']:.2f}×**; "
                  f"the move alone / rm -rf: {d['move_over_rm']['wall']:.2f}×, / mv -t: "
                  f"{d['move_over_mv']['wall']:.2f}×. From the --log: the moves "
                  f"{d['moves_median_s']:.3f} s, the purge {d['purge_median_s']:.3f} s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, default=10000, help="the plan's tree")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--reps-in-process", type=int, default=3)
    ap.add_argument("--mix", nargs="+", choices=MIXES, default=["dylora", "ordinary"])
    ap.add_argument("--delete-checkpoints", type=int, default=1000, help="the --delete trees")
    ap.add_argument("--delete-reps", type=int, default=5)
    ap.add_argument("--plan-only", action="store_true")
    ap.add_argument("--delete-only", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile the plan's library calls")
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--wait", type=float, default=600, help="seconds to wait for --max-load")
    ap.add_argument("--against", type=Path, default=None,
                    help="another checkout (the directory holding its ckpt_tools package) whose "
                         "retention plan is timed in the same alternation")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "out")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ck = ckpt_tools_cmd()
    for mix in args.mix:
        work = Path(tempfile.mkdtemp(prefix="ckpt-bench-retention-", dir=args.workdir))
        doc = {"machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname())},
               "command": " ".join([sys.executable] + (argv if argv is not None else sys.argv))}
        try:
            if not args.delete_only:
                doc["plan"] = plan_bench(ck, mix, args.checkpoints, args.reps, work, args.out, args)
            if not args.plan_only:
                doc["delete"] = delete_bench(ck, mix, args.delete_checkpoints, args.delete_reps,
                                             work, args)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        part = "-plan" if args.plan_only else "-delete" if args.delete_only else ""
        stem = f"retention_cost-{mix}{part}"
        (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2))
        md = markdown(doc)
        (args.out / f"{stem}.md").write_text(md)
        print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
