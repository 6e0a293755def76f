"""Reliability, concurrency: ckpt-tools runs against each other and against a training run.

Three entries of the scorecard, each repeated with random timings:

- two ``prune --yes`` runs started at once on one root: one waits for the other's lock or exits
  75, and together they delete exactly the redundant merged files, each once;
- ``prune`` run again and again while another process writes new checkpoints file by file, in
  the Trainer's order (merged weights, optimizer, trainer state, then the PEFT tree): nothing is
  ever deleted from a checkpoint before it is complete;
- ``migrate SRC DST`` and ``prune SRC`` started together: both exit with a documented code,
  every target is complete and equal to an undisturbed migration's, every source checkpoint keeps
  a complete copy of its weights, and no partial directory is left.

``CKPT_TOOLS_CONCURRENCY_RUNS=N`` sets the number of runs of each entry (the defaults, 6, 4 and
3, keep the file near a minute on 2 cores, most of it migrate starting torch);
``CKPT_TOOLS_CONCURRENCY_SEED`` fixes the seed (printed on failure).
"""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fixtures.copying import copy_tree
from reliability import cli_env, file_hashes, json_document, seed_from
from scorecard import Runs
from test_prune import LOCK_NAME, ckpt_tools_exe
from test_reliability_crash import (MARKER, TMP_MARKS, check_prune_state, effective_status,
                                    target_failures)

from ckpt_tools import scan

SCENARIO = 5
RUNS_ENV = "CKPT_TOOLS_CONCURRENCY_RUNS"
SEED_ENV = "CKPT_TOOLS_CONCURRENCY_SEED"
# what the two-prune and migrate-prune runs work on: redundant checkpoints of several layouts
# (canonical+merged, v3, the benchmark script's rewritten config), legacy ones, a young one and
# a tmp-checkpoint-*
PRUNE_RUNS = ("run_trainer", "seed_v3", "benchmarked", "legacy_v1", "run canonical", "hybrid_v2")
MIGRATE_RUNS = ("run_trainer", "seed_v3", "benchmarked", "legacy_v1/checkpoint-100")
# The --lock-timeout of a run that must wait for the other one: only a guard against a hang,
# far beyond how long the other ever holds the lock (a prune: well under a second; a migrate:
# seconds), so that a loaded machine cannot make the waiting run give up (exit 75).
LOCK_WAIT_S = 240
# How long a Proc may run (a guard too): the longest wait for the lock plus the run itself.
PROC_GUARD_S = LOCK_WAIT_S + 120


# --- settings and processes ---------------------------------------------------------------------

def runs_of(default: int) -> int:
    value = os.environ.get(RUNS_ENV)
    return max(1, int(value)) if value else default


# ``ckpt-tools ARGS`` with its imports done ahead: it prints "ready", then runs the command as
# soon as a line arrives on stdin, so that two of them can be let go within a millisecond.
WARM = textwrap.dedent("""
    import sys
    import ckpt_tools.api, ckpt_tools.cli.prune, ckpt_tools.prune.execute, ckpt_tools.validator
    from ckpt_tools.cli import main
    print("ready", flush=True)
    sys.stdin.readline()
    sys.exit(main(sys.argv[1:]))
""")


class Proc:
    """A ``ckpt-tools`` child in its own session, stdout and stderr collected as it runs.

    ``warm``: started ahead (see WARM) and run by ``go()``; otherwise the console script, at once.
    """

    def __init__(self, *args, warm: bool = False):
        self.args = [str(a) for a in args]
        cmd = [sys.executable, "-c", WARM, *self.args] if warm else [ckpt_tools_exe(), *self.args]
        self.ready = threading.Event()
        self.popen = subprocess.Popen(cmd, stdin=subprocess.PIPE if warm else subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=cli_env(), start_new_session=True)
        self.t0 = time.monotonic()
        self.out: list[str] = []
        self.err: list[str] = []
        self.ends: list[float] = []
        self.readers = [threading.Thread(target=self._read, args=(self.popen.stdout, self.out, warm)),
                        threading.Thread(target=self._read, args=(self.popen.stderr, self.err, False))]
        for t in self.readers:
            t.start()
        if warm and not self.ready.wait(120):
            raise RuntimeError(f"the warm child never became ready: {''.join(self.err)[-500:]}")
        self.seconds: float | None = None

    def _read(self, stream, sink, warm: bool):
        for line in stream:
            if warm and not self.ready.is_set() and line == "ready\n":
                self.ready.set()
                continue
            sink.append(line)
        self.ends.append(time.monotonic())     # its end of file: the child has exited

    def go(self) -> None:
        self.t0 = time.monotonic()
        self.popen.stdin.write("go\n")
        self.popen.stdin.close()

    def wait(self, timeout: float = PROC_GUARD_S) -> int:
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        for t in self.readers:
            t.join()
        self.seconds = round(max(self.ends, default=time.monotonic()) - self.t0, 3)
        return self.popen.returncode

    @property
    def rc(self) -> int | None:
        return self.popen.returncode

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def json(self) -> dict | None:
        return json_document(self.stdout)


def no_traceback(name: str, proc: Proc) -> list[str]:
    if "Traceback" in proc.stdout + proc.stderr:
        return [f"{name}: a traceback in its output: {proc.stderr[-600:]}"]
    return []


def expected_deletions(manifest, copied: tuple[str, ...]) -> tuple[dict, set[str]]:
    """The manifest entries under the ``copied`` paths and what ``prune --min-age 0`` must
    delete from them."""
    entries = {k: e for k, e in manifest.items()
               if any(k == c or k.startswith(c + "/") for c in copied)}
    expected = set()
    for e in entries.values():
        st = effective_status(e)
        if st == "redundant" or (st == "in-progress" and not e.name.startswith("tmp-")):
            expected |= set(e.merged_files)
    return entries, expected


def scenario_entry(key: str, **description) -> tuple[int, random.Random, Runs]:
    """An entry's seed, its generator and its scorecard record (``Runs(key, ...)``)."""
    seed = seed_from(SEED_ENV)
    return seed, random.Random(seed), Runs(key, scenario=SCENARIO, **description)


def finish(runs: Runs, seed: int, n: int, **extra) -> None:
    runs.finish(seed=seed, reproduce=f"{SEED_ENV}={seed} {RUNS_ENV}={n}", **extra)


# --- 1. two prunes at once ----------------------------------------------------------------------

def test_two_prunes_at_once_serialise_on_the_lock(results_tree, tmp_path):
    src, manifest, _ = results_tree
    entries, expected = expected_deletions(manifest, PRUNE_RUNS)
    assert len(expected) >= 5
    seed, rng, runs = scenario_entry(
        "concurrency-two-prunes",
        title="Two `ckpt-tools prune --yes --min-age 0 ROOT` started at once",
        checks=[
            "each exits 0, or 75 (lock held) only when its --lock-timeout is 0; never both 75",
            "a run that exits 75 prints one line naming the lock file and deletes nothing",
            "the deletions reported by the two (--json) are disjoint and together exactly "
            "the redundant merged files",
            "every checkpoint keeps a complete copy of its weights; nothing else deleted "
            "or changed (sha256, mtime); no file created but the lock file",
            "no traceback",
        ], test="test_two_prunes_at_once_serialise_on_the_lock")
    n = runs_of(6)
    for i in range(n):
        t0 = time.monotonic()
        base = tmp_path / f"two-{i}"
        root = copy_tree(src, base / "results", only=PRUNE_RUNS)
        before = file_hashes(root, skip=(LOCK_NAME,))
        timeouts = [rng.choice((0, 0, LOCK_WAIT_S)), rng.choice((0, LOCK_WAIT_S))]
        explicit_lock = rng.random() < 0.25
        offset = round(rng.uniform(0.0, 0.06), 4)
        jobs = [rng.choice((1, 2)), rng.choice((1, 2))]
        lock_args = ["--lock", base / "team.lock"] if explicit_lock else []
        # warm: both imported ahead and let go `offset` apart, so that their lock attempts
        # really meet; cold: two console scripts started `offset` apart, as two cron jobs
        warm = rng.random() < 0.7
        procs = []
        for k in range(2):
            if k == 1 and not warm:
                time.sleep(offset)
            procs.append(Proc("prune", "--yes", "--min-age", "0", "--no-progress", "--json",
                              "--lock-timeout", timeouts[k], "--jobs", jobs[k], *lock_args, root,
                              warm=warm))
        if warm:
            procs[0].go()
            time.sleep(offset)
            procs[1].go()
        rcs = [p.wait() for p in procs]
        failures: list[str] = []
        deleted: list[list[str]] = []
        for k, p in enumerate(procs):
            name = f"prune {'AB'[k]}"
            failures += no_traceback(name, p)
            if p.rc == 0:
                doc = p.json()
                if doc is None:
                    failures.append(f"{name}: exit 0 without a JSON document: {p.stdout[-300:]}")
                    deleted.append([])
                    continue
                deleted.append([d["path"] for d in doc["deleted"]])
                changed = [s for s in doc["skipped"] if s["path"] in expected]
                if changed or doc["failed"]:
                    failures.append(f"{name}: skipped {changed} failed {doc['failed']}")
            elif p.rc == 75:
                deleted.append([])
                lines = p.stderr.strip().splitlines()
                lock_file = str(base / "team.lock") if explicit_lock else LOCK_NAME
                if timeouts[k]:
                    failures.append(f"{name}: exit 75 although it waits {timeouts[k]} s for the lock")
                if len(lines) != 1 or lock_file not in lines[0]:
                    failures.append(f"{name}: exit 75 must print one line naming {lock_file}: {lines}")
                if p.stdout.strip():
                    failures.append(f"{name}: exit 75 with output on stdout: {p.stdout[:200]}")
            else:
                deleted.append([])
                failures.append(f"{name}: exit {p.rc}: {p.stderr[-600:]}")
        if rcs == [75, 75]:
            failures.append("both runs exited 75: nobody pruned")
        both = [d for d in deleted[0] if d in deleted[1]]
        if both:
            failures.append(f"deleted by both runs: {both}")
        reported = set(deleted[0]) | set(deleted[1])
        if reported != expected:
            failures.append(f"reported deletions differ from the redundant merged files: "
                            f"missing {sorted(expected - reported)}, extra {sorted(reported - expected)}")
        fails, gone = check_prune_state(root, entries, before, expected)
        failures += fails
        if gone != len(expected):
            failures.append(f"{len(expected) - gone} redundant merged files left")
        if explicit_lock and (root / LOCK_NAME).exists():
            failures.append(f"--lock given, yet {LOCK_NAME} was created in the root")
        runs.add(f"run {i}", failures, seconds=round(time.monotonic() - t0, 2), exits=rcs, warm=warm,
                 lock_timeouts=timeouts, explicit_lock=explicit_lock, start_offset_s=offset,
                 jobs=jobs, deleted_by=[len(d) for d in deleted],
                 process_seconds=[p.seconds for p in procs])
        shutil.rmtree(base, ignore_errors=True)
    runs.note(f"Root: copies of {', '.join(PRUNE_RUNS)} from the fixture tree; "
              f"{len(expected)} redundant merged files. Varied per run: both imported ahead and "
              "let go 0–60 ms apart (most runs), or two console scripts started 0–60 ms apart; "
              f"each run's --lock-timeout (0 or {LOCK_WAIT_S} s) and --jobs; --lock PATH or the "
              "root's own lock file. Both exiting 0 with a 0 timeout means the second took the "
              "lock after the first had finished.")
    finish(runs, seed, n, expected_deletions=len(expected))


# --- 2. prune while a checkpoint is being written -----------------------------------------------

# Writes checkpoint-<1000+k> (k < count) file by file, in the Trainer's order: merged weights,
# optimizer, scheduler, RNG state, trainer state, training args, then the PEFT tree (in a random
# order that still ends with an adapter's weights, which a complete tree needs). Each file is
# written in random chunks with random pauses. After every chunk but the checkpoint's very last
# one it checks that every byte written so far in the checkpoint is still there; anything missing
# is printed as "LOST <path>" (a deletion before the checkpoint was complete).
# Modes: "trainer" (fresh mtimes, as a training run writes them), "rsync" (each file's mtime set
# 2 days back once written, as `rsync -a` or `cp -p` leave it: --min-age cannot protect it),
# "tmp-rename" (written as tmp-checkpoint-<step>, renamed into place when complete).
# Once the first file of its last checkpoint is written it prints "holding" and waits for a line
# on stdin: the test lets it go after two prunes have run, so that prunes certainly run while a
# checkpoint is incomplete, however fast or slow the machine.
WRITER = textwrap.dedent("""
    import json, os, random, sys, time
    template, run, count, seed, mode, pause = sys.argv[1:7]
    count, pause = int(count), float(pause)
    rng = random.Random(int(seed))
    files = []
    for dirpath, _, names in os.walk(template):
        files += [os.path.relpath(os.path.join(dirpath, n), template) for n in names]
    first = ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
             "trainer_state.json", "training_args.bin"]
    lost = 0
    for k in range(count):
        tree = sorted(f for f in files if f not in first)
        rng.shuffle(tree)
        last = max(f for f in tree if f.endswith("adapter_model.safetensors"))
        tree.remove(last)
        order = [f for f in first if f in files] + tree + [last]
        name = f"checkpoint-{1000 + k}"
        final = os.path.join(run, name)
        ck = os.path.join(run, "tmp-" + name) if mode == "tmp-rename" else final
        written = {}
        for i, rel in enumerate(order):
            with open(os.path.join(template, rel), "rb") as fh:
                data = fh.read()
            dst = os.path.join(ck, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "wb") as out:
                pos = 0
                while True:
                    n = rng.choice((len(data), rng.randint(1, max(1, len(data) // 3))))
                    out.write(data[pos:pos + n])
                    out.flush()
                    pos = min(len(data), pos + n)
                    written[rel] = pos
                    if i == len(order) - 1 and pos == len(data):
                        break
                    for r, size in written.items():
                        p = os.path.join(ck, r)
                        try:
                            ok = os.stat(p).st_size == size
                        except FileNotFoundError:
                            ok = False
                        if not ok:
                            lost += 1
                            print("LOST", p, "while writing", rel, flush=True)
                    if pos == len(data):
                        break
                    time.sleep(rng.uniform(0, pause))
            if mode == "rsync":
                old = time.time() - 2 * 86400
                os.utime(dst, (old, old))
            if k == count - 1 and i == 0:
                print("holding", flush=True)
                sys.stdin.readline()
            time.sleep(rng.uniform(0, pause))
        if mode == "tmp-rename":
            os.rename(ck, final)
        print("done", final, json.dumps(written), flush=True)
    sys.exit(3 if lost else 0)
""")

WRITER_MODES = {
    # mode: (prune's --min-age, may a complete new checkpoint lose its merged weights meanwhile)
    "trainer": ("1h", False),
    "trainer, --min-age 0": ("0", True),
    "rsync": ("1h", True),
    "tmp-rename": ("0", True),
}


def test_prune_never_deletes_from_a_checkpoint_being_written(results_tree, tmp_path):
    src, manifest, _ = results_tree
    template = src / "run_trainer" / "checkpoint-4"
    seed, rng, runs = scenario_entry(
        "concurrency-trainer-writing",
        title="`ckpt-tools prune --yes` again and again while a checkpoint is written "
              "file by file as the Trainer does",
        checks=[
            "the writer checks after every chunk it writes that every byte it wrote in the "
            "checkpoint so far is still there: nothing of an incomplete checkpoint is ever "
            "deleted (the last chunk of the last PEFT file is what completes it)",
            "with the default --min-age 1h and fresh files nothing at all is deleted from "
            "the new checkpoints; with --min-age 0, or files whose mtimes are old (rsync -a), "
            "only the merged model.safetensors of a completed checkpoint may go",
            "every prune run exits 0 with nothing skipped or failed; prunes ran while "
            "the writer was writing (it holds, its last checkpoint begun, until two "
            "have run); the old redundant checkpoints were pruned",
            "no traceback",
        ], test="test_prune_never_deletes_from_a_checkpoint_being_written")
    n = runs_of(4)
    modes = list(WRITER_MODES)
    for i in range(n):
        t0 = time.monotonic()
        mode = modes[i % len(modes)]
        min_age, may_prune_complete = WRITER_MODES[mode]
        root = copy_tree(src, tmp_path / f"w-{i}" / "results", only=("run_trainer",))
        run = root / "run_trainer"
        count = rng.randint(2, 3)
        pause = rng.choice((0.02, 0.03))
        wseed = rng.randrange(2 ** 31)
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(template), str(run), str(count),
                                   str(wseed), mode.split(",")[0], str(pause)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        out_lines: list[str] = []
        reader = threading.Thread(target=lambda: out_lines.extend(writer.stdout))
        reader.start()
        prunes: list[Proc] = []
        during = 0
        try:
            while writer.poll() is None or len(prunes) < 2:
                during += writer.poll() is None
                p = Proc("prune", "--yes", "--no-progress", "--json", "--min-age", min_age, root)
                p.wait()
                prunes.append(p)
                if len(prunes) == 2:        # the writer may finish now
                    try:
                        writer.stdin.write("go\n")
                        writer.stdin.close()
                    except BrokenPipeError:     # it has died: its exit status says so below
                        pass
                if len(prunes) > 200:
                    break
        finally:
            if writer.poll() is None:
                writer.kill()
            writer.wait()
            reader.join()
        failures: list[str] = []
        if writer.returncode != 0:
            failures.append(f"writer exited {writer.returncode}: {writer.stderr.read()[-500:]}")
        if "holding\n" not in out_lines:
            failures.append("the writer never held with its last checkpoint incomplete")
        lost = [line.strip() for line in out_lines if line.startswith("LOST")]
        failures += lost[:5]
        done = {}
        for line in out_lines:
            if line.startswith("done "):
                _, path, sizes = line.rstrip("\n").split(" ", 2)
                done[path] = json.loads(sizes)
        if len(done) != count:
            failures.append(f"the writer completed {len(done)} of {count} checkpoints")
        if not during:
            failures.append("no prune ran while the writer was writing")
        for k, p in enumerate(prunes):
            failures += no_traceback(f"prune {k}", p)
            doc = p.json()
            if p.rc != 0 or doc is None:
                failures.append(f"prune {k} exited {p.rc}: {p.stderr[-400:]}")
            elif doc["failed"]:        # (exit 0 also says nothing was skipped as changed)
                failures.append(f"prune {k}: failed {doc['failed']}")
        pruned_new = 0
        for ck, sizes in done.items():
            for rel, size in sizes.items():
                p = Path(ck) / rel
                if rel == "model.safetensors" and may_prune_complete and not p.exists():
                    pruned_new += 1
                    continue
                if not p.exists() or p.stat().st_size != size:
                    failures.append(f"{p}: deleted or changed")
        for old in ("checkpoint-2", "checkpoint-4"):
            if (run / old / "model.safetensors").exists():
                failures.append(f"{old}: the old redundant checkpoint was not pruned meanwhile")
        runs.add(f"run {i}: {mode}", failures, seconds=round(time.monotonic() - t0, 2), mode=mode,
                 min_age=min_age, checkpoints_written=count, pause_s=pause, writer_seed=wseed,
                 prune_runs=len(prunes), prune_runs_while_writing=during,
                 new_checkpoints_pruned_once_complete=pruned_new)
        shutil.rmtree(tmp_path / f"w-{i}", ignore_errors=True)
    runs.note("Template: run_trainer/checkpoint-4 of the fixture tree (canonical PEFT tree and the "
              "Trainer's merged model.safetensors). Modes cycle over: " + "; ".join(
                  f"{m} (prune --min-age {a})" for m, (a, _) in WRITER_MODES.items()) + ".")
    finish(runs, seed, n)


# --- 3. migrate and prune on the same tree at once ----------------------------------------------

def _marker_only_differs_in(diff: str, allowed: set[str]) -> bool:
    prefix = f"{MARKER}: differs in "
    if not diff.startswith(prefix):
        return False
    try:
        keys = ast.literal_eval(diff[len(prefix):])
    except (ValueError, SyntaxError):
        return False
    return set(keys) <= allowed


def check_targets(dst: Path, ref: Path, ref_targets: set[str], pruned: bool) -> list[str]:
    """Every reference target present, auditing healthy with no error, equal to the reference;
    nothing else (no temporary directory) in DST."""
    failures = []
    found = {c.path: c for c in scan(str(dst), min_age_s=0).checkpoints} if dst.exists() else {}
    for t in sorted(ref_targets):
        c = found.get(t)
        if c is None:
            failures.append(f"{t}: target missing")
            continue
        # a source whose merged weights were pruned before migrate read it is recorded as the
        # layout it then had, with the input files it then had: the same target
        failures += target_failures(t, c, dst, ref, lambda d: pruned and _marker_only_differs_in(
            d, {"layout", "inputs", "inputs_digest"}))
    extra = sorted(set(found) - ref_targets)
    if extra:
        failures.append(f"unexpected directories in DST: {extra}")
    leftovers = [str(p) for m in TMP_MARKS for p in dst.rglob(m + "*")] if dst.exists() else []
    if leftovers:
        failures.append(f"partial directories left: {leftovers}")
    return failures


@pytest.fixture(scope="module")
def migrate_reference(undisturbed_migration):
    base, ref = undisturbed_migration("concurrency-migrate", MIGRATE_RUNS)
    methods = {m["method"] for m in ref.doc["migrated"]}
    assert {"copy", "exact"} <= methods, methods
    return base, ref.dst, ref.targets, ref.seconds


def _wait_for_path(path: Path, proc: Proc, limit: float) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.popen.poll() is None:
        if path.exists():
            return True
        time.sleep(0.002)
    return path.exists()


def test_migrate_and_prune_of_the_same_tree_at_once(results_tree, migrate_reference):
    src_tree, manifest, _ = results_tree
    base, ref, ref_targets, ref_seconds = migrate_reference
    entries, expected = expected_deletions(manifest, MIGRATE_RUNS)
    assert expected
    seed, rng, runs = scenario_entry(
        "concurrency-migrate-prune",
        title="`ckpt-tools migrate SRC DST` and `ckpt-tools prune --yes --min-age 0 SRC` "
              "started together",
        checks=[
            "migrate exits 0, or 75 only when its --lock-timeout is 0 and prune holds "
            "SRC's lock; prune exits 0, or 75 only when its --lock-timeout is 0 (migrate "
            "holds SRC's tree lock shared while it reads SRC); never both 75",
            "migrate reports no failed checkpoint; when it exits 0 every target of an "
            "undisturbed migration is there, audits healthy with no error and equals "
            "it (tensors bit-equal; the marker may record the pruned source's layout and "
            "inputs); when it exits 75 DST holds no target. (A checkpoint whose merged "
            "weights prune deletes while migrate reads them is done again from the source "
            "as it then is, with a note: counted per run.)",
            "no partial (.ckpt-tools-tmp-*/.ckpt-tools-old-*) directory in DST",
            "prune deleted exactly the redundant merged files (none when it exited 75); "
            "every source checkpoint keeps a complete copy of its weights; nothing else "
            "in SRC deleted or changed",
            "DST inside SRC, or SRC inside DST: migrate refuses (exit 2) and writes "
            "nothing; the prune beside it is unaffected",
            "no traceback",
        ], test="test_migrate_and_prune_of_the_same_tree_at_once")
    n = runs_of(3)
    cases = ["dst-inside-src", "src-inside-dst"] + [f"run {i}" for i in range(n)]
    for i, case in enumerate(cases):
        t0 = time.monotonic()
        work = base / f"m-{i}"
        src = work / "src"
        for rel in MIGRATE_RUNS:
            copy_tree(src_tree / rel, src / rel)
        facts: dict = {}
        failures: list[str] = []
        if case == "dst-inside-src":
            dst, prune_root = src / "healthy", src
        elif case == "src-inside-dst":
            dst, prune_root = work, src
        else:
            dst, prune_root = work / "dst", src
        inside = case in ("dst-inside-src", "src-inside-dst")
        lock_file = not inside and rng.random() < 0.35
        if lock_file:               # what an earlier prune of SRC leaves behind
            (src / LOCK_NAME).touch()
        before = file_hashes(src, skip=(LOCK_NAME,))
        mig_timeout = 0 if inside else rng.choice((0, 0, LOCK_WAIT_S))
        prune_timeout = 0 if inside else rng.choice((0, LOCK_WAIT_S))
        start = "together" if inside else rng.choice(("migrate executing", "migrate executing",
                                                       "migrate executing", "random", "prune first"))
        delay = round(rng.uniform(0.0, 0.5 if start != "random" else max(1.0, 1.5 * ref_seconds)), 3)
        mig_args = ("migrate", "--min-age", "0", "--json", "--no-progress", "--lock-timeout",
                    mig_timeout, src, dst)
        prune_args = ("prune", "--yes", "--min-age", "0", "--json", "--no-progress",
                      "--lock-timeout", prune_timeout, prune_root)
        if start == "prune first":
            prune = Proc(*prune_args)
            time.sleep(delay)
            migrate = Proc(*mig_args)
        else:
            migrate = Proc(*mig_args)
            if start == "migrate executing":
                # once migrate takes DST's lock it starts on its first checkpoint: that is when
                # it reads the merged weights that a prune deletes
                _wait_for_path(dst / LOCK_NAME, migrate, 120)
            time.sleep(delay)
            prune = Proc(*prune_args)
        m_rc, p_rc = migrate.wait(), prune.wait()
        facts.update(start=start, delay_s=delay, src_lock_file=lock_file, migrate_exit=m_rc,
                     prune_exit=p_rc, migrate_lock_timeout=mig_timeout,
                     prune_lock_timeout=prune_timeout, migrate_seconds=migrate.seconds,
                     prune_seconds=prune.seconds)
        failures += no_traceback("migrate", migrate) + no_traceback("prune", prune)
        # --- exit codes
        if inside:
            if m_rc != 2:
                failures.append(f"migrate with {case} exited {m_rc}, not 2: {migrate.stderr[-400:]}")
            if case == "src-inside-dst" and sorted(os.listdir(work)) != ["src"]:
                failures.append(f"migrate refused, yet wrote in DST: {sorted(os.listdir(work))}")
        else:
            ok = {0} | ({75} if mig_timeout == 0 else set())
            if m_rc not in ok:
                failures.append(f"migrate exited {m_rc}: {migrate.stderr[-600:]}")
        p_ok = {0} | ({75} if prune_timeout == 0 else set())
        if p_rc not in p_ok:
            failures.append(f"prune exited {p_rc}: {prune.stderr[-600:]}")
        if m_rc == 75 and p_rc == 75:
            failures.append("both exited 75")
        # --- migrate's result
        if not inside:
            doc = migrate.json()
            if m_rc == 0:
                if doc is None:
                    failures.append(f"migrate: no JSON document: {migrate.stdout[-300:]}")
                else:
                    if doc["failed"]:
                        failures.append(f"migrate failed: {[(f['source'], f['reason']) for f in doc['failed']]}")
                    got = {m["target"] for m in doc["migrated"]}
                    if got != ref_targets:
                        failures.append(f"migrated {sorted(got)}, an undisturbed run {sorted(ref_targets)}")
                failures += check_targets(dst, ref, ref_targets, pruned=p_rc == 0)
                facts["targets_from_a_pruned_source"] = sum(
                    1 for t in ref_targets if (dst / t / MARKER).exists() and json.loads(
                        (dst / t / MARKER).read_text(encoding="utf-8"))["layout"] != json.loads(
                        (ref / t / MARKER).read_text(encoding="utf-8"))["layout"])
            elif m_rc == 75:
                leftovers = sorted(str(p.relative_to(dst)) for p in dst.rglob("*")
                                   if p.name != LOCK_NAME) if dst.exists() else []
                if leftovers:
                    failures.append(f"migrate exited 75 yet DST holds {leftovers[:5]}")
            if doc is not None:
                facts["migrated"] = len(doc.get("migrated", []))
                # read while prune deleted its merged weights, then done again (see the converter)
                facts["sources_changed_while_read"] = sum(
                    1 for m in doc.get("migrated", []) for w in m.get("warnings", [])
                    if w.startswith("note: the source changed while it was read"))
                facts["failed"] = [f"{f['source']}: {f['reason']}" for f in doc.get("failed", [])]
        # --- prune's result and the source
        p_doc = prune.json()
        want = expected if p_rc == 0 else set()
        if p_rc == 0:
            if p_doc is None:
                failures.append(f"prune: no JSON document: {prune.stdout[-300:]}")
            else:
                got = {d["path"] for d in p_doc["deleted"]}
                if got != expected:
                    failures.append(f"prune deleted {sorted(got ^ expected)} unlike the plan of "
                                    "redundant merged files")
                changed = [s for s in p_doc["skipped"] if s["path"] in expected]
                if changed or p_doc["failed"]:
                    failures.append(f"prune skipped {changed} failed {p_doc['failed']}")
        fails, gone = check_prune_state(src, entries, before, expected)
        failures += fails
        if gone != len(want):
            failures.append(f"{len(want) - gone} of the {len(want)} merged files prune had to "
                            f"delete are still there" if gone < len(want)
                            else f"{gone} merged files deleted by a prune that exited {p_rc}")
        facts["pruned"] = gone
        runs.add(case, failures, seconds=round(time.monotonic() - t0, 2), **facts)
        shutil.rmtree(work, ignore_errors=True)
    runs.note(f"SRC: copies of {', '.join(MIGRATE_RUNS)} from the fixture tree ({len(ref_targets)} "
              f"targets; {len(expected)} redundant merged files for prune). The reference migration "
              f"took {ref_seconds:.2f} s through the CLI. Start orders: prune 0–0.5 s after migrate took "
              "DST's lock (it then reads its first checkpoint, merged weights included), at a random "
              "moment of migrate's run, or prune first; SRC with or without a lock file left by an "
              f"earlier prune; each --lock-timeout 0 or {LOCK_WAIT_S} s.")
    hit = sum(1 for r in runs.records if r.get("sources_changed_while_read"))
    runs.note(f"Runs in which prune deleted merged weights while migrate was reading them (migrate "
              f"then did that checkpoint again): {hit} of {len(runs.records)}.")
    finish(runs, seed, n, targets=len(ref_targets), expected_deletions=len(expected))
