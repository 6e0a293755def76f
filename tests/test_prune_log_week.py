"""A week of nightly ``prune --log`` runs, read back from the log (issue 17 item 1).

``fixtures.cron_week`` plays seven nights with the real console script on a small tree that
training adds to (the same week ``tools/cron_week.py`` prints for docs/prune.md): one night with
nothing new, one with the lock held by another run, one with a checkpoint saved minutes before.
The log must tell that story: a start and an end per night, the exit codes cron saw, the bytes
that left the disk, and the checkpoints left alone counted every night but never repeated as
lines.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from fixtures.cron_week import BROKEN, LEGACY, RUN, WEEK, play_week, shown

from test_prune import ckpt_tools_exe

DOC = Path(__file__).resolve().parents[1] / "docs" / "prune.md"
# what differs from one machine or one play to the next: times, durations, blocks allocated
UNSTABLE = ("time", "duration_s", "version", "bytes", "planned_bytes", "freed_bytes")


@pytest.fixture(scope="module")
def week(tmp_path_factory):
    return play_week(tmp_path_factory.mktemp("cron-week"), ckpt_tools_exe())


def nights_of(log) -> list[list[dict]]:
    """The lines of each run, in the order the runs started; each run's lines in order."""
    runs: dict[str, list[dict]] = {}
    for line in log.read_text().splitlines():
        x = json.loads(line)
        runs.setdefault(x["run_id"], []).append(x)
    return list(runs.values())


def deleted_paths(lines: list[dict]) -> list[str]:
    return [x["path"] for x in lines if x["action"] == "delete"]


def test_each_night_is_one_start_and_one_end_under_its_own_run_id(week):
    nights = nights_of(week.log)
    assert len(nights) == len(WEEK) == 7
    for lines in nights:
        assert lines[0]["action"] == "start" and lines[-1]["action"] == "end"
        assert [x["action"] for x in lines].count("start") == 1
        assert [x["action"] for x in lines].count("end") == 1
    starts = [x["time"] for lines in nights for x in lines if x["action"] == "start"]
    assert starts == sorted(starts)
    # one run's lines never interleave with another's: the file is runs one after the other
    flat = [json.loads(x)["run_id"] for x in week.log.read_text().splitlines()]
    assert flat == [lines[0]["run_id"] for lines in nights for _ in lines]


def test_each_end_has_the_exit_code_cron_saw(week):
    codes = [lines[-1]["exit_code"] for lines in nights_of(week.log)]
    assert codes == [n.exit_code for n in week.nights] == [0, 0, 0, 75, 0, 0, 0]


def test_the_bytes_freed_each_night_are_the_bytes_that_left_the_disk(week):
    for night, lines in zip(week.nights, nights_of(week.log), strict=True):
        end = lines[-1]
        assert end["freed_bytes"] == night.left_disk, night.day
        assert end["freed_bytes"] == sum(x["bytes"] for x in lines if x["action"] == "delete")
        assert all(not os.path.lexists(p) for p in deleted_paths(lines))
    assert sum(n.left_disk for n in week.nights) > 0


def test_every_saved_checkpoint_loses_its_merged_weights_once_on_the_first_night_it_may(week):
    nights = nights_of(week.log)
    merged = {step: str(week.root / RUN / f"checkpoint-{step}" / "model.safetensors")
              for day in WEEK for step in day.saved + day.fresh}
    every = [p for lines in nights for p in deleted_paths(lines)]
    assert sorted(every) == sorted(merged.values())   # each once, none twice
    assert deleted_paths(nights[4]) == [merged[400], merged[500]]   # 400 waited out the lock
    assert deleted_paths(nights[5]) == [merged[600]]                # 700 was saved minutes ago
    assert deleted_paths(nights[6]) == [merged[700], merged[800]]
    assert nights[5][-1]["left_alone"]["fresh"] == 1
    assert "fresh" not in nights[6][-1]["left_alone"]


def test_the_night_with_nothing_to_do_has_a_start_an_end_and_no_deletion(week):
    quiet = nights_of(week.log)[2]
    assert not WEEK[2].saved and not WEEK[2].fresh and not WEEK[2].lock_held
    assert [x["action"] for x in quiet] == ["start", "end"]
    end = quiet[-1]
    assert end["exit_code"] == 0 and end["freed_bytes"] == end["planned_bytes"] == 0
    assert set(end["counts"].values()) == {0}
    assert week.nights[2].left_disk == 0


def test_the_night_the_lock_was_held_exits_75_and_deletes_nothing(week):
    held = nights_of(week.log)[3]
    assert WEEK[3].lock_held and week.nights[3].exit_code == 75
    assert "holds the lock" in week.nights[3].stderr
    assert [(x["action"], x.get("path")) for x in held] == [
        ("start", None), ("skip", str(week.root)), ("end", None)]
    assert held[-1]["freed_bytes"] == 0 and week.nights[3].left_disk == 0


def test_legacy_and_broken_are_counted_every_night_never_written_as_lines(week):
    for night, lines in zip(week.nights, nights_of(week.log), strict=True):
        if night.day.lock_held:
            continue   # nothing was scanned
        end = lines[-1]
        assert end["left_alone"]["legacy"] == 1 and end["left_alone"]["broken"] == 1, end
        assert end["skipped"]["legacy"] == 1 and end["skipped"]["broken"] == 1
    paths = {x.get("path") for lines in nights_of(week.log) for x in lines}
    assert not {str(week.root / LEGACY), str(week.root / BROKEN)} & paths
    assert (week.root / LEGACY / "model.safetensors").exists()
    assert (week.root / BROKEN / "model.safetensors").exists()


def test_no_skip_line_is_written_twice_in_the_week(week):
    skips = Counter((x["path"], x["reason"]) for lines in nights_of(week.log) for x in lines
                    if x["action"] == "skip")
    assert skips and max(skips.values()) == 1, skips


def test_log_skips_writes_a_skip_line_per_checkpoint_left_alone(week, tmp_path):
    log = tmp_path / "skips.jsonl"
    proc = subprocess.run([ckpt_tools_exe(), "prune", "--yes", "--quiet", "--no-progress",
                           "--log-skips", "--log", str(log), str(week.root)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (lines,) = nights_of(log)
    skips = {x["path"]: x["reason"] for x in lines if x["action"] == "skip"}
    assert set(skips) == {str(week.root / LEGACY), str(week.root / BROKEN)}
    assert skips[str(week.root / LEGACY)].startswith("legacy: ")
    assert skips[str(week.root / BROKEN)].startswith("broken: ")
    end = lines[-1]
    assert end["counts"]["skip"] == 2
    assert end["left_alone"] == {"broken": 1, "legacy": 1}


def test_log_skips_without_a_log_is_a_usage_error(week):
    proc = subprocess.run([ckpt_tools_exe(), "prune", "--dry-run", "--log-skips", str(week.root)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == \
        "ckpt-tools: error: --log-skips writes into the log: give --log FILE too"


def test_the_week_docs_prune_md_shows_is_this_week(week):
    block = re.search(r"^### A week of nightly runs\n.*?^```json\n(.*?)^```", DOC.read_text(),
                      re.S | re.M)
    assert block, "docs/prune.md has no week of nightly runs"

    def stable(line: str) -> dict:
        return {k: v for k, v in json.loads(line).items() if k not in UNSTABLE}

    played = [stable(x) for x in shown(week.log.read_text().splitlines(), week)]
    assert [stable(x) for x in block.group(1).splitlines()] == played, \
        "docs/prune.md's week is stale: paste the output of tools/cron_week.py"
