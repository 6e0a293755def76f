"""audit --status, --run, --sort, -q's counts and colour, as a user sees them through the CLI.

``CliRunner(color=True)`` is click's stand-in for a terminal on stdout; one test runs the
program on a real pseudo-terminal."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckpt_tools.cli.group import cli

REPO = Path(__file__).resolve().parent.parent
ESC = re.compile(r"\x1b\[[0-9;]*m")
STATUSES = ("healthy", "redundant", "legacy", "broken", "in-progress")
COLOURS = {"broken": "31", "legacy": "33", "redundant": "33", "in-progress": "36", "healthy": "32"}


def audit(*args, color=False, env=None):
    result = CliRunner().invoke(cli, ["audit", "--no-progress", *map(str, args)], color=color,
                                env=env)
    assert "Traceback" not in result.output, result.output
    return result


def audit_json(*args):
    result = audit("--json", *args)
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture(scope="module")
def whole(results_tree):
    """The audit of the whole fixture tree, unfiltered: what each filter is checked against."""
    root, _, _ = results_tree
    code, doc = audit_json(root)
    assert code == 1 and {c["status"] for c in doc["checkpoints"]} >= {"healthy", "broken", "legacy"}
    return root, doc


def scan_errors(doc) -> bool:
    return any(p["severity"] == "error" for p in doc["problems"])


def test_status_shows_only_those_statuses_with_totals_of_what_is_shown(whole):
    root, full = whole
    code, doc = audit_json("--status", "broken", "--status", "LEGACY", root)
    wanted = [c for c in full["checkpoints"] if c["status"] in ("broken", "legacy")]
    assert [c["path"] for c in doc["checkpoints"]] == [c["path"] for c in wanted]
    assert doc["totals"]["checkpoints"] == len(wanted)
    assert doc["totals"]["by_status"] == {s: sum(c["status"] == s for c in wanted) for s in STATUSES}
    assert doc["totals"]["size_bytes"] == sum(c["size_bytes"] for c in wanted)
    # a run is shown only where it holds a checkpoint shown
    assert {r["path"] for r in doc["runs"]} == {c["run"] for c in wanted}
    assert code == 1


def test_exit_code_is_that_of_what_is_shown(whole):
    root, full = whole
    code, doc = audit_json("--status", "healthy", root)
    assert doc["checkpoints"] and {c["status"] for c in doc["checkpoints"]} == {"healthy"}
    # the broken checkpoints are not shown: only a problem of the scan itself still counts
    assert code == (1 if scan_errors(full) else 0)
    assert doc["problems"] == full["problems"]
    assert audit("--status", "redundant", "--strict", root).exit_code == 1


def test_peft_only_is_the_old_name_of_healthy(whole):
    root, _ = whole
    assert audit_json("--status", "peft-only", root) == audit_json("--status", "healthy", root)


def test_an_unknown_status_is_a_usage_error(whole):
    root, _ = whole
    result = audit("--status", "sick", root)
    assert result.exit_code == 2
    assert "sick" in result.output and "--status" in result.output


def test_run_glob_matches_the_run_path(whole):
    root, full = whole
    runs = {c["run"] for c in full["checkpoints"]}
    glob = "broken/*"
    expected = [c for c in full["checkpoints"] if fnmatch.fnmatchcase(c["run"], glob)]
    assert expected and len(expected) < len(full["checkpoints"])
    code, doc = audit_json("--run", glob, root)
    assert [c["path"] for c in doc["checkpoints"]] == [c["path"] for c in expected]
    assert code == 1   # the broken runs: broken checkpoints shown
    # with the root in front too; a glob that matches nothing shows nothing and finds nothing wrong
    assert audit_json("--run", f"{root}/{glob}", root)[1]["checkpoints"] == doc["checkpoints"]
    code, doc = audit_json("--run", "no-such-run*", root)
    assert doc["checkpoints"] == [] and doc["totals"]["checkpoints"] == 0
    assert code == (1 if scan_errors(full) else 0)
    healthy_run = next(r for r in sorted(runs) if not r.startswith("broken"))
    text = audit("--run", healthy_run, "--run", glob, root).stdout
    assert healthy_run in text and "checkpoints in" in text.splitlines()[-1]


@pytest.mark.parametrize("key, field, reverse", [("size", "size_bytes", True),
                                                 ("reclaimable", "reclaimable_bytes", True),
                                                 ("step", "step", False)])
def test_sort_orders_checkpoints_within_runs_and_the_runs(whole, key, field, reverse):
    root, full = whole
    _, doc = audit_json("--sort", key, root)
    assert sorted(c["path"] for c in doc["checkpoints"]) == sorted(c["path"] for c in full["checkpoints"])
    by_run: dict[str, list] = {}
    for c in doc["checkpoints"]:
        by_run.setdefault((c["root"], c["run"]), []).append(c)
    for cs in by_run.values():
        values = [c[field] for c in cs if c[field] is not None]
        assert values == sorted(values, reverse=reverse)
    if key != "step":
        totals = [sum(c[field] for c in cs) for cs in by_run.values()]
        assert totals == sorted(totals, reverse=True)
    else:   # the runs keep the scan's order
        assert list(by_run) == list(dict.fromkeys((c["root"], c["run"]) for c in full["checkpoints"]))


def test_sort_age_puts_the_oldest_first(whole, tmp_path):
    root, full = whole
    run = next(r for r in dict.fromkeys(c["run"] for c in full["checkpoints"])
               if sum(c["run"] == r and c["step"] is not None for c in full["checkpoints"]) >= 3)
    shutil.copytree(root / run, tmp_path / "run", symlinks=True)
    _, doc = audit_json("--sort", "step", tmp_path / "run")
    paths = [c["path"] for c in doc["checkpoints"]]
    old = time.time() - 10 * 86400
    for i, path in enumerate(reversed(paths)):   # the highest step the oldest
        for dirpath, dirnames, filenames in os.walk(tmp_path / "run" / path):
            for name in dirnames + filenames:
                os.utime(os.path.join(dirpath, name), (old + i * 3600,) * 2, follow_symlinks=False)
    _, doc = audit_json("--sort", "age", tmp_path / "run")
    assert [c["path"] for c in doc["checkpoints"]] == paths[::-1]
    text = audit("--sort", "age", tmp_path / "run").stdout
    rows = [line.split()[0] for line in text.splitlines() if line.startswith("  checkpoint")]
    assert rows == [os.path.basename(p) for p in paths[::-1]]


def test_quiet_names_every_status_count(whole):
    root, full = whole
    result = audit("-q", root)
    assert len(result.stdout.splitlines()) == 1
    line = result.stdout.strip()
    counts = full["totals"]["by_status"]
    for status in STATUSES:
        assert f"{counts[status]} {status.replace('-', ' ')}" in line, (status, line)
    assert counts["healthy"] > 0
    # of what is shown, zeros included
    line = audit("-q", "--status", "legacy", root).stdout.strip()
    assert f"{counts['legacy']} legacy" in line and "0 healthy" in line and "0 broken" in line


def test_the_table_without_quiet_keeps_its_footer(whole):
    root, full = whole
    last = audit(root).stdout.splitlines()[-1]
    assert "healthy" not in last and f"{full['totals']['by_status']['broken']} broken" in last


def test_colour_on_a_terminal_only_the_status_cell_and_aligned(whole):
    root, full = whole
    plain = audit(root, color=True, env={"NO_COLOR": ""}).stdout   # empty NO_COLOR: no effect
    coloured = audit(root).stdout
    assert "\x1b[" not in coloured   # off a terminal
    assert "\x1b[31mbroken\x1b[0m" in plain and "\x1b[32mhealthy" in plain
    assert "\x1b[33mlegacy" in plain
    # the escape codes are all there is in addition: the columns are where they were
    assert ESC.sub("", plain) == coloured
    for line in plain.splitlines():   # one styled cell a row: the status's, in its colour
        if "\x1b[" in line:
            assert len(ESC.findall(line)) == 2
            fg, status = re.search(r"\x1b\[(3\d)m([^\x1b]*)\x1b\[0m", line).groups()
            assert COLOURS[status.split(" ")[0]] == fg


def test_no_color_and_NO_COLOR_say_no(whole):
    root, _ = whole
    for args, env in ((("--no-color",), None), ((), {"NO_COLOR": "1"})):
        assert "\x1b[" not in audit(*args, root, color=True, env=env).stdout
    before = CliRunner().invoke(cli, ["--no-color", "audit", "--no-progress", str(root)], color=True)
    assert "\x1b[" not in before.stdout and "broken" in before.stdout
    assert "\x1b[" not in audit("--json", root, color=True).stdout


def test_colour_on_a_pseudo_terminal(whole):
    """The program itself, its stdout a pty: coloured; with NO_COLOR set: not."""
    root, full = whole
    run = next(c["run"] for c in full["checkpoints"] if c["status"] == "broken")

    def on_pty(env_extra):
        master, slave = os.openpty()
        chunks = []

        def drain():
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    return
                if not data:
                    return
                chunks.append(data)

        reader = threading.Thread(target=drain)
        reader.start()
        env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | env_extra
        proc = subprocess.run([sys.executable, "-m", "ckpt_tools.cli", "audit", "--no-progress",
                               "--run", run, str(root)], stdout=slave, stderr=subprocess.PIPE,
                              cwd=REPO, env=env, timeout=120)
        os.close(slave)
        reader.join(timeout=30)
        os.close(master)
        return proc, b"".join(chunks).decode()

    proc, out = on_pty({})
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr
    assert "\x1b[31mbroken\x1b[0m" in out
    proc, out = on_pty({"NO_COLOR": "1"})
    assert "\x1b[" not in out and "broken" in out
