"""Runs the reliability tests and writes RELIABILITY.md from their results.

    .venv/bin/python bench/reliability_scorecard.py [--migrate-runs 50] [--prune-runs 30] [--prune-workers-runs 10]
                                                    [--fault-runs N] [--concurrency-runs N]
                                                    [--redteam-runs N] [--redteam-seed S]
                                                    [--seed S] [--env NAME=VALUE ...]
                                                    [--tests FILE ...] [--out RELIABILITY.md]
    .venv/bin/python bench/reliability_scorecard.py --from DIR   # aggregate an existing run

The reliability test files (``tests/test_reliability_*.py``, those present) run in one pytest
session, then the property tests of the two format readers (``-m fuzz``) in a second one, with
``CKPT_TOOLS_SCORECARD_DIR`` set: every scenario entry writes ``<key>.json`` there (see
``tests/scorecard.py``; the crash tests write ``migrate.json``, ``prune.json`` and
``prune_workers.json``), and pytest writes ``junit-*.xml`` next to them. This script renders
every JSON document of that directory, sorted by scenario number: one table, then a section per
entry. Nothing in it is written by hand. Fault injection comes from the tests' own entry point,
``tests/fault_entry.py``, given a ``tests/faulty_fs.py`` spec (``after_write:3``,
``enospc@write:2``): the library reads no fault from the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RELIABILITY_TESTS = ("tests/test_reliability_crash.py", "tests/test_reliability_faults.py",
                     "tests/test_reliability_access.py", "tests/test_reliability_concurrency.py",
                     "tests/test_reliability_hostile.py", "tests/test_reliability_redteam.py",
                     "tests/test_reliability_retention.py")
FUZZ_TESTS = ("tests/test_formats_safetensors.py", "tests/test_formats_torchsave.py")
SCENARIOS = 15
# The crash tests write their own documents: "scenario" is the command's name, not a number.
CRASH = {
    "migrate": (1, "Crash during `ckpt-tools migrate SRC DST`",
                "test_sigkill_during_migrate_leaves_complete_or_absent_targets_and_rerun_matches"),
    "prune": (2, "Crash during `ckpt-tools prune --yes --min-age 0 ROOT`",
              "test_sigkill_during_prune_never_loses_the_last_copy_and_rerun_finishes"),
    "prune_workers": (2, "Crash during `ckpt-tools prune --yes --jobs 2`, or of one of its worker "
                      "processes", "test_sigkill_of_prune_or_of_its_workers_never_loses_the_last_copy"),
}
RUN_INFO = "_run.json"


# --- running -------------------------------------------------------------------------------------

def run_tests(out: Path, env_counts: dict[str, str], tests: list[str], fuzz: bool) -> int:
    env = dict(os.environ, CKPT_TOOLS_SCORECARD_DIR=str(out), HF_HUB_OFFLINE="1", **env_counts)
    sessions = []
    present = [t for t in tests if (REPO / t).exists()]
    if present:
        sessions.append(("reliability", present, []))
    if fuzz:
        sessions.append(("fuzz", [t for t in FUZZ_TESTS if (REPO / t).exists()], ["-m", "fuzz"]))
    info = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "env": env_counts,
            "missing": [t for t in tests if not (REPO / t).exists()], "sessions": []}
    rc = 0
    for name, files, extra in sessions:
        cmd = [sys.executable, "-m", "pytest", *files, *extra, "-q", "-p", "no:cacheprovider",
               f"--junitxml={out / f'junit-{name}.xml'}"]
        t0 = time.monotonic()
        code = subprocess.run(cmd, cwd=REPO, env=env).returncode
        info["sessions"].append({"name": name, "files": files, "args": extra, "exit": code,
                                 "seconds": round(time.monotonic() - t0, 1)})
        rc = rc or code
    (out / RUN_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return rc


# --- reading -------------------------------------------------------------------------------------

def junit_outcomes(out: Path) -> dict[str, tuple[str, float]]:
    """test name (as pytest names the case, with its parameters) → (outcome, seconds)."""
    outcomes = {}
    for path in sorted(out.glob("junit*.xml")):
        for case in ET.parse(path).getroot().iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                if case.find(tag) is not None:
                    outcome = {"failure": "failed"}.get(tag, tag)
            outcomes[case.get("name")] = (outcome, float(case.get("time") or 0))
    return outcomes


def test_outcome(junit: dict[str, tuple[str, float]], tests) -> str:
    """'passed (12 s)', or the count of each outcome when the entry names several tests."""
    names = [tests] if isinstance(tests, str) else list(tests or ())
    found = []
    for name in names:
        name = name.split("::")[-1]
        cases = [v for k, v in junit.items() if k == name or k.startswith(name + "[")]
        found += cases or [("not run", 0.0)]
    if not found:
        return "-"
    seconds = sum(s for _, s in found)
    kinds: dict[str, int] = {}
    for outcome, _ in found:
        kinds[outcome] = kinds.get(outcome, 0) + 1
    if len(kinds) == 1 and len(found) == 1:
        text = found[0][0]
    elif len(kinds) == 1:
        text = f"{len(found)} {found[0][0]}"
    else:
        text = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    return f"{text} ({seconds:.0f} s)"


def load_entries(out: Path) -> tuple[list[dict], list[str]]:
    """Every scenario document of ``out``, normalised, sorted by scenario number; and the
    names of the JSON files that are not scenario documents."""
    entries, skipped = [], []
    for path in sorted(out.glob("*.json")):
        if path.name.startswith("_"):
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            skipped.append(path.name)
            continue
        if not isinstance(doc, dict) or "runs" not in doc or "scenario" not in doc:
            skipped.append(path.name)
            continue
        crash = CRASH.get(doc["scenario"]) if isinstance(doc["scenario"], str) else None
        if crash is not None:
            number, title, test = crash
            entry = {**doc, "key": doc["scenario"], "number": number, "title": title,
                     "test": test, "crash": True}
        else:
            try:
                number = int(doc["scenario"])
            except (TypeError, ValueError):
                skipped.append(path.name)
                continue
            entry = {**doc, "key": doc.get("key", path.stem), "number": number,
                     "title": doc.get("title") or doc.get("key", path.stem), "crash": False}
        entry.setdefault("per_run", [])
        entry.setdefault("checks", [])
        entry.setdefault("notes", [])
        entries.append(entry)
    entries.sort(key=lambda e: (e["number"], e["key"]))
    return entries, skipped


# --- rendering -----------------------------------------------------------------------------------

def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _reproduce(e: dict) -> str:
    if e["crash"]:
        return (f"`CKPT_TOOLS_CRASH_SEED={e['seed']} "
                f"CKPT_TOOLS_CRASH_RUNS_{e['key'].upper()}={e['runs']}`")
    if e.get("reproduce"):
        return f"`{_cell(e['reproduce'])}`"
    if e.get("seed") is not None:
        return f"seed {e['seed']}"
    return "-"


def _runs_cell(e: dict) -> str:
    if not e["crash"]:
        examples = e.get("examples")
        return f"{e['runs']} ({examples:,} examples)" if examples is not None else str(e["runs"])
    modes: dict[str, int] = {}
    for r in e["per_run"]:
        modes[r.get("mode", "?")] = modes.get(r.get("mode", "?"), 0) + 1
    mode_text = ", ".join(f"{v} {k}" for k, v in sorted(modes.items()))
    return f"{e['runs']}, {e.get('killed', '?')} killed ({mode_text})"


def _crash_facts(e: dict) -> list[str]:
    runs = e["per_run"]
    lines = ["Each run: the command is started on its own copy, SIGKILLed at a random moment, the "
             "tree is checked, the command is re-run and the result compared with an "
             "uninterrupted run."]
    if e["key"] == "migrate":
        mid = sum(1 for r in runs if 0 < r.get("targets_present_after_kill", 0) < e["targets"]
                  or r.get("tmp_dirs_after_kill"))
        faults = sorted({r["fault"].split(":")[0] for r in runs if r.get("fault")})
        lines.append(f"Source: {', '.join(f'`{s}`' for s in e['source'])} ({e['targets']} "
                     f"targets; an uninterrupted run takes {e['uninterrupted_run_s']} s). Kills "
                     f"that left the migration part-done (some targets, or a temporary "
                     f"directory): {mid} of {len(runs)}.")
        lines.append("Fault points used (specs of `tests/fault_entry.py`, point:N): "
                     f"{', '.join(faults) or 'none'}.")
    else:
        killed = [r for r in runs if r.get("mode") != "worker"]
        mid = sum(1 for r in killed if 0 < r.get("deleted_before_kill", 0) < e["expected_deletions"])
        lines.append(f"Expected deletions: {e['expected_deletions']} redundant merged files (an "
                     f"uninterrupted run takes {e['uninterrupted_run_s']} s). Kills that landed "
                     f"mid-deletion: {mid} of {len(killed)}; before any deletion: "
                     f"{sum(1 for r in killed if r.get('deleted_before_kill', 0) == 0)}.")
        workers = [r for r in runs if r.get("mode") == "worker"]
        if workers:
            redone = sorted(r.get("redone_after_worker_died", 0) for r in workers)
            lines.append(f"Runs whose worker processes killed themselves mid-run: {len(workers)}; "
                         f"the prune process took over their checkpoints each time (checkpoints "
                         f"it found already pruned by a dead worker: {redone[0]}–{redone[-1]}).")
    return lines


def _examples_table(runs: list[dict]) -> list[str]:
    lines = ["| property test | examples | of which invalid | max_examples | outcome | s |",
             "|---|---:|---:|---:|---|---:|"]
    for r in runs:
        name = str(r.get("name", r.get("run"))).split("::")[-1]
        lines.append(f"| `{_cell(name)}` | {r.get('examples', 0):,} | "
                     f"{r.get('invalid', 0)} | {r.get('max_examples', '-')} | "
                     f"{r.get('outcome', 'ok' if r.get('ok') else 'failed')} | "
                     f"{r.get('seconds', 0)} |")
    return lines


def _failure_lines(e: dict) -> list[str]:
    bad = [r for r in e["per_run"] if not r.get("ok", True)]
    if not bad:
        return []
    lines = ["", "Failures:", ""]
    for r in bad:
        how = {k: r.get(k) for k in ("mode", "fault", "delay_s", "trigger", "jobs")
               if r.get(k) is not None}
        name = f"run {r.get('run')}" + (f" {r['name']}" if r.get("name") else "")
        lines.append(f"- {_cell(name)}{f' {how}' if how else ''}: "
                     + _cell(" | ".join(map(str, r.get("failures", []))))[:800])
    return lines


def atheris_section(paths: list[Path]) -> list[str]:
    """Scenario 8's optional part: runs of bench/fuzz_atheris.py (outside CI), from its JSON."""
    if not paths:
        return []
    lines = ["### 8. Coverage-guided fuzzing (atheris, outside CI)", "",
             "Runs of `bench/fuzz_atheris.py` (each target seeded with real files; a finding is "
             "an exception other than the reader's format error with its code, a disagreement "
             "between reading paths, a hang over 10 s or memory over 2 GB). Findings are fixed and "
             "kept as regression tests in the formats test files.", "",
             "| run | target | seconds | executions | coverage (edges / features) | findings | hangs "
             "| memory |", "|---|---|---:|---:|---|---:|---:|---:|"]
    for path in paths:
        for t in json.loads(path.read_text(encoding="utf-8")):
            stops = t.get("stops") or []
            hangs = sum(1 for x in stops if x.get("kind") == "hang")
            memory = sum(1 for x in stops if x.get("kind") == "memory")
            lines.append(f"| `{path.name}` | {t['target']} | {t['seconds']:.0f} | "
                         f"{t['executions']:,} | {t.get('cov')} / {t.get('ft')} | "
                         f"{len(t.get('findings') or [])} | {hangs} | {memory} |")
            for f in t.get("findings") or []:
                lines.append(f"|  | finding: {_cell(f['message'])[:300]} ({f['type']}, "
                             f"{f['size']}-byte input) | | | | | | |")
    return lines + [""]


def render(out: Path, atheris: list[Path] = ()) -> str:
    junit = junit_outcomes(out)
    entries, skipped = load_entries(out)
    info_path = out / RUN_INFO
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else None
    rows, details = [], []
    for e in entries:
        failures = e.get("failures", sum(1 for r in e["per_run"] if not r.get("ok", True)))
        outcome = test_outcome(junit, e.get("test"))
        if outcome.startswith("not run") and e.get("seconds") is not None:
            outcome = f"not in junit ({e['seconds']:.0f} s)"
        rows.append(f"| {e['number']} | {_cell(e['title'])} | {_runs_cell(e)} | {failures} | "
                    f"{outcome} | {_reproduce(e)} |")
        details.append(f"### {e['number']}. {e['title']}\n")
        tests = [e["test"]] if isinstance(e.get("test"), str) else list(e.get("test") or ())
        if tests and not any(r.get("examples") is not None for r in e["per_run"]):
            details.append("Test: " + ", ".join(f"`{t}`" for t in tests) + "\n")
        if e["crash"]:
            details += _crash_facts(e) + [""]
        if e["checks"]:
            details.append("Checked after each run:\n")
            details += [f"- {_cell(c)}" for c in e["checks"]]
            details.append("")
        if e["per_run"] and all(r.get("examples") is not None for r in e["per_run"]):
            details += _examples_table(e["per_run"]) + [""]
        if e["notes"]:
            details.append("Notes:\n")
            details += [f"- {_cell(n)}" for n in e["notes"]]
        details += _failure_lines(e)
        details.append("")
    covered = {e["number"] for e in entries}
    missing = [str(n) for n in range(1, SCENARIOS + 1) if n not in covered]
    header = [
        "# Reliability",
        "",
        f"Generated by `bench/reliability_scorecard.py` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); do not edit by hand.",
    ]
    if info:
        for s in info["sessions"]:
            command = " ".join(["pytest", *s["args"], *s["files"]])
            header.append(f"`{command}`: exit {s['exit']}, {s['seconds']:.0f} s.")
        if info.get("env"):
            counts = ", ".join(f"`{k}={v}`" for k, v in info["env"].items())
            header.append(f"Counts: {counts}.")
        if info.get("missing"):
            header.append("Not present: " + ", ".join(f"`{t}`" for t in info["missing"]) + ".")
    table = ["| # | scenario | runs | failures | test | reproduce |",
             "|---:|---|---|---:|---|---|", *rows]
    tail = []
    if missing:
        tail.append(f"No results for scenario{'s' if len(missing) > 1 else ''} "
                    f"{', '.join(missing)}.")
    if skipped:
        ignored = ", ".join(f"`{s}`" for s in skipped)
        tail.append(f"Not scenario documents (ignored): {ignored}.")
    details += atheris_section(list(atheris))
    text = "\n".join([*header, "", *table, "", *([*tail, ""] if tail else []), *details])
    return text.rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--migrate-runs", type=int, default=50,
                    help="crash runs of migrate (scenario 1)")
    ap.add_argument("--prune-runs", type=int, default=30, help="crash runs of prune (scenario 2)")
    ap.add_argument("--prune-workers-runs", type=int, default=10,
                    help="crash runs of prune with worker processes (scenario 2)")
    ap.add_argument("--fault-runs", type=int, help="CKPT_TOOLS_FAULT_RUNS for the fault tests")
    ap.add_argument("--concurrency-runs", type=int,
                    help="CKPT_TOOLS_CONCURRENCY_RUNS for the concurrency tests")
    ap.add_argument("--redteam-runs", type=int,
                    help="CKPT_TOOLS_REDTEAM_RUNS: runs of each red-team scenario (9-13)")
    ap.add_argument("--redteam-seed", help="CKPT_TOOLS_REDTEAM_SEED for the red-team scenarios")
    ap.add_argument("--seed", help="CKPT_TOOLS_CRASH_SEED for the crash tests")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="another setting for the tests (repeatable)")
    ap.add_argument("--tests", nargs="+", default=list(RELIABILITY_TESTS),
                    help="reliability test files to run (default: all of them that exist)")
    ap.add_argument("--no-fuzz", action="store_true",
                    help="skip the format readers' property tests")
    ap.add_argument("--from", dest="from_dir", type=Path, help="aggregate this results directory")
    ap.add_argument("--atheris", type=Path, action="append", default=[], metavar="JSON",
                    help="a bench/fuzz_atheris.py result to add to scenario 8 (repeatable)")
    ap.add_argument("--out", type=Path, default=REPO / "RELIABILITY.md")
    args = ap.parse_args()
    rc = 0
    if args.from_dir:
        out = args.from_dir
    else:
        counts = {"CKPT_TOOLS_CRASH_RUNS_MIGRATE": str(args.migrate_runs),
                  "CKPT_TOOLS_CRASH_RUNS_PRUNE": str(args.prune_runs),
                  "CKPT_TOOLS_CRASH_RUNS_PRUNE_WORKERS": str(args.prune_workers_runs)}
        if args.fault_runs is not None:
            counts["CKPT_TOOLS_FAULT_RUNS"] = str(args.fault_runs)
        if args.concurrency_runs is not None:
            counts["CKPT_TOOLS_CONCURRENCY_RUNS"] = str(args.concurrency_runs)
        if args.redteam_runs is not None:
            counts["CKPT_TOOLS_REDTEAM_RUNS"] = str(args.redteam_runs)
        if args.redteam_seed is not None:
            counts["CKPT_TOOLS_REDTEAM_SEED"] = args.redteam_seed
        if args.seed is not None:
            counts["CKPT_TOOLS_CRASH_SEED"] = args.seed
        for item in args.env:
            name, sep, value = item.partition("=")
            if not sep or not name:
                ap.error(f"--env wants NAME=VALUE, not {item!r}")
            counts[name] = value
        out = Path(tempfile.mkdtemp(prefix="ckpt-tools-scorecard-"))
        rc = run_tests(out, counts, args.tests, not args.no_fuzz)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(out, args.atheris), encoding="utf-8")
    print(f"wrote {args.out} (results in {out}; pytest exit {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
