"""`make demo` tells one consistent story (issue 17): fixtures/demo.py, its checks and its next steps."""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from ckpt_tools.report import size_str
from fixtures.demo import PROG, Story, Trees, _clear, beside, main, tell, untold

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "ckpt_tools.cli"]


def trees_of(results_tree, ordinary_runs, migrated: Path, **changes) -> Trees:
    root, manifest, _ = results_tree
    ordinary_root, ordinary = ordinary_runs
    counts = dict(sorted(Counter(e.status.value for e in ordinary.values()).items()))
    fields = dict(dylora=root, manifest=manifest, ordinary=ordinary_root, ordinary_counts=counts, migrated=migrated)
    return Trees(**(fields | changes))


def test_the_story_holds_and_ends_with_next_steps_from_what_the_commands_reported(
        results_tree, ordinary_runs, tmp_path, capfd):
    """The real CLI on the built trees (migrate left out): every step shown, each non-zero exit
    said in words, the checks hold, and the next steps carry the figures of this tree, this user."""
    root, manifest, _ = results_tree
    trees = trees_of(results_tree, ordinary_runs, tmp_path / "migrated")
    assert tell(trees, Story(CLI, sys.stdout, sys.stderr), migrate=False) == 0
    out, err = capfd.readouterr()
    assert PROG not in err, err
    assert [line for line in out.splitlines() if line.startswith("$ ")] == [
        f"$ ckpt-tools audit {root}", f"$ ckpt-tools prune --dry-run {root}",
        f"$ ckpt-tools audit --min-age 0 {trees.ordinary}",
        f"$ ckpt-tools prune --dry-run --min-age 0 --keep-last 1 --strip {trees.ordinary}"]
    assert out.count("exit 1: audit found broken checkpoints") == 2

    # figures worked out from the manifest, not from the commands: what prune frees here, as this user
    euid = os.geteuid()
    prunable = [e for e in manifest.values() if e.status_for(euid) == "redundant" and "young" not in e.flags]
    legacy = [e for e in manifest.values() if e.status_for(euid) == "legacy"]
    allocated = sum((root / f).lstat().st_blocks * 512 for e in prunable for f in e.merged_files)
    steps = out.split("\nNext steps\n", 1)[1]
    assert (f"prune would free {size_str(allocated)} from {len(prunable)} redundant "
            f"checkpoints:\n    ckpt-tools prune --yes {root}\n") in steps
    assert f"  {len(legacy)} legacy checkpoints to migrate" in steps
    assert f"--base-model {root}-outside/base-models/llama --rank 4 {root} {trees.migrated}\n" in steps
    # the retention figure is the one prune printed for the same policy
    stripped = re.search(r"A real run would also free (.+) by retention now\.", out).group(1)
    assert (f"would free {stripped}:\n    ckpt-tools prune --min-age 0 --keep-last 1 --strip --yes "
            f"{trees.ordinary}") in steps
    assert f"ckpt-tools validate --deep {root}/deep-only/nan-or-inf/checkpoint-100\n" in steps
    assert "docs/retention.md" in steps.splitlines()[-1]


def test_counts_that_disagree_are_one_clear_line():
    announced = {"broken": 15, "redundant": 6, "healthy": 7}
    audit = {"totals": {"by_status": {"healthy": 7, "redundant": 7, "legacy": 0, "broken": 14}}}
    assert untold("demo-tree", announced, audit) == [
        "demo-tree: the builder announced 15 broken, 7 healthy, 6 redundant, "
        "but audit found 14 broken, 7 healthy, 7 redundant"]
    assert untold("demo-tree", {"broken": 14, "healthy": 7, "redundant": 7}, audit) == []


FAKE_CLI = """\
import json, sys
args = sys.argv[1:]
if "--json" in args:
    print(json.dumps({"totals": {"by_status": BY_STATUS, "reclaimable_bytes": 0},
                      "freed_bytes": 0, "deleted": [], "retention": {"frees_bytes_now": 0}}))
else:
    print("(output of", " ".join(args[:2]) + ")")
    sys.exit(EXIT)
"""


def fake_cli(tmp_path: Path, by_status: dict, exit_code: int) -> list[str]:
    script = tmp_path / "fake_ckpt_tools.py"
    script.write_text(FAKE_CLI.replace("BY_STATUS", repr(by_status)).replace("EXIT", str(exit_code)))
    return [sys.executable, str(script)]


def test_a_story_that_does_not_hold_exits_1_saying_where(results_tree, ordinary_runs, tmp_path, capfd):
    """The builders announced what audit (here a stand-in reporting one healthy tree) did not find."""
    root, _, _ = results_tree
    trees = trees_of(results_tree, ordinary_runs, tmp_path / "migrated")
    cli = fake_cli(tmp_path, {"healthy": 3}, exit_code=0)
    assert tell(trees, Story(cli, sys.stdout, sys.stderr), migrate=False) == 1
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert [line.split(": ")[1] for line in lines] == ["the story does not hold"] * 2
    assert lines[0].startswith(f"{PROG}: the story does not hold: {root}: the builder announced ")
    assert lines[0].endswith("but audit found 3 healthy")
    assert lines[1].startswith(f"{PROG}: the story does not hold: {trees.ordinary}: the builder announced ")
    assert "Next steps" in out   # told to the end all the same


def test_a_step_exiting_as_the_story_does_not_expect_fails_it(results_tree, ordinary_runs, tmp_path, capfd):
    root, manifest, _ = results_tree
    counts = dict(Counter(e.status_for(os.geteuid()) for e in manifest.values()))
    trees = trees_of(results_tree, ordinary_runs, tmp_path / "migrated", ordinary_counts=counts)
    cli = fake_cli(tmp_path, counts, exit_code=2)   # every step a usage error: none of them expected
    assert tell(trees, Story(cli, sys.stdout, sys.stderr), migrate=False) == 1
    err = capfd.readouterr().err
    assert f"{PROG}: ckpt-tools audit {root}: exit 2, which this story does not expect\n" in err
    assert f"{PROG}: ckpt-tools prune --dry-run {root}: exit 2, which this story does not expect\n" in err
    assert "the story does not hold" not in err    # the counts agree: only the exits are wrong


def test_an_earlier_demo_is_replaced_only_when_asked(tmp_path, capsys):
    dest = tmp_path / "demo-tree"
    for path in beside(dest).values():
        path.mkdir()
        (path / "left-over").write_text("x")
    neighbour = tmp_path / "demo-tree-mine"
    neighbour.mkdir()
    assert main([str(dest)]) == 2
    assert capsys.readouterr().err == (f"{PROG}: error: {dest}: exists; --replace removes it "
                                       "(and the rest of an earlier demo)\n")
    assert all((path / "left-over").exists() for path in beside(dest).values())
    assert _clear(dest, replace=True) is None
    assert not any(path.exists() for path in beside(dest).values())
    assert neighbour.is_dir()
    (tmp_path / "demo-tree-ordinary").write_text("a file, not an earlier demo")
    assert _clear(dest, replace=True) == f"{tmp_path}/demo-tree-ordinary: exists and is not a directory"
    assert (tmp_path / "demo-tree-ordinary").is_file()


def _recipe(target: str) -> list[str]:
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line[1:])
    return recipe


def test_the_makefile_demo_runs_the_story_and_ignores_no_error():
    recipe = _recipe("demo")
    assert recipe and any("-m fixtures.demo" in line for line in recipe)
    # make's prefixes @, + and - may come in any order: - would ignore a failed story
    assert not [line for line in recipe if "-" in re.match(r"[@+\-\s]*", line).group()], recipe


def test_make_clean_removes_every_directory_the_demo_writes():
    clean = " ".join(_recipe("clean")).split()
    suffixes = {p.name.removeprefix("D") for p in beside(Path("D")).values()}
    assert {f"$(DEMO){s}" for s in suffixes} <= set(clean), clean
