"""Crash reliability: ``ckpt-tools migrate`` and ``ckpt-tools prune`` killed with SIGKILL at random
moments, then checked and re-run.

Counts: ``CKPT_TOOLS_CRASH_RUNS`` (default 10 kills of migrate, 10 of prune, 4 of prune with
worker processes, to keep this file around two minutes); ``CKPT_TOOLS_CRASH_RUNS_MIGRATE`` /
``_PRUNE`` / ``_PRUNE_WORKERS`` override it per scenario (the scorecard's counts are 50, 30 and
10: ``bench/reliability_scorecard.py`` runs those). ``CKPT_TOOLS_CRASH_SEED`` fixes the seed (printed on failure); ``CKPT_TOOLS_CRASH_JOBS``
how many trials run at once (default: the CPU count + 1, 2 to 4). When ``CKPT_TOOLS_SCORECARD_DIR``
is set each scenario writes ``<scenario>.json`` there with its per-run outcomes, for the scorecard.

Every trial runs in its own DST (migrate) or its own copy of the tree (prune), so the trials are
independent and a failing one does not hide the others: every failure is collected and reported
together with the seed and how that run was killed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import scorecard
import torch
from reliability import (LOCK_NAME, REPO, cli_env, file_hashes, migrate_args, seed_from,
                         target_files)
from safetensors.torch import load_file

import fault_entry
from ckpt_tools import scan
from fixtures.copying import copy_tree

TMP_MARKS = (".ckpt-tools-tmp-", ".ckpt-tools-old-")
MARKER = ".ckpt-tools-migrated.json"
MARKER_VOLATILE = ("finished_at", "source_path")       # a timestamp and an absolute path
MIGRATE_SUBSET = ("legacy_v1/checkpoint-100",            # v1
                  "hybrid_v2",                           # v2
                  "upstream_v5_naïve/checkpoint-200",    # v5
                  "run canonical/checkpoint-100",        # canonical (copy)
                  "run_trainer/checkpoint-2",            # canonical+merged (copy, merged dropped)
                  "run_best")                            # best_model (v1) + checkpoint-100 (v2)


# --- settings -----------------------------------------------------------------------------------

def crash_runs(scenario: str, default: int) -> int:
    value = os.environ.get(f"CKPT_TOOLS_CRASH_RUNS_{scenario.upper()}") or os.environ.get(
        "CKPT_TOOLS_CRASH_RUNS")
    return int(value) if value else default


def crash_jobs() -> int:
    value = os.environ.get("CKPT_TOOLS_CRASH_JOBS")
    # one more than the CPUs: part of each run waits on fsync
    return max(1, int(value)) if value else max(2, min(4, (os.cpu_count() or 1) + 1))


# --- helpers ------------------------------------------------------------------------------------

def errors_of(c) -> list:
    return [p for p in c.problems if p.is_error]


class Killed:
    """How one child process ended."""

    def __init__(self, proc: subprocess.Popen, killed_by_us: bool, seconds: float):
        self.returncode = proc.returncode
        self.killed = proc.returncode == -signal.SIGKILL
        self.killed_by_us = killed_by_us
        self.seconds = seconds
        self.stderr = proc.stderr.read() if proc.stderr else ""


def run_and_kill(args: list[str], env: dict, *, delay: float | None = None,
                 trigger=None, timeout: float = 300) -> Killed:
    """Start ``args``; SIGKILL its process group after ``delay`` s, or as soon as ``trigger()``
    is true (polled), or never (the fault spec it runs under kills it). Returns how it ended."""
    t0 = time.monotonic()
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    killed_by_us = False
    try:
        if delay is not None or trigger is not None:
            deadline = t0 + (delay if delay is not None else timeout)
            while proc.poll() is None and time.monotonic() < deadline:
                if trigger is not None and trigger():
                    break
                time.sleep(0.0002 if trigger is not None else min(0.01, max(0.0, deadline - time.monotonic())))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_by_us = True
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return Killed(proc, killed_by_us, time.monotonic() - t0)


TIMED_TRIES = 3


def run_and_kill_timed(args: list[str], env: dict, delay: float, rng: random.Random,
                       fresh) -> tuple[Killed, list[float]]:
    """``run_and_kill`` at ``delay`` s, so that the kill lands at a random moment. A run that
    finished (exit 0) before its kill says nothing about a crash: it is tried again, after
    ``fresh()`` has put back what it started from, with a delay drawn below that run's own
    lifetime; the last try kills at 0 s. So every timed run is killed, however much faster the
    machine is now than when the delays' range was measured. Returns (how it ended, delays)."""
    delays = [delay]
    while True:
        end = run_and_kill(args, env, delay=delays[-1])
        if end.killed or end.returncode != 0 or len(delays) == TIMED_TRIES:
            return end, delays
        fresh()
        delays.append(0.0 if len(delays) == TIMED_TRIES - 1 else round(rng.uniform(0.0, end.seconds), 4))


class CrashTrials:
    """The trials of one scenario: how many (``crash_runs``), the seed, and their report."""

    def __init__(self, scenario: str, default_runs: int):
        self.scenario = scenario
        self.n = crash_runs(scenario, default_runs)
        self.seed = seed_from("CKPT_TOOLS_CRASH_SEED")
        self.t0 = time.monotonic()

    def run(self, trial) -> list[dict]:
        """``trial(i, rng)`` for i < n, ``crash_jobs()`` at once; each returns its record (a dict
        with ``failures``); an exception in a trial is a failure of that run, not of the others."""
        rngs = [random.Random(f"{self.seed}:{i}") for i in range(self.n)]

        def one(i):
            rec = {"run": i, "ok": False, "failures": []}
            try:
                rec.update(trial(i, rngs[i]))
            except Exception as exc:   # noqa: BLE001 - recorded, reported below
                rec["failures"].append(f"{type(exc).__name__}: {exc}")
            rec["ok"] = not rec["failures"]
            return rec

        with ThreadPoolExecutor(max_workers=crash_jobs()) as pool:
            return list(pool.map(one, range(self.n)))

    def report(self, records: list[dict], checks: list[str], extra: dict) -> None:
        """The scorecard document (``tests/scorecard.py``), then a test failure listing every
        failed run with what reproduces it."""
        failed = [r for r in records if not r["ok"]]
        scorecard.write(self.scenario, {
            "scenario": self.scenario, "seed": self.seed, "runs": len(records),
            "failures": len(failed), "killed": sum(1 for r in records if r.get("killed")),
            "checks": checks, "seconds": round(time.monotonic() - self.t0, 1),
            "jobs": crash_jobs(), **extra, "per_run": records})
        if failed:
            lines = [f"{self.scenario}: {len(failed)} of {len(records)} crash runs failed "
                     f"(reproduce with CKPT_TOOLS_CRASH_SEED={self.seed} "
                     f"CKPT_TOOLS_CRASH_RUNS_{self.scenario.upper()}={len(records)})"]
            for r in failed[:10]:
                how = {k: r.get(k) for k in ("mode", "fault", "delay_s", "trigger", "jobs")
                       if r.get(k) is not None}
                lines.append(f"  run {r['run']} {how}: " + " | ".join(r["failures"])[:1500])
            pytest.fail("\n".join(lines), pytrace=False)


# --- migrate ------------------------------------------------------------------------------------

def target_differences(got: Path, want: Path) -> list[str]:
    """How target ``got`` differs from the reference target ``want`` (empty: the same result)."""
    diffs = []
    files = target_files(got)
    if files != target_files(want):
        return [f"files differ: {sorted(set(files) ^ set(target_files(want)))}"]
    for rel in files:
        a, b = got / rel, want / rel
        if rel.endswith(".safetensors"):
            ta, tb = load_file(str(a)), load_file(str(b))
            if set(ta) != set(tb):
                diffs.append(f"{rel}: tensor names differ")
                continue
            for k in ta:
                x, y = ta[k], tb[k]
                if (x.dtype != y.dtype or x.shape != y.shape or not torch.equal(
                        x.contiguous().flatten().view(torch.uint8), y.contiguous().flatten().view(torch.uint8))):
                    diffs.append(f"{rel}: tensor {k} differs")
        elif rel == MARKER:
            ma, mb = (json.loads(p.read_text(encoding="utf-8")) for p in (a, b))
            for k in MARKER_VOLATILE:
                ma.pop(k, None)
                mb.pop(k, None)
            if ma != mb:
                diffs.append(f"{rel}: differs in {sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))}")
        elif rel.endswith("adapter_config.json"):
            # PEFT keeps target_modules as a set and writes it in hash order, which differs between
            # processes (PYTHONHASHSEED): compared as JSON, target_modules as a set, the rest exactly
            ca, cb = (json.loads(p.read_text(encoding="utf-8")) for p in (a, b))
            for c in (ca, cb):
                if isinstance(c.get("target_modules"), list):
                    c["target_modules"] = sorted(c["target_modules"])
            if ca != cb:
                diffs.append(f"{rel}: differs in {sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))}")
        elif a.read_bytes() != b.read_bytes():
            diffs.append(f"{rel}: bytes differ")
    return diffs


def target_failures(t: str, c, dst: Path, ref: Path, tolerated=lambda difference: False) -> list[str]:
    """A target ``t`` found under DST as checkpoint ``c``: it audits healthy with no error and
    equals the reference's, but for the differences ``tolerated`` lets pass."""
    if c.status != "healthy" or errors_of(c):
        return [f"{t}: audits {c.status} {[p.code for p in errors_of(c)]}"]
    return [f"{t}: {d}" for d in target_differences(dst / t, ref / t) if not tolerated(d)]


def check_dst(dst: Path, ref: Path, ref_targets: set[str]) -> tuple[list[str], int]:
    """Every target complete (healthy, no error, equal to the reference) or absent; only migrate's
    temporary directories besides. Returns (failures, targets present)."""
    failures: list[str] = []
    if not dst.exists():
        return failures, 0
    found = {c.path: c for c in scan(str(dst), min_age_s=0).checkpoints}
    present = 0
    for t in sorted(ref_targets):
        if not os.path.lexists(dst / t):
            continue
        present += 1
        c = found.get(t)
        if c is None:
            failures.append(f"{t}: exists but is not a checkpoint")
            continue
        failures += target_failures(t, c, dst, ref)
    for path, c in found.items():
        if path in ref_targets:
            continue
        if not any(m in path for m in TMP_MARKS):
            failures.append(f"{path}: unexpected checkpoint in DST ({c.status})")
        elif c.status != "in-progress":
            failures.append(f"{path}: a temporary directory audits {c.status}, not in-progress")
    return failures, present


@pytest.fixture(scope="module")
def migrate_setup(results_tree, undisturbed_migration):
    manifest = results_tree[1]
    base, ref = undisturbed_migration("crash-migrate", MIGRATE_SUBSET)
    layouts = {manifest[m["source"]].layout for m in ref.doc["migrated"]}
    assert {"v1", "v2", "v5", "canonical", "canonical+merged"} <= layouts, layouts
    assert any(t.endswith("best_model") for t in ref.targets)
    files = sum(len(target_files(ref.dst / t)) for t in ref.targets)
    return base, ref.src, ref.before, ref.dst, ref.targets, ref.seconds, files


def test_sigkill_during_migrate_leaves_complete_or_absent_targets_and_rerun_matches(migrate_setup):
    base, src, before, ref, ref_targets, base_seconds, n_files = migrate_setup
    trials = CrashTrials("migrate", 10)
    ref_listing = {t: target_files(ref / t) for t in ref_targets}

    def trial(i: int, rng: random.Random) -> dict:
        dst = base / f"dst-{i}"
        jobs = rng.choice((1, 2))
        rec: dict = {"jobs": jobs, "failures": []}
        # the first run dies mid-write for sure (it leaves a temporary directory), whatever the
        # seed and the timing: the check that a kill landed mid-migration cannot miss
        if i == 0 or rng.random() < 0.5:
            point = "after_write" if i == 0 else rng.choice(
                ("after_write", "after_write", "after_write", "before_rename", "after_rename"))
            count = n_files if point == "after_write" else len(ref_targets)
            fault = f"{point}:{rng.randint(1, count)}"
            rec |= {"mode": "fault", "fault": fault}
            end = run_and_kill(migrate_args(src, dst, jobs, fault), cli_env())
            if not end.killed:
                rec["failures"].append(f"the fault {fault} did not kill it (rc {end.returncode}): "
                                       f"{end.stderr[-500:]}")
        else:
            delay = round(rng.uniform(0.0, base_seconds), 3)
            end, delays = run_and_kill_timed(migrate_args(src, dst, jobs), cli_env(), delay, rng,
                                             lambda: shutil.rmtree(dst, ignore_errors=True))
            rec |= {"mode": "timed", "delay_s": delays[-1], "timed_tries": len(delays)}
            if not end.killed and end.returncode != 0:
                rec["failures"].append(f"exited {end.returncode} before the kill: {end.stderr[-500:]}")
        rec["killed"] = end.killed
        # 1. right after the kill
        fails, present = check_dst(dst, ref, ref_targets)
        rec["targets_present_after_kill"] = present
        rec["tmp_dirs_after_kill"] = len([p for p in dst.rglob(".ckpt-tools-tmp-*")]) if dst.exists() else 0
        rec["failures"] += [f"after kill: {f}" for f in fails]
        if file_hashes(src) != before:
            rec["failures"].append("after kill: the source tree changed")
        # 2. a re-run completes and gives the uninterrupted run's result
        proc = subprocess.run(migrate_args(src, dst), cwd=REPO, env=cli_env(), capture_output=True,
                              text=True, timeout=600)
        if proc.returncode != 0:
            rec["failures"].append(f"re-run exited {proc.returncode}: {proc.stderr[-1000:]}")
            return rec
        doc = json.loads(proc.stdout)
        rec["rerun_already_migrated"] = sum(1 for s in doc["skipped"] if s["reason"] == "already migrated")
        if doc["failed"]:
            rec["failures"].append(f"re-run failed: {doc['failed']}")
        found = {c.path for c in scan(str(dst), min_age_s=0).checkpoints}
        if found != ref_targets:
            rec["failures"].append(f"re-run: targets {sorted(found ^ ref_targets)} differ from an "
                                   "uninterrupted run")
        fails, present = check_dst(dst, ref, ref_targets)
        rec["failures"] += [f"after re-run: {f}" for f in fails]
        if list(dst.rglob(".ckpt-tools-tmp-*")) or list(dst.rglob(".ckpt-tools-old-*")):
            rec["failures"].append("after re-run: temporary directories left")
        if {t: target_files(dst / t) for t in found & ref_targets} != {
                t: ref_listing[t] for t in found & ref_targets}:
            rec["failures"].append("after re-run: file lists differ")
        if file_hashes(src) != before:
            rec["failures"].append("after re-run: the source tree changed")
        shutil.rmtree(dst, ignore_errors=True)
        return rec

    records = trials.run(trial)
    checks = [
        "killed: the process died of SIGKILL (run through tests/fault_entry.py with the fault spec "
        "after_write|before_rename|after_rename:N, or a timed kill of its process group at a "
        "random delay; a run that finished before its kill is tried again with a delay below its "
        "own run time, the third try at 0 s)",
        "every target under DST audits healthy with no error and equals the uninterrupted run's, "
        "or is absent; only .ckpt-tools-tmp-* directories (in-progress) besides",
        "SRC bit-identical (sha256, size, mtime of every file, computed once before)",
        "a re-run exits 0 with no failure",
        "after the re-run: the same targets as an uninterrupted run, adapter tensors bit-equal, "
        "adapter_config.json equal as JSON (target_modules order-insensitive: PEFT writes a set), "
        "every other file byte-equal, the marker equal but for finished_at/source_path, no temporary dirs",
    ]
    trials.report(records, checks, {"source": list(MIGRATE_SUBSET), "targets": len(ref_targets),
                                    "uninterrupted_run_s": round(base_seconds, 2)})
    # the kills must really have landed at different moments, or the test proves little
    assert sum(r["killed"] for r in records) >= max(1, trials.n // 2), "most runs were not killed"
    if trials.n >= 8:
        assert any(0 < r["targets_present_after_kill"] < len(ref_targets) or r["tmp_dirs_after_kill"]
                   for r in records), "no kill landed mid-migration"


# --- prune --------------------------------------------------------------------------------------

def effective_status(entry) -> str:
    return entry.status_as_root if os.geteuid() == 0 else entry.status


def prune_args(root: Path, log: Path, fault: str | None = None) -> list[str]:
    exe = shutil.which("ckpt-tools", path=os.pathsep.join([str(REPO / ".venv" / "bin"),
                                                           str(Path(sys.executable).parent)]))
    cmd = [exe] if exe else [sys.executable, "-m", "ckpt_tools.cli"]
    if fault:
        cmd = fault_entry.command(fault)
    return [*cmd, "prune", "--yes", "--min-age", "0", "--no-progress", "--json", "--log", str(log),
            str(root)]


def log_actions(log: Path) -> list[str]:
    try:
        text = log.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line)["action"])
        except ValueError:
            out.append("torn")
    return out


@pytest.fixture(scope="module")
def prune_setup(results_tree, tmp_path_factory):
    root, manifest, now = results_tree
    base = tmp_path_factory.mktemp("crash-prune")
    # what prune --min-age 0 must delete: the merged files of every redundant checkpoint, and of
    # the checkpoints in progress only because they are young (never of a tmp-checkpoint-*)
    expected = set()
    for e in manifest.values():
        st = effective_status(e)
        if st == "redundant" or (st == "in-progress" and not e.name.startswith("tmp-")):
            expected |= set(e.merged_files)
    before = file_hashes(root)
    # the uninterrupted run
    ref = copy_tree(root, base / "ref" / "results")
    t0 = time.monotonic()
    proc = subprocess.run(prune_args(ref, base / "ref.log"), env=cli_env(), capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = file_hashes(ref, skip=(LOCK_NAME,))
    assert set(before) - set(after) == expected, sorted(set(before) ^ set(after))
    assert {k: v for k, v in before.items() if k not in expected} == after
    return base, root, manifest, before, expected, after, seconds


def tree_changes(before: dict, now: dict, expected: set[str]) -> tuple[list[str], set[str]]:
    """Failures (something deleted that was not expected, new files, changed files) and the
    set of paths gone, between two listings of one tree."""
    failures = []
    gone = set(before) - set(now)
    if gone - expected:
        failures.append(f"deleted what it must not: {sorted(gone - expected)[:10]}")
    if set(now) - set(before):
        failures.append(f"new files: {sorted(set(now) - set(before))[:10]}")
    changed = [k for k in now if k in before and now[k] != before[k]]
    if changed:
        failures.append(f"files changed: {changed[:10]}")
    return failures, gone


def check_prune_state(root: Path, manifest, before: dict, expected: set[str]) -> tuple[list[str], int]:
    """Every checkpoint keeps a complete copy of its weights; only expected files are gone, the rest
    unchanged. Returns (failures, how many expected files are gone)."""
    failures, gone = tree_changes(before, file_hashes(root, skip=(LOCK_NAME,)), expected)
    found = {c.path: c for c in scan(str(root), min_age_s=0).checkpoints}
    for e in manifest.values():
        merged_present = all(os.path.lexists(root / m) for m in e.merged_files)
        st = effective_status(e)
        if st in ("legacy", "broken") or e.name.startswith("tmp-"):
            if not merged_present:
                failures.append(f"{e.path} ({st}): lost merged files")
            continue
        if merged_present:
            continue
        c = found.get(e.path)
        if c is None or c.status not in ("healthy", "redundant") or errors_of(c):
            failures.append(f"{e.path}: merged files gone and its PEFT tree audits "
                            f"{c.status if c else 'missing'} {[p.code for p in errors_of(c)] if c else ''}")
    return failures, len(gone & expected)


def test_sigkill_during_prune_never_loses_the_last_copy_and_rerun_finishes(prune_setup):
    base, src_root, manifest, before, expected, ref_after, base_seconds = prune_setup
    trials = CrashTrials("prune", 10)

    def trial(i: int, rng: random.Random) -> dict:
        root = copy_tree(src_root, base / f"t{i}" / "results")
        log = base / f"t{i}" / "prune.jsonl"
        rec: dict = {"failures": []}
        mode = ("timed", "log", "fault")[i % 3]   # every third run dies mid-deletion for sure
        if mode == "timed":
            delay = round(rng.uniform(0.0, base_seconds * 1.1), 4)

            def fresh():
                shutil.rmtree(base / f"t{i}")
                copy_tree(src_root, root)

            end, delays = run_and_kill_timed(prune_args(root, log), cli_env(), delay, rng, fresh)
            rec |= {"mode": "timed", "delay_s": delays[-1], "timed_tries": len(delays)}
        elif mode == "fault":
            # the process kills itself right after its k-th unlink, before logging it
            k = rng.randint(1, max(1, len(expected) - 1))
            rec |= {"mode": "fault", "fault": f"after_unlink:{k}"}
            end = run_and_kill(prune_args(root, log, f"after_unlink:{k}"), cli_env())
        else:
            # right after the k-th deletion was logged (0: once the plan is logged, before any)
            k = rng.randint(0, len(expected) - 1)
            rec |= {"mode": "log", "trigger": f"after delete #{k}"}

            def trigger():
                acts = log_actions(log)
                return "plan" in acts and acts.count("delete") >= k
            end = run_and_kill(prune_args(root, log), cli_env(), trigger=trigger)
        rec["killed"] = end.killed
        if not end.killed and end.returncode != 0:
            rec["failures"].append(f"exited {end.returncode} before the kill: {end.stderr[-500:]}")
        fails, gone = check_prune_state(root, manifest, before, expected)
        rec["deleted_before_kill"] = gone
        rec["failures"] += [f"after kill: {f}" for f in fails]
        proc = subprocess.run(prune_args(root, log), env=cli_env(), capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            rec["failures"].append(f"re-run exited {proc.returncode}: {proc.stderr[-1000:]}")
        else:
            doc = json.loads(proc.stdout)
            rec["rerun_deleted"] = len(doc["deleted"])
            if doc["failed"]:
                rec["failures"].append(f"re-run failed: {doc['failed']}")
        fails, gone = check_prune_state(root, manifest, before, expected)
        rec["failures"] += [f"after re-run: {f}" for f in fails]
        if gone != len(expected):
            rec["failures"].append(f"after re-run: {len(expected) - gone} redundant merged files left")
        if file_hashes(root, skip=(LOCK_NAME,)) != ref_after:
            rec["failures"].append("after re-run: the tree differs from an uninterrupted prune's")
        shutil.rmtree(base / f"t{i}", ignore_errors=True)
        return rec

    records = trials.run(trial)
    checks = [
        "killed, a third of the runs each way: SIGKILL of its process group at a random delay (a "
        "run that finished first is tried again with a delay below its own run time, the third "
        "try at 0 s); "
        "right after the k-th deletion appeared in its --log; by itself right after its k-th "
        "unlink, before logging it (run through tests/fault_entry.py with the fault spec "
        "after_unlink:k); k random",
        "every checkpoint keeps a complete copy: all its merged files, or a PEFT tree auditing "
        "healthy/redundant with no error; legacy, broken and tmp-checkpoint-* keep every merged file",
        "nothing deleted but the expected redundant merged files; every other file unchanged (sha256, mtime)",
        "a re-run exits 0 with no failure",
        "after the re-run: exactly the expected redundant merged files deleted; the tree equals an "
        "uninterrupted prune's",
    ]
    trials.report(records, checks, {"expected_deletions": len(expected),
                                    "uninterrupted_run_s": round(base_seconds, 3)})
    assert sum(r["killed"] for r in records) >= max(1, trials.n // 2), "most runs were not killed"
    if trials.n >= 3:   # the runs under a fault spec die mid-deletion
        assert any(0 < r["deleted_before_kill"] < len(expected) for r in records), \
            "no kill landed mid-deletion"


# --- prune in worker processes ------------------------------------------------------------------

WORKER_TREE = 300   # generated checkpoints, every third redundant: 100, two workers' worth


def tree_state(root: Path) -> dict[str, tuple]:
    """file_hashes for the generated tree, whose merged files are hundreds of MB of holes:
    each file's kind, size and mtime, and the sha256 of its first MiB (prune writes nothing,
    so a change would move the mtime; an unlink removes the entry)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root).replace(os.sep, "/")
            if rel == LOCK_NAME:
                continue
            st = os.lstat(p)
            with open(p, "rb") as fh:
                head = hashlib.sha256(fh.read(1 << 20)).hexdigest()
            out[rel] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, head)
    return out


def cp_tree(src: Path, dst: Path) -> Path:
    """A copy that keeps the generated tree's sparse merged files sparse."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


@pytest.fixture(scope="module")
def prune_workers_setup(tmp_path_factory):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from gen_tree import generate
    finally:
        sys.path.remove(str(REPO / "bench"))
    base = tmp_path_factory.mktemp("crash-prune-workers")
    src = base / "tree"
    generate(src, WORKER_TREE)
    before = tree_state(src)
    expected = {k for k in before if k.endswith("/model.safetensors")}
    ref = cp_tree(src, base / "ref" / "tree")
    t0 = time.monotonic()
    proc = subprocess.run([*prune_args(ref, base / "ref.log"), "--jobs", "2"], env=cli_env(),
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads(proc.stdout)["deleted"]) == len(expected) >= 100
    after = tree_state(ref)
    assert set(before) - set(after) == expected
    return base, src, before, expected, after, seconds


def check_generated_tree(root: Path, before: dict, expected: set[str]) -> tuple[list[str], int]:
    """Only planned merged files gone, every other file unchanged, and each checkpoint that lost
    its merged file audits healthy with no error. Returns (failures, merged files gone)."""
    failures, gone = tree_changes(before, tree_state(root), expected)
    found = {c.path: c for c in scan(str(root), min_age_s=0).checkpoints}
    for rel in gone & expected:
        c = found.get(rel.rsplit("/", 1)[0])
        if c is None or c.status != "healthy" or errors_of(c):
            failures.append(f"{rel}: gone, and its checkpoint audits "
                            f"{c.status if c else 'missing'} {[p.code for p in errors_of(c)] if c else ''}")
    return failures, len(gone & expected)


def test_sigkill_of_prune_or_of_its_workers_never_loses_the_last_copy(prune_workers_setup):
    base, src, before, expected, ref_after, base_seconds = prune_workers_setup
    trials = CrashTrials("prune_workers", 4)

    def trial(i: int, rng: random.Random) -> dict:
        root = cp_tree(src, base / f"w{i}" / "tree")
        log = base / f"w{i}" / "prune.jsonl"
        args = [*prune_args(root, log), "--jobs", "2"]
        rec: dict = {"failures": []}
        if i % 2 == 0:
            # the process group (prune and its workers) right after the k-th deletion was logged
            k = rng.randint(1, len(expected) - 10)
            rec |= {"mode": "log", "trigger": f"after delete #{k}"}
            end = run_and_kill(args, cli_env(),
                               trigger=lambda: log_actions(log).count("delete") >= k)
            rec["killed"] = end.killed
            if not end.killed and end.returncode != 0:
                rec["failures"].append(f"exited {end.returncode} before the kill: {end.stderr[-500:]}")
        else:
            # each worker SIGKILLs itself right after its k-th unlink, before logging or
            # reporting it; at least one of the two gets that far (each has about 50)
            k = rng.randint(1, 45)
            rec |= {"mode": "worker", "fault": f"after_unlink_in_worker:{k}"}
            proc = subprocess.run([*prune_args(root, log, f"after_unlink_in_worker:{k}"), "--jobs", "2"],
                                  env=cli_env(),
                                  capture_output=True, text=True, timeout=300,
                                  stdin=subprocess.DEVNULL)
            rec["killed"] = False
            if proc.returncode != 1:
                rec["failures"].append(f"exited {proc.returncode}, not 1: {proc.stderr[-500:]}")
            else:
                doc = json.loads(proc.stdout)
                redone = [s for s in doc["skipped"] if "worker process ended" in s["reason"]]
                rec["redone_after_worker_died"] = len(redone)
                if not redone:
                    rec["failures"].append("no checkpoint says a worker process ended")
                if doc["failed"]:
                    rec["failures"].append(f"failed: {doc['failed'][:3]}")
        fails, gone = check_generated_tree(root, before, expected)
        rec["deleted_before_kill"] = gone   # worker runs: by the end of the first run
        rec["failures"] += [f"after the first run: {f}" for f in fails]
        if rec["mode"] == "worker" and gone != len(expected):
            rec["failures"].append(f"{len(expected) - gone} merged files left after the prune "
                                   "process took over the dead workers' checkpoints")
        proc = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            rec["failures"].append(f"re-run exited {proc.returncode}: {proc.stderr[-1000:]}")
        fails, gone = check_generated_tree(root, before, expected)
        rec["failures"] += [f"after re-run: {f}" for f in fails]
        if gone != len(expected):
            rec["failures"].append(f"after re-run: {len(expected) - gone} merged files left")
        if tree_state(root) != ref_after:
            rec["failures"].append("after re-run: the tree differs from an uninterrupted prune's")
        shutil.rmtree(base / f"w{i}", ignore_errors=True)
        return rec

    records = trials.run(trial)
    checks = [
        f"prune --yes --jobs 2 on {WORKER_TREE} generated checkpoints ({len(expected)} redundant: "
        "two worker processes re-validate and unlink); half the runs: SIGKILL of the process "
        "group right after the k-th deletion appeared in its --log; the other half: each worker "
        "SIGKILLs itself right after its k-th unlink (run through tests/fault_entry.py with the "
        "fault spec after_unlink_in_worker:k, k random), the prune process goes on",
        "a dead worker's checkpoints are taken over by the prune process: every merged file gone, "
        "exit 1, the skips it reports say a worker process ended",
        "every checkpoint keeps a complete copy: its merged file, or a PEFT tree auditing "
        "healthy with no error; nothing else deleted; every other file unchanged (size, mtime, "
        "sha256 of its first MiB: the merged files are hundreds of MB of holes)",
        "a re-run exits 0; the tree then equals an uninterrupted prune's",
    ]
    trials.report(records, checks, {"expected_deletions": len(expected),
                                    "uninterrupted_run_s": round(base_seconds, 3)})
