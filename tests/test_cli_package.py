"""The command line's own seams: lazy commands, one exit-code mapping, the context object,
and migrate's dry-run document being the plan's own ``to_dict``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest

from fixtures.copying import copy_tree

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 300


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt_tools.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=HANG_GUARD_S)


def modules_after(*args) -> tuple[int, set[str]]:
    """Run ``main(args)`` in a fresh interpreter: its exit code and every module imported."""
    code = textwrap.dedent("""
        import contextlib, io, json, sys
        from ckpt_tools.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(sys.argv[1:])
        print(json.dumps({"rc": rc, "modules": sorted(sys.modules)}))
    """)
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.splitlines()[-1])
    return doc["rc"], set(doc["modules"])


# --- lazy commands --------------------------------------------------------------------------

def test_help_lists_every_command_without_importing_any():
    rc, modules = modules_after("--help")
    assert rc == 0
    loaded = {m for m in modules if m.startswith("ckpt_tools.")}
    assert not loaded & {"ckpt_tools.cli.audit", "ckpt_tools.cli.validate", "ckpt_tools.cli.prune",
                         "ckpt_tools.cli.migrate", "ckpt_tools.api", "ckpt_tools.validator",
                         "ckpt_tools.records", "ckpt_tools.formats.torchsave"}, sorted(loaded)
    out = run_cli("--help").stdout
    for name in ("audit", "validate", "prune", "migrate"):
        assert f"\n  {name} " in out, out


def test_the_summaries_in_the_command_table_are_the_commands_own():
    """--help shows the table's summaries; each must be its command's first help paragraph."""
    from ckpt_tools.cli.group import COMMANDS, cli
    ctx = click.Context(cli)
    for name, (_, summary) in COMMANDS.items():
        command = cli.get_command(ctx, name)
        assert command is not None and command.name == name
        assert command.help.split("\n\n")[0].split() == summary.split(), name


def test_an_audit_of_an_empty_directory_imports_no_validator_and_no_torch(tmp_path):
    rc, modules = modules_after("audit", tmp_path)
    assert rc == 0
    assert not modules & {"ckpt_tools.validator", "ckpt_tools.formats.torchsave",
                          "ckpt_tools.formats.safetensors_header", "torch", "transformers",
                          "peft"}


# --- one mapping of failures to exit codes ----------------------------------------------------

def _library_errors():
    from ckpt_tools.migrate import MigrateError
    from ckpt_tools.locking import LockError, LockHeld
    from ckpt_tools.prune import LogOpenError, LogWriteError
    from ckpt_tools.scanner import ScanError
    return [(ScanError("r: no such file or directory"), 2),
            (MigrateError("DST d lies inside SRC s"), 2),
            (LockError("cannot open the lock file"), 2),
            (LogOpenError("cannot open log: not a regular file"), 2),
            (LogWriteError("log.jsonl", "No space left on device"), 1),
            (LockHeld("/r/.ckpt-tools.lock", 0), 75),
            (ValueError("a bug"), 1),
            (click.UsageError("bad option"), 2),
            (click.exceptions.Abort(), 130),
            (KeyboardInterrupt(), 130)]


@pytest.mark.parametrize("index", range(10))
def test_every_failure_gets_one_line_and_the_documented_code(index, capsys):
    from ckpt_tools.cli.exits import handle
    exc, code = _library_errors()[index]
    assert handle(exc) == code
    err = capsys.readouterr().err
    if not isinstance(exc, click.UsageError):   # click's own: usage and a hint besides
        assert err.count("\n") == 1 and err.startswith("ckpt-tools: "), err


def test_each_library_error_is_one_of_the_kinds_the_exit_codes_tell_apart():
    from ckpt_tools import errors
    for exc, code in _library_errors()[:6]:
        assert isinstance(exc, errors.CkptToolsError), type(exc)
        assert type(exc).exit_code == code, type(exc)


def test_the_code_comes_from_the_kind_not_from_the_class_name_or_module(capsys):
    """A new exception anywhere gets its code by deriving from a kind in ckpt_tools.errors."""
    from ckpt_tools import errors
    from ckpt_tools.cli.exits import handle

    class SomeNewRefusal(errors.UsageError):
        pass

    class SomeNewWait(errors.TryAgain):
        pass

    assert handle(SomeNewRefusal("x: not a directory")) == 2
    assert capsys.readouterr().err == "ckpt-tools: error: x: not a directory\n"
    assert handle(SomeNewWait("the lock l is held")) == 75
    assert capsys.readouterr().err.endswith("; nothing done. Try again later or raise "
                                            "--lock-timeout.\n")


def test_the_error_kinds_import_nothing():
    """cli/exits.py imports ckpt_tools.errors at start-up: it must stay free of imports."""
    import ast
    import ckpt_tools.errors
    tree = ast.parse(Path(ckpt_tools.errors.__file__).read_text(encoding="utf-8"))
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def _held_dst_lock(dst: Path):
    from ckpt_tools.locking import root_lock
    dst.mkdir(parents=True, exist_ok=True)
    return root_lock([str(dst)], 0)


def test_a_held_lock_exits_75_in_prune_and_in_migrate_with_the_same_line(results_tree, tmp_path):
    root, _, _ = results_tree
    src = copy_tree(root / "run_trainer", tmp_path / "src" / "run_trainer").parent
    dst = tmp_path / "dst"
    with _held_dst_lock(dst), _held_dst_lock(src):
        migrate = run_cli("migrate", "--min-age", "0", src, dst)
        prune = run_cli("prune", "--yes", "--min-age", "0", src)
    for proc in (migrate, prune):
        assert proc.returncode == 75, proc.stderr
        assert proc.stderr.count("\n") == 1
        assert proc.stderr.startswith("ckpt-tools: another ckpt-tools run holds ")
        assert proc.stderr.endswith("; nothing done. Try again later or raise --lock-timeout.\n")
    assert not any(dst.glob("run_trainer*"))   # migrate wrote nothing


# --- the context object ------------------------------------------------------------------------

def test_prune_and_migrate_get_the_callers_file_operations_through_the_context(
        results_tree, tmp_path, monkeypatch):
    from ckpt_tools import migrate
    from ckpt_tools.cli import CliContext, cli
    from ckpt_tools.cli import prune as prune_command
    root, _, _ = results_tree
    src = copy_tree(root / "run_trainer", tmp_path / "src" / "run_trainer").parent
    seen = {}

    def stop(name):
        def execute(plan, **kwargs):
            seen[name] = kwargs.get("fs", "not given")
            raise RuntimeError("stopped before doing anything")
        return execute

    monkeypatch.setattr(prune_command, "execute_prune", stop("prune"))
    monkeypatch.setattr(migrate, "execute_migrate", stop("migrate"))   # imported when run
    fs = object()
    for args in (["prune", "--yes", "--min-age", "0", str(src)],
                 ["migrate", "--min-age", "0", str(src), str(tmp_path / "dst")]):
        assert cli.main(args, obj=CliContext(fs=fs), standalone_mode=False) == 1
    assert seen == {"prune": fs, "migrate": fs}
    # without one, the group makes its own: fs=None, the local file system
    seen.clear()
    assert cli.main(["prune", "--yes", "--min-age", "0", str(src)], standalone_mode=False) == 1
    assert seen == {"prune": None}


def test_global_verbose_reaches_the_handler_after_the_command_name(tmp_path, monkeypatch, capfd):
    """-v given after the command still earns the traceback: no scan of argv needed."""
    from ckpt_tools import api
    from ckpt_tools.cli import main

    def scan(*roots, **_):
        raise ValueError("boom")

    monkeypatch.setattr(api, "scan", scan)
    assert main(["audit", str(tmp_path), "-v"]) == 1
    err = capfd.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("ValueError: boom")


# --- migrate --dry-run --json -----------------------------------------------------------------

def test_migrate_dry_run_json_is_the_plans_to_dict(results_tree, tmp_path):
    from ckpt_tools.migrate import MigrateOptions, MigratePlan, plan_migrate
    from ckpt_tools.report import dumps
    root, _, _ = results_tree
    src = copy_tree(root / "legacy_v1", tmp_path / "src" / "legacy_v1").parent
    copy_tree(root / "broken", src / "broken")
    dst = tmp_path / "dst"
    proc = run_cli("migrate", "--dry-run", "--json", "--min-age", "0", src, dst)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    plan = plan_migrate(str(src), str(dst), MigrateOptions(min_age_s=0))
    assert doc == json.loads(dumps(plan.to_dict()))
    assert doc["dry_run"] is True and doc["planned"] and doc["skipped"]   # docs/migrate.md
    assert doc["migrated"] == [] and doc["failed"] == []
    assert MigratePlan.from_dict(doc) == plan
    assert not dst.exists()
