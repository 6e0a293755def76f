"""``prune --log``: every run writes a ``start`` and an ``end`` record around its action lines,
all carrying one ``run_id`` (issue 16's Safety bullet, issue 17 item 1).

Each outcome a cron job can have is run through the CLI and its log read back: work done,
nothing to do, a dry run, refused without ``--yes``, a held lock (75), a usage error after the
log opened; the end record's counts are checked against the lines of the same run.
"""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from pathlib import Path

import click
import pytest

from fixtures.copying import copy_tree

from ckpt_tools import __version__
from ckpt_tools.cli.exits import exit_code_of, handle
from ckpt_tools.errors import ProblemsError, TryAgain, UsageError
from ckpt_tools.prune import ActionLog, LogWriteError, PruneEvent
from test_prune import run_cli, small_root
from test_prune_trace_lock_log import TreeHolder

ACTIONS = ("plan", "delete", "skip", "fail", "strip", "trash", "purge")


def records(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines()]


def runs_of(lines: list[dict]) -> dict[str, list[dict]]:
    """The lines of each run, by run id, in the order written."""
    out: dict[str, list[dict]] = {}
    for x in lines:
        out.setdefault(x["run_id"], []).append(x)
    return out


def only_run(log: Path) -> list[dict]:
    runs = runs_of(records(log))
    assert len(runs) == 1, list(runs)
    return next(iter(runs.values()))


def assert_story(lines: list[dict], exit_code: int) -> dict:
    """A start first, an end last with ``exit_code``, and the end's counts those of the lines."""
    start, *actions, end = lines
    assert start["action"] == "start" and end["action"] == "end"
    assert start["version"] == __version__ and start["argv"][1] == "prune"
    assert all(os.path.isabs(r) for r in start["roots"])
    assert end["exit_code"] == exit_code
    assert end["duration_s"] >= 0
    counted = Counter(x["action"] for x in actions)
    assert set(counted) <= set(ACTIONS)
    assert end["counts"] == {a: counted.get(a, 0) for a in ACTIONS}
    return end


def test_a_run_that_prunes_tells_its_story_under_one_run_id(results_tree, tmp_path):
    root = small_root(results_tree, tmp_path, "run_trainer")
    log = tmp_path / "prune.jsonl"
    proc = run_cli("prune", "--yes", "--json", "--min-age", "0", "--log", log, root)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    lines = only_run(log)
    end = assert_story(lines, 0)
    assert lines[0]["roots"] == [str(root)] and lines[0]["policy"] is None
    assert "--yes" in lines[0]["argv"] and lines[0]["dry_run"] is False
    assert len(lines[0]["run_id"]) == 32 and int(lines[0]["run_id"], 16) >= 0
    assert end["counts"]["delete"] == len(doc["deleted"]) > 0
    assert end["freed_bytes"] == doc["freed_bytes"] > 0
    assert end["planned_bytes"] == sum(x["bytes"] for x in lines if x["action"] == "plan")
    assert end["checkpoints"] == {"redundant": 2}


def test_a_run_with_nothing_to_do_still_logs_and_each_run_has_its_own_id(results_tree, tmp_path):
    root = small_root(results_tree, tmp_path, "run_trainer")
    log = tmp_path / "prune.jsonl"
    for _ in range(2):   # the second finds nothing left to delete
        proc = run_cli("prune", "--yes", "--min-age", "0", "--log", log, root)
        assert proc.returncode == 0, proc.stderr
    runs = list(runs_of(records(log)).values())
    assert len(runs) == 2
    assert_story(runs[0], 0)
    nothing = runs[1]
    end = assert_story(nothing, 0)
    assert [x["action"] for x in nothing] == ["start", "end"]
    assert end["counts"] == dict.fromkeys(ACTIONS, 0)
    assert end["planned_bytes"] == end["freed_bytes"] == 0
    assert end["checkpoints"] == {"healthy": 2}


def test_a_dry_run_logs_what_it_plans_and_frees_nothing(results_tree, tmp_path):
    root = small_root(results_tree, tmp_path, "run_trainer")
    log = tmp_path / "prune.jsonl"
    assert run_cli("prune", "--dry-run", "--min-age", "0", "--log", log, root).returncode == 0
    lines = only_run(log)
    end = assert_story(lines, 0)
    assert all(x["dry_run"] is True for x in lines)
    assert end["counts"]["plan"] == 2 and end["counts"]["delete"] == 0
    assert end["planned_bytes"] > 0 and end["freed_bytes"] == 0


def test_a_run_refused_without_yes_ends_with_exit_2(results_tree, tmp_path):
    root = small_root(results_tree, tmp_path, "run_trainer")
    log = tmp_path / "prune.jsonl"
    proc = run_cli("prune", "--min-age", "0", "--log", log, root)   # stdin is not a terminal
    assert proc.returncode == 2, proc.stderr
    end = assert_story(only_run(log), 2)
    assert end["counts"]["delete"] == 0 and end["freed_bytes"] == 0
    assert (root / "run_trainer/checkpoint-2/model.safetensors").exists()


def test_a_run_that_finds_the_lock_held_ends_with_exit_75(results_tree, tmp_path):
    root = small_root(results_tree, tmp_path, "run_trainer")
    log = tmp_path / "prune.jsonl"
    holder = TreeHolder(root)
    try:
        proc = run_cli("prune", "--yes", "--min-age", "0", "--log", log, root)
    finally:
        holder.release()
    assert proc.returncode == 75, proc.stderr
    lines = only_run(log)
    end = assert_story(lines, 75)
    assert [(x["action"], x.get("path")) for x in lines[1:-1]] == [("skip", str(root))]
    assert end["checkpoints"] == {}    # nothing was scanned


@pytest.mark.parametrize("case", ["missing root", "policy and flags"])
def test_a_usage_error_after_the_log_opened_ends_with_exit_2(results_tree, tmp_path, case):
    root = small_root(results_tree, tmp_path, "run_trainer")
    log = tmp_path / "prune.jsonl"
    args = ([tmp_path / "no-such-root"] if case == "missing root"
            else ["--policy", tmp_path / "p.toml", "--keep-last", "1", root])
    proc = run_cli("prune", "--yes", "--log", log, *args)
    assert proc.returncode == 2, proc.stderr
    assert ("no such file" if case == "missing root" else "two ways") in proc.stderr
    lines = only_run(log)
    assert [x["action"] for x in lines] == ["start", "end"]
    assert_story(lines, 2)
    assert lines[0]["policy"] is None


def test_a_retention_run_logs_its_policy_decisions_and_bytes(results_tree, tmp_path):
    src, _, _ = results_tree
    root = copy_tree(src, tmp_path / "results")
    log = tmp_path / "prune.jsonl"
    proc = run_cli("prune", "--yes", "--json", "--jobs", "2", "--min-age", "0", "--keep-last", "1",
                   "--delete", "--purge-now", "--log", log, root)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    lines = only_run(log)
    end = assert_story(lines, 0)
    policy = lines[0]["policy"]
    assert policy["rest"] == "delete" and policy["tiers"][0]["rules"]["keep_last"] == 1
    retention = doc["retention"]
    assert end["decisions"] == retention["counts"]
    assert end["counts"]["trash"] == len(retention["trashed"]) > 0
    assert end["counts"]["purge"] == len(retention["purged"]) > 0
    assert end["freed_bytes"] == doc["freed_bytes"] + retention["freed_bytes_now"]
    assert end["freed_bytes_when_purged"] == retention["freed_bytes_when_purged"]
    assert end["planned_bytes"] == doc["freed_bytes"] + retention["frees_bytes_now"]
    # what the plan left alone is counted by status and by reason, without a line each
    assert end["counts"]["skip"] == 0
    assert sum(end["left_alone"].values()) == sum(end["skipped"].values()) == len(doc["skipped"]) > 0
    assert end["checkpoints"]["broken"] == end["skipped"]["broken"] == end["left_alone"]["broken"]
    assert {"legacy", "broken", "in-progress"} <= set(end["left_alone"]) <= {
        "legacy", "broken", "in-progress", "fresh", "not proven", "healthy"}


def test_the_policy_file_is_named_in_the_start_record(results_tree, tmp_path):
    root = small_root(results_tree, tmp_path, "run_trainer")
    policy = tmp_path / "retention.toml"
    policy.write_text('rest = "strip"\n\n[[tier]]\naction = "keep"\nkeep_last = 1\n')
    log = tmp_path / "prune.jsonl"
    proc = run_cli("prune", "--dry-run", "--min-age", "0", "--policy", policy, "--log", log, root)
    assert proc.returncode == 0, proc.stderr
    start = only_run(log)[0]
    assert start["policy"]["file"] == str(policy) and start["policy"]["rest"] == "strip"


def test_the_logs_missing_directories_are_created(results_tree, tmp_path):
    root = small_root(results_tree, tmp_path, "run_trainer")
    log = tmp_path / "var" / "log" / "ckpt-tools" / "prune.jsonl"
    umask = os.umask(0o022)
    try:
        proc = run_cli("prune", "--dry-run", "--min-age", "0", "--log", log, root)
    finally:
        os.umask(umask)
    assert proc.returncode == 0, proc.stderr
    for d in (tmp_path / "var", tmp_path / "var" / "log", log.parent):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o755, d
    assert_story(only_run(log), 0)


def test_a_log_whose_directory_cannot_be_made_is_one_line_and_exit_2(results_tree, tmp_path):
    root = small_root(results_tree, tmp_path, "run_trainer")
    (tmp_path / "a-file").write_text("")
    log = tmp_path / "a-file" / "sub" / "prune.jsonl"
    proc = run_cli("prune", "--yes", "--min-age", "0", "--log", log, root)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(log) in lines[0] and "Not a directory" in lines[0], proc.stderr
    assert (root / "run_trainer/checkpoint-2/model.safetensors").exists()


def test_a_log_that_failed_takes_no_end_record(tmp_path):
    path = tmp_path / "prune.jsonl"
    calls = []

    def write(fd: int, data: bytes) -> int:
        calls.append(data)
        if b'"action": "plan"' in data:
            raise OSError(5, "Input/output error")
        return os.write(fd, data)

    with ActionLog(str(path), write=write) as log:
        log.start(version=__version__, argv=["ckpt-tools", "prune"], roots=[str(tmp_path)])
        with pytest.raises(LogWriteError):
            log.record(PruneEvent("plan", str(tmp_path), "a/model.safetensors", 1))
        log.end(exit_code=1, duration_s=0.5)
    assert [json.loads(x)["action"] for x in path.read_text().splitlines()] == ["start"]
    assert len(calls) == 2   # the end was not even tried


@pytest.mark.parametrize("exc", [
    click.exceptions.Exit(3), KeyboardInterrupt(), click.exceptions.Abort(),
    click.UsageError("bad"), BrokenPipeError(), TryAgain("held"), UsageError("bad"),
    ProblemsError("failed"), LogWriteError("log", "No space left on device"), RuntimeError("bug"),
], ids=lambda e: type(e).__name__)
def test_the_end_records_exit_code_is_the_one_the_user_gets(exc, capsys):
    assert exit_code_of(exc) == handle(exc)
