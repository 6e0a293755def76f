"""What reliability tests hand to ``bench/reliability_scorecard.py``.

A reliability test builds a list of per-run records (``{"ok": bool, "failures": [str], ...}``),
then calls :func:`finish`, which writes ``$CKPT_TOOLS_SCORECARD_DIR/<key>.json`` when that
variable is set and fails the test when any run failed. The scorecard script aggregates those
files and pytest's junit XML into ``RELIABILITY.md``; nothing in that table is typed by hand.

Document written for each key::

    {"key", "scenario": <1..8>, "title", "test", "runs", "failures", "checks": [str],
     "notes": [str], "seconds", "per_run": [...], ...extra}
"""

from __future__ import annotations

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

    ``key``: file name of the entry; ``scenario``: the issue's scenario number (1–8);
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
