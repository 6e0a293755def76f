"""Help as a new user meets it: every ``--help`` ends with examples that are real invocations,
and a mistyped command is answered with the command that was meant (issue 17, item 3)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 300
COMMAND_NAMES = ("audit", "validate", "prune", "migrate", "restore")
COMMAND_MODULES = {f"ckpt_tools.cli.{name}" for name in COMMAND_NAMES}


def run_cli(*args, cwd=REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="80")
    return subprocess.run([sys.executable, "-m", "ckpt_tools.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=HANG_GUARD_S)


def examples_of(help_text: str) -> list[list[str]]:
    """The invocations of the Examples block that ends ``help_text``, as argv lists (shell
    comments, continuation lines and a trailing redirection or pipe taken off)."""
    _, heading, block = help_text.rpartition("\n  Examples:\n")
    assert heading, f"no Examples block:\n{help_text}"
    invocations = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue   # a blank line or a comment
        assert words[0] == "ckpt-tools", f"not an invocation, after the Examples heading: {line!r}"
        ends = [i for i, w in enumerate(words) if w in {"|", ">", ">>"}]
        invocations.append(words[:ends[0]] if ends else words)
    assert invocations, f"an empty Examples block:\n{help_text}"
    return invocations


def parse_invocation(argv: list[str]) -> click.Context | None:
    """Parse ``argv`` as ``ckpt-tools`` would: every option known, every value converted and
    checked, the arguments counted; click's UsageError when not. Nothing runs."""
    from ckpt_tools.cli.group import cli
    name, args = argv[1], argv[2:]
    command = cli.get_command(click.Context(cli, info_name="ckpt-tools"), name)
    if command is None:
        raise click.UsageError(f"no such command {name!r}")
    try:
        return command.make_context(name, list(args))
    except click.exceptions.Exit as exc:   # --help: parsed, shown, done
        assert exc.exit_code == 0
        return None


# --- every --help ends with an Examples block of real invocations -------------------------------

@pytest.mark.parametrize("name", (None, *COMMAND_NAMES))
def test_every_help_ends_with_examples_that_parse(name):
    proc = run_cli(*([name] if name else []), "--help")
    assert proc.returncode == 0, proc.stderr
    examples = examples_of(proc.stdout)
    for argv in examples:
        if name:   # a command's examples are of that command
            assert argv[1] == name, argv
        parse_invocation(argv)
    if name:   # each shows more than the bare command: at least one option in use
        assert any(w.startswith("-") for argv in examples for w in argv[2:]), examples


def test_the_example_check_rejects_what_click_would_reject():
    """The check above can fail: an unknown option, a bad value, a missing argument."""
    for line in ("ckpt-tools prune --keep-lst 1 results/",
                 "ckpt-tools audit --min-age soon results/",
                 "ckpt-tools migrate results/",
                 "ckpt-tools prun --dry-run results/"):
        with pytest.raises(click.UsageError):
            parse_invocation(shlex.split(line))
    with pytest.raises(AssertionError):
        examples_of("Usage: ckpt-tools audit [OPTIONS] ROOTS...\n\nOptions:\n  --json\n")


def test_the_read_only_examples_run_on_the_fixture_tree(results_tree, capsys):
    """The examples are the tree a user builds (``python -m fixtures results``): those that only
    read, on paths the tree has, run there and finish without a usage error."""
    from ckpt_tools.cli import main
    from ckpt_tools.cli.group import cli
    root, _, _ = results_tree
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    ran = []
    cwd = os.getcwd()
    os.chdir(root.parent)
    try:
        for name in ("audit", "validate", "prune", "migrate"):
            command = cli.get_command(click.Context(cli), name)
            help_text = command.get_help(click.Context(command, info_name=name))
            for argv in examples_of("\n" + help_text):
                if name in ("prune", "migrate") and "--dry-run" not in argv:
                    continue   # these change files: parsed above, not run here
                paths = [w for w in argv[2:] if "/" in w]
                if not all(Path(p).exists() for p in paths if not p.startswith("results-")):
                    continue   # another machine's paths (/shared/results, /models/...)
                rc = main(argv[1:])
                err = capsys.readouterr().err
                assert rc in (0, 1), (argv, rc, err)
                ran.append(argv[1])
    finally:
        os.chdir(cwd)
    assert set(ran) == {"audit", "validate", "prune", "migrate"}, ran
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert not (root.parent / "results-peft").exists()


# --- unknown commands get the command that was meant --------------------------------------------

@pytest.mark.parametrize("typed, meant", [("prun", "prune"), ("adit", "audit"),
                                          ("migrat", "migrate"), ("restor", "restore"),
                                          ("valdiate", "validate"), ("val", "validate"),
                                          ("PRUNE", "prune")])
def test_a_mistyped_command_exits_2_naming_the_command_meant(typed, meant):
    proc = run_cli(typed, "results/")
    assert proc.returncode == 2, proc.stderr
    assert f"No such command '{typed}'. Did you mean '{meant}'?" in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_a_command_like_no_other_gets_no_guess():
    proc = run_cli("xyzzy")
    assert proc.returncode == 2
    assert "No such command 'xyzzy'." in proc.stderr and "Did you mean" not in proc.stderr


def test_a_prefix_of_several_commands_names_them_all():
    from ckpt_tools.cli.group import COMMANDS, closest_commands
    assert closest_commands("re", sorted(COMMANDS)) == ["restore"]
    assert closest_commands("", ["audit", "prune"]) == []
    assert closest_commands("p", ["prune", "purge"]) == ["prune", "purge"]


def test_an_unknown_option_is_still_an_unknown_option():
    proc = run_cli("--jsn", "audit", "results/")
    assert proc.returncode == 2
    assert "No such option '--jsn'" in proc.stderr and "No such command" not in proc.stderr


# --- and all of it costs --help nothing ---------------------------------------------------------

def _modules_after(*args) -> tuple[int, set[str]]:
    code = textwrap.dedent("""
        import contextlib, io, json, sys
        from ckpt_tools.cli import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = main(sys.argv[1:])
        print(json.dumps({"rc": rc, "modules": sorted(sys.modules)}))
    """)
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=REPO, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.splitlines()[-1])
    return doc["rc"], set(doc["modules"])


@pytest.mark.parametrize("args, code", [(["--help"], 0), (["prun"], 2), (["adit", "x"], 2)])
def test_help_and_a_mistyped_command_import_no_command_module(args, code):
    rc, modules = _modules_after(*args)
    assert rc == code
    assert not modules & COMMAND_MODULES, sorted(modules & COMMAND_MODULES)
    assert "torch" not in modules
    if args == ["--help"]:   # the suggestion's difflib is loaded only when one is needed
        assert "difflib" not in modules
