"""What a user sees on a real terminal: colour, the prune question, progress bars.

Each test runs the real ``ckpt-tools`` on a pseudo-terminal (``terminal.run_in_terminal``) over
a small private tree, and asserts on the screen, the exit code and the files left on disk.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from fixtures.copying import copy_tree
from terminal import CTRL_C, REPO, run_in_terminal, terminal_env

from ckpt_tools.report import STATUS_COLORS

SGR = re.compile(r"\x1b\[[0-9;]*m")
ANY_ESCAPE = "\x1b"
QUESTION = "[y/N]"
# click.style's foreground codes
FG = {"red": 31, "green": 32, "yellow": 33, "cyan": 36}


def merged_files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.name.startswith(("model", "pytorch_model")) and p.is_file()}


@pytest.fixture
def broken_and_healthy(results_tree, tmp_path):
    src, _, _ = results_tree
    return copy_tree(src, tmp_path / "results", only=("broken/truncated", "seed_v4"))


@pytest.fixture
def redundant_run(results_tree, tmp_path):
    """run_trainer: two redundant checkpoints, old enough to prune (3+ merged files)."""
    src, _, _ = results_tree
    root = copy_tree(src, tmp_path / "results", only=("run_trainer",))
    assert len(merged_files(root)) >= 2
    return root


def styled(screen: str, word: str) -> set[int]:
    """The SGR foreground codes that ``word`` is shown in on ``screen``."""
    return {int(m.group(1)) for m in re.finditer(r"\x1b\[(\d+)m\s*" + re.escape(word), screen)}


# --- (a) colour ---------------------------------------------------------------------------------

def test_audit_colours_each_status_cell_on_a_terminal(broken_and_healthy):
    seen = run_in_terminal("audit", "--no-progress", "--min-age", "0", broken_and_healthy)
    assert seen.returncode == 1, seen.screen   # a broken checkpoint
    assert styled(seen.screen, "broken") == {FG[STATUS_COLORS["broken"]]}
    assert styled(seen.screen, "healthy") == {FG[STATUS_COLORS["healthy"]]}
    # only the STATUS cells are styled: the rest of each row is plain text
    plain = SGR.sub("", seen.screen)
    assert "broken" in plain and "healthy" in plain
    assert len(SGR.findall(seen.screen)) == 4   # one style and one reset per checkpoint row


@pytest.mark.parametrize("how", ["--no-color", "NO_COLOR=1"])
def test_no_color_removes_every_escape(broken_and_healthy, how):
    flag = [how] if how.startswith("--") else []
    env = terminal_env(NO_COLOR="1") if not flag else terminal_env()
    seen = run_in_terminal("audit", *flag, "--no-progress", "--min-age", "0", broken_and_healthy,
                           env=env)
    assert seen.returncode == 1
    assert "broken" in seen.screen and "healthy" in seen.screen
    assert ANY_ESCAPE not in seen.screen, repr(seen.screen)


# --- (b) the question ----------------------------------------------------------------------------

def test_prune_asks_and_no_deletes_nothing(redundant_run):
    before = merged_files(redundant_run)
    seen = run_in_terminal("prune", "--no-progress", redundant_run, answers=((QUESTION, b"n\n"),))
    assert seen.returncode == 0, seen.screen
    assert QUESTION in seen.screen and "Nothing deleted." in seen.screen
    assert merged_files(redundant_run) == before


def test_prune_asks_and_yes_deletes(redundant_run):
    seen = run_in_terminal("prune", "--no-progress", redundant_run, answers=((QUESTION, b"y\n"),))
    assert seen.returncode == 0, seen.screen
    assert merged_files(redundant_run) == set()
    assert re.search(r"Deleted \d+ files?, freed", seen.screen), seen.screen


def test_ctrl_c_at_the_question_is_exit_130_and_deletes_nothing(redundant_run):
    before = merged_files(redundant_run)
    seen = run_in_terminal("prune", "--no-progress", redundant_run, answers=((QUESTION, CTRL_C),))
    assert seen.returncode == 130, seen.screen
    assert "ckpt-tools: interrupted" in seen.screen and "Traceback" not in seen.screen
    assert merged_files(redundant_run) == before


# --- (c) progress bars ----------------------------------------------------------------------------

def test_the_deletion_bar_counts_files_on_the_terminal_and_is_absent_off_it(redundant_run,
                                                                            results_tree,
                                                                            tmp_path):
    n = len(merged_files(redundant_run))
    seen = run_in_terminal("prune", "--yes", redundant_run)
    assert seen.returncode == 0, seen.screen
    assert merged_files(redundant_run) == set()
    assert re.search(rf"deleting:.*\d+/{n} .*(file/s|s/file)", seen.screen), seen.screen
    assert re.search(r"validating:.*(checkpoint/s|s/checkpoint)", seen.screen), seen.screen
    assert "ckpt/s" not in seen.screen and "s/ckpt" not in seen.screen
    # the same run with stdout and stderr on pipes: no bar at all
    src, _, _ = results_tree
    again = copy_tree(src, tmp_path / "piped", only=("run_trainer",))
    proc = subprocess.run([sys.executable, "-m", "ckpt_tools.cli", "prune", "--yes", again],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=terminal_env(), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert merged_files(again) == set()
    assert "file/s" not in proc.stderr and "\r" not in proc.stderr and "%|" not in proc.stderr
