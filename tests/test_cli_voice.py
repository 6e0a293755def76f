"""One voice on stderr, the exit codes of the README's table, and a closed stdout (``| head``).

Through real processes where the pipe matters: a closed stdout must stop ``prune`` at a
checkpoint boundary, never between two unlinks of one checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fixtures.copying import copy_tree

import ckpt_tools.cli.prune as cli_prune
from ckpt_tools.cli import cli
from ckpt_tools.cli.exits import ExitCode

REPO = Path(__file__).resolve().parents[1]
COPIES = 40   # run_trainer holds two redundant checkpoints: 80 of them in all


def cli_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "ckpt_tools.cli", *map(str, args)]


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(cli_cmd(*args), capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.fixture
def many_redundant(results_tree, tmp_path) -> Path:
    """A root of COPIES copies of the Trainer run (mtimes kept: all old enough to prune)."""
    src, _, _ = results_tree
    root = copy_tree(src, tmp_path / "results", only=("run_trainer",))
    for i in range(1, COPIES):
        shutil.copytree(root / "run_trainer", root / f"run_trainer_{i:02d}", symlinks=True)
    return root


def merged_state(root: Path) -> dict[str, set[str]]:
    """checkpoint → the merged-weight files it still holds, for every checkpoint that had any."""
    state: dict[str, set[str]] = {}
    for ckpt in sorted(root.glob("run_trainer*/checkpoint-*")):
        state[str(ckpt.relative_to(root))] = {p.name for p in ckpt.iterdir()
                                              if p.name.startswith(("model", "pytorch_model"))}
    return state


def assert_none_half_done(before: dict[str, set[str]], after: dict[str, set[str]]) -> int:
    """Each checkpoint kept all its merged files or lost all of them; the number pruned."""
    pruned = 0
    for ckpt, files in before.items():
        assert after[ckpt] in (files, set()), f"{ckpt} half pruned: {files} -> {after[ckpt]}"
        pruned += bool(files) and not after[ckpt]
    return pruned


# --- a closed stdout ---------------------------------------------------------------------------

def test_prune_into_a_closed_pipe_starts_no_checkpoint_and_says_why(many_redundant, tmp_path):
    root = many_redundant
    before = merged_state(root)
    log = tmp_path / "prune.jsonl"
    read_end, write_end = os.pipe()
    os.close(read_end)   # the reader is gone before the run begins
    try:
        proc = subprocess.run(cli_cmd("prune", "--yes", "--no-progress", "--log", log, root),
                              stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              timeout=300)
    finally:
        os.close(write_end)
    assert proc.returncode == ExitCode.STDOUT_CLOSED == 141, proc.stderr
    assert merged_state(root) == before   # nothing deleted: stopped before the first checkpoint
    lines = proc.stderr.strip().splitlines()
    assert lines == [l for l in lines if l.startswith("ckpt-tools: error: ")], proc.stderr
    assert "stdout was closed" in proc.stderr and "not deleted" in proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    records = [json.loads(l) for l in log.read_text().splitlines()]
    assert any("stdout was closed" in r.get("reason", "") for r in records)
    assert records[-1].get("exit_code") == 141, records[-1]


def test_prune_piped_into_head_leaves_no_checkpoint_half_pruned(many_redundant, tmp_path):
    root = many_redundant
    before = merged_state(root)
    proc = subprocess.Popen(cli_cmd("prune", "--yes", "--no-progress", "-v", root),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    first = proc.stdout.readline()   # as `| head -1` does, then goes away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=300)
    assert first
    assert code == 141, err
    assert "ckpt-tools: error: <stdout>: stdout was closed" in err
    assert "Traceback" not in err and "Exception ignored" not in err
    pruned = assert_none_half_done(before, merged_state(root))
    if pruned < len([f for f in before.values() if f]):   # stopped early: it says how much is left
        assert "not deleted" in err


def test_audit_into_a_closed_pipe_exits_141_without_a_traceback(results_tree, tmp_path):
    src, _, _ = results_tree
    # a clean tree exits 141 (its report was cut short); the whole fixture tree keeps 1, as
    # problems found still matter more to cron than a report cut short
    clean = copy_tree(src, tmp_path / "results", only=("run_trainer",))
    for root, want in ((clean, 141), (src, 1)):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            proc = subprocess.run(cli_cmd("audit", "--min-age", "0", root), stdout=write_end,
                                  stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=300)
        finally:
            os.close(write_end)
        assert proc.returncode == want, proc.stderr
        assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr


# --- the prompt --------------------------------------------------------------------------------

def test_no_at_the_prompt_does_nothing_and_exits_0(results_tree, tmp_path, monkeypatch):
    src, _, _ = results_tree
    root = copy_tree(src, tmp_path / "results", only=("run_trainer",))
    before = merged_state(root)
    monkeypatch.setattr(cli_prune, "_stdin_is_terminal", lambda: True)
    res = CliRunner().invoke(cli, ["prune", "--no-progress", str(root)], input="n\n")
    assert res.exit_code == 0, res.output
    assert "Nothing deleted." in res.output
    assert merged_state(root) == before


# --- one voice, and each exit code of the table --------------------------------------------------

def test_a_usage_error_speaks_in_the_programs_voice(tmp_path):
    proc = run_cli("audit", "--no-such-option", tmp_path)
    assert proc.returncode == ExitCode.USAGE == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("ckpt-tools: error: ") and "--no-such-option" in lines[0]
    assert lines[1:] == ["Try 'ckpt-tools audit --help' for help."]
    assert "Error:" not in proc.stderr and "Usage:" not in proc.stderr


def test_a_missing_path_names_the_path_in_the_programs_voice(tmp_path):
    missing = tmp_path / "nowhere"
    proc = run_cli("prune", "--yes", missing)
    assert proc.returncode == 2
    first = proc.stderr.strip().splitlines()[0]
    assert first.startswith("ckpt-tools: error: ") and str(missing) in first
    assert "Error:" not in proc.stderr


def _exit_0_nothing_wrong(results_tree, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    return run_cli("audit", empty)


def _exit_1_problems_found(results_tree, tmp_path):
    src, _, _ = results_tree
    return run_cli("audit", copy_tree(src, tmp_path / "results", only=("broken/truncated",)))


def _exit_2_usage_error(results_tree, tmp_path):
    return run_cli("audit", "--no-such-option", tmp_path)


def _exit_75_lock_held(results_tree, tmp_path):
    src, _, _ = results_tree
    root = copy_tree(src, tmp_path / "results", only=("run_trainer",))
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time\n"
         "f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True)\n"
         "time.sleep(60)", str(root / ".ckpt-tools.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_cli("prune", "--yes", root)
    finally:
        holder.kill()
        holder.wait()
    assert proc.stderr.startswith("ckpt-tools: ")
    return proc


def _exit_130_ctrl_c(results_tree, tmp_path):
    from terminal import CTRL_C, run_in_terminal
    src, _, _ = results_tree
    root = copy_tree(src, tmp_path / "results", only=("run_trainer",))
    seen = run_in_terminal("prune", "--no-progress", root, answers=(("[y/N]", CTRL_C),))
    return subprocess.CompletedProcess([], seen.returncode, "", seen.screen)


def _exit_141_stdout_closed(results_tree, tmp_path):
    src, _, _ = results_tree
    clean = copy_tree(src, tmp_path / "results", only=("run_trainer",))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(cli_cmd("audit", "--min-age", "0", clean), stdout=write_end,
                              stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=300)
    finally:
        os.close(write_end)


# one scenario a code of the README's table, as a user meets it
EXIT_SCENARIOS = {0: _exit_0_nothing_wrong, 1: _exit_1_problems_found, 2: _exit_2_usage_error,
                  75: _exit_75_lock_held, 130: _exit_130_ctrl_c, 141: _exit_141_stdout_closed}


@pytest.mark.parametrize("code", sorted(EXIT_SCENARIOS))
def test_each_documented_exit_code(code, results_tree, tmp_path):
    proc = EXIT_SCENARIOS[code](results_tree, tmp_path)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr


def _readme_exit_codes() -> list[int]:
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| code | meaning |"):]
    table = table[:table.index("\n\n")]
    return [int(row.split("|")[1]) for row in table.splitlines()[2:]]


def test_the_readme_documents_every_exit_code_once_and_each_is_tested():
    codes = _readme_exit_codes()
    assert codes == sorted(codes) and set(codes) == {int(c) for c in ExitCode} == set(EXIT_SCENARIOS)


# --- the library's arguments, in the command line's words -----------------------------------------

def test_every_flag_the_cli_spells_an_argument_with_is_an_option_of_a_command():
    import click

    from ckpt_tools.cli.exits import FLAGS
    ctx = click.Context(cli)
    options = {opt for name in cli.list_commands(ctx)
               for p in cli.get_command(ctx, name).params for opt in p.opts}
    wildcard = {flag for flag in FLAGS.values() if flag.endswith("*")}
    assert set(FLAGS.values()) - wildcard <= options
    for flag in wildcard:
        assert any(o.startswith(flag[:-1]) for o in options), flag


def test_a_usage_error_raised_by_the_library_reaches_the_user_with_flags(results_tree, tmp_path):
    src, _, _ = results_tree
    root = copy_tree(src, tmp_path / "results", only=("run_trainer",))
    proc = run_cli("prune", "--yes", "--strip", root)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["ckpt-tools: error: --strip needs a rule: give "
                                        "--keep-last, --keep-best, --keep-every or --keep-within"]


def test_a_migrate_failure_names_its_flags_in_text_and_json(results_tree, tmp_path):
    src, _, _ = results_tree
    one = copy_tree(src, tmp_path / "src", only=("run_best/checkpoint-100",))
    want = "--verify needs --base-model here"
    # in this process: torch and PEFT are imported once, not by two new processes
    text = CliRunner().invoke(cli, ["migrate", "--verify", "--no-progress", "--min-age", "0",
                                    str(one), str(tmp_path / "dst-text")])
    assert text.exit_code == 1 and f"run_best/checkpoint-100: {want}" in text.stdout, text.output
    doc = CliRunner().invoke(cli, ["migrate", "--verify", "--json", "--no-progress", "--min-age",
                                   "0", str(one), str(tmp_path / "dst-json")])
    (failed,) = json.loads(doc.stdout)["failed"]
    assert failed["reason"].startswith(want)


# --- every warning shows its message ---------------------------------------------------------------

def test_a_warning_is_shown_with_its_message_without_v(results_tree, tmp_path):
    src, _, _ = results_tree
    root = copy_tree(src, tmp_path / "results", only=("hybrid_v2",))   # bad-config: a warning
    line = "warning: hybrid_v2/checkpoint-100/peft_adapters: bad-config: expert_<i>.pt files"
    audit = run_cli("audit", "--no-progress", "--min-age", "0", root)
    assert line in audit.stdout, audit.stdout
    assert "bad-config (warning)" in audit.stdout   # the table's cell, the line below it
    validate = run_cli("validate", "--min-age", "0", root / "hybrid_v2/checkpoint-100")
    assert f"warning: {root}/hybrid_v2/checkpoint-100/peft_adapters: bad-config: expert_" \
        in validate.stdout, validate.stdout
    prune = run_cli("prune", "--dry-run", "--no-progress", "-v", "--min-age", "0", root)
    for proc in (audit, validate, prune):   # a code is never shown bare, without its message
        for shown in (proc.stdout + proc.stderr).splitlines():
            if "bad-config" in shown and "(warning)" not in shown:
                assert ": bad-config: expert_<i>.pt files" in shown, shown
    quiet = run_cli("audit", "-q", "--min-age", "0", root)
    assert quiet.stdout.count("\n") == 1 and "warning" not in quiet.stdout, quiet.stdout
