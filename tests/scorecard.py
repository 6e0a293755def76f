"""What reliability tests hand to ``bench/reliability_scorecard.py``.

A reliability test builds a list of per-run records (``{"ok": bool, "failures": [str], ...}``),
then calls :func:`finish`, which writes ``$CKPT_TOOLS_SCORECARD_DIR/<key>.json`` when that
variable is set and fails the test when any run failed. The scorecard script aggregates those
files and pytest's junit XML into ``RELIABILITY.md``; nothing in that table is typed by hand.

Property tests marked ``@pytest.mark.fuzz`` are counted by :class:`FuzzCounter` (registered by
``conftest.py``), which writes the document ``fuzz`` (scenario 8) at the end of the session.

Document written for each key::

    {"key", "scenario": <1..15>, "title", "test", "runs", "failures", "checks": [str],
     "notes": [str], "seconds", "per_run": [...], ...extra}
"""

from __future__ import annotations

import functools
import json
import os
import time

import pytest

SCORECARD_ENV = "CKPT_TOOLS_SCORECARD_DIR"


def write(key: str, doc: dict) -> None:
    """Write one scorecard document (no-op unless ``CKPT_TOOLS_SCORECARD_DIR`` is set)."""
    out = os.environ.get(SCORECARD_ENV)
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{key}.json"), "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2, ensure_ascii=False, default=str)


class Runs:
    """Collects the runs of one scenario entry, then reports them.

    ``key``: file name of the entry; ``scenario``: the scenario's number in RELIABILITY.md (1–15);
    ``title``: the table's row text; ``checks``: what is verified after every run.
    """

    def __init__(self, key: str, scenario: int, title: str, checks: list[str], test: str):
        self.key, self.scenario, self.title, self.checks, self.test = key, scenario, title, checks, test
        self.records: list[dict] = []
        self.notes: list[str] = []
        self.t0 = time.monotonic()

    def add(self, name: str, failures: list[str], **facts) -> dict:
        rec = {"run": len(self.records), "name": name, "ok": not failures,
               "failures": list(failures), **facts}
        self.records.append(rec)
        return rec

    def note(self, text: str) -> None:
        self.notes.append(text)

    def finish(self, **extra) -> None:
        failed = [r for r in self.records if not r["ok"]]
        write(self.key, {
            "key": self.key, "scenario": self.scenario, "title": self.title, "test": self.test,
            "runs": len(self.records), "failures": len(failed), "checks": self.checks,
            "notes": self.notes, "seconds": round(time.monotonic() - self.t0, 1), **extra,
            "per_run": self.records})
        if not self.records:
            pytest.fail(f"{self.key}: no run recorded", pytrace=False)
        if failed:
            lines = [f"{self.key}: {len(failed)} of {len(self.records)} runs failed"]
            lines += [f"  {r['name']}: " + " | ".join(r["failures"])[:1500] for r in failed[:20]]
            pytest.fail("\n".join(lines), pytrace=False)


# --- scenarios 14 and 15: retention (tests/test_reliability_retention.py) ------------------------

# SIGKILL of `prune --keep-last 1 --delete`, `--strip` and `--purge-now` after each storage operation.
RETENTION_CRASH = 14
# A live Trainer rotating its checkpoints (save_total_limit) while prune applies a policy to them.
RETENTION_TRAINER = 15


# --- scenario 8: examples run by the property tests ----------------------------------------------

FUZZ_MARKER = "fuzz"
FUZZ_KEY = "fuzz"
FUZZ_SCENARIO = 8


def _sentence(item) -> str:
    doc = (getattr(item.function, "__doc__", None) or "").strip()
    if doc:
        return doc.splitlines()[0]
    return item.originalname.removeprefix("test_").replace("_", " ")


def _failure_lines(excinfo) -> list[str]:
    """The exception's first line and hypothesis's notes on it (the falsifying example)."""
    value = excinfo.value
    first = (str(value).strip().splitlines() or [""])[0]
    lines = [f"{type(value).__name__}: {first}"[:500]]
    lines += [note[:1000] for note in getattr(value, "__notes__", ())]
    return lines


class FuzzCounter:
    """pytest plugin: counts the examples each ``@pytest.mark.fuzz`` hypothesis test runs.

    Every call of a marked test's body is counted (generated examples, replays from the example
    database, shrinking), by wrapping ``wrapped_test.hypothesis.inner_test`` (the hook hypothesis
    leaves for plugins that run the body themselves) for the duration of the test. At session end
    one scorecard document ``fuzz`` (scenario 8) lists one run per test: ``{name, examples, ok,
    outcome, invalid, failing_calls, max_examples, seconds}``. A test that fails (hypothesis found
    a failing example, or its setup failed) is a failed run, with the exception and the
    falsifying example as its failures. Nothing is written when no marked test ran.
    """

    def __init__(self):
        self.records: dict[str, dict] = {}
        self.seed = None

    def pytest_configure(self, config):
        self.seed = config.getoption("hypothesis_seed", None)

    def _record(self, item) -> dict:
        rec = self.records.get(item.nodeid)
        if rec is None:
            settings = getattr(item.obj, "_hypothesis_internal_use_settings", None)
            rec = self.records[item.nodeid] = {
                "run": len(self.records), "name": item.nodeid, "test": item.name,
                "check": _sentence(item), "ok": True, "outcome": "not run", "failures": [],
                "examples": 0, "invalid": 0, "failing_calls": 0,
                "max_examples": getattr(settings, "max_examples", None), "seconds": 0.0}
        return rec

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        handle = getattr(getattr(item, "obj", None), "hypothesis", None)
        if item.get_closest_marker(FUZZ_MARKER) is None or handle is None:
            yield
            return
        from hypothesis.errors import UnsatisfiedAssumption

        rec = self._record(item)
        inner = handle.inner_test

        @functools.wraps(inner)
        def counted(*args, **kwargs):
            rec["examples"] += 1
            try:
                return inner(*args, **kwargs)
            except UnsatisfiedAssumption:
                rec["invalid"] += 1
                raise
            except BaseException:
                rec["failing_calls"] += 1
                raise

        handle.inner_test = counted
        try:
            yield
        finally:
            handle.inner_test = inner

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        result = yield
        if item.get_closest_marker(FUZZ_MARKER) is None:
            return
        report = result.get_result()
        rec = self._record(item)
        if report.when == "call":
            rec["outcome"] = report.outcome
            rec["seconds"] = round(report.duration, 2)
        elif report.failed:
            rec["outcome"] = "error"
        elif report.skipped and rec["outcome"] == "not run":
            rec["outcome"] = "skipped"
        if report.failed:
            rec["ok"] = False
            rec["failures"] += (_failure_lines(call.excinfo) if call.excinfo is not None
                                else [f"{report.when} failed"])

    def pytest_sessionfinish(self, session):
        if not self.records:
            return
        runs = list(self.records.values())
        files = sorted({r["name"].split("::")[0] for r in runs})
        reproduce = f"pytest -m {FUZZ_MARKER} {' '.join(files)}"
        if self.seed is not None:
            reproduce += f" --hypothesis-seed={self.seed}"
        write(FUZZ_KEY, {
            "key": FUZZ_KEY, "scenario": FUZZ_SCENARIO,
            "title": "Property tests (hypothesis) on the safetensors header parser and the "
                     "torch.save zip/pickle reader",
            "test": [r["test"] for r in runs], "runs": len(runs),
            "failures": sum(1 for r in runs if not r["ok"]),
            "checks": [f"{r['name'].split('::')[0]}: {r['check']}" for r in runs],
            "notes": ["examples: calls of the test body (generated, replayed from the example "
                      "database, shrunk); invalid: of those, rejected by assume()",
                      f"{sum(r['examples'] for r in runs):,} examples in all"],
            "seconds": round(sum(r["seconds"] for r in runs), 1),
            "examples": sum(r["examples"] for r in runs), "reproduce": reproduce,
            "per_run": runs})
